"""The collector's SQLite record store: dedupe, queries, retention, concurrency, bad files."""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path

import pytest

from agent.collector import store as store_mod
from agent.collector.store import RecordStore, StoreError, filter_to_sql
from agent.records.filter import RecordFilter
from agent.records.record import Endpoint, PodRef, Record
from agent.schema import pb
from agent.schema.convert import from_pb, to_pb

TS = 1_795_442_587_000_000_000


def _rec(seq: int, **kw) -> Record:
    base = dict(
        type="data",
        ts_ns=TS + seq,
        agent_id="agent-a",
        node="node-1",
        seq=seq,
        pid=4211,
        tid=4212,
        comm="curl",
        source="openssl",
        conn_id="c1",
        fd=5,
        local=Endpoint("127.0.0.1", 51234),
        remote=Endpoint("198.18.0.2", 443),
        role="client",
        direction="egress",
        len=3,
        captured_len=3,
        data=b"GET",
    )
    base.update(kw)
    return Record(**base)


def _item(record: Record) -> tuple[Record, bytes]:
    return record, to_pb(record).SerializeToString()


def _seqs(rows: list[tuple[int, bytes]]) -> list[int]:
    return [pb.Record.FromString(wire).seq for _, wire in rows]


@pytest.fixture
def store(tmp_path: Path):
    with RecordStore(tmp_path / "records.db") as s:
        yield s


def test_insert_counts_new_and_duplicate_records(store: RecordStore) -> None:
    first = store.insert([_item(_rec(i)) for i in (1, 2, 3)])
    assert (first.stored, first.duplicates) == (3, 0)
    assert [item.rowid for item in first.new_items] == [1, 2, 3]
    assert [item.record.seq for item in first.new_items] == [1, 2, 3]

    # An agent re-sends 2 and 3 after a reconnect, with 4 new.
    again = store.insert([_item(_rec(i)) for i in (2, 3, 4)])
    assert (again.stored, again.duplicates) == (1, 2)
    # (A duplicate may use up a rowid: rowids only ever grow, they need not be dense.)
    assert [item.record.seq for item in again.new_items] == [4]
    assert again.new_items[0].rowid > 3

    # The same (agent_id, seq) twice in one batch: the first copy is the one stored.
    twice = store.insert(
        [_item(_rec(5, comm="first")), _item(_rec(5, comm="second")), _item(_rec(6))]
    )
    assert (twice.stored, twice.duplicates) == (2, 1)
    assert [item.record.comm for item in twice.new_items] == ["first", "curl"]
    stored = store.query(RecordFilter(comms=frozenset({"first", "second"})))
    assert [(rowid, pb.Record.FromString(w).process.comm) for rowid, w in stored] == [
        (twice.new_items[0].rowid, "first")
    ]

    # Same seq from another agent is a different record.
    other = store.insert([_item(_rec(1, agent_id="agent-b"))])
    assert (other.stored, other.duplicates) == (1, 0)

    assert store.insert([]).stored == 0
    stats = store.stats()
    assert stats["records"] == 7
    assert stats["stored_total"] == 7
    assert stats["duplicates_total"] == 3
    assert stats["db_bytes"] > 0


def test_new_items_carry_the_stored_rowid_and_wire(store: RecordStore) -> None:
    store.insert([_item(_rec(i)) for i in range(1, 4)])
    result = store.insert([_item(_rec(i)) for i in (9, 2, 8, 3, 7)])
    by_rowid = dict(store.query(RecordFilter()))
    assert [item.record.seq for item in result.new_items] == [9, 8, 7]
    for item in result.new_items:
        assert by_rowid[item.rowid] == item.wire
        assert pb.Record.FromString(item.wire).seq == item.record.seq


def test_query_returns_the_wire_record_unchanged(store: RecordStore) -> None:
    record, wire = _item(_rec(1, data=b"\x00\xffpayload", captured_len=9, len=9))
    store.insert([(record, wire)])
    assert store.query(RecordFilter()) == [(1, wire)]


