"""Device keys that never leave a PKCS#11 token: a TPM 2.0, a secure element, an HSM.

:class:`Pkcs11Signer` signs with a P-256 private key that the token holds as
sensitive and non-extractable: whoever copies the SD card gets no key.  The
same code drives any token that ships a PKCS#11 module: ``tpm2-pkcs11`` for
a TPM 2.0, a secure element's vendor module, SoftHSM2 in the tests.

The token is asked for ``CKM_ECDSA`` over the SHA-256 digest, which every
such token supports (``CKM_ECDSA_SHA256`` is optional and would send the
header over a slow bus to be hashed there); its raw ``r || s`` answer goes
through :func:`cngmrv.signed.keys.signature_from_raw`, the one DER/low-S
encoding every signer emits.

Needs python-pkcs11, the ``pkcs11`` extra (``pip install 'cngmrv[pkcs11]'``):
a compiled module a bus without a token does not need to carry.  Without it,
opening a token raises :class:`~cngmrv.signed.keys.SignerError` saying so.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cngmrv.signed.keys import SignerError, kid_of, signature_from_raw, verify_signature

P256_OID = "1.2.840.10045.3.1.7"  # secp256r1, the only curve a batch may be signed with


class TokenError(SignerError):
    """A token, its key or its PIN is not as the settings say; ``part`` names the setting."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


@dataclass(frozen=True)
class TokenKey:
    """Where a device key lives: the PKCS#11 module, the token's label, the key's label, the PIN.

    ``repr`` never shows the PIN.
    """

    module: Path
    token_label: str
    key_label: str
    pin: str = field(repr=False)


