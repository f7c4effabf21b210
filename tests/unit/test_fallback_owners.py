"""agent.fallback.owners: which local process holds a TCP socket (as `ss -p` finds it).

SocketOwners never reports the calling process (the proxy's own sockets are not
clients), so every socket looked up here is held by a child process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.fallback.owners import ProcessRef, SocketOwners
from agent.records.record import Endpoint

CONNECTOR = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    print(s.getsockname()[1], flush=True)
    time.sleep(60)
    """
)

LISTENER = textwrap.dedent(
    """
    import socket, time
    s = socket.create_server(("127.0.0.1", 0))
    print(s.getsockname()[1], flush=True)
    time.sleep(60)
    """
)


def toward(port: int) -> tuple[Endpoint, Endpoint]:
    """(local, peer) of a connection a client would make to 127.0.0.1:port."""
    return Endpoint("127.0.0.1", port), Endpoint("127.0.0.1", 40000)


@pytest.fixture(autouse=True, params=[True, False], ids=["sock_diag", "proc_net_tcp"])
def lookup_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every test runs with both ways of finding a socket's inode."""
    monkeypatch.setattr(SocketOwners.__init__, "__defaults__", ("/proc", request.param))
    return request.param


def spawn(code: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip().isdigit(), f"child printed {line!r}"
    return child, int(line)


def comm_of(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        child.kill()
        child.wait()
        if child.stdout:
            child.stdout.close()


def connect_child(
    children: list[subprocess.Popen[str]], listener: socket.socket
) -> tuple[subprocess.Popen[str], Endpoint, Endpoint]:
    port = listener.getsockname()[1]
    child, child_port = spawn(CONNECTOR, str(port))
    children.append(child)
    conn, _ = listener.accept()
    conn.close()  # the child's socket stays established (CLOSE_WAIT) until it exits
    return child, Endpoint("127.0.0.1", child_port), Endpoint("127.0.0.1", port)


def test_connection_owner_finds_the_child(
    listener: socket.socket, children: list[subprocess.Popen[str]]
) -> None:
    child, local, remote = connect_child(children, listener)
    owners = SocketOwners()
    found = owners.connection_owner(local, remote)
    assert found == ProcessRef(pid=child.pid, comm=comm_of(child.pid))
    assert found.comm  # "python3" or similar
    assert (owners.lookups, owners.misses) == (1, 0)
    assert child.pid in owners._hot


def test_second_lookup_searches_hot_pids_first(
    listener: socket.socket,
    children: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    child, local, remote = connect_child(children, listener)
    owners = SocketOwners()
    assert owners.connection_owner(local, remote).pid == child.pid

    # Asked again, the process that owned the last connection is searched first, so
    # its fd directory is the only one read.
    searched: list[int] = []
    holds = owners._holds

    def spy(pid: int, target: str) -> bool:
        searched.append(pid)
        return holds(pid, target)

    monkeypatch.setattr(owners, "_holds", spy)
    assert owners.connection_owner(local, remote).pid == child.pid
    assert searched == [child.pid]
    assert (owners.lookups, owners.misses) == (2, 0)


def test_the_callers_own_sockets_are_not_attributed(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as mine:
        conn, _ = listener.accept()
        with conn:
            owners = SocketOwners()
            local = Endpoint("127.0.0.1", mine.getsockname()[1])
            assert owners.connection_owner(local, Endpoint("127.0.0.1", port)) is None
            assert owners.listener_owner(*toward(port)) is None
            assert owners.misses == 2
            assert os.getpid() not in owners._hot


def test_listener_owner(children: list[subprocess.Popen[str]]) -> None:
    child, port = spawn(LISTENER)
    children.append(child)
    owners = SocketOwners()
    assert owners.listener_owner(*toward(port)) == ProcessRef(child.pid, comm_of(child.pid))
    assert (owners.lookups, owners.misses) == (1, 0)


def test_listener_owner_ignores_established_sockets(
    listener: socket.socket, children: list[subprocess.Popen[str]]
) -> None:
    _child, local, _remote = connect_child(children, listener)
    owners = SocketOwners()
    # The child's connected socket has that local port, but nothing listens on it.
    assert owners.listener_owner(*toward(local.port)) is None
    assert (owners.lookups, owners.misses) == (1, 1)


def test_unknown_endpoints_are_misses(listener: socket.socket) -> None:
    owners = SocketOwners()
    free = listener.getsockname()[1]
    assert owners.connection_owner(Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", free)) is None
    assert owners.connection_owner(Endpoint("::1", 1), Endpoint("::1", 2)) is None
    assert (owners.lookups, owners.misses) == (2, 2)
    # the test process itself listens on `free`, and is never reported
    assert owners.listener_owner(*toward(free)) is None
    assert (owners.lookups, owners.misses) == (3, 3)


def test_missing_proc_root(tmp_path: Path) -> None:
    owners = SocketOwners(proc_root=str(tmp_path))
    assert owners.connection_owner(Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)) is None
    assert owners.listener_owner(*toward(443)) is None
    assert owners.misses == 2
