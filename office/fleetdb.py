"""The fleet database: connections, the versioned schema and its migrations.

One schema, written in SQL that SQLite and PostgreSQL both run (``?``
markers, translated for psycopg).  SQLite is the embedded default (one
laptop, ``make sim``); a ``postgresql://`` URL selects PostgreSQL through
psycopg 3 and a psycopg_pool connection pool (the ``office`` extra).

The schema's version is the highest row of ``schema_version``.  Migrations are
applied by :func:`migrate` (``cngmrv ingest --db URL --migrate``), in one
transaction each, serialised across servers by a lock.  At start
(:class:`IngestDB`), an empty database gets the whole schema; any other
version than :data:`SCHEMA_VERSION` is refused with a one-line answer, and
every write transaction checks the version again, so a server never writes
into a database that a newer cngmrv has migrated under it (docs/fleet-database.md).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cngmrv.signed import batch
from cngmrv.signed.archive import ArchiveError, Kind, classify, open_readonly

log = logging.getLogger("cngmrv.fleetdb")

#: The schema this code reads and writes.
SCHEMA_VERSION = 4

# An arbitrary constant key for pg_advisory_xact_lock: one migration at a time per database.
_MIGRATION_LOCK = 0x636E676D7276


class IngestError(ArchiveError):
    """The fleet database cannot be opened or used; the message says why, on one line."""


class SchemaMismatch(IngestError):
    """The database's schema is not the one this cngmrv writes: migrate, or upgrade cngmrv."""

    def __init__(self, message: str, held: int) -> None:
        super().__init__(message)
        self.held = held

    @property
    def public(self) -> str:
        """What a client may be told: the remedy, without naming the database."""
        if self.held > SCHEMA_VERSION:
            return f"the database is at schema version {self.held}, written by a newer cngmrv"
        return f"the database is at schema version {self.held}: it awaits a migration"


def is_url(target: str | Path) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def redact(target: str | Path) -> str:
    """The target as it may be printed: a URL's password is replaced by ``***``."""
    text = str(target)
    # A regular expression, not a URL parser: a malformed URL must still print safely.
    return re.sub(r"^(postgres(?:ql)?://[^:/@]*:)[^@]*@", r"\1***@", text) if is_url(text) else text


def _psycopg() -> Any:
    try:
        import psycopg  # type: ignore[import-not-found]
    except ImportError:
        raise IngestError(
            "a postgresql:// database needs the office install: pip install 'cngmrv[office]'"
        ) from None
    return psycopg


def _pg_error(target: str, e: Exception) -> IngestError:
    # psycopg's messages span lines (server hints); the first line says what went wrong.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return IngestError(f"cannot use PostgreSQL database {redact(target)}: {first}")


def _sqlite_path(text: str) -> Path:
    return Path(text.removeprefix("sqlite:///") if text.startswith("sqlite:") else text)


# -- migrations ------------------------------------------------------------------


def stored_batch(raw: bytes) -> batch.Batch:
    """A batch as this database holds it.

    An ingest from before format 2 may hold a version-1 batch in a re-wrapped
    envelope (it accepted any msgpack container): it is read as what it claims
    to be, so its batch id and links still work for duplicates and the chain.
    """
    try:
        return batch.parse(raw)
    except batch.NonCanonicalError:
        claim = batch.claimed(raw)
        if claim is None:
            raise
        return claim


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    apply: Callable[[IngestDB], None]


