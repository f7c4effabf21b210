"""decode_event: raw ring-buffer records (built from the ctypes layouts) -> typed events."""

from __future__ import annotations

import ctypes as ct
import random
import tracemalloc

import pytest

from agent.events import layout
from agent.events.decode import (
    DecodeError,
    EventDecoder,
    KernelSocket,
    ProcessEvent,
    SocketClosed,
    TlsCall,
    decode_event,
    endpoint,
)
from agent.events.ring import RingBatch
from agent.records.record import Endpoint
from tests.unit.eventbuild import (
    ROLE_CLIENT,
    ROLE_SERVER,
    close_record,
    conn,
    conn_v4,
    data_header,
    data_record,
    proc_record,
)

HDR = layout.DATA_HEADER_SIZE


def decode_data(raw: bytes) -> TlsCall:
    ev = decode_event(raw)
    assert isinstance(ev, TlsCall)
    return ev


# --- layout sanity ---------------------------------------------------------------------


def test_layout_sizes_match_tlscap_h() -> None:
    assert HDR == 136
    assert ct.sizeof(layout.ConnInfo) == 48
    assert ct.sizeof(layout.CloseEvent) == 32
    assert ct.sizeof(layout.ProcEvent) == 32
    assert layout.DataEventHeader.conn.offset == 80
    assert layout.DataEventHeader.cgroup_id.offset == 128
    assert layout.DataEventHeader.comm.offset == 64


# --- data chunks -----------------------------------------------------------------------


def test_data_chunk_ipv4_all_fields() -> None:
    payload = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
    raw = data_record(
        payload,
        tgid=1234,
        tid=1240,
        fd=9,
        ts_ns=987_654_321,
        ssl=0x7F12_3456_7890,
        len=len(payload),
        offset=4096,
        direction=layout.DIR_EGRESS,
        comm=b"curl",
        socket=conn(
            gen=55_000_000_123,
            family=layout.AF_INET,
            raddr="93.184.216.34",
            rport=443,
            laddr="192.168.1.10",
            lport=51234,
            role=ROLE_CLIENT,
        ),
    )
    assert len(raw) == HDR + len(payload)
    ev = decode_data(raw)
    assert ev == TlsCall(
        tgid=1234,
        tid=1240,
        fd=9,
        ts_mono_ns=987_654_321,
        ssl=0x7F12_3456_7890,
        len=len(payload),
        offset=4096,
        captured_len=len(payload),
        chunk_off=0,
        direction="egress",
        source="openssl",
        comm="curl",
        socket=KernelSocket(
            gen=55_000_000_123,
            remote=Endpoint("93.184.216.34", 443),
            local=Endpoint("192.168.1.10", 51234),
            role="client",
        ),
        data=payload,
    )


def test_data_chunk_ipv6_loopback() -> None:
    sock = conn(
        gen=1, family=layout.AF_INET6, raddr="::1", rport=8443, laddr="::1", lport=40000, role=2
    )
    ev = decode_data(data_record(b"x", socket=sock))
    assert ev.socket.remote == Endpoint("::1", 8443)
    assert ev.socket.local == Endpoint("::1", 40000)
    assert ev.socket.role == "server"


def test_data_chunk_ipv6_global_address() -> None:
    sock = conn(gen=1, family=layout.AF_INET6, raddr="2001:db8::2", rport=443)
    ev = decode_data(data_record(b"x", socket=sock))
    assert ev.socket.remote == Endpoint("2001:db8::2", 443)


def test_ipv4_mapped_ipv6_is_reported_as_ipv4() -> None:
    sock = conn(
        gen=1,
        family=layout.AF_INET6,
        raddr="::ffff:127.0.0.1",
        rport=443,
        laddr="::ffff:10.1.2.3",
        lport=50000,
        role=ROLE_SERVER,
    )
    ev = decode_data(data_record(b"x", socket=sock))
    assert ev.socket.remote == Endpoint("127.0.0.1", 443)
    assert ev.socket.local == Endpoint("10.1.2.3", 50000)


