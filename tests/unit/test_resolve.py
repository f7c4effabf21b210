"""Socket resolution: /proc/net/tcp parsing, role logic, cache policy, real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.flows.resolve import (
    SocketResolver,
    TcpState,
    classify_role,
    decode_proc_address,
    fd_is_socket,
    normalize_ip,
    parse_proc_net_tcp,
    socket_inode,
)
from agent.records.record import Endpoint

# Captured from this machine (little-endian x86-64): a 127.0.0.1 listener with one
# accepted connection, and in tcp6 a ::1 listener + connection and a dual-stack [::]
# listener whose IPv4 client shows as IPv4-mapped.
TCP4 = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1149 1 000000001848d00e 100 0 0 10 0
   1: 0100007F:815B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7183 1 00000000cd583e17 100 0 0 10 0
   2: 0100007F:E5E4 0100007F:815B 01 00000000:00000000 00:00000000 00000000     0        0 7184 2 000000001499035c 20 0 0 10 -1
   3: 0100007F:EB22 0100007F:E64D 01 00000000:00000000 00:00000000 00000000  1000        0 7178 2 000000004c439d97 20 0 0 10 -1
   4: 0100007F:815B 0100007F:E5E4 01 00000000:00000000 00:00000000 00000000     0        0 7185 1 00000000e7e919a0 20 0 0 10 -1
   5: 0100007F:815B 0100007F:C001 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
"""  # noqa: E501

TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:80B5 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7180 1 000000000319c664 100 0 0 10 0
   1: 00000000000000000000000000000000:E64D 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7177 1 000000005887aa3b 100 0 0 10 0
   2: 00000000000000000000000001000000:80B5 00000000000000000000000001000000:D966 01 00000000:00000000 00:00000000 00000000     0        0 7182 1 00000000cb3f03af 20 0 0 10 -1
   3: 00000000000000000000000001000000:D966 00000000000000000000000001000000:80B5 01 00000000:00000000 00:00000000 00000000     0        0 7181 2 0000000003918038 20 0 0 10 -1
   4: 0000000000000000FFFF00000100007F:E64D 0000000000000000FFFF00000100007F:EB22 01 00000000:00000000 00:00000000 00000000     0        0 7179 1 00000000b7b314eb 20 0 0 10 -1
   5: B80D0120000000000000000001000000:01BB 20010DB8000000000000000002000000:C350 08 00000000:00000000 00:00000000 00000000     0        0 7190 1 0000000000000000 20 0 0 10 -1