FIELD_CASES = [
    ("nodes", "node-2", dict(node="node-2")),
    ("agent_ids", "agent-b", dict(agent_id="agent-b")),
    ("pids", 99, dict(pid=99)),
    ("comms", "python3", dict(comm="python3")),
    ("sources", "gotls", dict(source="gotls")),
    ("directions", "ingress", dict(direction="ingress")),
    ("conn_ids", "c2", dict(conn_id="c2")),
    ("remote_ips", "198.18.0.9", dict(remote=Endpoint("198.18.0.9", 443))),
    ("remote_ports", 8443, dict(remote=Endpoint("198.18.0.2", 8443))),
    ("local_ips", "::1", dict(local=Endpoint("::1", 51234))),
    ("local_ports", 40000, dict(local=Endpoint("127.0.0.1", 40000))),
    ("container_ids", "c0ffee", dict(container_id="c0ffee")),
    ("namespaces", "shop", dict(pod=PodRef("web-1", "shop"))),
    ("pods", "web-1", dict(pod=PodRef("web-1", "shop"))),
]


@pytest.mark.parametrize(
    ("field", "value", "differs"), FIELD_CASES, ids=[c[0] for c in FIELD_CASES]
)
def test_query_by_each_filter_field(store: RecordStore, field: str, value, differs: dict) -> None:
    store.insert(
        [
            _item(_rec(1)),
            _item(_rec(2, **differs)),
            _item(_rec(3, local=None, remote=None)),
            _item(_rec(4, **differs)),
        ]
    )
    # Record 3 has no endpoints: an endpoint filter must not match it.
    assert _seqs(store.query(RecordFilter(**{field: frozenset({value})}))) == [2, 4]
    assert _seqs(store.query(RecordFilter(**{field: frozenset({value, "zzz", 7})}))) == [2, 4]
    assert _seqs(store.query(RecordFilter())) == [1, 2, 3, 4]


def test_query_by_type_and_time(store: RecordStore) -> None:
    store.insert(
        [
            _item(_rec(1, type="open", direction=None, data=b"", captured_len=0, len=0)),
            _item(_rec(2)),
            _item(_rec(3, type="close", direction=None, data=b"", captured_len=0, len=0)),
            _item(Record(type="stats", ts_ns=TS + 4, agent_id="agent-a", seq=4, stats={"x": 1})),
        ]
    )
    assert _seqs(store.query(RecordFilter())) == [1, 2, 3]  # stats only when asked for
    assert _seqs(store.query(RecordFilter(types=frozenset({"stats"})))) == [4]
    assert _seqs(store.query(RecordFilter(types=frozenset()))) == []
    assert _seqs(store.query(RecordFilter(since_ns=TS + 2))) == [2, 3]
    assert _seqs(store.query(RecordFilter(until_ns=TS + 2))) == [1, 2]
    assert _seqs(store.query(RecordFilter(since_ns=TS + 2, until_ns=TS + 2))) == [2]
    assert _seqs(store.query(RecordFilter(since_ns=TS + 100))) == []


def test_query_pages_by_rowid(store: RecordStore) -> None:
    # Arrival order is not time order: pages follow arrival (rowid) order.
    seqs = list(range(1, 26))
    random.Random(7).shuffle(seqs)
    store.insert([_item(_rec(s)) for s in seqs])
    seen: list[int] = []
    after, pages = 0, 0
    while rows := store.query(RecordFilter(), after_rowid=after, limit=10):
        assert [rowid for rowid, _ in rows] == sorted(rowid for rowid, _ in rows)
        assert all(rowid > after for rowid, _ in rows)
        seen.extend(_seqs(rows))
        after = rows[-1][0]
        pages += 1
    assert pages == 3
    assert seen == seqs
    assert store.last_rowid() == 25
    # Paging a time window (the first page starts from the ts index).
    window = RecordFilter(since_ns=TS + 11)
    got, after = [], 0
    while rows := store.query(window, after_rowid=after, limit=4):
        got.extend(_seqs(rows))
        after = rows[-1][0]
    assert got == [s for s in seqs if s >= 11]


# -- RecordFilter.matches and filter_to_sql must agree ----------------------------------------