def test_family_zero_means_no_endpoints() -> None:
    # accept() whose entry we never saw: gen and role known, addresses not.
    ev = decode_data(data_record(b"x", socket=conn(gen=77, role=ROLE_SERVER, lport=1234)))
    assert ev.socket == KernelSocket(gen=77, remote=None, local=None, role="server")


def test_unknown_socket_is_all_zero() -> None:
    ev = decode_data(data_record(b"x"))
    assert ev.socket == KernelSocket(gen=0, remote=None, local=None, role="unknown")


def test_local_unknown_until_handshake() -> None:
    # connect() recorded the peer; ESTABLISHED has not filled in the local end yet.
    sock = conn(gen=5, family=layout.AF_INET, raddr="10.0.0.1", rport=443, role=ROLE_CLIENT)
    ev = decode_data(data_record(b"x", socket=sock))
    assert ev.socket.remote == Endpoint("10.0.0.1", 443)
    assert ev.socket.local is None


def test_endpoint_helper() -> None:
    v4 = bytes([10, 0, 0, 1]) + bytes(12)
    assert endpoint(layout.AF_INET, v4, 80) == Endpoint("10.0.0.1", 80)
    assert endpoint(0, v4, 80) is None
    assert endpoint(1, v4, 80) is None  # AF_UNIX
    mapped = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7])
    assert endpoint(layout.AF_INET6, mapped, 1) == Endpoint("192.0.2.7", 1)


@pytest.mark.parametrize(
    ("raw_dir", "expected"),
    [(layout.DIR_EGRESS, "egress"), (layout.DIR_INGRESS, "ingress")],
)
def test_direction_mapping(raw_dir: int, expected: str) -> None:
    assert decode_data(data_record(b"x", direction=raw_dir)).direction == expected


@pytest.mark.parametrize(
    ("raw_role", "expected"),
    [(0, "unknown"), (1, "client"), (2, "server"), (3, "unknown"), (255, "unknown")],
)
def test_role_mapping(raw_role: int, expected: str) -> None:
    ev = decode_data(data_record(b"x", socket=conn(gen=1, role=raw_role)))
    assert ev.socket.role == expected


@pytest.mark.parametrize(("raw_source", "expected"), [(1, "openssl"), (9, "source9")])
def test_source_mapping(raw_source: int, expected: str) -> None:
    assert decode_data(data_record(b"x", source=raw_source)).source == expected


def _with_comm(raw: bytes, comm16: bytes, offset: int) -> bytes:
    assert len(comm16) == 16
    buf = bytearray(raw)
    buf[offset : offset + 16] = comm16
    return bytes(buf)


@pytest.mark.parametrize(
    ("comm16", "expected"),
    [
        (b"curl\0garbage!!!!", "curl"),  # bytes after the NUL are stale stack junk
        (b"python3\0" + bytes(8), "python3"),
        (b"exactly16chars!!", "exactly16chars!!"),  # TASK_COMM_LEN, no NUL
        (bytes(16), ""),
        (b"caf\xc3\xa9\0" + bytes(10), "caf\u00e9"),
        (b"bad\xff\0" + bytes(11), "bad\ufffd"),
    ],
)
def test_comm_is_nul_trimmed(comm16: bytes, expected: str) -> None:
    off = layout.DataEventHeader.comm.offset
    raw = _with_comm(data_record(b"x"), comm16, off)
    assert decode_data(raw).comm == expected
    pev = decode_event(
        _with_comm(proc_record(layout.EV_EXEC), comm16, layout.ProcEvent.comm.offset)
    )
    assert isinstance(pev, ProcessEvent)
    assert pev.comm == expected