def read_pin_file(path: Path) -> str:
    """The user PIN from ``path`` (its first line), refusing a file others can read."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TokenError("pin_file", f"cannot read PIN file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(
            "pin_file",
            f"PIN file {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run: chmod 600 {path}",
        )
    pin = text.splitlines()[0] if text else ""
    if not pin:
        raise TokenError("pin_file", f"PIN file {path} is empty")
    return pin


def pin_from_env(name: str) -> str:
    """The user PIN from the environment variable ``name``."""
    pin = os.environ.get(name, "")
    if not pin:
        raise TokenError("pin_env", f"environment variable {name} is not set or empty")
    return pin


def _pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise SignerError(
            "the PKCS#11 signer needs the python-pkcs11 package: pip install 'cngmrv[pkcs11]'"
        ) from None
    return pkcs11


def _open_session(ref: TokenKey, rw: bool) -> Any:
    """A session on the token, logged in as its user; TokenError names what did not fit."""
    p11 = _pkcs11()
    if not ref.module.is_file():
        raise TokenError("module", f"PKCS#11 module {ref.module} not found")
    try:
        lib = p11.lib(str(ref.module))
    except (p11.PKCS11Error, OSError, RuntimeError) as e:
        raise TokenError("module", f"cannot load PKCS#11 module {ref.module}: {e}") from None
    try:
        token = lib.get_token(token_label=ref.token_label)
    except p11.NoSuchToken:
        labels = sorted(t.label for t in lib.get_tokens())
        raise TokenError(
            "token_label",
            f"no token labelled {ref.token_label!r} in {ref.module} (tokens: {labels})",
        ) from None
    except p11.MultipleTokensReturned:
        raise TokenError(
            "token_label", f"more than one token is labelled {ref.token_label!r}"
        ) from None
    try:
        return token.open(rw=rw, user_pin=ref.pin)
    except p11.UserAlreadyLoggedIn:
        # The login belongs to the token and this process, not to one session:
        # another session of ours (a second signer, keygen's check) already holds it.
        return token.open(rw=rw)
    except (p11.PinIncorrect, p11.PinLenRange, p11.PinInvalid):
        raise TokenError("pin", f"token {ref.token_label!r} refused the PIN") from None
    except p11.PinLocked:
        raise TokenError(
            "pin", f"token {ref.token_label!r} has locked its user PIN (too many wrong tries)"
        ) from None
    except p11.PKCS11Error as e:
        raise TokenError(
            "token_label", f"cannot open token {ref.token_label!r}: {type(e).__name__}"
        ) from None


def _public_key(session: Any, ref: TokenKey) -> ec.EllipticCurvePublicKey:
    p11 = _pkcs11()
    try:
        pub = session.get_key(
            object_class=p11.ObjectClass.PUBLIC_KEY, key_type=p11.KeyType.EC, label=ref.key_label
        )
        der = p11.util.ec.encode_ec_public_key(pub)
    except p11.NoSuchKey:
        raise TokenError(
            "key_label",
            f"token {ref.token_label!r} holds no EC public key labelled {ref.key_label!r}",
        ) from None
    except p11.MultipleObjectsReturned:
        raise TokenError(
            "key_label", f"token {ref.token_label!r} holds several keys {ref.key_label!r}"
        ) from None
    key = serialization.load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TokenError("key_label", f"key {ref.key_label!r} is not an ECDSA P-256 key")
    return key


def _private_key(session: Any, ref: TokenKey) -> Any:
    """The signing key, refused unless the token keeps it (sensitive, never extractable)."""
    p11 = _pkcs11()
    attr = p11.Attribute
    try:
        key = session.get_key(
            object_class=p11.ObjectClass.PRIVATE_KEY, key_type=p11.KeyType.EC, label=ref.key_label
        )
    except p11.NoSuchKey:
        raise TokenError(
            "key_label",
            f"token {ref.token_label!r} holds no EC private key labelled {ref.key_label!r}",
        ) from None
    except p11.MultipleObjectsReturned:
        raise TokenError(
            "key_label", f"token {ref.token_label!r} holds several keys {ref.key_label!r}"
        ) from None
    if key[attr.EXTRACTABLE] or not key[attr.SENSITIVE]:
        # A key that can be read out is a key file with extra steps: refuse it.
        raise TokenError(
            "key_label",
            f"key {ref.key_label!r} can leave the token (CKA_EXTRACTABLE true or CKA_SENSITIVE "
            "false); generate one on the token with: cngmrv keygen --config FILE",
        )
    if not key[attr.SIGN]:
        raise TokenError("key_label", f"key {ref.key_label!r} is not allowed to sign (CKA_SIGN)")
    return key


class Pkcs11Signer:
    """A :class:`~cngmrv.signed.keys.Signer` whose P-256 key stays in a PKCS#11 token.

    Opening checks the module, the token, the PIN and the key (P-256, sensitive,
    not extractable), so a bad setting stops the agent before it opens a bus.
    Each signature is checked against the token's public key before it is
    returned: a token that answers garbage must not seal a batch no one can verify.
    A lost session (a token reset) is reopened on the next ``sign``; a key
    that changed meanwhile is refused, since it would break the device's chain.
    Thread-safe; refuses to be pickled.
    """

    def __init__(self, ref: TokenKey) -> None:
        self._ref = ref
        self._lock = threading.Lock()
        self._session: Any = None
        self._key: Any = None
        self._public = self._open()
        self._kid = kid_of(self._public)

    def _open(self) -> ec.EllipticCurvePublicKey:
        session = _open_session(self._ref, rw=False)
        try:
            public = _public_key(session, self._ref)
            self._key = _private_key(session, self._ref)
        except BaseException:
            session.close()
            raise
        self._session = session
        return public

    def __repr__(self) -> str:
        return (
            f"Pkcs11Signer(token={self._ref.token_label!r}, key={self._ref.key_label!r}, "
            f"kid={self._kid[:16]}…)"
        )

    def __reduce__(self) -> Any:
        raise TypeError("a token session cannot be pickled")

    @property
    def kid(self) -> str:
        return self._kid

    def public_pem(self) -> bytes:
        return self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        p11 = _pkcs11()
        digest = hashlib.sha256(data).digest()
        with self._lock:
            try:
                if self._session is None:
                    if kid_of(self._open()) != self._kid:
                        self.close()
                        raise SignerError(
                            f"key {self._ref.key_label!r} on token {self._ref.token_label!r} "
                            "changed while the agent ran; refusing to sign with another key"
                        )
                rs = self._key.sign(digest, mechanism=p11.Mechanism.ECDSA)
            except p11.PKCS11Error as e:
                self._close_locked()
                raise SignerError(
                    f"token {self._ref.token_label!r} could not sign: {type(e).__name__}"
                ) from None
        der = signature_from_raw(bytes(rs))
        if not verify_signature(self._public, der, data):
            raise SignerError(f"token {self._ref.token_label!r} returned an invalid signature")
        return der

    def _close_locked(self) -> None:
        session, self._session, self._key = self._session, None, None
        if session is not None:
            try:
                session.close()
            except Exception:  # noqa: BLE001 - a dead session may fail to close; it is dropped
                pass

    def close(self) -> None:
        """End the session; a later ``sign`` opens a new one."""
        with self._lock:
            self._close_locked()


def generate_on_token(ref: TokenKey) -> bytes:
    """Generate a P-256 key pair on the token under ``ref.key_label``; returns its public PEM.

    The private key is made sensitive and non-extractable, so it never leaves
    the token.  Refuses when the label is already taken: a device that
    silently changes key breaks its own chain at the ingest (as ``keys.generate``).
    """
    p11 = _pkcs11()
    attr = p11.Attribute
    with _open_session(ref, rw=True) as session:
        taken = list(session.get_objects({attr.LABEL: ref.key_label}))
        if taken:
            raise TokenError(
                "key_label",
                f"token {ref.token_label!r} already holds objects labelled {ref.key_label!r}; "
                "refusing to replace a device key (export its public key with --existing)",
            )
        params = session.create_domain_parameters(
            p11.KeyType.EC,
            {attr.EC_PARAMS: p11.util.ec.encode_named_curve_parameters(P256_OID)},
            local=True,
        )
        sign = p11.MechanismFlag.SIGN | p11.MechanismFlag.VERIFY
        # tpm2-pkcs11 (1.9) makes every EC key able to sign and decrypt, and refuses a
        # template that says otherwise: asked for a signing-only key first, it gets this.
        for capabilities in (sign, sign | p11.MechanismFlag.ENCRYPT | p11.MechanismFlag.DECRYPT):
            try:
                params.generate_keypair(
                    store=True,
                    label=ref.key_label,
                    capabilities=capabilities,
                    private_template={
                        attr.SENSITIVE: True,
                        attr.EXTRACTABLE: False,
                        attr.PRIVATE: True,
                        attr.SIGN: True,
                    },
                )
                break
            except p11.PKCS11Error as e:
                failure = e
        else:
            raise SignerError(
                f"token {ref.token_label!r} could not generate a P-256 key: "
                f"{type(failure).__name__}"
            ) from None
        public = _public_key(session, ref)
        _private_key(session, ref)
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def export_public(ref: TokenKey) -> bytes:
    """The public PEM of the token's existing key (checked as :class:`Pkcs11Signer` checks it)."""
    signer = Pkcs11Signer(ref)
    try:
        return signer.public_pem()
    finally:
        signer.close()