"""  # noqa: E501


# --- parsing ---------------------------------------------------------------------------


def test_parse_ipv4_rows() -> None:
    rows = parse_proc_net_tcp(TCP4, ipv6=False)
    assert len(rows) == 6
    listener, client = rows[1], rows[2]
    assert listener.local == Endpoint("127.0.0.1", 0x815B)
    assert listener.remote == Endpoint("0.0.0.0", 0)
    assert listener.state == TcpState.LISTEN
    assert listener.inode == 7183
    assert client.local == Endpoint("127.0.0.1", 0xE5E4)
    assert client.remote == Endpoint("127.0.0.1", 0x815B)
    assert client.state == TcpState.ESTABLISHED
    assert (client.inode, client.ipv6) == (7184, False)
    assert rows[3].uid == 1000
    assert rows[0].local == Endpoint("0.0.0.0", 2024)
    assert (rows[5].state, rows[5].inode) == (TcpState.TIME_WAIT, 0)


def test_parse_ipv6_loopback_and_mapped() -> None:
    rows = parse_proc_net_tcp(TCP6, ipv6=True)
    assert rows[0].local == Endpoint("::1", 0x80B5)
    assert rows[0].remote == Endpoint("::", 0)
    assert rows[1].local == Endpoint("::", 0xE64D)
    assert rows[3].local == Endpoint("::1", 0xD966)
    assert rows[3].remote == Endpoint("::1", 0x80B5)
    # ::ffff:127.0.0.1 is reported as plain IPv4, the way its peer (AF_INET) sees it
    assert rows[4].local == Endpoint("127.0.0.1", 0xE64D)
    assert rows[4].remote == Endpoint("127.0.0.1", 0xEB22)
    assert rows[4].ipv6 is True
    assert rows[5].local == Endpoint("2001:db8::1", 443)
    assert rows[5].state == TcpState.CLOSE_WAIT


def test_decode_address_byte_order() -> None:
    assert decode_proc_address("0100007F", "little") == "127.0.0.1"
    assert decode_proc_address("050012C6", "little") == "198.18.0.5"
    assert decode_proc_address("C6120005", "big") == "198.18.0.5"
    assert decode_proc_address("00000000000000000000000001000000", "little") == "::1"
    assert decode_proc_address("00000000000000000000000000000001", "big") == "::1"
    mapped_le = "0000000000000000FFFF00000500" + "12C6"
    assert decode_proc_address(mapped_le, "little") == "198.18.0.5"
    with pytest.raises(ValueError):
        decode_proc_address("0100", "little")


def test_parse_rejects_wrong_family_and_garbage() -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_proc_net_tcp(TCP4, ipv6=True)
    with pytest.raises(ValueError):
        parse_proc_net_tcp("   0: 0100007F:zz 00000000:0000 0A\n", ipv6=False)
    assert parse_proc_net_tcp("", ipv6=False) == []


def test_normalize_ip() -> None:
    assert normalize_ip("::ffff:127.0.0.1") == "127.0.0.1"
    assert normalize_ip("0:0:0:0:0:0:0:1") == "::1"
    assert normalize_ip("2001:DB8::1") == "2001:db8::1"
    assert normalize_ip("198.18.0.5") == "198.18.0.5"


# --- role ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "state", "listeners", "role"),
    [
        (Endpoint("127.0.0.1", 8443), 1, {("127.0.0.1", 8443)}, "server"),
        (Endpoint("198.18.0.2", 8443), 1, {("0.0.0.0", 8443)}, "server"),
        (Endpoint("198.18.0.2", 8443), 1, {("::", 8443)}, "server"),  # dual-stack [::]
        (Endpoint("::1", 8443), 1, {("::", 8443)}, "server"),
        (Endpoint("::1", 8443), 1, {("0.0.0.0", 8443)}, "client"),  # AF_INET can't accept v6
        (Endpoint("198.18.0.2", 8443), 1, {("127.0.0.1", 8443)}, "client"),  # other address
        (Endpoint("127.0.0.1", 51234), 1, {("127.0.0.1", 8443)}, "client"),
        (Endpoint("127.0.0.1", 8443), TcpState.LISTEN, {("127.0.0.1", 8443)}, "unknown"),
    ],
)
def test_classify_role(local: Endpoint, state: int, listeners: set, role: str) -> None:
    assert classify_role(local, state, frozenset(listeners)) == role


# --- cache, with a fake /proc ----------------------------------------------------------


class FakeProc:
    """A tmp dir laid out like /proc for a few pids."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add_pid(self, pid: int, tcp: str = "", tcp6: str = "", share_ns_with: int | None = None):
        d = self.root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "ns").mkdir()
        if share_ns_with is None:
            (d / "ns" / "net").write_text("")
            (d / "net").mkdir()
            self.set_tables(pid, tcp, tcp6)
        else:
            # Same netns: same ns inode, and /proc/<pid>/net shows the same tables.
            os.link(self.root / str(share_ns_with) / "ns" / "net", d / "ns" / "net")
            (d / "net").symlink_to(self.root / str(share_ns_with) / "net")

    def set_tables(self, pid: int, tcp: str, tcp6: str = "") -> None:
        (self.root / str(pid) / "net" / "tcp").write_text(tcp)
        (self.root / str(pid) / "net" / "tcp6").write_text(tcp6)

    def add_fd(self, pid: int, fd: int, inode: int | None, target: str = "") -> None:
        link = self.root / str(pid) / "fd" / str(fd)
        link.symlink_to(f"socket:[{inode}]" if inode is not None else target)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_socket_inode(fake: FakeProc) -> None:
    fake.add_pid(10, TCP4)
    fake.add_fd(10, 3, 7184)
    fake.add_fd(10, 4, None, "/dev/null")
    fake.add_fd(10, 5, None, "socket:[oops]")
    assert socket_inode(10, 3, str(fake.root)) == 7184
    assert socket_inode(10, 4, str(fake.root)) is None
    assert socket_inode(10, 5, str(fake.root)) is None
    assert socket_inode(10, 99, str(fake.root)) is None
    assert socket_inode(11, 3, str(fake.root)) is None