def test_memory_bio_fd_minus_one_and_wide_values() -> None:
    ev = decode_data(
        data_record(
            b"abc",
            fd=-1,
            ssl=0xFFFF_FFFF_FFFF_FFF0,
            len=5 << 32,
            offset=(1 << 63) + 5,
            ts_ns=(1 << 64) - 1,
        )
    )
    assert ev.fd == -1
    assert ev.ssl == 0xFFFF_FFFF_FFFF_FFF0
    assert ev.len == 5 << 32
    assert ev.captured_len == 3
    assert ev.offset == (1 << 63) + 5
    assert ev.ts_mono_ns == (1 << 64) - 1


def test_later_chunk_of_a_call() -> None:
    payload = bytes(range(256)) * 4
    raw = data_record(payload, len=100_000, captured_len=50_000, chunk_off=16384)
    ev = decode_data(raw)
    assert ev.chunk_off == 16384
    assert ev.captured_len == 50_000
    assert ev.len == 100_000
    assert ev.data == payload


def test_full_size_chunk() -> None:
    payload = random.Random(1).randbytes(layout.CHUNK_SIZE)
    ev = decode_data(data_record(payload))
    assert ev.data == payload


def test_trailing_bytes_after_the_chunk_are_ignored() -> None:
    raw = data_record(b"hello") + b"\xee" * 3
    assert decode_data(raw).data == b"hello"


def test_empty_chunk() -> None:
    ev = decode_data(data_record(b""))
    assert ev.data == b""
    assert ev.len == 0


# --- close and process events ------------------------------------------------------------


def test_close_event() -> None:
    gen = (1 << 63) | 3
    ev = decode_event(close_record(tgid=10, tid=11, fd=12, ts_ns=13, gen=gen))
    assert ev == SocketClosed(tgid=10, tid=11, fd=12, ts_mono_ns=13, gen=gen)


def test_close_event_negative_fd() -> None:
    ev = decode_event(close_record(fd=-1))
    assert isinstance(ev, SocketClosed)
    assert ev.fd == -1


@pytest.mark.parametrize(
    ("kind", "name"),
    [(layout.EV_EXEC, "exec"), (layout.EV_EXEC_MAP, "exec_map"), (layout.EV_EXIT, "exit")],
)
def test_process_events(kind: int, name: str) -> None:
    ev = decode_event(proc_record(kind, tgid=99, ts_ns=123_456, comm=b"nginx"))
    assert ev == ProcessEvent(kind=name, tgid=99, ts_mono_ns=123_456, comm="nginx")  # type: ignore[arg-type]


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"\x01", b"\x01\x00", b"\x01\x00\x00"])
def test_too_short_for_a_kind(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_event(raw)


@pytest.mark.parametrize("kind", [0, 8, 100, 0xFFFF_FFFF])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(DecodeError, match="unknown event kind"):
        decode_event(kind.to_bytes(4, "little") + bytes(200))


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        (data_record(b"abc")[: HDR - 1], HDR),
        (close_record()[:-1], 32),
        (proc_record(layout.EV_EXIT)[:-1], 32),
        (proc_record(layout.EV_EXEC)[:4], 32),
    ],
)
def test_record_shorter_than_its_struct(raw: bytes, size: int) -> None:
    assert len(raw) < size
    with pytest.raises(DecodeError):
        decode_event(raw)


def test_short_data_event_is_named_as_one() -> None:
    with pytest.raises(DecodeError, match="data event needs"):
        decode_event(data_record(b"abc")[: HDR - 1])


def test_chunk_len_above_chunk_size() -> None:
    payload = bytes(layout.CHUNK_SIZE + 1)
    with pytest.raises(DecodeError):
        decode_event(data_record(payload, len=1 << 20, captured_len=1 << 20))


def test_chunk_len_above_chunk_size_even_if_record_is_short() -> None:
    # A corrupt length must not be trusted to slice with.
    with pytest.raises(DecodeError):
        decode_event(data_record(b"abc", chunk_len=0xFFFF_FFFF))


