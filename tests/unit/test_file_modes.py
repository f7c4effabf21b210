"""Every file holding captured plaintext is 0600 whatever the umask: pcapng output,
the SQLite store and the files SQLite makes beside it, `tlscap export` output; a
pre-existing file with looser permissions is tightened when opened for writing."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.records.record import Endpoint, Record
from agent.sinks.pcapng import PcapngSink
from agent.sinks.store import StoreSink

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _record(seq: int) -> Record:
    return Record(
        type="data",
        ts_ns=1_000_000_000 + seq,
        pid=1,
        comm="app",
        source="openssl",
        conn_id="c1",
        fd=3,
        local=Endpoint("127.0.0.1", 50000),
        remote=Endpoint("127.0.0.1", 443),
        role="client",
        direction="egress",
        offset=seq * 5,
        len=5,
        captured_len=5,
        data=b"hello",
        seq=seq,
        agent_id="a1",
    )


def test_pcapng_output_is_private_and_tightens_an_existing_file(tmp_path: Path, no_umask) -> None:
    new = tmp_path / "new.pcapng"
    sink = PcapngSink.open(str(new))
    sink.write(_record(1))
    sink.close()
    assert mode(new) == 0o600
    old = tmp_path / "old.pcapng"
    old.write_bytes(b"x")
    old.chmod(0o644)
    PcapngSink.open(str(old)).close()
    assert mode(old) == 0o600


def test_store_and_sqlite_companions_are_private(tmp_path: Path, no_umask) -> None:
    path = tmp_path / "records.db"
    (tmp_path / "records.db-wal").write_bytes(b"")  # left by an earlier run, too open
    (tmp_path / "records.db-wal").chmod(0o666)
    sink = StoreSink(path, interval=0)
    for seq in range(1, 4):
        sink.write(_record(seq))
    sink.flush()
    files = sorted(p for p in tmp_path.iterdir() if p.name.startswith("records.db"))
    assert {p.name for p in files} >= {"records.db", "records.db-wal", "records.db-shm"}
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    sink.close()
    assert mode(path) == 0o600


def test_export_output_is_private(tmp_path: Path) -> None:
    store = tmp_path / "records.db"
    old = os.umask(0o077)  # the store itself is not what this test is about
    try:
        sink = StoreSink(store, interval=0)
        sink.write(_record(1))
        sink.close()
    finally:
        os.umask(old)
    out = tmp_path / "out.pcapng"
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "export", "--store", str(store), "--pcapng", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        umask=0,  # not preexec_fn: Python code in a fork of this threaded process can hang or crash
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0 and mode(out) == 0o600
