"""JSON-lines and terminal sinks."""

from __future__ import annotations

import base64
import errno
import fcntl
import io
import json
import multiprocessing
import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.records.record import Endpoint, Record
from agent.sinks.base import IOV_MAX, OutputError, PeriodicFlusher, Sink
from agent.sinks.jsonl import JsonlSink, encode_record
from agent.sinks.terminal import TerminalSink, looks_like_text, render_hexdump, render_text

IDENTITY = {"type", "ts_ns", "pid", "tid", "comm", "source", "conn_id", "fd", "local", "remote"}
IDENTITY |= {"role"}
DATA_FIELDS = IDENTITY | {"direction", "offset", "len", "captured_len", "truncated", "data_b64"}
STATS_FIELDS = {"type", "ts_ns", "events", "bytes", "lost"}

# 2026-11-23 14:03:07.123456789 UTC
TS = 1795442587_123456789


def _rec(type_: str = "data", **kw) -> Record:
    base = dict(
        ts_ns=TS,
        pid=4211,
        tid=4212,
        comm="curl",
        source="openssl",
        conn_id="4211-5-1",
        fd=5,
        local=Endpoint("127.0.0.1", 51234),
        remote=Endpoint("127.0.0.1", 8443),
        role="client",
    )
    if type_ == "data":
        data = kw.pop("data", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        base.update(direction="egress", len=len(data), captured_len=len(data), data=data)
    base.update(kw)
    return Record(type_, **base)  # type: ignore[arg-type]


def _stats() -> Record:
    return Record("stats", ts_ns=TS, stats={"events": 12, "bytes": 3456, "lost": 0})


# --- JSON lines ------------------------------------------------------------------------


def _lines(records: list[Record]) -> list[str]:
    buf = io.BytesIO()
    sink = JsonlSink(buf)
    for r in records:
        sink.write(r)
    sink.close()
    text = buf.getvalue().decode("ascii")
    assert text.endswith("\n")
    return text.splitlines()


def test_jsonl_every_contract_field_present() -> None:
    lines = _lines([_rec("open"), _rec("data"), _rec("close"), _stats()])
    assert len(lines) == 4
    objs = [json.loads(line) for line in lines]
    assert [o["type"] for o in objs] == ["open", "data", "close", "stats"]
    assert objs[0].keys() >= IDENTITY and objs[2].keys() >= IDENTITY
    assert objs[1].keys() >= DATA_FIELDS
    assert objs[3].keys() >= STATS_FIELDS
    data = objs[1]
    assert data["local"] == {"ip": "127.0.0.1", "port": 51234}
    assert (data["direction"], data["role"], data["ts_ns"]) == ("egress", "client", TS)
    assert data["truncated"] is False and data["len"] == data["captured_len"] == 27
    assert objs[3]["events"] == 12 and objs[3]["lost"] == 0


def test_jsonl_compact_one_line_per_record() -> None:
    (line,) = _lines([_rec(comm="a b\nc", data=b"x\ny\n")])
    assert ", " not in line and '": ' not in line
    assert json.loads(line)["comm"] == "a b\nc"


def test_jsonl_payload_base64_exact_bytes() -> None:
    payload = bytes(range(256)) * 3 + b"\x00\xff"
    (line,) = _lines([_rec(data=payload)])
    assert base64.b64decode(json.loads(line)["data_b64"], validate=True) == payload
    (empty,) = _lines([_rec(data=b"")])
    assert json.loads(empty)["data_b64"] == ""


def test_jsonl_unknown_endpoints_and_ipv6() -> None:
    (line,) = _lines([_rec(local=Endpoint("::1", 443), remote=None, role="unknown")])
    obj = json.loads(line)
    assert obj["local"] == {"ip": "::1", "port": 443}
    assert obj["remote"] is None and obj["role"] == "unknown"


def test_jsonl_non_ascii_and_undecodable_comm_stay_ascii() -> None:
    comm = "caf\u00e9" + b"\xff".decode("utf-8", "surrogateescape")
    line = encode_record(_rec(comm=comm))
    assert line.isascii()
    assert json.loads(line)["comm"] == comm


def test_jsonl_open_file_flush_policy_and_close(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JsonlSink.open(str(path), flush_interval=0.5)
    sink.write(_rec())
    # Nothing buffered: a batch is one writev(2), and `tail -f` sees it at once.
    assert len(path.read_text().splitlines()) == 1
    sink.write(_rec("close"))
    sink.flush()
    assert len(path.read_text().splitlines()) == 2
    sink.write(_stats())
    sink.close()
    assert [json.loads(x)["type"] for x in path.read_text().splitlines()] == [
        "data",
        "close",
        "stats",
    ]
    with pytest.raises(ValueError):
        sink.write(_rec())


def test_jsonl_open_truncates_or_appends(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with JsonlSink.open(str(path)) as sink:
        sink.write(_stats())
    assert path.read_text().count("\n") == 1
    with JsonlSink.open(str(path), append=True) as sink:
        sink.write(_stats())
    assert path.read_text().count("\n") == 2


@pytest.mark.parametrize("where", ["missing-dir/out.jsonl", "."])
def test_jsonl_open_bad_path_is_one_line_oserror(tmp_path: Path, where: str) -> None:
    path = str(tmp_path / where)
    with pytest.raises(OutputError) as info:
        JsonlSink.open(path)
    assert isinstance(info.value, OSError) and info.value.errno
    msg = str(info.value)
    assert "\n" not in msg and path in msg and msg.startswith("cannot write JSON lines to")


def test_jsonl_dash_is_stdout_and_left_open() -> None:
    sink = JsonlSink.open("-")
    assert sink._out.stream is sys.stdout.buffer
    sink.close()
    assert not sys.stdout.closed


def test_sinks_satisfy_protocol() -> None:
    assert isinstance(JsonlSink(io.BytesIO()), Sink)
    assert isinstance(TerminalSink(io.StringIO()), Sink)


# --- the flush policy ------------------------------------------------------------------


class CountingStream(io.StringIO):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.flushes = 0
        self.fail = fail
        self.flushed = threading.Event()

    def flush(self) -> None:
        self.flushes += 1
        self.flushed.set()
        if self.fail:
            raise BrokenPipeError(32, "Broken pipe")


def test_flusher_at_most_once_per_interval() -> None:
    now = [0.0]
    stream = CountingStream()
    out = PeriodicFlusher(stream, interval=10, clock=lambda: now[0])  # timer won't fire
    for _ in range(1000):
        out.write("x\n")
    assert stream.flushes == 0
    now[0] = 10.0
    out.write("y\n")
    assert stream.flushes == 1
    out.close()
    assert stream.flushes == 2
    out.close()  # idempotent
    assert stream.flushes == 2


def test_flusher_write_lines_hands_each_line_over_whole() -> None:
    """JsonlSink's batches: no joined copy of the batch, the same bytes in order, and
    the same flush policy as write()."""
    now = [0.0]
    raw = io.BytesIO()
    out = PeriodicFlusher(raw, interval=10, clock=lambda: now[0])
    lines = [b'{"n":%d}\n' % i for i in range(1000)]
    out.write_lines(lines[:500])
    out.write_lines(lines[500:])
    assert raw.getvalue() == b"".join(lines)
    out.close()
    with pytest.raises(ValueError):
        out.write_lines([b"late\n"])


def test_flusher_timer_failure_surfaces_on_next_call() -> None:
    stream = CountingStream(fail=True)
    out = PeriodicFlusher(stream, interval=0.01)
    out.write("x\n")
    assert stream.flushed.wait(5)
    deadline = time.monotonic() + 5
    while out._error is None and time.monotonic() < deadline:  # raised just after the event
        time.sleep(0.001)
    with pytest.raises(BrokenPipeError):
        out.write("y\n")


# --- lines straight to a file descriptor (writev) --------------------------------------


def _numbered(n: int, pad: int = 0) -> list[bytes]:
    """n distinct lines of about `pad` bytes or more, of differing lengths."""
    return [b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * (pad + i % 7)) for i in range(n)]


def test_write_lines_batch_over_iov_max(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    writev = os.writev

    def counting(fd: int, iov: list) -> int:
        calls.append(len(iov))
        return writev(fd, iov)

    monkeypatch.setattr(os, "writev", counting)
    path = tmp_path / "out.jsonl"
    lines = _numbered(2 * IOV_MAX + 5)
    with path.open("wb", buffering=0) as f:
        out = PeriodicFlusher(f, interval=10)
        out.write_lines(lines)
        out.close()
    assert calls == [IOV_MAX, IOV_MAX, 5]
    assert path.read_bytes() == b"".join(lines)

    calls.clear()
    n = IOV_MAX + 300
    with JsonlSink.open(str(path)) as sink:
        sink.write_many([_rec(data=b"%d" % i, offset=i) for i in range(n)])
    assert calls == [IOV_MAX, 300]
    assert [json.loads(line)["offset"] for line in path.read_text().splitlines()] == list(range(n))


def test_write_lines_short_writes_lose_and_cut_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """writev(2) may take only part of what it is given (a signal, a full pipe): the
    rest must follow from the first byte not taken, whatever the cut."""
    rng = random.Random(5)
    calls = [0]

    def short(fd: int, iov: list) -> int:
        calls[0] += 1
        if calls[0] % 7 == 0:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        data = b"".join(iov)
        return os.write(fd, data[: rng.randint(1, min(len(data), 5000))])

    monkeypatch.setattr(os, "writev", short)
    path = tmp_path / "out.jsonl"
    lines = _numbered(3000, pad=300)
    with path.open("wb", buffering=0) as f:
        out = PeriodicFlusher(f, interval=10)
        for start in range(0, len(lines), 700):
            out.write_lines(lines[start : start + 700])
    assert calls[0] > 100  # many short writes and waits, not a few whole ones
    assert path.read_bytes() == b"".join(lines)


def test_write_lines_non_blocking_pipe_slow_reader() -> None:
    """A real pipe: non-blocking (stdout shared with a parent that set O_NONBLOCK),
    one page of room, a reader slower than the writer: writev takes part of a batch,
    then fails with EAGAIN until the reader makes room."""
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ
    os.set_blocking(w, False)
    got = bytearray()

    def read() -> None:
        while chunk := os.read(r, 3000):
            got.extend(chunk)
            time.sleep(0.0005)

    reader = threading.Thread(target=read)
    reader.start()
    lines = _numbered(400, pad=2000)
    with open(w, "wb", buffering=0) as f:
        out = PeriodicFlusher(f, interval=10)
        out.write_lines(lines[:150])
        out.write_lines(lines[150:])
        out.close()
    reader.join(30)
    os.close(r)
    assert bytes(got) == b"".join(lines)


def _append_worker(path: str, proc: int, start: object) -> None:
    rng = random.Random(proc)
    start.wait(10)  # type: ignore[attr-defined]
    with JsonlSink.open(path, append=True) as sink:
        for batch in range(12):
            sink.write_many(
                [
                    _rec(conn_id=f"{proc}-5-1", offset=i, data=b"%d:%d|" % (proc, i) * size)
                    for i in range(batch * 150, batch * 150 + 150)
                    for size in [rng.randint(1, 900)]
                ]
            )


def test_two_processes_appending_keep_every_line_whole(tmp_path: Path) -> None:
    """Capture workers each append to one file (O_APPEND): a batch's writev is one
    append, so their lines interleave but never split."""
    path = str(tmp_path / "out.jsonl")
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_worker, args=(path, p, start)) for p in (1, 2)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    offsets: dict[str, list[int]] = {"1-5-1": [], "2-5-1": []}
    with open(path, "rb") as f:
        for line in f:
            obj = json.loads(line)
            data = base64.b64decode(obj["data_b64"])
            unit = b"%s:%d|" % (obj["conn_id"][0].encode(), obj["offset"])
            assert data and data == unit * (len(data) // len(unit))
            offsets[obj["conn_id"]].append(obj["offset"])
    assert offsets == {"1-5-1": list(range(1800)), "2-5-1": list(range(1800))}
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_write_lines_without_a_descriptor_keep_the_flush_policy() -> None:
    """A stream with no file descriptor (BytesIO, under a buffer or not) gets
    writelines(), and the lines wait in its buffer for the periodic flush."""
    now = [0.0]
    raw = io.BytesIO()
    out = PeriodicFlusher(io.BufferedWriter(raw, 1 << 16), interval=10, clock=lambda: now[0])
    lines = _numbered(20)
    out.write_lines(lines)
    assert raw.getvalue() == b""
    now[0] = 10.0
    out.write_lines(lines)
    assert raw.getvalue() == b"".join(lines * 2)
    out.write_lines(lines)
    out.close()
    assert raw.getvalue() == b"".join(lines * 3)


def test_write_lines_after_buffered_write_keep_order(tmp_path: Path) -> None:
    path = tmp_path / "out"
    with path.open("wb") as f:  # buffered
        out = PeriodicFlusher(f, interval=10)
        out.write(b"first\n")  # type: ignore[arg-type]
        out.write_lines([b"second\n"])
        assert path.read_bytes() == b"first\nsecond\n"


def test_write_lines_errors_surface_from_the_write() -> None:
    r, w = os.pipe()
    os.close(r)
    with open(w, "wb", buffering=0) as f, pytest.raises(BrokenPipeError):
        PeriodicFlusher(f).write_lines([b"x\n"])
    if os.path.exists("/dev/full"):
        sink = JsonlSink.open("/dev/full")
        with pytest.raises(OSError) as info:
            sink.write(_rec())
        assert info.value.errno == errno.ENOSPC
        sink.close()


# --- terminal --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _render(record: Record, **kw) -> list[str]:
    return TerminalSink(io.StringIO(), color=False, **kw).render(record)


def test_terminal_header_egress_and_ingress() -> None:
    lines = _render(_rec())
    assert lines[0] == (
        "14:03:07.123456 curl[4211/4212] openssl egress  127.0.0.1:51234 -> 127.0.0.1:8443 "
        "client conn=4211-5-1 fd=5 off=0 len=27"
    )
    ingress = _render(_rec(direction="ingress", offset=27))[0]
    assert " ingress 127.0.0.1:51234 <- 127.0.0.1:8443 client " in ingress
    assert ingress.endswith(" off=27 len=27")


def test_terminal_text_payload() -> None:
    lines = _render(_rec(data=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert lines[1:] == ["  GET / HTTP/1.1", "  Host: x", "  "]
    tricky = b'{"a":\t1}\x1b[2J bare\rcr caf\xc3\xa9 \xff\n'
    assert looks_like_text(tricky)
    assert render_text(tricky) == ['{"a":\t1}\\x1b[2J bare\\rcr caf\u00e9 \\xff']


def test_terminal_binary_payload_hexdump() -> None:
    data = bytes(range(0x3E, 0x3E + 20)) + b"\x00\x01\xfe"
    assert not looks_like_text(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    lines = _render(_rec(data=b"\x00" + data))
    assert lines[1] == (
        "  00000000  00 3e 3f 40 41 42 43 44  45 46 47 48 49 4a 4b 4c  |.>?@ABCDEFGHIJKL|"
    )
    assert lines[2] == ("  00000010  4d 4e 4f 50 51 00 01 fe                           |MNOPQ...|")
    assert render_hexdump(b"") == []


def test_terminal_max_bytes_marker() -> None:
    lines = _render(_rec(data=b"a" * 100), max_bytes=10)
    assert lines[1:] == ["  aaaaaaaaaa", "  ... (90 more bytes)"]
    binary = _render(_rec(data=bytes(100)), max_bytes=16)
    assert len(binary) == 3 and binary[2] == "  ... (84 more bytes)"


def test_terminal_truncated_capture_marked() -> None:
    rec = _rec(data=b"hello", len=5000, captured_len=5, truncated=True)
    lines = _render(rec)
    assert lines[0].endswith(" len=5000 captured=5 TRUNCATED")
    assert lines[1:] == ["  hello", "  ... (4995 bytes not captured)"]
    # not captured at all (e.g. payload capture off): header + marker only
    lines = _render(_rec(data=b"", len=1, captured_len=0, truncated=True))
    assert lines[1:] == ["  ... (1 byte not captured)"]


def test_terminal_ipv6_brackets_and_unknown_endpoints() -> None:
    rec = _rec(local=Endpoint("::1", 51234), remote=Endpoint("2001:db8::1", 443))
    assert " [::1]:51234 -> [2001:db8::1]:443 client " in _render(rec)[0]
    rec = _rec(local=None, remote=None, role="unknown", conn_id="")
    assert " ? -> ? unknown conn=? fd=5 " in _render(rec)[0]


def test_terminal_open_close_stats_lines() -> None:
    assert _render(_rec("open")) == [
        "14:03:07.123456 curl[4211/4212] openssl open    127.0.0.1:51234 <-> 127.0.0.1:8443 "
        "client conn=4211-5-1 fd=5"
    ]
    (close,) = _render(_rec("close"))
    assert " close   127.0.0.1:51234 <-> " in close
    assert _render(_stats()) == ["14:03:07.123456 stats events=12 bytes=3456 lost=0"]


def test_terminal_escapes_comm() -> None:
    line = _render(_rec(comm="ev\x1b]0;x\x07il"))[0]
    assert "\x1b" not in line and "ev\\x1b]0;x\\x07il[4211/4212]" in line


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_color_only_on_tty_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    for stream, color, expect in [
        (io.StringIO(), None, False),
        (FakeTTY(), None, True),
        (io.StringIO(), True, True),
        (FakeTTY(), False, False),
    ]:
        sink = TerminalSink(stream, color=color)
        sink.write(_rec(truncated=True, len=99))
        sink.close()
        assert ("\x1b[" in stream.getvalue()) is expect, (type(stream), color)
    monkeypatch.setenv("NO_COLOR", "1")
    tty = FakeTTY()
    sink = TerminalSink(tty)
    sink.write(_rec())
    sink.close()
    assert "\x1b[" not in tty.getvalue()


def test_terminal_write_ends_each_record_with_newline() -> None:
    buf = io.StringIO()
    sink = TerminalSink(buf, color=False)
    sink.write(_rec("open"))
    sink.write(_rec())
    sink.close()
    assert buf.getvalue().count("\n") == 1 + 4


# --- the data-line encoder agrees with Record.to_json -------------------------------------


def test_jsonl_data_lines_equal_to_json_while_identity_changes() -> None:
    """Data lines are spliced from per-connection fragments; whatever changes
    between two records of one connection must still show in the line."""
    from agent.records.record import PodRef
    from agent.sinks.jsonl import JsonLineEncoder

    rng = random.Random(7)
    enc = JsonLineEncoder()
    pod = PodRef("web-1", "shop", uid="u1", container="nginx", labels={"app": "web"})
    variants = [
        {},
        {"comm": "curl2"},
        {"pod": pod, "container_id": "ab" * 32, "cgroup_id": 77},
        {"pod": PodRef("web-1", "shop", uid="u1", container="nginx", labels={"app": "x"})},
        {"local": Endpoint("::1", 1), "remote": None, "role": "server"},
        {"comm": "caf\u00e9" + b"\xff".decode("utf-8", "surrogateescape")},
        {"redactions": ["header:authorization", "regex:t\u00f6ken"], "protocol": "http1"},
        {"truncated": True, "len": 100_000, "direction": "ingress"},
    ]
    for i in range(300):
        kw = dict(rng.choice(variants))
        kw.update(seq=i, tid=rng.randrange(1, 1 << 31), data=rng.randbytes(rng.randrange(0, 64)))
        rec = _rec(conn_id=f"c{rng.randrange(3)}", **kw)
        rec.node, rec.agent_id = "node-a", "agent-1"
        line = enc.encode(rec)
        assert line.isascii() and line.endswith(b"\n") and line.count(b"\n") == 1
        assert json.loads(line) == rec.to_json()


def test_jsonl_exchange_lines_share_the_fragments_and_equal_to_json() -> None:
    """Exchange lines reuse the connection's identity fragments that its data
    lines made (in either order), and still equal Record.to_json."""
    from agent.l7.exchange import Exchange, HttpMessage
    from agent.sinks.jsonl import JsonLineEncoder

    def exchange(i: int) -> Exchange:
        headers = [("host", "shop"), ("x-note", "caf\u00e9")]
        req = HttpMessage(
            method="GET", target=f"/item/{i}?q=\u00e9", version="1.1", headers=headers
        )
        resp = HttpMessage(status=200, reason="OK", version="1.1", body=b'{"ok":1}', body_len=8)
        return Exchange("http1", request=req, response=resp, stream_id=i)

    enc = JsonLineEncoder()
    records = []
    for i in range(6):
        conn = dict(conn_id=f"c{i % 2}", comm="nginx" if i < 4 else "nginx2")
        records.append(_rec("exchange", seq=2 * i, protocol="http1", exchange=exchange(i), **conn))
        records.append(_rec(seq=2 * i + 1, **conn))
    for rec in records + records[::-1]:
        rec.node, rec.agent_id = "node-a", "agent-1"
        line = enc.encode(rec)
        assert line.isascii() and line.count(b"\n") == 1
        assert json.loads(line) == rec.to_json()


def test_jsonl_data_line_of_any_buffer_and_of_equal_identities() -> None:
    """A payload may be any buffer (a memoryview of the ring); a record whose identity
    fields are equal to, not the same objects as, the cached ones reuses them."""
    from agent.sinks.jsonl import JsonLineEncoder

    enc = JsonLineEncoder()
    for data in (b"abc", bytearray(b"abcd"), memoryview(b"xabcdex")[1:6], b""):
        rec = _rec(data=data, len=len(data), captured_len=len(data), pid=int("70000"))
        rec.node, rec.agent_id = "node-a", "agent-1"
        assert json.loads(enc.encode(rec)) == rec.to_json()
    assert len(enc._identities) == 1


def test_jsonl_a_close_forgets_its_connections_identity() -> None:
    """A batch's close record drops its connection's cached identity (a reused conn_id
    is a new connection), and only that one."""
    from agent.sinks.jsonl import JsonLineEncoder

    enc = JsonLineEncoder()
    first, second = _rec(conn_id="c1"), _rec(conn_id="c2")
    for rec in (first, second):
        rec.node, rec.agent_id = "node-a", "agent-1"
    close = first.replace(type="close", data=b"", len=0, captured_len=0)
    enc.encode_many([first, second])
    assert set(enc._identities) == {"c1", "c2"}
    lines = enc.encode_many([first, close])
    assert [json.loads(line)["type"] for line in lines] == ["data", "close"]
    assert set(enc._identities) == {"c2"}


def test_jsonl_record_types_made_at_run_time_are_those_types() -> None:
    """A record's type is compared by value: one built at run time (not the interned
    literal) is a data line, and a close made so still forgets its connection."""
    from agent.sinks.jsonl import JsonLineEncoder

    def made(word: str) -> str:
        return "".join(list(word))

    enc = JsonLineEncoder()
    rec = _rec(conn_id="c1")
    rec.node, rec.agent_id = "node-a", "agent-1"
    enc.encode_many([rec])
    again = rec.replace(type=made("data"), seq=2)
    assert again.type == "data" and again.type is not rec.type
    assert enc.encode_many([again]) == enc.encode_many([rec.replace(seq=2)])
    enc.encode_many([rec.replace(type=made("close"), data=b"", len=0, captured_len=0)])
    assert enc._identities == {}


def test_jsonl_a_batch_is_encoded_as_record_by_record() -> None:
    """encode_many (one C call per batch) gives each record the line encode() gives it:
    new connections and changed identities in the middle of a batch, lifecycle
    records, a gRPC exchange the C encoder leaves to the Python path."""
    from agent.l7.exchange import Exchange, GrpcCall, HttpMessage
    from agent.sinks.jsonl import JsonLineEncoder

    http = Exchange("http1", request=HttpMessage(method="GET", target="/"), stream_id=1)
    grpc = Exchange("grpc", request=HttpMessage(method="POST"), grpc=GrpcCall(service="s"))
    batch = [
        _rec("open", conn_id="a"),
        _rec(conn_id="a", data=b"x" * 100),
        _rec(conn_id="a", data=b"y"),
        _rec("exchange", conn_id="a", protocol="http1", exchange=http),
        _rec(conn_id="b", comm="wget"),
        _rec(conn_id="a", comm="curl2", data=b"z"),  # the identity changed
        _rec("exchange", conn_id="b", protocol="grpc", exchange=grpc),
        _rec("close", conn_id="a"),
        _rec(conn_id="a", comm="curl2"),
    ]
    for i, rec in enumerate(batch):
        rec.seq, rec.node, rec.agent_id = i, "node-a", "agent-1"
    batched = JsonLineEncoder()
    lines = batched.encode_many(batch)
    assert lines == [JsonLineEncoder().encode(r) for r in batch]
    assert lines == batched.encode_many(batch)  # every connection cached now
    assert [json.loads(line) for line in lines] == [r.to_json() for r in batch]
