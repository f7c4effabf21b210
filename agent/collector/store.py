"""The collector's record store: one embedded SQLite file.

Every record is kept as its serialized wire form (what replay sends back
unchanged) beside the columns a RecordFilter can select on.  (agent_id, seq) is
unique, so a batch an agent re-sends after a reconnect is stored once.  Each
row gets a store position, `rowid`, that only ever grows: replay pages and
subscriber cursors are rowids, and the live fan-out uses them to hand over from
replay to live without losing or repeating a record.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agent.records.filter import RecordFilter
from agent.records.record import Record

SCHEMA_VERSION = 3
# PRAGMA application_id: tells our file apart from any other SQLite database.
APPLICATION_ID = 0x544C5343  # "TLSC"

_TABLE = "records"
_SCHEMA = (
    f"""
CREATE TABLE {_TABLE} (
    -- AUTOINCREMENT: a rowid is never reused, even after retention has
    -- deleted every row, so a cursor held by a consumer stays meaningful.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts_ns INTEGER NOT NULL,
    node TEXT NOT NULL,
    type TEXT NOT NULL,
    pid INTEGER NOT NULL,
    comm TEXT NOT NULL,
    source TEXT NOT NULL,
    direction TEXT,
    local_ip TEXT,
    local_port INTEGER,
    remote_ip TEXT,
    remote_port INTEGER,
    conn_id TEXT NOT NULL,
    wire BLOB NOT NULL,
    container_id TEXT,  -- schema 2: Kubernetes attribution (NULL when unknown)
    namespace TEXT,
    pod TEXT,
    protocol TEXT,  -- schema 3: parsed HTTP/gRPC (agent/l7); NULL when not parsed
    method TEXT,
    path TEXT,
    status INTEGER,
    grpc_method TEXT,
    -- The de-duplication key (at-least-once delivery from agents).
    UNIQUE (agent_id, seq)
)
""",
    f"CREATE INDEX {_TABLE}_ts ON {_TABLE} (ts_ns)",
    # Replay by agent: one agent's records in rowid order, no sort per page.
    f"CREATE INDEX {_TABLE}_agent ON {_TABLE} (agent_id, id)",
)

_INSERT = (
    f"INSERT OR IGNORE INTO {_TABLE} (agent_id, seq, ts_ns, node, type, pid, comm, source,"
    " direction, local_ip, local_port, remote_ip, remote_port, conn_id, wire,"
    " container_id, namespace, pod, protocol, method, path, status, grpc_method)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_DELETE_OLDER = (
    f"DELETE FROM {_TABLE} WHERE id IN (SELECT id FROM {_TABLE} WHERE ts_ns < ? LIMIT ?)"
)
_DELETE_FIRST_STORED = (
    f"DELETE FROM {_TABLE} WHERE id IN (SELECT id FROM {_TABLE} ORDER BY id LIMIT ?)"
)
# INDEXED BY: left alone, SQLite answers min(id) by walking rowids from the top,
# the very scan this query is there to avoid.
_FIRST_ROWID_SINCE = f"SELECT min(id) FROM {_TABLE} INDEXED BY {_TABLE}_ts WHERE ts_ns >= ?"
# From schema 1 (no Kubernetes columns): old rows keep NULL there, as records of
# processes in no pod would.
_MIGRATE_1_TO_2 = tuple(
    f"ALTER TABLE {_TABLE} ADD COLUMN {column} TEXT"
    for column in ("container_id", "namespace", "pod")
)
# From schema 2: old rows were never parsed, as records of unparsed traffic are.
_MIGRATE_2_TO_3 = tuple(
    f"ALTER TABLE {_TABLE} ADD COLUMN {column}"
    for column in (
        "protocol TEXT",
        "method TEXT",
        "path TEXT",
        "status INTEGER",
        "grpc_method TEXT",
    )
)
# Rows deleted per transaction when pruning.
_PRUNE_CHUNK = 5000
# Idle reader connections kept for reuse; more concurrent readers than this
# open their own and close them afterwards.
_MAX_IDLE_READERS = 8
# How long a connection waits for a lock another process holds (a second
# process writing the same file, a checkpoint) before giving up.
_BUSY_TIMEOUT_S = 10.0


class StoreError(Exception):
    """The store file cannot be used (not a store, newer schema, I/O error); names the path."""


class StoredItem(NamedTuple):
    """A record as stored: its store position, the dataclass, and its wire form."""

    rowid: int
    record: Record
    wire: bytes


@dataclass(frozen=True)
class InsertResult:
    stored: int  # records new to the store
    duplicates: int  # records it already had (or repeated within the batch)
    new_items: list[StoredItem]  # the stored ones, in rowid order: what to fan out live


class RecordStore:
    """Thread-safe: one writer connection behind a lock, a pool of reader connections.

    WAL lets readers run while the writer writes.  Readers come from a pool
    rather than one connection per thread: gRPC worker threads come and go,
    and a pool is something close() can actually close.  A pooled connection
    is used by one thread at a time, so check_same_thread=False is safe.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        retention_seconds: float | None = None,
        max_records: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.retention_seconds = retention_seconds
        self.max_records = max_records
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._closed = False
        self._record_count: int | None = None  # counted on first need, then kept up to date
        self._stored_total = 0
        self._duplicates_total = 0
        self._pruned_total = 0
        try:
            make_private(self.path)
            writer = self._connect()
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open the record store: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the record store: {exc}") from exc
        try:
            _prepare(writer)
            # Checkpoints run on the committing thread: fewer, larger ones (~32 MB
            # of WAL rather than SQLite's 4 MB) measured ~15% more ingest throughput.
            writer.execute("PRAGMA wal_autocheckpoint = 8000")
            writer.execute(f"PRAGMA journal_size_limit = {64 << 20}")
        except (sqlite3.Error, StoreError) as exc:
            writer.close()
            raise StoreError(f"{self.path}: cannot open the record store: {exc}") from exc
        self._writer = writer

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._write_lock, self._pool_lock:
            if self._closed:
                return
            self._closed = True
            for conn in self._idle_readers:
                conn.close()
            self._idle_readers.clear()
            # stats() still answers after close (a final report at shutdown).
            with suppress(sqlite3.Error):
                self._count(self._writer)
            self._writer.close()

    # -- writing ---------------------------------------------------------------------------

    def insert(self, items: Sequence[tuple[Record, bytes]]) -> InsertResult:
        """Store a batch in one transaction; records already stored are counted, not stored."""
        if not items:
            return InsertResult(0, 0, [])
        rows = [_row(record, wire) for record, wire in items]
        with self._write_lock, self._writing() as conn:
            before = _last_assigned_rowid(conn)
            changes = conn.total_changes
            conn.executemany(_INSERT, rows)
            stored = conn.total_changes - changes
            new_items = _new_items(conn, items, before, stored)
            conn.execute("COMMIT")
            self._stored_total += stored
            self._duplicates_total += len(items) - stored
            if self._record_count is not None:
                self._record_count += stored
        return InsertResult(stored, len(items) - stored, new_items)

    def prune(self, now_ns: int | None = None) -> int:
        """Apply retention: drop the records older than retention_seconds, then the
        oldest-stored beyond max_records.  Returns how many were deleted."""
        deleted = 0
        if self.retention_seconds is not None:
            now = time.time_ns() if now_ns is None else now_ns
            cutoff = now - int(self.retention_seconds * 1e9)
            while n := self._delete_chunk(_DELETE_OLDER, lambda _count: (cutoff, _PRUNE_CHUNK)):
                deleted += n
        if self.max_records is not None:
            limit = self.max_records

            def excess(count: int) -> tuple | None:
                return (min(count - limit, _PRUNE_CHUNK),) if count > limit else None

            while n := self._delete_chunk(_DELETE_FIRST_STORED, excess):
                deleted += n
        return deleted

    def _delete_chunk(self, sql: str, params_for: Callable[[int], tuple | None]) -> int:
        """One DELETE transaction; params_for(record count) gives its parameters, or
        None when there is nothing to delete.  The writer lock is released between
        chunks, so a large prune never stalls ingest for long."""
        with self._write_lock, self._writing() as conn:
            count = self._count(conn)
            params = params_for(count)
            if params is None:
                return 0
            n = conn.execute(sql, params).rowcount
            conn.execute("COMMIT")
            self._record_count = count - n
            self._pruned_total += n
            return n

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The writer inside BEGIN IMMEDIATE (rolled back unless the body commits);
        the caller holds _write_lock.  SQLite errors become StoreError."""
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _count(self, conn: sqlite3.Connection) -> int:
        # Counted once per process, then maintained by insert/prune: count(*) is a
        # full index scan, too slow to repeat on every prune of a large store.
        if self._record_count is None:
            self._record_count = conn.execute(f"SELECT count(*) FROM {_TABLE}").fetchone()[0]
        return self._record_count

    # -- reading ---------------------------------------------------------------------------

    def query(
        self, flt: RecordFilter, *, after_rowid: int = 0, limit: int = 1000
    ) -> list[tuple[int, bytes]]:
        """(rowid, wire record) of the records matching `flt` stored after `after_rowid`,
        in rowid (= insertion) order, at most `limit` of them."""
        where, params = filter_to_sql(flt)
        sql = f"SELECT id, wire FROM {_TABLE} WHERE id > ? AND {where} ORDER BY id LIMIT ?"
        with self._reader() as conn:
            if flt.since_ns and after_rowid == 0:
                # Pages walk the table in rowid order from the cursor; a first page
                # for "the last five minutes" of a week's store starts at the first
                # rowid in that window (found on the ts index) instead of the top.
                first = conn.execute(_FIRST_ROWID_SINCE, (flt.since_ns,)).fetchone()[0]
                if first is None:
                    return []
                after_rowid = first - 1
            return conn.execute(sql, [after_rowid, *params, limit]).fetchall()

    def last_rowid(self) -> int:
        """The highest rowid ever assigned (0 for a new store): "now", as a cursor."""
        with self._reader() as conn:
            return _last_assigned_rowid(conn)

    def stats(self) -> dict[str, int]:
        """Counters; the *_total ones count since this RecordStore was opened.

        Works after close() too, with the values at closing time.
        """
        with self._write_lock:
            if self._closed:
                records = self._record_count or 0
            else:
                try:
                    records = self._count(self._writer)
                except sqlite3.Error as exc:
                    raise StoreError(f"{self.path}: {exc}") from exc
            out = {
                "records": records,
                "stored_total": self._stored_total,
                "duplicates_total": self._duplicates_total,
                "pruned_total": self._pruned_total,
            }
        out["db_bytes"] = _file_size(self.path)
        out["wal_bytes"] = _file_size(Path(f"{self.path}-wal"))
        return out

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            if self._closed:
                raise StoreError(f"{self.path}: the store is closed")
            conn = self._idle_readers.pop() if self._idle_readers else None
        try:
            if conn is None:
                conn = self._connect()
                conn.execute("PRAGMA query_only = ON")
            yield conn
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        finally:
            if conn is not None:
                with self._pool_lock:
                    if self._closed or len(self._idle_readers) >= _MAX_IDLE_READERS:
                        conn.close()
                    else:
                        self._idle_readers.append(conn)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; the writer says BEGIN itself.
        conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        # Per connection.  With WAL, NORMAL loses no committed data on a process
        # crash; a power cut may lose the last commits, never corrupt the file.
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn


_COMPANIONS = ("-wal", "-shm", "-journal")


def make_private(path: Path) -> None:
    """Create the store file 0600 whatever the umask (it holds captured plaintext),
    and tighten it and the companions an earlier run left to 0600.

    SQLite creates its -wal, -shm and -journal files itself, with the database
    file's permission bits (its unix VFS copies them and fchmods past the umask),
    so a 0600 database gets 0600 companions.  Changing the umask around the open
    instead would race every other thread of the agent creating files.  A file
    this process does not own (a reader's view of someone else's store) is left
    as it is."""
    name = str(path)
    if name == ":memory:" or name.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except PermissionError:
        if os.path.exists(path):  # not ours to write: SQLite opens it read-only
            return
        raise
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            _tighten(lambda: os.fchmod(fd, 0o600))
    finally:
        os.close(fd)
    for suffix in _COMPANIONS:
        _tighten(lambda suffix=suffix: os.chmod(name + suffix, 0o600))


def _tighten(chmod: Callable[[], None]) -> None:
    with suppress(FileNotFoundError, PermissionError):
        chmod()


def filter_to_sql(flt: RecordFilter) -> tuple[str, list]:
    """A WHERE clause (and its parameters) selecting exactly what flt.matches() accepts.

    The clause is built only from this module's column names and placeholders;
    values travel as parameters.
    """
    clauses: list[str] = []
    params: list = []

    def one_of(column: str, values: frozenset, *, always: bool = False) -> None:
        # An empty set means "any" for every field but `types` (always=True),
        # where it matches nothing, as in RecordFilter.matches.
        if not values and not always:
            return
        present = [v for v in values if v is not None]
        terms = []
        if present:
            terms.append(f"{column} IN ({', '.join('?' * len(present))})")
            params.extend(present)
        if None in values:  # SQL's `NULL IN (...)` is never true; Python's `None in` can be
            terms.append(f"{column} IS NULL")
        clauses.append(f"({' OR '.join(terms)})" if terms else "0")

    one_of("type", flt.types, always=True)
    # Unary + (a no-op on the value) keeps SQLite off an index where using it
    # would mean sorting every match on each page; RecordStore.query walks rowid
    # order instead.  One agent's records are already in rowid order on its index.
    if flt.since_ns:
        clauses.append("+ts_ns >= ?")
        params.append(flt.since_ns)
    if flt.until_ns:
        clauses.append("+ts_ns <= ?")
        params.append(flt.until_ns)
    one_of("node", flt.nodes)
    one_of("agent_id" if len(flt.agent_ids) <= 1 else "+agent_id", flt.agent_ids)
    one_of("pid", flt.pids)
    one_of("comm", flt.comms)
    one_of("source", flt.sources)
    one_of("direction", flt.directions)
    one_of("conn_id", flt.conn_ids)
    # A record without an endpoint has NULL here, which no IN (...) matches:
    # the same as matches() rejecting `remote is None` when remote_* is set.
    one_of("remote_ip", flt.remote_ips)
    one_of("remote_port", flt.remote_ports)
    one_of("local_ip", flt.local_ips)
    one_of("local_port", flt.local_ports)
    one_of("container_id", flt.container_ids)
    one_of("namespace", flt.namespaces)
    one_of("pod", flt.pods)
    one_of("protocol", flt.protocols)
    if flt.selects_exchanges_only:
        clauses.append("type = 'exchange'")
    one_of("method", flt.methods)
    one_of("status", flt.statuses)
    if flt.path_prefixes:
        terms = []
        for prefix in flt.path_prefixes:
            terms.append("substr(path, 1, ?) = ?")
            params.extend((len(prefix), prefix))
        clauses.append(f"({' OR '.join(terms)})")
    if flt.grpc_methods:
        # A value is a whole "pkg.Service/Method" or a service name (all its methods).
        marks = ", ".join("?" * len(flt.grpc_methods))
        clauses.append(
            f"(grpc_method IN ({marks})"
            f" OR substr(grpc_method, 1, instr(grpc_method, '/') - 1) IN ({marks}))"
        )
        params.extend(flt.grpc_methods)
        params.extend(flt.grpc_methods)
    return " AND ".join(clauses), params


def _prepare(conn: sqlite3.Connection) -> None:
    """Check the file is a tlscap store of a version we know, creating the schema
    in a new file.  Raises StoreError (or sqlite3.Error for a non-database)."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise StoreError(f"cannot use write-ahead logging (journal mode stays {mode!r})")
    _check_identity(conn)
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Checked again under the write lock: another process may have just created it.
        version = _check_identity(conn)
        if version == 0:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        else:
            migrations = (_MIGRATE_1_TO_2, _MIGRATE_2_TO_3)
            for step in migrations[version - 1 :]:
                for statement in step:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _check_identity(conn: sqlite3.Connection) -> int:
    """The schema version of a usable file (0: empty, to be created)."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id not in (0, APPLICATION_ID):
        raise StoreError(f"not a tlscap store (SQLite application_id {app_id:#x})")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store schema version {version} is newer than this tlscap supports"
            f" ({SCHEMA_VERSION}); upgrade tlscap or use another file"
        )
    if version == 0:
        tables = [
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        if tables:
            raise StoreError(f"not a tlscap store (an SQLite database with tables {tables})")
    elif version not in (1, 2, SCHEMA_VERSION):  # 1 and 2 are migrated by _prepare
        raise StoreError(f"unknown store schema version {version}")
    return version


def _row(record: Record, wire: bytes) -> tuple:
    local, remote = record.local, record.remote
    return (
        record.agent_id,
        _int64(record.seq),
        record.ts_ns,
        record.node,
        record.type,
        record.pid,
        record.comm,
        record.source,
        record.direction,
        local.ip if local is not None else None,
        local.port if local is not None else None,
        remote.ip if remote is not None else None,
        remote.port if remote is not None else None,
        record.conn_id,
        wire,
        record.container_id or None,
        record.pod.namespace if record.pod is not None else None,
        record.pod.name if record.pod is not None else None,
        *_l7_columns(record),
    )


def _l7_columns(record: Record) -> tuple:
    """protocol, method, path, status, grpc_method (NULL where not applicable)."""
    ex = record.exchange
    if ex is None:
        return (record.protocol or None, None, None, None, None)
    req, resp = ex.request, ex.response
    return (
        record.protocol or None,
        req.method if req is not None else None,
        req.target if req is not None else None,
        resp.status if resp is not None else None,
        ex.grpc.full_method if ex.grpc is not None else None,
    )


def _int64(seq: int) -> int:
    # seq is a uint64 on the wire and SQLite integers are int64: map the upper half
    # onto the negatives (one-to-one) instead of failing a whole batch on overflow.
    return seq - (1 << 64) if seq >= 1 << 63 else seq


def _last_assigned_rowid(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (_TABLE,)).fetchone()
    return row[0] if row else 0


def _new_items(
    conn: sqlite3.Connection,
    items: Sequence[tuple[Record, bytes]],
    before: int,
    stored: int,
) -> list[StoredItem]:
    """Which items this transaction stored, with their rowids.

    Inside our write transaction AUTOINCREMENT hands out before+1, before+2, ...
    in statement order, so when nothing was a duplicate (the usual case) the
    rowids follow without asking the database.
    """
    if stored == 0:
        return []
    if stored == len(items) and conn.execute("SELECT last_insert_rowid()").fetchone()[0] == (
        before + stored
    ):
        return [StoredItem(before + 1 + i, record, wire) for i, (record, wire) in enumerate(items)]
    rowids = {
        (agent_id, seq): rowid
        for rowid, agent_id, seq in conn.execute(
            f"SELECT id, agent_id, seq FROM {_TABLE} WHERE id > ? ORDER BY id", (before,)
        )
    }
    new_items = []
    for record, wire in items:
        # pop: of a key repeated within the batch only the first copy was stored.
        rowid = rowids.pop((record.agent_id, _int64(record.seq)), None)
        if rowid is not None:
            new_items.append(StoredItem(rowid, record, wire))
    new_items.sort(key=lambda item: item.rowid)
    return new_items


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