def test_record_shorter_than_header_plus_chunk_len() -> None:
    with pytest.raises(DecodeError):
        decode_event(data_record(b"123456789", chunk_len=10, len=10, captured_len=10))


def test_header_only_when_chunk_len_nonzero() -> None:
    with pytest.raises(DecodeError):
        decode_event(data_record(b"", chunk_len=1, len=1, captured_len=1))


def test_chunk_beyond_captured_len() -> None:
    raw = data_record(b"0123456789", chunk_off=10, len=100, captured_len=15)
    with pytest.raises(DecodeError):
        decode_event(raw)


def test_chunk_exactly_up_to_captured_len_is_fine() -> None:
    raw = data_record(b"01234", chunk_off=10, len=100, captured_len=15)
    assert decode_data(raw).chunk_off == 10


def test_captured_len_above_len() -> None:
    with pytest.raises(DecodeError):
        decode_event(data_record(b"abc", len=2, captured_len=3))


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(DecodeError, ValueError)


# --- property: garbage in, TlsCall/event or DecodeError out -------------------------------


def _random_header_record(rng: random.Random) -> bytes:
    """A data record with random, often inconsistent, header fields."""
    n = rng.choice([0, 1, rng.randrange(0, 64), rng.randrange(0, layout.CHUNK_SIZE + 2)])
    payload = rng.randbytes(n)
    captured = rng.choice([n, n + rng.randrange(0, 40000), rng.randrange(0, 1 << 32)])
    h = data_header(
        chunk_len=rng.choice([n, rng.randrange(0, 1 << 32), n + 1, max(n - 1, 0)]),
        tgid=rng.randrange(1 << 32),
        tid=rng.randrange(1 << 32),
        fd=rng.randrange(-(1 << 31), 1 << 31),
        ts_ns=rng.randrange(1 << 64),
        ssl=rng.randrange(1 << 64),
        len=rng.choice([captured, captured + rng.randrange(1 << 20), rng.randrange(1 << 64)]),
        offset=rng.randrange(1 << 64),
        captured_len=captured % (1 << 32),
        chunk_off=rng.choice([0, rng.randrange(0, 1 << 32), layout.CHUNK_SIZE]),
        direction=rng.randrange(256),
        source=rng.randrange(256),
        comm=rng.randbytes(15),
    )
    c = h.conn
    c.gen = rng.randrange(1 << 64)
    c.family = rng.choice([0, layout.AF_INET, layout.AF_INET6, rng.randrange(1 << 16)])
    c.rport = rng.randrange(1 << 16)
    c.lport = rng.choice([0, rng.randrange(1 << 16)])
    c.role = rng.randrange(256)
    c.flags = rng.randrange(256)
    raw = bytearray(bytes(h) + payload)
    for name in ("raddr", "laddr"):
        field = getattr(layout.ConnInfo, name)
        start = layout.DataEventHeader.conn.offset + field.offset
        raw[start : start + 16] = rng.randbytes(16)
    comm_off = layout.DataEventHeader.comm.offset
    raw[comm_off : comm_off + 16] = rng.randbytes(16)  # possibly no NUL at all
    if rng.random() < 0.2:
        raw = raw[: rng.randrange(len(raw) + 1)]
    return bytes(raw)


def _garbage(rng: random.Random) -> bytes:
    style = rng.randrange(3)
    if style == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if style == 1:
        # Plausible kind, random body of a length around the struct sizes.
        kind = rng.randrange(0, 7)
        size = rng.choice([rng.randrange(0, 40), rng.randrange(100, 200), rng.randrange(0, 600)])
        return (kind.to_bytes(4, "little") + rng.randbytes(size))[: max(size, 0)]
    return _random_header_record(rng)


