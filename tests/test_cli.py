"""Command-line contract: one-line errors and non-zero exits, never a traceback."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from cngmrv.agent import config
from cngmrv.signed import keys


def _one_line_error(r) -> str:  # type: ignore[no-untyped-def]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_keygen_writes_a_private_key_only_the_owner_can_read(tmp_path: Path, cli) -> None:
    r = cli("keygen", "--out", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    key = tmp_path / "k" / "device.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "k" / "device.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    # The private key never shows up in what the command prints.
    assert "PRIVATE" not in r.stdout + r.stderr
    again = cli("keygen", "--out", str(tmp_path / "k"))
    assert "refusing to replace" in _one_line_error(again)


def test_a_key_readable_by_others_is_refused(keydir: Path) -> None:
    os.chmod(keydir / keys.KEY_FILE, 0o644)
    with pytest.raises(keys.KeyFileError, match="chmod 600"):
        keys.load_signer(keydir / keys.KEY_FILE)


def test_keygen_never_writes_through_a_dangling_symlink(tmp_path: Path, cli) -> None:
    folder = tmp_path / "k"
    folder.mkdir(mode=0o700)
    target = tmp_path / "elsewhere" / "stolen.key"
    target.parent.mkdir()
    (folder / "device.key").symlink_to(target)  # dangling: the target does not exist
    r = cli("keygen", "--out", str(folder))
    # Old code: exists() is False for a dangling link, and the key was written to its target.
    assert "refusing to replace" in _one_line_error(r)
    assert not target.exists()
    r = cli("keygen", "--out", str(folder), "--force")
    assert r.returncode == 0, r.stderr
    assert not target.exists() and not (folder / "device.key").is_symlink()
    assert stat.S_IMODE((folder / "device.key").stat().st_mode) == 0o600


@pytest.mark.may_skip("changing a file's owner needs root")
def test_a_key_owned_by_another_user_is_refused(keydir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(keydir / keys.KEY_FILE, 4242, -1)
    # Old code checked the mode only: a 0600 key of another user loaded.
    with pytest.raises(keys.KeyFileError, match="owned by uid 4242"):
        keys.load_signer(keydir / keys.KEY_FILE)


def test_missing_key_file_is_one_line(tmp_path: Path, cli) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[device]\nid = "bus-1"\nkey_file = "nope/device.key"\n'
        '[can]\ninterface = "virtual"\nchannel = "t"\n[store]\npath = "s.sqlite"\n'
    )
    line = _one_line_error(cli("run", "--config", str(cfg)))
    assert "key file not found" in line


def test_unreadable_store_is_one_line(tmp_path: Path, cli) -> None:
    bogus = tmp_path / "store.sqlite"
    bogus.write_bytes(b"this is not a database" * 100)
    line = _one_line_error(cli("export", "--db", str(bogus), "--out", str(tmp_path / "o")))
    assert "cannot read database" in line
    line = _one_line_error(cli("export", "--db", str(tmp_path / "absent.sqlite"), "--out", "o"))
    assert "no such database file" in line


def test_unknown_option_is_one_line(cli) -> None:
    line = _one_line_error(cli("verify", "--frobnicate"))
    assert "unrecognized arguments" in line or "required" in line
    line = _one_line_error(cli("sim", "--no-such-option"))
    assert "unrecognized arguments: --no-such-option" in line


def test_verify_with_missing_files_is_one_line(tmp_path: Path, keydir: Path, cli) -> None:
    line = _one_line_error(
        cli("verify", str(tmp_path / "none"), "--pubkey", str(keydir / keys.PUB_FILE))
    )
    assert "no such file or folder" in line


def _cfg(tmp_path: Path, extra: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text('[device]\nid = "bus-1"\nkey_file = "k/device.key"\n[store]\npath = "s"\n' + extra)
    return p


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[can]\nchanel = "can0"\n', "can.chanel: unknown key"),
        ("[batch]\nreadings_per_batch = 0\n", "batch.readings_per_batch: must be 1..1800"),
        ('[batch]\nreadings_per_batch = "60"\n', "batch.readings_per_batch: expected int"),
        ("[pipeline]\nengine_source_address = 255\n", "pipeline.engine_source_address"),
        (
            '[upload]\nurl = "ftp://x"\n',
            "upload.url: must be a URL of an installed upload transport",
        ),
        ("[nonsense]\n", "nonsense: unknown section"),
        ("[can]\nlisten_only = 1\n", "can.listen_only: expected bool"),
        # _cfg's last table is [store]: these lines continue it.
        ("buffer_s = 0\n", "store.buffer_s: must be > 0"),
        ("buffer_s = 600\n", "at most 60 seconds"),
        ("alarm_fraction = 1.5\n", "store.alarm_fraction: must be between"),
        ("drop_fraction = 0.5\n", "store.drop_fraction: must be above"),
        ("quota_mb = 0.1\n", "store.quota_mb: must be 1..1048576 MB"),
        ("[upload]\nbackoff_cap_s = 1\n", "upload.backoff_cap_s: must be at least"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.load(_cfg(tmp_path, extra))


def test_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = config.load(_cfg(tmp_path, ""))
    can_values = cfg.source_values["can"]
    assert can_values["interface"] == "socketcan" and can_values["listen_only"] is True
    assert cfg.key_file == tmp_path.resolve() / "k" / "device.key"
    assert cfg.readings_per_batch == 60
    assert (cfg.store_buffer_s, cfg.store_quota_bytes) == (10.0, 1024 * 1024 * 1024)
    assert (cfg.upload_backoff_base_s, cfg.upload_backoff_cap_s) == (2.0, 900.0)


def test_bad_config_via_cli_is_one_line(tmp_path: Path, cli) -> None:
    line = _one_line_error(cli("run", "--config", str(_cfg(tmp_path, "[can]\nbogus = 1\n"))))
    assert "can.bogus: unknown key" in line


def test_keygen_makes_a_private_folder(tmp_path: Path, cli) -> None:
    r = cli("keygen", "--out", str(tmp_path / "new" / "keys"), "--json")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "new" / "keys").stat().st_mode) == 0o700


def test_verify_needs_keys_and_says_so(tmp_path: Path, cli) -> None:
    (tmp_path / "0.batch").write_bytes(b"x")
    line = _one_line_error(cli("verify", str(tmp_path)))
    assert "--pubkey" in line and "--registry" in line


def test_export_and_verify_from_an_ingest_database(tmp_path: Path, keydir: Path, cli) -> None:
    from cngmrv.office.ingest import Ingest, open_db, register_device
    from cngmrv.signed import batch

    signer = keys.load_signer(keydir / keys.KEY_FILE)
    db = open_db(tmp_path / "ingest.sqlite")
    register_device(db, "bus-1", (keydir / keys.PUB_FILE).read_bytes())
    ingest, prev = Ingest(db), batch.ZERO_HASH
    for seq in range(3):
        raw = batch.build(signer, "bus-1", seq, prev, {"readings": [{"t0": float(seq)}]})
        assert ingest.accept(raw)[0] == 201
        prev = batch.chain_id(raw)
    db.close()
    ingest_db = str(tmp_path / "ingest.sqlite")
    out = tmp_path / "o"
    r = cli("export", "--db", ingest_db, "--device", "bus-1", "--since", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["1.batch", "2.batch"]
    r = cli("verify", "--db", ingest_db, "--registry", ingest_db)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED: 3 batches verified" in r.stdout


def _ingest_with_batches(tmp_path: Path, keydir: Path, n: int = 3) -> tuple[str, list[bytes]]:
    from cngmrv.office.ingest import Ingest, open_db, register_device
    from cngmrv.signed import batch

    signer = keys.load_signer(keydir / keys.KEY_FILE)
    db = open_db(tmp_path / "ingest.sqlite")
    register_device(db, "bus-1", (keydir / keys.PUB_FILE).read_bytes())
    ingest, prev, out = Ingest(db), batch.ZERO_HASH, []
    for seq in range(n):
        raw = batch.build(signer, "bus-1", seq, prev, {"readings": [{"t0": float(seq)}]})
        assert ingest.accept(raw)[0] == 201
        prev = batch.chain_id(raw)
        out.append(raw)
    # A conflicting batch 1, validly signed: the ingest refuses it and files an alarm.
    other = batch.build(signer, "bus-1", 1, batch.chain_id(out[0]), {"readings": []})
    for _ in range(3):
        assert ingest.accept(other)[0] == 409
    db.close()
    return str(tmp_path / "ingest.sqlite"), out


def test_export_refuses_a_folder_that_is_not_empty(tmp_path: Path, keydir: Path, cli) -> None:
    ingest_db, _ = _ingest_with_batches(tmp_path, keydir)
    out = tmp_path / "o"
    out.mkdir()
    (out / "9.batch").write_bytes(b"stale")  # old code left it there for verify to trip on
    line = _one_line_error(cli("export", "--db", ingest_db, "--out", str(out)))
    assert "not an empty folder" in line
    assert sorted(p.name for p in out.iterdir()) == ["9.batch"]
    r = cli("export", "--db", ingest_db, "--out", str(tmp_path / "fresh"))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("evil", ["../escaped", "/tmp/abs", ""])
def test_export_never_writes_outside_its_folder(
    tmp_path: Path, keydir: Path, cli, evil: str
) -> None:
    import sqlite3

    ingest_db, chain = _ingest_with_batches(tmp_path, keydir)
    # A database written before registration checked ids (or by hand).
    db = sqlite3.connect(ingest_db)
    db.execute(
        "INSERT INTO batches(device_id, seq, sha256, prev_hash, bytes, received_at) "
        "VALUES(?, 0, x'00', x'00', ?, 0)",
        (evil, chain[0]),
    )
    db.commit()
    db.close()
    out = tmp_path / "nest" / "o"
    line = _one_line_error(cli("export", "--db", ingest_db, "--out", str(out)))
    assert "cannot be exported" in line
    assert not (tmp_path / "nest" / "escaped").exists() and not out.exists()


def test_verify_db_reports_the_ingests_tamper_alarms(tmp_path: Path, keydir: Path, cli) -> None:
    ingest_db, _ = _ingest_with_batches(tmp_path, keydir)
    r = cli("verify", "--db", ingest_db, "--registry", ingest_db)
    # Old code: PASSED, although the ingest held a conflict alarm.
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ingest_alarm" in r.stdout and "conflict alarm (3x)" in r.stdout


def test_verify_sees_a_cut_off_tail_only_with_an_outside_anchor(
    tmp_path: Path, keydir: Path, cli
) -> None:
    _, chain = _ingest_with_batches(tmp_path, keydir)
    folder = tmp_path / "f"
    folder.mkdir()
    for seq, raw in enumerate(chain[:-1]):  # the last batch was deleted
        (folder / f"{seq}.batch").write_bytes(raw)
    pub = str(keydir / keys.PUB_FILE)
    assert cli("verify", str(folder), "--pubkey", pub).returncode == 0  # cannot see it alone
    r = cli("verify", str(folder), "--pubkey", pub, "--expect-last", "bus-1=2")
    assert r.returncode == 1 and "tail_missing" in r.stdout, r.stdout
    assert cli("verify", str(folder), "--pubkey", pub, "--expect-last", "1").returncode == 0
