"""Signers: the one DER/low-S encoding, the key file, and a key that never leaves a PKCS#11 token.

The PKCS#11 tests run against SoftHSM2 (Debian package ``softhsm2``) with a
token made in a temporary folder through ``SOFTHSM2_CONF``, and python-pkcs11
(the ``pkcs11`` extra).  They skip, saying why, when either is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given
from hypothesis import strategies as st

from cngmrv.agent import config
from cngmrv.agent.recorder import Recorder, RecorderConfig
from cngmrv.agent.store import Store
from cngmrv.office.ingest import Ingest, IngestDB, register_device
from cngmrv.signed import batch, hsm, keys
from cngmrv.sim import tokens

N = keys.P256_ORDER
SOFTHSM_MODULE = tokens.SOFTHSM_MODULE
TOKEN = "cngmrv-test"
USER_PIN = "246810"


def _low_s_strict_der(sig: bytes) -> bool:
    r, s = decode_dss_signature(sig)
    return s <= N // 2 and encode_dss_signature(r, s) == sig


# -- the one encoding -------------------------------------------------------------------


@given(st.integers(1, N - 1), st.integers(1, N - 1))
def test_low_s_is_strict_der_with_low_s(r: int, s: int) -> None:
    der = keys.low_s(encode_dss_signature(r, s))
    assert decode_dss_signature(der) == (r, min(s, N - s))
    assert _low_s_strict_der(der)
    # Both S forms of one signature give the same bytes: nobody can make a second one.
    assert keys.low_s(encode_dss_signature(r, N - s)) == der


def test_raw_signature_must_be_64_bytes() -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        keys.signature_from_raw(bytes(63))
    assert keys.signature_from_raw((5).to_bytes(32, "big") + (N - 1).to_bytes(32, "big")) == (
        encode_dss_signature(5, 1)
    )


def test_file_signer_signs_low_s_only(signer: keys.FileSigner) -> None:
    pub = keys.public_key_from_pem(signer.public_pem())
    # About half of unnormalized signatures are high-S: 64 in a row low would be chance 2**-64.
    for i in range(64):
        data = f"header {i}".encode()
        sig = signer.sign(data)
        assert _low_s_strict_der(sig), i
        assert keys.verify_signature(pub, sig, data)


# -- the config's [signer] table (no token needed) ----------------------------------------


def _config(tmp_path: Path, signer: str, device: str = "") -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(
        f'[device]\nid = "bus-1"\n{device}[can]\ninterface = "virtual"\nchannel = "c"\n'
        f'[store]\npath = "s.sqlite"\n[signer]\n{signer}'
    )
    return p


@pytest.mark.parametrize(
    ("signer", "device", "message"),
    [
        ('kind = "file"\n', "", "device.key_file: required when signer.kind = 'file'"),
        (
            'kind = "file"\nmodule = "x.so"\n',
            'key_file = "k"\n',
            "signer.module: only with signer.kind = 'pkcs11'",
        ),
        ('kind = "pkcs11"\ntoken_label = "t"\nkey_label = "k"\n', "", "signer.module: required"),
        (
            'kind = "pkcs11"\nmodule = "m.so"\ntoken_label = "t"\nkey_label = "k"\n',
            "",
            "signer.pin_file: give exactly one of signer.pin_file and signer.pin_env",
        ),
        (
            'kind = "pkcs11"\nmodule = "m.so"\ntoken_label = "t"\nkey_label = "k"\n'
            'pin_file = "p"\npin_env = "P"\n',
            "",
            "signer.pin_file: give exactly one",
        ),
        # The PIN never sits in the config (it is often world-readable in /etc).
        (
            'kind = "pkcs11"\nmodule = "m.so"\ntoken_label = "t"\nkey_label = "k"\npin = "1"\n',
            "",
            "signer.pin: unknown key",
        ),
        (
            'kind = "pkcs11"\nmodule = "m.so"\ntoken_label = "t"\nkey_label = "k"\npin_env = "P"\n',
            'key_file = "k"\n',
            "device.key_file: must be empty when signer.kind = 'pkcs11'",
        ),
        ('kind = "tpm"\n', 'key_file = "k"\n', "signer.kind: must be one of 'file', 'pkcs11'"),
    ],
)
def test_signer_table_is_checked_naming_the_key(
    tmp_path: Path, signer: str, device: str, message: str
) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(_config(tmp_path, signer, device))


def test_without_python_pkcs11_the_error_says_which_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)  # what `import pkcs11` meets when absent
    with pytest.raises(keys.SignerError, match=r"pip install 'cngmrv\[pkcs11\]'"):
        hsm.Pkcs11Signer(hsm.TokenKey(SOFTHSM_MODULE, TOKEN, "k", USER_PIN))


# -- SoftHSM2 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SoftHSM2 token in a temporary folder; SOFTHSM2_CONF points there for this module.

    Made before anything in this process loads the module: SoftHSM2 reads its
    configuration and lists its tokens once, when it is first initialized.
    """
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        pytest.skip("python-pkcs11 is not installed (pip install 'cngmrv[pkcs11]')")
    try:
        with tokens.softhsm_token(tmp_path_factory.mktemp("softhsm"), TOKEN, USER_PIN) as module:
            yield module
    except tokens.TokenUnavailable as e:
        pytest.skip(str(e))