def test_random_records_decode_or_raise_decode_error() -> None:
    rng = random.Random(0x7153CA9)
    outcomes = {"data": 0, "close": 0, "proc": 0, "error": 0}
    for _ in range(4000):
        raw = _garbage(rng)
        try:
            ev = decode_event(raw)
        except DecodeError:
            outcomes["error"] += 1
            continue
        if isinstance(ev, TlsCall):
            outcomes["data"] += 1
            assert len(ev.data) <= layout.CHUNK_SIZE
            assert ev.data == raw[HDR : HDR + len(ev.data)]
            assert ev.chunk_off + len(ev.data) <= ev.captured_len <= ev.len
            assert ev.direction in ("egress", "ingress")
            assert ev.socket.role in ("client", "server", "unknown")
            assert isinstance(ev.comm, str)
        elif isinstance(ev, SocketClosed):
            outcomes["close"] += 1
        else:
            assert isinstance(ev, ProcessEvent)
            outcomes["proc"] += 1
    # The generator must actually reach every path, or the loop proves little.
    assert all(n > 50 for n in outcomes.values()), outcomes


# --- the C decoder and its TlsCall (agent/events/_decode.c) -------------------------------


def _call(**fields: object) -> TlsCall:
    base: dict[str, object] = dict(
        tgid=7, tid=8, fd=9, ts_mono_ns=10, ssl=11, len=5, offset=12, captured_len=5,
        chunk_off=0, direction="egress", source="openssl", comm="curl",
        socket=KernelSocket(0, None, None, "unknown"), data=b"hello",
    )  # fmt: skip
    base.update(fields)
    return TlsCall(**base)  # type: ignore[arg-type]


def test_tls_call_defaults_fields_and_equality() -> None:
    call = _call()
    assert (call.cgroup_id, call.complete, call.fd_weak, call.truncated) == (0, True, False, False)
    assert call == _call()
    assert (call != _call()) is False  # __ne__ is C too
    for field, other in (("fd", -1), ("data", b"hellO"), ("complete", False), ("ssl", 2**64 - 1)):
        assert call != _call(**{field: other}), field
    assert call != "not a call"
    with pytest.raises(TypeError):
        hash(call)
    assert repr(call).startswith("TlsCall(tgid=7, tid=8, fd=9, ts_mono_ns=10,")
    assert "data=b'hello'" in repr(call) and "fd_weak=False" in repr(call)


def test_tls_call_is_mutable_where_the_assembler_needs_it() -> None:
    call = _call(len=10, captured_len=3, data=b"abc")
    assert call.truncated
    call.data, call.captured_len, call.complete = b"abcdefghij", 10, False
    assert (call.data, call.captured_len, call.complete, call.truncated) == (
        b"abcdefghij", 10, False, False,
    )  # fmt: skip
    with pytest.raises(AttributeError):
        call.not_a_field = 1  # type: ignore[attr-defined]


def test_tls_call_needs_every_field_without_a_default() -> None:
    with pytest.raises(TypeError):
        TlsCall(tgid=1)  # type: ignore[call-arg]


def test_decoder_caches_are_bounded_and_stay_correct() -> None:
    """More sockets and process names than the caches hold: each record still gets
    its own (a cache starts over when full)."""
    decoder = EventDecoder(cache_size=2)
    records = []
    for i in range(7):
        sock = conn_v4((f"10.0.0.{i}", 1000 + i), ("10.0.1.1", 443), gen=1 + i, role=ROLE_SERVER)
        records.append(data_record(b"x%d" % i, socket=sock, comm=b"proc%d" % i))
    for _ in range(2):
        events = decoder.decode_batch(RingBatch.of(records))
        for i, ev in enumerate(events):
            assert isinstance(ev, TlsCall)
            assert (ev.comm, ev.socket.remote, ev.data) == (
                f"proc{i}", Endpoint(f"10.0.0.{i}", 1000 + i), b"x%d" % i,
            )  # fmt: skip


