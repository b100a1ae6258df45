"""Device keys: generation, loading and the signing interface.

Signing sits behind :class:`Signer` so a secure element (which only does
ECDSA P-256) can replace the key file later without touching the batch code.
The private key never leaves this module: nothing here logs or formats it.

The file signer uses deterministic ECDSA (RFC 6979): a Raspberry Pi at boot
may have a thin entropy pool, and a repeated nonce would leak the key.  It
also makes the published test vectors reproducible byte for byte.  Verifiers
must not assume determinism: a secure element signs with random nonces.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

ALG = "ES256"
# The order n of P-256's base point: an ECDSA signature (r, s) verifies exactly
# when (r, n - s) does, so batch format 2 admits only s <= n/2 (low-S).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# The algorithms a verifier accepts.  Only one: a header naming any other
# algorithm is refused before the signature is even looked at, so an attacker
# cannot pick a weaker one (OCMF leaves its algorithm field unsigned).
ALLOWED_ALGS = frozenset({ALG})
KEY_FILE = "device.key"
PUB_FILE = "device.pub"


class KeyFileError(Exception):
    """A key file is missing, unreadable, of the wrong type or too widely readable."""


def kid_of(public_key: ec.EllipticCurvePublicKey) -> str:
    """Key id: hex SHA-256 of the public key's SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def low_s(signature: bytes) -> bytes:
    """The DER signature with ``s`` replaced by ``n - s`` when ``s > n/2``, in strict DER.

    Every signer's output goes through this (a secure element signs with
    whichever ``s`` it finds): batch format 2 accepts only the low form, so a
    relay cannot make a second valid signature by negating ``s``.
    """
    r, s = decode_dss_signature(signature)
    if s > P256_ORDER // 2:
        s = P256_ORDER - s
    return encode_dss_signature(r, s)


class Signer(Protocol):
    """What the batch sealer needs from a key: an id and a signature over bytes."""

    @property
    def kid(self) -> str: ...

    def sign(self, data: bytes) -> bytes:
        """Return the DER ECDSA-P256-SHA256 signature of ``data``, low-S (:func:`low_s`)."""
        ...

    def public_pem(self) -> bytes: ...


class FileSigner:
    """A P-256 key held in a PKCS#8 PEM file of mode 0600.

    ``repr`` and ``str`` show only the key id; the object refuses to be pickled
    so the key cannot leak through a multiprocessing queue or a crash dump.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise KeyFileError("device key must be ECDSA P-256")
        self._key = private_key
        self._kid = kid_of(private_key.public_key())

    def __repr__(self) -> str:  # never show key material
        return f"FileSigner(kid={self._kid[:16]}…)"

    def __reduce__(self) -> Any:
        raise TypeError("a device key cannot be pickled")

    @property
    def kid(self) -> str:
        return self._kid

    def sign(self, data: bytes) -> bytes:
        return low_s(self._key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def generate(out_dir: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``device.key`` (PKCS#8 PEM, mode 0600) and ``device.pub`` into ``out_dir``.

    Refuses to replace an existing key unless ``overwrite``: a device that
    silently changes key breaks its own signature chain at the ingest.
    """
    # A fresh key folder is private too: other users should not even see the key's name.
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, pub_path = out_dir / KEY_FILE, out_dir / PUB_FILE
    # lexists: a dangling symlink "does not exist", yet opening it would create its target.
    if os.path.lexists(key_path) and not overwrite:
        raise KeyFileError(f"{key_path} already exists; refusing to replace a device key")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(key_path, pem, 0o600)  # 0600 from the start: never briefly world-readable
    _write_new(pub_path, FileSigner(key).public_pem(), 0o644)
    return key_path, pub_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a fresh file at ``path`` itself: whatever was there (a symlink too) is replaced,
    and no symlink is ever followed to write somewhere else."""
    if os.path.lexists(path):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def load_signer(key_path: Path) -> FileSigner:
    """Load the device key, refusing one that group or others can read, or another user owns.

    Another owner could replace the key (or read it back) whatever its mode.
    """
    try:
        st = key_path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file not found: {key_path}") from None
    except OSError as e:
        raise KeyFileError(f"cannot read key file {key_path}: {e.strerror}") from None
    mode = st.st_mode
    if st.st_uid != os.geteuid():
        raise KeyFileError(
            f"key file {key_path} is owned by uid {st.st_uid}, not by this user "
            f"(uid {os.geteuid()}); run: chown {os.geteuid()} {key_path}"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {key_path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
            "run: chmod 600 " + str(key_path)
        )
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as e:
        raise KeyFileError(
            f"key file {key_path} is not an unencrypted PKCS#8 PEM key: {e}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"key file {key_path} is not an EC key")
    return FileSigner(key)


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a PEM public key (``device.pub``)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read public key {path}: {e.strerror}") from None
    return public_key_from_pem(data, str(path))


def public_key_from_pem(data: bytes, where: str = "public key") -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise KeyFileError(f"{where} is not a PEM public key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{where} is not an ECDSA P-256 public key")
    return key


def verify_signature(public_key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid DER ECDSA-P256-SHA256 signature of ``data``."""
    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