def _token_config(tmp_path: Path, key_label: str, **over: str) -> Path:
    pin = tmp_path / "pin"
    pin.write_text(USER_PIN + "\n")
    pin.chmod(0o600)
    table = {
        "kind": "pkcs11",
        "module": str(SOFTHSM_MODULE),
        "token_label": TOKEN,
        "key_label": key_label,
        "pin_file": str(pin),
        **over,
    }
    return _config(tmp_path, "".join(f'{k} = "{v}"\n' for k, v in table.items() if v != "-"))


@pytest.fixture
def token_key(softhsm: Path, tmp_path: Path, cli: Any) -> tuple[Path, str, Path]:
    """A fresh P-256 key on the token, made by ``cngmrv keygen --config``: (config, label, pub)."""
    label = f"bus-{uuid.uuid4().hex[:8]}"
    cfg = _token_config(tmp_path, label)
    r = cli("keygen", "--config", str(cfg), "--out", str(tmp_path / "pub"), "--json")
    assert r.returncode == 0, r.stderr
    return cfg, label, tmp_path / "pub" / keys.PUB_FILE


def test_keygen_makes_a_key_that_never_leaves_the_token(
    token_key: tuple[Path, str, Path], tmp_path: Path, cli: Any
) -> None:
    import pkcs11

    cfg, label, pub = token_key
    kid = keys.kid_of(keys.load_public_key(pub))
    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    with lib.get_token(token_label=TOKEN).open(user_pin=USER_PIN) as session:
        private = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=label)
        assert private[pkcs11.Attribute.SENSITIVE] and not private[pkcs11.Attribute.EXTRACTABLE]
        with pytest.raises(pkcs11.AttributeSensitive):
            private[pkcs11.Attribute.VALUE]
    # A second keygen never replaces the key; --existing exports the same public key.
    again = cli("keygen", "--config", str(cfg), "--out", str(tmp_path / "again"))
    assert again.returncode == 2 and "refusing to replace a device key" in again.stderr
    r = cli("keygen", "--config", str(cfg), "--out", str(tmp_path / "x"), "--existing", "--json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x" / keys.PUB_FILE).read_bytes() == pub.read_bytes()
    assert '"kid": "' + kid in r.stdout
    ok = cli("config", "check", str(cfg), "--json")
    assert ok.returncode == 0, ok.stderr
    assert kid in ok.stdout


def test_token_signer_seals_batches_the_ingest_and_verify_accept(
    token_key: tuple[Path, str, Path], tmp_path: Path
) -> None:
    cfg_path, _, pub_path = token_key
    signer = config.open_signer(config.load(cfg_path))
    try:
        assert isinstance(signer, hsm.Pkcs11Signer) and "246810" not in repr(signer)
        # The agent's own sealing path: recorder, store, batch.build.
        recorder = Recorder(
            tmp_path / "store.sqlite",
            "bus-1",
            signer,
            RecorderConfig(readings_per_batch=5, buffer_s=5.0),
        )
        recorder.start()
        for i in range(40):
            recorder.add([{"t0": 1000.0 + i, "dur": 1.0, "diesel_l": 0.001 * i}])
        recorder.stop()
        recorder.close()
        # The token signs with random nonces: about half would be high-S unnormalized.
        sigs = [signer.sign(f"h{i}".encode()) for i in range(40)]
        assert all(_low_s_strict_der(s) for s in sigs)
    finally:
        signer.close()
    store = Store(tmp_path / "store.sqlite", "bus-1")
    raws = [raw for _, raw in store.batches()]
    store.close()
    assert len(raws) >= 8
    assert all(_low_s_strict_der(batch.parse(r).signature) for r in raws)
    pub = keys.load_public_key(pub_path)
    assert batch.verify_set(((f"{i}.batch", r) for i, r in enumerate(raws)), pub).passed
    db = IngestDB(tmp_path / "ingest.sqlite")
    register_device(db, "bus-1", pub_path.read_bytes())
    ingest = Ingest(db)
    assert [ingest.accept(r)[0] for r in raws] == [201] * len(raws)
    db.close()


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"module": "/nonexistent/libnone.so"}, "signer.module: PKCS#11 module"),
        ({"token_label": "no-such-token"}, "signer.token_label: no token labelled"),
        ({"key": "no-such-key"}, "signer.key_label: token 'cngmrv-test' holds no EC"),
        ({"pin_file": "-", "pin_env": "CNGMRV_TEST_PIN_UNSET"}, "signer.pin_env: environment"),
    ],
)
def test_config_check_names_the_bad_token_setting(
    softhsm: Path, tmp_path: Path, cli: Any, over: dict[str, str], message: str
) -> None:
    label = over.pop("key", "bus-x")
    r = cli("config", "check", str(_token_config(tmp_path, label, **over)))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_config_check_refuses_a_wrong_pin_and_a_pin_file_others_read(
    token_key: tuple[Path, str, Path], tmp_path: Path, cli: Any
) -> None:
    cfg, label, _ = token_key
    env = tmp_path / "env"
    env.mkdir()
    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "cngmrv.agent.cli",
            "config",
            "check",
            str(_token_config(env, label, pin_file="-", pin_env="CNGMRV_TEST_PIN")),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CNGMRV_TEST_PIN": "000000"},
    )
    assert (
        wrong.returncode == 2 and "signer.pin: token 'cngmrv-test' refused the PIN" in wrong.stderr
    )
    (tmp_path / "pin").chmod(0o644)
    r = cli("config", "check", str(cfg))
    assert r.returncode == 2 and "signer.pin_file:" in r.stderr and "chmod 600" in r.stderr