def test_memo_collisions_never_hand_one_socket_the_others_object() -> None:
    """Far more sockets and names than the memo's 1024 slots, interleaved, twice: many
    share a pair of slots, and each event still gets the objects of its own raw bytes,
    the same object every time they repeat."""
    decoder = EventDecoder()
    records, expected = [], []
    for i in range(3000):
        sock = conn_v4((f"10.{i >> 8}.{i & 255}.9", 1000 + i), ("10.0.1.1", 443), gen=1 + i)
        records.append(data_record(b"x", socket=sock, comm=b"p%d" % (i % 1500)))
        expected.append((Endpoint(f"10.{i >> 8}.{i & 255}.9", 1000 + i), f"p{i % 1500}"))
    first = decoder.decode_batch(RingBatch.of(records))
    again = decoder.decode_batch(RingBatch.of(records[::-1]))[::-1]
    for ev, ev2, (remote, comm) in zip(first, again, expected, strict=True):
        assert (ev.socket.remote, ev.comm) == (ev2.socket.remote, ev2.comm) == (remote, comm)
        assert ev.socket.gen == ev2.socket.gen
    # Repeats are the very objects decoded before (memo or dict).
    assert all(a.socket is b.socket for a, b in zip(first, again, strict=True))


def test_a_batch_keeps_order_with_errors_in_place() -> None:
    good = data_record(b"payload")
    bad = data_record(b"payload")[:-3]  # shorter than its chunk_len
    batch = RingBatch.of([good, b"\x09\x00", close_record(fd=3), bad, bytes(3), good])
    events = EventDecoder().decode_batch(batch)
    kinds = [type(ev).__name__ for ev in events]
    assert kinds == ["TlsCall", "DecodeError", "SocketClosed", "DecodeError", "DecodeError",
                     "TlsCall"]  # fmt: skip
    assert "payload bytes" in str(events[3]) and "too short" in str(events[4])


def test_a_span_outside_the_buffer_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="outside"):
        EventDecoder().decode_batch(RingBatch(bytes(200), [100, 136]))


def test_decoding_leaks_nothing() -> None:
    """Every object the C code makes is released: memory after many batches is what
    it was after a few (a leaked cache key or payload would grow it by MBs)."""
    records = [data_record(b"z" * 512, ssl=i) for i in range(8)]
    records += [close_record(fd=4), data_record(b"z")[:-5], b"\xff" * 9]
    batch = RingBatch.of(records)
    decoder = EventDecoder()
    tracemalloc.start()
    try:
        for _ in range(50):
            decoder.decode_batch(batch)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            decoder.decode_batch(batch)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


def test_calls_reused_from_the_free_list_and_memoized_numbers_are_each_call_s_own() -> None:
    """Dead TlsCalls are kept for the next batch's, and repeated numbers come from a
    memo (_decode.c: call_alloc, number_of): a later batch decodes exactly as a fresh
    decoder does, with ints colliding in the memo and values past 64 bits' sign."""

    def batch(seed: int) -> RingBatch:
        rng = random.Random(seed)
        return RingBatch.of([
            data_record(
                b"d%d" % i, tgid=rng.randrange(1, 4), tid=rng.randrange(1, 2000),
                fd=rng.choice([-1, 3, 70000]), ssl=rng.choice([i, 2**64 - 1 - i]),
                cgroup_id=rng.randrange(2**64), ts_ns=i,
                len=len(b"d%d" % i) + rng.choice([0, 2**40]),
            )
            for i in range(5000)  # more than the free list keeps
        ])  # fmt: skip

    decoder = EventDecoder()
    for seed in range(3):
        b = batch(seed)
        events = decoder.decode_batch(b)
        assert events == EventDecoder().decode_batch(b)
        del events
    constructed = TlsCall(1, 2, 3, 4, 5, 6, 7, 8, 0, "egress", "openssl", "c", None, b"x")
    assert (constructed.cgroup_id, constructed.complete, constructed.fd_weak) == (0, True, False)