def test_resolve_fake_proc_roles(fake: FakeProc, clock: Clock) -> None:
    fake.add_pid(10, TCP4, TCP6)
    for fd, inode in [(3, 7184), (4, 7185), (5, 7181), (6, 7182), (7, 7179), (8, 7183)]:
        fake.add_fd(10, fd, inode)
    r = SocketResolver(str(fake.root), clock=clock)
    client = r.resolve(10, 3)
    assert client is not None
    assert (client.local, client.remote) == (
        Endpoint("127.0.0.1", 58852),
        Endpoint("127.0.0.1", 33115),
    )
    assert (client.role, client.inode, client.state_name) == ("client", 7184, "ESTABLISHED")
    server = r.resolve(10, 4)
    assert server is not None and server.role == "server"
    assert (server.local, server.remote) == (client.remote, client.local)
    assert r.resolve(10, 5).role == "client"  # ::1 client
    assert r.resolve(10, 6).role == "server"  # ::1 accepted
    mapped = r.resolve(10, 7)  # IPv4 client accepted by the dual-stack [::] listener
    assert mapped is not None and mapped.role == "server"
    assert mapped.local == Endpoint("127.0.0.1", 0xE64D)
    assert r.resolve(10, 8).role == "unknown"  # the listening socket itself
    assert r.reads == 1  # six lookups, one read


def test_cache_reuses_young_table_and_rereads_old(fake: FakeProc, clock: Clock) -> None:
    fake.add_pid(10, TCP4)
    fake.add_fd(10, 3, 7184)
    r = SocketResolver(str(fake.root), max_age=0.05, clock=clock)
    assert r.resolve(10, 3) is not None
    clock.now += 0.03
    assert r.resolve(10, 3) is not None
    assert r.reads == 1
    clock.now += 0.03
    assert r.resolve(10, 3) is not None
    assert r.reads == 2


def test_cache_miss_forces_one_reread(fake: FakeProc, clock: Clock) -> None:
    fake.add_pid(10, TCP4)
    fake.add_fd(10, 3, 7184)
    r = SocketResolver(str(fake.root), clock=clock)
    assert r.resolve(10, 3) is not None
    # A brand-new connection appears within max_age: the young table misses it.
    new_row = "   9: 0100007F:D000 0100007F:815B 01 00000000:00000000 00:00000000 00000000     0        0 9001 1 0 20 0 0 10 -1\n"  # noqa: E501
    fake.set_tables(10, TCP4 + new_row)
    fake.add_fd(10, 4, 9001)
    info = r.resolve(10, 4)
    assert info is not None and info.local == Endpoint("127.0.0.1", 0xD000)
    assert r.reads == 2


def test_non_tcp_socket_does_not_reread_every_call(fake: FakeProc, clock: Clock) -> None:
    fake.add_pid(10, TCP4)
    fake.add_fd(10, 3, 7184)
    fake.add_fd(10, 4, 424242)  # e.g. a unix socket: never in tcp/tcp6
    r = SocketResolver(str(fake.root), clock=clock)
    assert r.resolve(10, 3) is not None
    assert r.resolve(10, 4) is None  # miss -> one re-read
    assert r.reads == 2
    for _ in range(100):
        assert r.resolve(10, 4) is None
    assert r.reads == 2  # remembered as absent while this snapshot is young
    clock.now += 1
    assert r.resolve(10, 4) is None
    assert r.reads == 3  # old snapshot: one read, and it already saw the fd -> no second


def test_burst_of_new_connections_reads_once(fake: FakeProc, clock: Clock) -> None:
    fake.add_pid(10, TCP4)
    fake.add_fd(10, 3, 7184)
    r = SocketResolver(str(fake.root), clock=clock)
    assert r.resolve(10, 3) is not None
    rows = "".join(
        f"  {i}: 0100007F:{0xD000 + i:04X} 0100007F:815B 01 00000000:00000000 00:00000000 "
        f"00000000     0        0 {9000 + i} 1 0 20 0 0 10 -1\n"
        for i in range(50)
    )
    fake.set_tables(10, TCP4 + rows)
    for i in range(50):
        fake.add_fd(10, 100 + i, 9000 + i)
    got = r.resolve_many([(10, 100 + i) for i in range(50)] + [(10, 3), (10, 999)])
    assert all(got[(10, 100 + i)].local.port == 0xD000 + i for i in range(50))
    assert got[(10, 3)] is not None and got[(10, 999)] is None
    assert r.reads == 2