POOLS = {
    "nodes": ["n1", "n2", "n3"],
    "agent_ids": ["a1", "a2", "a3"],
    "pids": [1, 2, 3],
    "comms": ["curl", "nginx", "Curl"],
    "sources": ["openssl", "gotls", "proxy"],
    "directions": ["egress", "ingress"],
    "conn_ids": ["c1", "c2", "c3"],
    "remote_ips": ["198.18.0.1", "198.18.0.2", "::1"],
    "remote_ports": [443, 8443, 0],
    "local_ips": ["127.0.0.1", "198.18.0.1", "::1"],
    "local_ports": [40000, 40001, 443],
}
TYPES = ["data", "open", "close", "stats"]


def _random_record(rng: random.Random, seq: int) -> Record:
    def endpoint(ips: str, ports: str) -> Endpoint | None:
        return (
            None
            if rng.random() < 0.2
            else Endpoint(rng.choice(POOLS[ips]), rng.choice(POOLS[ports]))
        )

    rtype = rng.choice(TYPES)
    return Record(
        type=rtype,  # type: ignore[arg-type]
        ts_ns=TS + rng.randrange(50),
        agent_id=rng.choice(POOLS["agent_ids"]),
        node=rng.choice(POOLS["nodes"]),
        seq=seq,
        pid=rng.choice(POOLS["pids"]),
        comm=rng.choice(POOLS["comms"]),
        source=rng.choice(POOLS["sources"]),
        conn_id=rng.choice(POOLS["conn_ids"]),
        local=endpoint("local_ips", "local_ports"),
        remote=endpoint("remote_ips", "remote_ports"),
        direction=rng.choice(POOLS["directions"]) if rtype == "data" else None,  # type: ignore[arg-type]
    )


def _random_filter(rng: random.Random) -> RecordFilter:
    fields: dict = {}
    for name, pool in POOLS.items():
        if rng.random() < 0.25:
            # Sometimes a value no record has ("n9", 9, ...): the filter matches nothing there.
            extra = [f"{pool[0]}x" if isinstance(pool[0], str) else 9]
            fields[name] = frozenset(rng.sample(pool + extra, rng.randint(1, 3)))
    if rng.random() < 0.3:
        fields["types"] = frozenset(rng.sample(TYPES, rng.randint(0, 4)))
    if rng.random() < 0.3:
        fields["since_ns"] = TS + rng.randrange(60)
    if rng.random() < 0.3:
        fields["until_ns"] = TS + rng.randrange(60)
    return RecordFilter(**fields)


def test_filter_to_sql_agrees_with_matches(store: RecordStore) -> None:
    rng = random.Random(20261123)
    records = [_random_record(rng, seq) for seq in range(1, 401)]
    store.insert([_item(r) for r in records])
    by_rowid = {rowid: r.seq for rowid, r in enumerate(records, start=1)}
    nonempty = 0
    for _ in range(600):
        flt = _random_filter(rng)
        expected = [r.seq for r in records if flt.matches(r)]
        got = [by_rowid[rowid] for rowid, _ in store.query(flt, limit=10_000)]
        assert got == expected, (flt, filter_to_sql(flt))
        nonempty += bool(expected)
    assert nonempty > 100  # the generated filters do select something most of the time


def test_filter_to_sql_handles_none_like_matches() -> None:
    # Not reachable from the wire, but the two predicates still agree on it.
    flt = RecordFilter(directions=frozenset({None, "egress"}))  # type: ignore[arg-type]
    where, params = filter_to_sql(flt)
    assert "IS NULL" in where
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE records (type TEXT, direction TEXT)")
    conn.executemany("INSERT INTO records VALUES ('open', ?)", [(None,), ("egress",), ("ingress",)])
    rows = conn.execute(f"SELECT direction FROM records WHERE {where}", params).fetchall()
    assert rows == [(None,), ("egress",)]
    assert [
        flt.matches(_rec(1, type="open", direction=d)) for d in (None, "egress", "ingress")
    ] == [
        True,
        True,
        False,
    ]


# -- retention ---------------------------------------------------------------------------------


def test_schema_1_store_is_migrated_and_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with RecordStore(path) as s:
        s.insert([_item(_rec(1))])
    # What a schema-1 file looks like: no Kubernetes columns (nor schema 3's).
    conn = sqlite3.connect(path)
    for column in (*L7_COLUMNS, "container_id", "namespace", "pod"):
        conn.execute(f"ALTER TABLE records DROP COLUMN {column}")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    with RecordStore(path) as s:
        s.insert([_item(_rec(2, pod=PodRef("web-1", "shop"), container_id="ab" * 32))])
        assert _seqs(s.query(RecordFilter())) == [1, 2]
        assert _seqs(s.query(RecordFilter(namespaces=frozenset({"shop"})))) == [2]
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3