def _m1_base(db: IngestDB) -> None:
    blob, real = db.types
    for stmt in (
        "CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, kid TEXT NOT NULL, "
        f"pubkey_pem {blob} NOT NULL)",
        "CREATE TABLE IF NOT EXISTS batches (device_id TEXT NOT NULL, seq BIGINT NOT NULL, "
        f"sha256 {blob} NOT NULL, prev_hash {blob}, bytes {blob} NOT NULL, "
        f"received_at {real} NOT NULL, PRIMARY KEY (device_id, seq))",
        "CREATE TABLE IF NOT EXISTS gaps (device_id TEXT NOT NULL, first_seq BIGINT NOT NULL, "
        f"last_seq BIGINT NOT NULL, found_at {real} NOT NULL, PRIMARY KEY (device_id, first_seq))",
        "CREATE TABLE IF NOT EXISTS alarms (device_id TEXT NOT NULL, seq BIGINT, "
        f"kind TEXT NOT NULL, detail TEXT NOT NULL, bytes {blob}, at {real} NOT NULL)",
        # batch_id and repeats come with version 3 (_m3_alarm_repeats), also on a new database.
    ):
        db.execute(stmt)
    if db.dialect == "sqlite":
        # Databases from before prev_hash was kept: add it and fill it in.
        cols = {r[1] for r in db.all("PRAGMA table_info(batches)")}
        if "prev_hash" not in cols:
            db.execute("ALTER TABLE batches ADD COLUMN prev_hash BLOB")
        for dev, seq, raw in db.all(
            "SELECT device_id, seq, bytes FROM batches WHERE prev_hash IS NULL"
        ):
            prev = stored_batch(bytes(raw)).header["prev_hash"]
            db.execute(
                "UPDATE batches SET prev_hash=? WHERE device_id=? AND seq=?", (prev, dev, seq)
            )


def _m2_batch_runs(db: IngestDB) -> None:
    from cngmrv.office import monitored

    monitored.create_table(db)
    monitored.backfill(db)


def _m3_alarm_repeats(db: IngestDB) -> None:
    blob, _ = db.types
    # A database an ingest from before versioning wrote (SQLite) may hold them already.
    if db.dialect == "sqlite":
        have = {r[1] for r in db.all("PRAGMA table_info(alarms)")}
    else:
        have = {
            r[0]
            for r in db.all(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'alarms'"
            )
        }
    if "batch_id" not in have:
        db.execute(f"ALTER TABLE alarms ADD COLUMN batch_id {blob}")
    if "repeats" not in have:
        db.execute("ALTER TABLE alarms ADD COLUMN repeats BIGINT NOT NULL DEFAULT 1")


def _m4_device_keys(db: IngestDB) -> None:
    blob, real = db.types
    # An ingest from before versioning (SQLite) may hold it already.  A device's
    # first key gets its row when the device is next looked at (ingest._adopt_first_key).
    db.execute(
        "CREATE TABLE IF NOT EXISTS device_keys (device_id TEXT NOT NULL, kid TEXT NOT NULL, "
        f"pubkey_pem {blob} NOT NULL, valid_from BIGINT NOT NULL, valid_until BIGINT, "
        f"via TEXT NOT NULL, at {real} NOT NULL, PRIMARY KEY (device_id, kid))"
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "devices, batches, gaps and alarms", _m1_base),
    Migration(2, "per-batch sums for the report (batch_runs), filled from the stored batches",
              _m2_batch_runs),
    Migration(3, "tamper alarms kept once per batch id, with a repeat count", _m3_alarm_repeats),
    Migration(4, "a device's keys over time, each valid for a range of sequences (device_keys)",
              _m4_device_keys),
)  # fmt: skip
assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


# -- the read-write database -------------------------------------------------------


class _Schema:
    """What both the read-write and the read-only database answer about their schema."""

    dialect: str

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        raise NotImplementedError

    def tables(self) -> set[str]:
        if self.dialect == "sqlite":
            rows = self.all("SELECT name FROM sqlite_master WHERE type='table'")
        else:
            rows = self.all(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            )
        return {str(r[0]) for r in rows}

    def version(self) -> int:
        """The schema version held: 0 for an empty database or one from before versioning."""
        if "schema_version" not in self.tables():
            return 0
        rows = self.all("SELECT max(version) FROM schema_version")
        return 0 if not rows or rows[0][0] is None else int(rows[0][0])