def test_netns_sharing_and_separation(fake: FakeProc, clock: Clock) -> None:
    fake.add_pid(10, TCP4, TCP6)
    fake.add_pid(11, share_ns_with=10)
    fake.add_pid(20, TCP4.replace(" 7184 ", " 5555 "))  # another netns, other inode
    fake.add_fd(10, 3, 7184)
    fake.add_fd(11, 3, 7185)
    fake.add_fd(20, 3, 7184)
    fake.add_fd(20, 4, 5555)
    r = SocketResolver(str(fake.root), clock=clock)
    assert r.resolve(10, 3).role == "client"
    assert r.resolve(11, 3).role == "server"
    assert r.reads == 1  # same netns -> same table
    assert r.resolve(20, 4).role == "client"
    assert r.resolve(20, 3) is None  # 7184 is not in that netns
    assert r.reads == 3  # its own read + one miss re-read


def test_vanished_process_or_tables_give_none(
    fake: FakeProc, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_pid(10, TCP4)
    fake.add_fd(10, 3, 7184)
    r = SocketResolver(str(fake.root), clock=clock)
    assert r.resolve(99, 3) is None
    (fake.root / "10" / "net" / "tcp").unlink()  # exiting process: tables gone
    assert r.resolve(10, 3) is None
    bad_row = "   0: 0100007F:zzzz 00000000:0000 01 0:0 0:0 0     0        0 7184 1\n"
    fake.set_tables(10, bad_row)
    assert r.resolve(10, 3) is None  # malformed kernel output: logged, not raised
    fake.set_tables(10, bad_row.replace(" 01 ", " 0A "))  # ... also in the listener scan
    r.refresh()
    assert r.resolve(10, 3) is None
    assert caplog.text.count("unreadable TCP table") == 2


def test_refresh_and_eviction(fake: FakeProc, clock: Clock) -> None:
    fake.add_pid(10, TCP4)
    fake.add_pid(20, TCP4)
    fake.add_fd(10, 3, 7184)
    fake.add_fd(20, 3, 7184)
    r = SocketResolver(str(fake.root), evict_after=10, clock=clock)
    r.resolve(10, 3)
    r.refresh(10)
    r.resolve(10, 3)
    assert r.reads == 2
    clock.now += 11
    r.resolve(20, 3)
    assert len(r._tables) == 1  # pid 10's netns unused for 11 s: dropped
    r.refresh()
    assert r._tables == {}


# --- real sockets in this process -------------------------------------------------------


def _pair(family: int, host: str) -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((host, 0))
    except OSError as e:
        pytest.skip(f"cannot bind {host}: {e}")
    listener.listen()
    client = socket.create_connection(listener.getsockname()[:2])
    accepted, _ = listener.accept()
    try:
        yield listener, client, accepted
    finally:
        for s in (client, accepted, listener):
            s.close()


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def real_pair(request: pytest.FixtureRequest):
    yield from _pair(*request.param)


@pytest.fixture
def mapped_pair():
    # An AF_INET6 listener bound to ::ffff:127.0.0.1 (not [::], to stay off other
    # interfaces): its connections live in tcp6 with IPv4-mapped addresses.
    yield from _pair(socket.AF_INET6, "::ffff:127.0.0.1")


def _ep(sockname: tuple) -> Endpoint:
    return Endpoint(normalize_ip(sockname[0]), sockname[1])


def test_real_loopback_connection(real_pair) -> None:
    listener, client, accepted = real_pair
    r = SocketResolver()
    c = r.resolve(os.getpid(), client.fileno())
    s = r.resolve(os.getpid(), accepted.fileno())
    assert c is not None and s is not None
    assert c.local == _ep(client.getsockname()) and c.remote == _ep(client.getpeername())
    assert s.local == _ep(accepted.getsockname()) and s.remote == _ep(accepted.getpeername())
    assert c.local == s.remote and c.remote == s.local
    assert (c.role, s.role) == ("client", "server")
    assert c.state == s.state == TcpState.ESTABLISHED
    assert c.inode == os.fstat(client.fileno()).st_ino
    lst = r.resolve(os.getpid(), listener.fileno())
    assert lst is not None and lst.role == "unknown" and lst.state == TcpState.LISTEN


def test_real_ipv4_mapped_connection(mapped_pair) -> None:
    _, client, accepted = mapped_pair
    r = SocketResolver()
    c = r.resolve(os.getpid(), client.fileno())
    s = r.resolve(os.getpid(), accepted.fileno())
    assert c is not None and s is not None
    assert s.local == c.remote and s.remote == c.local
    assert s.local.ip == "127.0.0.1" and c.local.ip == "127.0.0.1"
    assert (c.role, s.role) == ("client", "server")


def test_real_new_connection_found_within_max_age(real_pair) -> None:
    listener, client, _ = real_pair
    r = SocketResolver(max_age=60)  # the table would otherwise be reused for a minute
    assert r.resolve(os.getpid(), client.fileno()) is not None
    late = socket.create_connection(listener.getsockname()[:2])
    late_accepted, _ = listener.accept()
    try:
        info = r.resolve(os.getpid(), late.fileno())
        assert info is not None and info.local == _ep(late.getsockname())
        assert r.resolve(os.getpid(), late_accepted.fileno()).role == "server"
    finally:
        late.close()
        late_accepted.close()


def test_real_non_socket_and_closed_fd() -> None:
    r = SocketResolver()
    with open(os.devnull) as f:
        assert r.resolve(os.getpid(), f.fileno()) is None
    s = socket.socket()
    fd = s.fileno()
    s.close()
    assert r.resolve(os.getpid(), fd) is None
    a, b = socket.socketpair()  # AF_UNIX: a socket, but not TCP
    try:
        assert r.resolve(os.getpid(), a.fileno()) is None
    finally:
        a.close()
        b.close()


# --- fd_is_socket: the sweep closes a connection on its False -------------------------


def test_fd_is_socket_fake_proc(fake: FakeProc) -> None:
    root = str(fake.root)
    fake.add_pid(10)
    fake.add_fd(10, 3, 7184)
    fake.add_fd(10, 4, None, "/dev/null")
    assert fd_is_socket(10, 3, root)
    assert not fd_is_socket(10, 4, root)  # the fd now names something else
    (fake.root / "10" / "task" / "10" / "fd").mkdir(parents=True)
    assert not fd_is_socket(10, 5, root)  # closed
    assert not fd_is_socket(11, 3, root)  # the process is gone


def test_fd_is_socket_of_a_process_whose_first_thread_exited(fake: FakeProc) -> None:
    """/proc/<pid>/fd is empty once the thread-group leader has exited, while the
    other threads go on with every file open: they are asked instead."""
    root = str(fake.root)
    fake.add_pid(10)  # fd/ empty
    for tid in (10, 12):
        (fake.root / "10" / "task" / str(tid) / "fd").mkdir(parents=True)
    (fake.root / "10" / "task" / "12" / "fd" / "3").symlink_to("socket:[7184]")
    assert fd_is_socket(10, 3, root)
    assert not fd_is_socket(10, 4, root)


def test_fd_is_socket_says_true_when_proc_cannot_tell(fake: FakeProc) -> None:
    fake.add_pid(10)
    (fake.root / "10" / "fd").rmdir()
    (fake.root / "10" / "fd").write_text("")  # readlink under it: ENOTDIR, not ENOENT
    assert fd_is_socket(10, 3, str(fake.root))


def test_fd_is_socket_real_process_without_its_main_thread() -> None:
    """A real process whose main thread called pthread_exit: its socket is alive."""
    code = (
        "import ctypes, socket, sys, threading, time\n"
        "s = socket.socket()\n"
        "threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "print(s.fileno(), flush=True)\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        fd = int(proc.stdout.readline())
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{proc.pid}/fd/{fd}") and time.monotonic() < deadline:
            time.sleep(0.01)  # until the main thread is gone
        assert not os.path.exists(f"/proc/{proc.pid}/fd/{fd}")
        assert fd_is_socket(proc.pid, fd)
        assert not fd_is_socket(proc.pid, fd + 100)
    finally:
        proc.kill()
        proc.wait()