L7_COLUMNS = ("protocol", "method", "path", "status", "grpc_method")


def test_schema_2_store_is_migrated_and_filters_exchanges(tmp_path: Path) -> None:
    from agent.l7.exchange import Exchange, GrpcCall, HttpMessage

    path = tmp_path / "old2.db"
    with RecordStore(path) as s:
        s.insert([_item(_rec(1))])
    conn = sqlite3.connect(path)
    for column in L7_COLUMNS:
        conn.execute(f"ALTER TABLE records DROP COLUMN {column}")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()

    def exchange(seq: int, method: str, path: str, status: int, grpc: str = "") -> Record:
        rec = _rec(seq)
        rec.type = "exchange"
        rec.protocol = "grpc" if grpc else "http1"
        rec.exchange = Exchange(
            protocol=rec.protocol,
            request=HttpMessage(method=method, target=path),
            response=HttpMessage(status=status),
            grpc=GrpcCall(*grpc.split("/")) if grpc else None,
        )
        return rec

    with RecordStore(path) as s:
        s.insert(
            [
                _item(exchange(2, "GET", "/api/users", 200)),
                _item(exchange(3, "POST", "/api/users/7", 503)),
                _item(exchange(4, "POST", "/pkg.Echo/Say", 200, "pkg.Echo/Say")),
                _item(exchange(5, "POST", "/pkg.Other/Say", 200, "pkg.Other/Say")),
            ]
        )
        cases = {
            RecordFilter(methods=frozenset({"POST"})): [3, 4, 5],
            RecordFilter(path_prefixes=frozenset({"/api/"})): [2, 3],
            RecordFilter(statuses=frozenset(range(500, 600))): [3],
            RecordFilter(grpc_methods=frozenset({"pkg.Echo/Say"})): [4],
            RecordFilter(grpc_methods=frozenset({"pkg.Other"})): [5],
            RecordFilter(protocols=frozenset({"grpc"})): [4, 5],
            RecordFilter(): [1, 2, 3, 4, 5],
        }
        for flt, expected in cases.items():
            assert _seqs(s.query(flt)) == expected, flt
            # The SQL and the in-memory predicate agree.
            stored = [from_pb(pb.Record.FromString(w)) for _, w in s.query(RecordFilter())]
            assert [r.seq for r in stored if flt.matches(r)] == expected, flt
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3


def test_prune_by_age(tmp_path: Path) -> None:
    with RecordStore(tmp_path / "s.db", retention_seconds=10) as s:
        s.insert([_item(_rec(i, ts_ns=TS + i * 1_000_000_000)) for i in range(1, 21)])
        # now = TS + 25 s: records older than TS + 15 s go (seq 1..14).
        assert s.prune(now_ns=TS + 25_000_000_000) == 14
        assert _seqs(s.query(RecordFilter())) == list(range(15, 21))
        assert s.prune(now_ns=TS + 25_000_000_000) == 0
        stats = s.stats()
        assert (stats["records"], stats["pruned_total"]) == (6, 14)


def test_prune_by_count_keeps_the_last_stored(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "_PRUNE_CHUNK", 4)  # several chunks
    with RecordStore(tmp_path / "s.db", max_records=10) as s:
        # Stored out of time order: "oldest" is the first stored.
        s.insert([_item(_rec(i, ts_ns=TS - i)) for i in range(1, 26)])
        assert s.prune() == 15
        assert _seqs(s.query(RecordFilter())) == list(range(16, 26))
        assert s.prune() == 0
        assert s.stats()["records"] == 10


def test_prune_by_age_and_count(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "_PRUNE_CHUNK", 3)
    with RecordStore(tmp_path / "s.db", retention_seconds=1, max_records=5) as s:
        s.insert([_item(_rec(i, ts_ns=TS + i * 1_000_000_000)) for i in range(1, 21)])
        assert s.prune(now_ns=TS + 6_500_000_000) == 15  # 5 by age, then 10 by count
        assert _seqs(s.query(RecordFilter())) == list(range(16, 21))