class IngestDB(_Schema):
    """The fleet database for writing: plain SQL with ``?`` markers, on SQLite or PostgreSQL.

    Thread-safe.  SQLite: one connection behind one lock.  PostgreSQL: a
    connection pool; :meth:`tx` binds one pooled connection to the calling
    thread for the transaction, so threads (and processes) store concurrently.

    ``create=True`` (the default) gives an empty database the whole schema;
    ``migrate=True`` also upgrades an older one (:func:`migrate`).  Any other
    version mismatch raises :class:`SchemaMismatch`.
    """

    def __init__(
        self,
        target: str | Path,
        migrate: bool = False,
        pool_size: int = 4,
        check_version: bool = True,
    ) -> None:
        text = str(target)
        self.target = text
        self._lock = threading.RLock()
        self._local = threading.local()
        self._conn: Any = None
        self._pool: Any = None
        self.dialect = "postgresql" if is_url(text) else "sqlite"
        if self.dialect == "postgresql":
            psycopg = _psycopg()
            try:
                from psycopg_pool import ConnectionPool  # type: ignore[import-not-found]
            except ImportError:
                raise IngestError(
                    "a postgresql:// database needs psycopg_pool: pip install 'cngmrv[office]'"
                ) from None
            try:
                # One direct connection first: a wrong URL fails here, at once, with its reason.
                psycopg.connect(text, connect_timeout=10).close()
                self._pool = ConnectionPool(
                    text,
                    min_size=1,
                    max_size=max(1, pool_size),
                    kwargs={"autocommit": True},
                    open=True,
                    timeout=30,
                )
            except psycopg.Error as e:
                raise _pg_error(text, e) from None
            self._pg_errors: tuple[type[BaseException], ...] = (psycopg.Error,)
        else:
            path = _sqlite_path(text)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(
                    path, isolation_level=None, check_same_thread=False, timeout=30
                )
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
            except (sqlite3.Error, OSError) as e:
                raise IngestError(f"cannot open ingest database {path}: {e}") from None
            self._pg_errors = ()
        pg = self.dialect == "postgresql"
        self.types = ("BYTEA", "DOUBLE PRECISION") if pg else ("BLOB", "REAL")
        # Serialises the checks of one device's batches across servers sharing the database.
        self.for_update = " FOR UPDATE" if pg else ""
        try:
            if migrate:
                migrate_db(self)
            else:
                self._create_if_empty()
            if check_version:
                self.require_current()
        except BaseException:
            self.close()
            raise

    # -- statements ---------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        """Run one statement; inside :meth:`tx` on its connection, else on its own."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn.execute(self._sql(sql), tuple(params))
        if self._pool is None:
            with self._lock:
                return self._conn.execute(sql, tuple(params))
        with self._pool.connection() as c:
            cur = c.execute(self._sql(sql), tuple(params))
            return _Fetched(cur.fetchall() if cur.description is not None else [])

    def one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        with self._lock if self._pool is None else _nolock():
            row = self.execute(sql, params).fetchone()
        self._settle_check()
        return row

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        with self._lock if self._pool is None else _nolock():
            rows = list(self.execute(sql, params).fetchall())
        self._settle_check()
        return rows

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        """Run one statement for each row of parameters (inside :meth:`tx`: one round trip)."""
        rows = [tuple(r) for r in rows]
        if not rows:
            return
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            if self._pool is None:
                conn.executemany(sql, rows)
            else:
                conn.cursor().executemany(self._sql(sql), rows)
            return
        if self._pool is None:
            with self._lock:
                self._conn.executemany(sql, rows)
            return
        with self._pool.connection() as c:
            c.cursor().executemany(self._sql(sql), rows)

    @contextmanager
    def tx(self, check: bool = True) -> Iterator[None]:
        """One transaction; ``check`` first makes sure the schema is still this code's.

        On PostgreSQL the transaction runs in psycopg's pipeline mode: statements
        are sent as they come and the client waits for the server only when it
        reads a result (a fetch) or at the end, so a transaction that reads once
        and then writes costs two round trips, not one per statement.  The
        schema check is sent with ``BEGIN`` and settled at the first read (or
        before ``COMMIT``), so no write commits under another schema version.
        """
        if getattr(self._local, "conn", None) is not None:
            raise RuntimeError("IngestDB.tx() does not nest")
        if self._pool is None:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                self._local.conn = self._conn
                try:
                    if check:
                        self._check_in_tx()
                    yield
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                finally:
                    self._local.conn = None
                self._conn.execute("COMMIT")
            return
        with self._pool.connection() as conn:
            try:
                with conn.pipeline():
                    conn.execute("BEGIN")
                    self._local.conn = conn
                    if check:
                        self._local.check = conn.execute(self._sql(_VERSION_SQL))
                    yield
                    self._settle_check()
                    conn.execute("COMMIT")
            except BaseException as e:
                pending, self._local.check = getattr(self._local, "check", None), None
                self._local.conn = None
                if not conn.closed:
                    conn.execute("ROLLBACK")
                if pending is not None and not isinstance(e, SchemaMismatch):
                    # A statement that failed because a newer cngmrv changed the schema
                    # under this server: say that, not the statement's error.
                    _mismatch_of(pending, self.target, e)
                raise
            finally:
                self._local.conn = None
                self._local.check = None

    def _settle_check(self) -> None:
        """Read the schema check sent with ``BEGIN`` (its result has come by now); raise on a mismatch."""
        pending = getattr(self._local, "check", None)
        if pending is None:
            return
        self._local.check = None
        row = pending.fetchone()
        _mismatch(0 if row is None or row[0] is None else int(row[0]), self.target)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        elif self._conn is not None:
            with self._lock:
                self._conn.close()

    # -- schema version -------------------------------------------------------------

    def _create_if_empty(self) -> None:
        with self.tx(check=False):
            self._lock_migrations()
            if not self.tables():
                _apply(self, 0)

    def _lock_migrations(self) -> None:
        if self.dialect == "postgresql":
            self.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))

    def require_current(self) -> None:
        """Raise :class:`SchemaMismatch` unless the database is at :data:`SCHEMA_VERSION`."""
        _mismatch(self.version(), self.target)

    def _check_in_tx(self) -> None:
        # One indexed read per transaction; the table exists in every versioned database.
        row = self.one(_VERSION_SQL)
        _mismatch(0 if row is None or row[0] is None else int(row[0]), self.target)

    def is_unavailable(self, e: BaseException) -> bool:
        """Whether ``e`` means the database is down or unreachable (retry later), not a bug."""
        if isinstance(e, sqlite3.OperationalError):
            return "locked" in str(e) or "busy" in str(e)
        return bool(self._pg_errors) and isinstance(e, self._pg_errors)