def test_a_key_that_can_leave_the_token_is_refused(softhsm: Path, tmp_path: Path, cli: Any) -> None:
    import pkcs11

    label = f"soft-{uuid.uuid4().hex[:8]}"
    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    with lib.get_token(token_label=TOKEN).open(rw=True, user_pin=USER_PIN) as session:
        params = session.create_domain_parameters(
            pkcs11.KeyType.EC,
            {
                pkcs11.Attribute.EC_PARAMS: pkcs11.util.ec.encode_named_curve_parameters(
                    hsm.P256_OID
                )
            },
            local=True,
        )
        params.generate_keypair(
            store=True,
            label=label,
            private_template={
                pkcs11.Attribute.EXTRACTABLE: True,
                pkcs11.Attribute.SENSITIVE: False,
            },
        )
    r = cli("config", "check", str(_token_config(tmp_path, label)))
    assert r.returncode == 2
    assert f"signer.key_label: key {label!r} can leave the token" in r.stderr, r.stderr


# -- a software TPM 2.0 through tpm2-pkcs11 --------------------------------------------------


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Path]:
    """A tpm2-pkcs11 token on a software TPM (swtpm behind tpm2-abrmd); yields the module."""
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        pytest.skip("python-pkcs11 is not installed (pip install 'cngmrv[pkcs11]')")
    try:
        with tokens.swtpm_token(tmp_path / "tpm", "cngmrv-tpm", USER_PIN) as module:
            yield module
    except tokens.TokenUnavailable as e:
        pytest.skip(str(e))


def test_a_software_tpm_token_signs_batches_that_verify(swtpm: Path) -> None:
    # The same signer on a TPM 2.0 through tpm2-pkcs11, as on a TPM HAT; its key too
    # never leaves the chip.
    ref = hsm.TokenKey(swtpm, "cngmrv-tpm", "device", USER_PIN)
    pub = keys.public_key_from_pem(hsm.generate_on_token(ref))
    signer = hsm.Pkcs11Signer(ref)
    try:
        prev, raws = batch.ZERO_HASH, []
        for seq in range(12):
            raws.append(batch.build(signer, "bus-1", seq, prev, {"readings": [{"t0": 1.0}]}))
            prev = batch.chain_id(raws[-1])
    finally:
        signer.close()
    assert batch.verify_set(((f"{i}.batch", r) for i, r in enumerate(raws)), pub).passed
    assert all(_low_s_strict_der(batch.parse(r).signature) for r in raws)


def test_a_token_that_loses_its_key_stops_sealing_not_recording(
    token_key: tuple[Path, str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pkcs11

    cfg_path, label, _ = token_key
    signer = config.open_signer(config.load(cfg_path))
    signer.close()
    signer.sign(b"a closed session is reopened on the next signature")
    rec = Recorder(tmp_path / "store.sqlite", "bus-1", signer, RecorderConfig(readings_per_batch=5))
    rec.start()
    sealed_before = len(rec.sealed)
    # The key vanishes from the token under the running agent (a token reset, a wiped chip).
    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    with lib.get_token(token_label=TOKEN).open(rw=True) as session:  # shares the agent's login
        for obj in session.get_objects({pkcs11.Attribute.LABEL: label}):
            obj.destroy()
    for i in range(20):
        rec.add([{"t0": 2000.0 + i, "dur": 1.0, "diesel_l": 0.001}])
    rec.stop()
    assert len(rec.sealed) == sealed_before  # nothing sealed without the key ...
    assert rec.store.unsealed()[0] == 20  # ... and nothing committed was lost
    assert "event=seal_failed reason=signer" in caplog.text
    rec.close()
    signer.close()