def test_rowids_are_never_reused_after_pruning(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with RecordStore(path, max_records=0) as s:
        s.insert([_item(_rec(i)) for i in range(1, 4)])
        assert s.prune() == 3
        assert s.last_rowid() == 3
    with RecordStore(path) as s:
        assert s.insert([_item(_rec(9))]).new_items[0].rowid > 3


# -- persistence and files ---------------------------------------------------------------------


def test_reopen_keeps_records_and_dedupes_against_them(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with RecordStore(path) as s:
        s.insert([_item(_rec(i)) for i in range(1, 6)])
    with RecordStore(path) as s:
        assert _seqs(s.query(RecordFilter())) == [1, 2, 3, 4, 5]
        assert s.stats()["records"] == 5
        result = s.insert([_item(_rec(i)) for i in range(4, 8)])
        assert (result.stored, result.duplicates) == (2, 2)
        assert [item.record.seq for item in result.new_items] == [6, 7]
        assert result.new_items[0].rowid > 5
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_seq_beyond_int64_is_stored_and_deduplicated(store: RecordStore) -> None:
    big = (1 << 64) - 1
    assert store.insert([_item(_rec(big, ts_ns=TS)), _item(_rec(1 << 63, ts_ns=TS))]).stored == 2
    assert store.insert([_item(_rec(big, ts_ns=TS))]).duplicates == 1
    assert _seqs(store.query(RecordFilter())) == [big, 1 << 63]


def test_corrupt_file_raises_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "not-a-db.db"
    path.write_bytes(random.Random(1).randbytes(8192))
    with pytest.raises(StoreError, match=r"not-a-db\.db"):
        RecordStore(path)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a database\n" * 100)
    with pytest.raises(StoreError, match=r"notes\.txt"):
        RecordStore(text)


def test_unusable_paths_raise_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=str(tmp_path)):
        RecordStore(tmp_path)  # a directory
    with pytest.raises(StoreError, match="missing"):
        RecordStore(tmp_path / "missing" / "s.db")


def test_other_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a tlscap store"):
        RecordStore(path)
    assert sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    RecordStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {store_mod.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this tlscap supports"):
        RecordStore(path)


def test_closed_store_raises_but_still_reports_stats(tmp_path: Path) -> None:
    s = RecordStore(tmp_path / "s.db")
    s.insert([_item(_rec(1)), _item(_rec(2))])
    s.close()
    assert s.stats()["records"] == 2
    assert s.stats()["stored_total"] == 2
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.insert([_item(_rec(1))])
    with pytest.raises(StoreError, match="closed"):
        s.query(RecordFilter())


# -- threads -----------------------------------------------------------------------------------


def test_concurrent_inserts_and_reads(store: RecordStore) -> None:
    batches, per_batch = 40, 50
    errors: list[BaseException] = []
    results: dict[str, list] = {"agent-a": [], "agent-b": []}
    done = threading.Event()
    reads: list[int] = []

    def ingest(agent: str) -> None:
        try:
            for b in range(batches):
                # Each batch re-sends the previous batch's last 5 records.
                first = max(1, b * per_batch - 4)
                items = [
                    _item(_rec(s, agent_id=agent)) for s in range(first, (b + 1) * per_batch + 1)
                ]
                results[agent].append(store.insert(items))
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            after = 0
            while not done.is_set() or len(reads) < 2 * batches * per_batch:
                rows = store.query(RecordFilter(), after_rowid=after, limit=137)
                if rows:
                    assert rows[0][0] > after
                    reads.extend(rowid for rowid, _ in rows)
                    after = rows[-1][0]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ingest, args=(a,)) for a in results]
    reader = threading.Thread(target=read)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join(timeout=30)
    assert not errors
    total = 2 * batches * per_batch
    for agent_results in results.values():
        assert sum(r.stored for r in agent_results) == batches * per_batch
        assert sum(r.duplicates for r in agent_results) == (batches - 1) * 5
    new_rowids = sorted(item.rowid for rs in results.values() for r in rs for item in r.new_items)
    assert len(set(new_rowids)) == total
    assert reads == new_rowids  # the reader saw every stored row once, in order
    assert store.stats()["records"] == total