class _nolock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _Fetched:
    """The rows of a statement run outside a transaction, after its connection went back."""

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows


_VERSION_SQL = "SELECT max(version) FROM schema_version"


def _mismatch_of(pending: Any, target: str, cause: BaseException) -> None:
    """Raise :class:`SchemaMismatch` from ``cause`` when the pending check's answer is one."""
    try:
        row = pending.fetchone()
    except Exception:
        return  # the check itself did not answer: the cause stands
    try:
        _mismatch(0 if row is None or row[0] is None else int(row[0]), target)
    except SchemaMismatch as mismatch:
        raise mismatch from cause


def _mismatch(held: int, target: str) -> None:
    where = redact(target)
    if held > SCHEMA_VERSION:
        raise SchemaMismatch(
            f"ingest database {where} is at schema version {held}, written by a newer cngmrv; "
            f"this one knows versions up to {SCHEMA_VERSION}: upgrade cngmrv (nothing was changed)",
            held,
        )
    if held < SCHEMA_VERSION:
        raise SchemaMismatch(
            f"ingest database {where} is at schema version {held}, this cngmrv writes "
            f"{SCHEMA_VERSION}: stop the older ingest servers, then run "
            f"`cngmrv ingest --db {where} --migrate`",
            held,
        )


def _cngmrv_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cngmrv")
    except PackageNotFoundError:
        return "unknown"


def _apply(db: IngestDB, held: int) -> list[int]:
    blob, real = db.types
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
        f"what TEXT NOT NULL, applied_at {real} NOT NULL, by_cngmrv TEXT NOT NULL)"
    )
    done = []
    for m in MIGRATIONS:
        if m.version <= held:
            continue
        # A new database's schema is routine; upgrading one that holds data is worth a warning.
        log.log(
            logging.INFO if held == 0 else logging.WARNING,
            "event=schema_migration version=%d what=%r",
            m.version,
            m.what,
        )
        m.apply(db)
        db.execute(
            "INSERT INTO schema_version(version, what, applied_at, by_cngmrv) VALUES(?, ?, ?, ?)",
            (m.version, m.what, time.time(), _cngmrv_version()),
        )
        done.append(m.version)
    return done


def migrate_db(db: IngestDB) -> tuple[int, int]:
    """Bring the database to :data:`SCHEMA_VERSION`; returns (version before, after).

    All pending migrations run in one transaction under a lock, so two servers
    migrating at once apply each step once, and a failed step changes nothing.
    A database from a newer cngmrv is refused and left as it is.
    """
    with db.tx(check=False):
        db._lock_migrations()
        held = db.version()
        if held > SCHEMA_VERSION:
            _mismatch(held, db.target)
        _apply(db, held)
    return held, SCHEMA_VERSION


def open_db(target: str | Path, migrate: bool = False, pool_size: int = 4) -> IngestDB:
    return IngestDB(target, migrate=migrate, pool_size=pool_size)


# -- reading only -------------------------------------------------------------------

_SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")


class ReadOnlyDB(_Schema):
    """A fleet database opened for reading (the report): never creates or changes anything.

    Every query reads one snapshot, the database as it was at the first: on a
    database the ingest is writing, a report's queries (the sums, the hashes it
    names, the missing ranges, the revoked keys) must not each see a different
    moment, or a batch stored between two of them would be named by one and
    absent from another.  PostgreSQL: one ``REPEATABLE READ, READ ONLY``
    transaction, which :meth:`snapshot` exports for other connections to join
    (``snapshot=``, as ``pg_dump --jobs`` does).  SQLite: one read transaction;
    its snapshot cannot be shared, so another connection reads its own moment.
    The snapshot is held until :meth:`close`; a long report on PostgreSQL holds
    back vacuum that long, as any long read does.
    """

    def __init__(self, target: str | Path, snapshot: str | None = None) -> None:
        text = str(target)
        self.target = text
        self.dialect = "postgresql" if is_url(text) else "sqlite"
        self._conn: Any
        if self.dialect == "postgresql":
            if snapshot is not None and not _SNAPSHOT_ID.fullmatch(snapshot):
                raise ValueError(f"not a PostgreSQL snapshot id: {snapshot!r}")
            psycopg = _psycopg()
            try:
                self._conn = psycopg.connect(
                    text,
                    connect_timeout=10,
                    autocommit=True,
                    options="-c default_transaction_read_only=on",
                )
                self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                if snapshot is not None:
                    # SET TRANSACTION takes no parameters; the id is checked above.
                    self._conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            except psycopg.Error as e:
                raise _pg_error(text, e) from None
            self._errors: tuple[type[BaseException], ...] = (psycopg.Error,)
        else:
            if snapshot is not None:
                raise ValueError("a SQLite database's snapshot cannot be shared")
            self._conn = open_readonly(Path(text))
            self._conn.execute("BEGIN")
            self._errors = (sqlite3.Error,)

    def snapshot(self) -> str | None:
        """The id another :class:`ReadOnlyDB` joins this one's snapshot with (PostgreSQL;
        valid while this one is open), or ``None`` where snapshots cannot be shared."""
        if self.dialect != "postgresql":
            return None
        return str(self.all("SELECT pg_export_snapshot()")[0][0])

    def all(self, sql: str, params: Iterable[Any] = (), binary: bool = False) -> list[Any]:
        """Every row of ``sql``.  ``binary``: PostgreSQL sends the values in binary (a float
        as its 8 bytes, not as text the server formats and the client parses: the same
        values, for much less CPU over a fleet report's hundreds of thousands of rows)."""
        options: dict[str, Any] = {}
        if self.dialect == "postgresql":
            sql = sql.replace("?", "%s")
            options["binary"] = binary
        try:
            return list(self._conn.execute(sql, tuple(params), **options).fetchall())
        except self._errors as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise IngestError(f"cannot read {redact(self.target)}: {first}") from None

    def kind(self) -> Kind:
        """Ingest database or device store (:func:`cngmrv.signed.archive.classify`)."""
        if self.dialect == "sqlite":
            cols = self.all("SELECT name FROM pragma_table_info('batches')")
        else:
            cols = self.all(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'batches'"
            )
        return classify(self.tables(), {str(r[0]) for r in cols}, redact(self.target))

    def close(self) -> None:
        self._conn.close()
