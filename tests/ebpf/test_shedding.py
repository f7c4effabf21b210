"""Load shedding for real: when the agent falls behind, connections that start
then are shed whole in the kernel, and the ones it already follows stay
complete.

The agent writes JSON lines to a pipe the test stops reading: its writes block,
it stops draining, and its 1 MiB ring fills with the traffic of one OLD
connection, opened before the stall.  Once that traffic is past the high-water
mark (half the ring), NEW connections are opened and closed; then OLD sends a
little more.  The sizes are chosen so that everything OLD sends during the
stall stays under the cut mark (7/8 of the ring: OLD is not cut, nothing is
lost) while it alone is well past the high-water mark when the NEW connections
start, whatever the agent had drained before it blocked.

Run as a script (`python -m tests.ebpf.test_shedding traffic`), this module is
the traffic program: a Python `ssl` client and server in one process, driven
by commands on stdin.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.ebpf.conftest import REPO, TLSCAP, Capture, wait_for
from tests.ebpf.programs.ssl_pair import recv_exactly

F_SETPIPE_SZ = 1031
PIPE_BYTES = 4096
RING_MB = 1  # the smallest --ringbuf-mb; the high-water mark is half of it
STALL_FILL = 64 << 10  # sent on OLD to fill the pipe and block the agent
PAST_MARK = 288 << 10  # then this: its events alone (~580 KiB) pass the 512 KiB mark
AFTER_NEW = 16 << 10  # OLD goes on while NEW connections are being shed
NEW_DURING_STALL = 4
NEW_AFTER_STALL = 2
NEW_REQUEST, NEW_REPLY = 2000, 3000
OVERFLOW = 2 << 20  # sent on OLD during a stall: twice the ring, so OLD is cut
RESUME_SEND, RESUME_REPLY = 8 << 10, 1024  # OLD again, once the ring has drained
SMALL_REPLY = 16
HEADER = struct.Struct("!II")  # payload length, reply length


# -- the traffic program ------------------------------------------------------


def _traffic_main() -> None:
    cert, key = sys.argv[2], sys.argv[3]
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one(raw: socket.socket) -> None:
        with server_ctx.wrap_socket(raw, server_side=True) as conn:
            while True:
                try:
                    size, reply = HEADER.unpack(recv_exactly(conn, HEADER.size))
                except (EOFError, OSError):
                    return
                recv_exactly(conn, size)
                if reply:
                    conn.sendall(os.urandom(reply))

    def accept_loop() -> None:
        while True:
            raw, _ = listener.accept()
            threading.Thread(target=serve_one, args=(raw,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    port = listener.getsockname()[1]
    conns: dict[int, ssl.SSLSocket] = {}
    sent: dict[int, bytearray] = collections.defaultdict(bytearray)
    received: dict[int, bytearray] = collections.defaultdict(bytearray)

    def connect() -> int:
        conn = client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
        conn_id = conn.getsockname()[1]  # its local port names it
        conns[conn_id] = conn
        return conn_id

    def send(conn_id: int, size: int, reply: int) -> None:
        message = HEADER.pack(size, reply) + os.urandom(size)
        conns[conn_id].sendall(message)
        sent[conn_id] += message
        if reply:
            received[conn_id] += recv_exactly(conns[conn_id], reply)

    def say(obj: object) -> None:
        print(json.dumps(obj), flush=True)

    say({"pid": os.getpid(), "port": port})
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "open":  # a connection that stays open: open SIZE REPLY
            conn_id = connect()
            send(conn_id, int(args[0]), int(args[1]))
            say({"conn": conn_id})
        elif cmd == "send":  # send CONN SIZE REPLY
            send(int(args[0]), int(args[1]), int(args[2]))
            say({"ok": True})
        elif cmd == "burst":  # COUNT short connections, one exchange each, closed
            ports = []
            for _ in range(int(args[0])):
                conn_id = connect()
                send(conn_id, NEW_REQUEST, NEW_REPLY)
                conns.pop(conn_id).close()
                ports.append(conn_id)
            say({"ports": ports})
        elif cmd == "quit":
            say(
                {
                    str(c): {
                        "sent_b64": base64.b64encode(sent[c]).decode(),
                        "received_b64": base64.b64encode(received[c]).decode(),
                    }
                    for c in conns
                }
            )
            return


# -- the test -----------------------------------------------------------------


class Traffic:
    def __init__(self, cert: Path, key: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.ebpf.test_shedding", "traffic", str(cert), str(key)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        hello = self.read()
        self.pid: int = hello["pid"]
        self.port: int = hello["port"]

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the traffic program died"
        return json.loads(line)

    def ask(self, *words: object) -> dict:
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self.read()


class PipeReader:
    """Reads the agent's stdout on a thread that can be paused: paused, the
    pipe fills and the agent blocks in write()."""

    def __init__(self, pipe) -> None:
        self._fd = pipe.fileno()
        self._data = bytearray()
        self._lock = threading.Lock()
        self.reading = threading.Event()
        self.reading.set()
        self.eof = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.reading.wait()
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                self.eof.set()
                return
            with self._lock:
                self._data += chunk

    def records(self) -> list[dict]:
        with self._lock:
            text = bytes(self._data).decode()
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def agent_blocked_writing(pid: int) -> bool:
    for wchan in glob.glob(f"/proc/{pid}/task/*/wchan"):
        try:
            if Path(wchan).read_text().endswith("pipe_write"):
                return True
        except OSError:
            continue
    return False


def port_of(record: dict) -> int | None:
    """The client port of a data record's connection, seen from either end."""
    end = record["local"] if record["role"] == "client" else record["remote"]
    return end["port"] if end else None


def stream_bytes(records: list[dict], port: int, role: str, direction: str) -> int:
    return sum(
        r["len"]
        for r in records
        if r["type"] == "data"
        and port_of(r) == port
        and r["role"] == role
        and r["direction"] == direction
    )


def assert_no_holes(cap: Capture) -> None:
    """Every direction of every captured connection is contiguous from its first
    record (the kernel keeps offsets, so anything lost would show as a jump)."""
    by_stream = collections.defaultdict(list)
    for r in cap.data():
        by_stream[(r["conn_id"], r["direction"])].append((r["offset"], r["len"]))
    for stream, chunks in by_stream.items():
        chunks.sort()
        expected = chunks[0][0]
        for offset, length in chunks:
            assert offset == expected, f"{stream}: hole at {expected}, next record at {offset}"
            expected += length


@contextlib.contextmanager
def stalling_agent(
    tls_cert, tmp_path: Path
) -> Iterator[tuple[Traffic, subprocess.Popen, PipeReader]]:
    """The traffic program and an agent on it (a 1 MiB ring) whose stdout the test can
    stop reading; both are killed if the test fails."""
    cert, key = tls_cert
    traffic = Traffic(cert, key)
    ready = tmp_path / "ready"
    agent = subprocess.Popen(
        [*TLSCAP, "run", "--output", "jsonl", "--ready-file", str(ready),
         "--pid", str(traffic.pid), "--ringbuf-mb", str(RING_MB), "--log-level", "info"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=open(tmp_path / "agent.stderr", "w"),  # noqa: SIM115
    )  # fmt: skip
    try:
        fcntl.fcntl(agent.stdout.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
        reader = PipeReader(agent.stdout)
        wait_for(lambda: ready.exists() or agent.poll() is not None, 60, "the agent to attach")
        assert agent.poll() is None, (tmp_path / "agent.stderr").read_text()
        yield traffic, agent, reader
    finally:
        for proc in (agent, traffic.proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def stop(traffic: Traffic, agent: subprocess.Popen, reader: PipeReader, tmp_path: Path) -> dict:
    """Quit the traffic program (returning what it sent and received per connection),
    then stop the agent once the last events are in."""
    truth = traffic.ask("quit")
    traffic.proc.wait(timeout=10)
    time.sleep(0.3)  # let the last events arrive
    agent.send_signal(signal.SIGINT)
    assert agent.wait(timeout=30) == 0, (tmp_path / "agent.stderr").read_text()
    assert reader.eof.wait(10)
    return truth


def stall(traffic: Traffic, agent: subprocess.Popen, reader: PipeReader, conn: int) -> None:
    """Stop reading until the agent is stuck writing to its stdout (`conn` sends what
    fills the pipe, with a small reply: the server has read, and the kernel emitted, it
    all)."""
    reader.reading.clear()
    traffic.ask("send", conn, STALL_FILL, SMALL_REPLY)
    wait_for(lambda: agent_blocked_writing(agent.pid), 10, "the agent to block on its pipe")


def test_new_connections_are_shed_whole_while_followed_ones_stay_complete(tls_cert, tmp_path):
    with stalling_agent(tls_cert, tmp_path) as (traffic, agent, reader):
        # OLD starts while the agent keeps up: it is followed.
        old = traffic.ask("open", 1000, 1000)["conn"]
        wait_for(
            lambda: stream_bytes(reader.records(), old, "client", "ingress") == 1000,
            10, "OLD's first exchange to be captured",
        )  # fmt: skip

        stall(traffic, agent, reader, old)
        traffic.ask("send", old, PAST_MARK, SMALL_REPLY)
        # The ring is now above the mark and stays there: NEW connections are shed.
        shed_ports = traffic.ask("burst", NEW_DURING_STALL)["ports"]
        traffic.ask("send", old, AFTER_NEW, 1024)
        assert agent_blocked_writing(agent.pid), "the agent got going during the stall"

        # Unstall: once OLD's last reply is in, the ring has drained again.
        reader.reading.set()
        old_total = 1000 + STALL_FILL + PAST_MARK + AFTER_NEW + 4 * HEADER.size
        old_received = 1000 + 2 * SMALL_REPLY + 1024
        wait_for(
            lambda: stream_bytes(reader.records(), old, "client", "ingress") == old_received
            and stream_bytes(reader.records(), old, "server", "ingress") == old_total,
            30, "OLD's traffic from the stall to be written",
        )  # fmt: skip
        followed_ports = traffic.ask("burst", NEW_AFTER_STALL)["ports"]
        comm = Path(f"/proc/{traffic.pid}/comm").read_text().strip()
        truth = stop(traffic, agent, reader, tmp_path)[str(old)]
    cap = Capture(reader.records(), (tmp_path / "agent.stderr").read_text(), agent.returncode)

    # The ring never overflowed: every loss below would be shedding's fault.
    stats = cap.stats
    assert stats["lost"] == 0 and stats["kernel_lost_events"] == 0, stats
    assert stats["incomplete_calls"] == 0 and stats["flow_gaps"] == 0, stats

    # Both ends (client and server SSL objects) of each NEW connection of the
    # stall were shed, and nothing else.
    per_conn = NEW_REQUEST + NEW_REPLY + HEADER.size
    assert stats["shed_connections"] == 2 * NEW_DURING_STALL, stats
    assert stats["shed_bytes"] == 2 * NEW_DURING_STALL * per_conn, stats
    assert stats["shed_calls"] >= 4 * NEW_DURING_STALL, stats
    assert stats["shed_connections_unattributed"] == 0
    assert stats["shed_processes"] == 1
    assert stats[f"shed_connections_pid_{traffic.pid}_{comm}"] == 2 * NEW_DURING_STALL
    assert not any(k.startswith("kernel_shed_") for k in stats)
    # Shed whole: not a byte of them, not even an open record.
    shed = set(shed_ports)
    assert not [r for r in cap.records if r["type"] in ("data", "open") and port_of(r) in shed]

    # OLD, followed through the stall, is complete both ways, on both ends.
    (client,) = {r["conn_id"] for r in cap.data(role="client") if port_of(r) == old}
    (server,) = {r["conn_id"] for r in cap.data(role="server") if port_of(r) == old}
    sent, received = (base64.b64decode(truth[k]) for k in ("sent_b64", "received_b64"))
    assert cap.stream(client, "egress") == cap.stream(server, "ingress") == sent
    assert cap.stream(client, "ingress") == cap.stream(server, "egress") == received
    assert hashlib.sha256(sent).digest() != hashlib.sha256(b"").digest()

    # Connections that start once the agent caught up are followed again.
    for port in followed_ports:
        ends = {r["conn_id"] for r in cap.data() if port_of(r) == port}
        assert len(ends) == 2, f"connection from port {port}: {ends}"
        for conn in ends:
            assert len(cap.stream(conn, "egress")) + len(cap.stream(conn, "ingress")) == per_conn

    assert_no_holes(cap)


def records_settled(reader: PipeReader, agent: subprocess.Popen, quiet: float = 0.5) -> bool:
    """The agent wrote nothing for `quiet` seconds and is not stuck writing: it has
    drained the ring."""
    before = len(reader.records())
    time.sleep(quiet)
    return len(reader.records()) == before and not agent_blocked_writing(agent.pid)


def check_against_truth(cap: Capture, conn: str, direction: str, truth: bytes) -> list[int]:
    """Every captured byte of one direction is the byte sent at its offset; returns where
    the gaps are (offsets at which captured data resumes after a hole)."""
    chunks = sorted(
        (r["offset"], base64.b64decode(r["data_b64"]))
        for r in cap.data(conn_id=conn, direction=direction)
    )
    gaps, expected = [], 0
    for offset, payload in chunks:
        assert payload == truth[offset : offset + len(payload)], f"{conn} {direction} @{offset}"
        if offset != expected:
            assert offset > expected, f"{conn} {direction}: overlap at {offset}"
            gaps.append(offset)
        expected = offset + len(payload)
    return gaps


def test_a_followed_connection_is_cut_before_the_ring_is_full_then_resumes(tls_cert, tmp_path):
    """When the ring passes its cut mark (7/8 full), a followed connection whose call
    took it there, or would have (OLD's 2 MiB write, checked before it is sent), stops
    sending until it has drained below the high-water mark: one gap per end and nothing
    refused by the ring, instead of holes in every connection. A connection quiet
    meanwhile stays whole."""
    with stalling_agent(tls_cert, tmp_path) as (traffic, agent, reader):
        old = traffic.ask("open", 1000, 1000)["conn"]
        other = traffic.ask("open", 1000, 1000)["conn"]
        wait_for(
            lambda: stream_bytes(reader.records(), old, "client", "ingress") == 1000
            and stream_bytes(reader.records(), other, "client", "ingress") == 1000,
            10, "the first exchanges to be captured",
        )  # fmt: skip
        stall(traffic, agent, reader, old)
        traffic.ask("send", old, OVERFLOW, SMALL_REPLY)  # past the cut mark: OLD is cut
        traffic.ask("send", old, AFTER_NEW, SMALL_REPLY)  # still cut: sends nothing
        reader.reading.set()
        wait_for(lambda: records_settled(reader, agent), 30, "the agent to drain the ring")
        traffic.ask("send", other, 1000, 1000)
        traffic.ask("send", old, RESUME_SEND, RESUME_REPLY)  # below the mark: OLD resumes
        truth = stop(traffic, agent, reader, tmp_path)
    cap = Capture(reader.records(), (tmp_path / "agent.stderr").read_text(), agent.returncode)
    stats = cap.stats

    # Both ends of OLD (client and server SSL objects) were cut once each, before the
    # ring had to refuse anything: nothing was lost, the cuts are all counted.
    assert stats["shed_midstream"] == 2, stats
    assert stats["lost"] == stats["kernel_lost_events"] == 0, stats
    assert stats["shed_calls"] >= 4 and stats["shed_bytes"] >= AFTER_NEW, stats
    assert stats["shed_connections"] == 0, stats

    # OLD: every byte captured is the byte sent, with one gap per direction that had
    # traffic while cut, and everything after the drain captured to the end.
    sent, received = (base64.b64decode(truth[str(old)][k]) for k in ("sent_b64", "received_b64"))
    (client,) = {r["conn_id"] for r in cap.data(role="client") if port_of(r) == old}
    (server,) = {r["conn_id"] for r in cap.data(role="server") if port_of(r) == old}
    for conn, out, into in ((client, "egress", "ingress"), (server, "ingress", "egress")):
        assert len(check_against_truth(cap, conn, out, sent)) == 1
        assert len(check_against_truth(cap, conn, into, received)) == 1
        assert stream_end(cap, conn, out) == len(sent)
        assert stream_end(cap, conn, into) == len(received)

    # OTHER, quiet while the ring was full, is whole both ways on both ends.
    sent, received = (base64.b64decode(truth[str(other)][k]) for k in ("sent_b64", "received_b64"))
    (client,) = {r["conn_id"] for r in cap.data(role="client") if port_of(r) == other}
    (server,) = {r["conn_id"] for r in cap.data(role="server") if port_of(r) == other}
    assert cap.stream(client, "egress") == cap.stream(server, "ingress") == sent
    assert cap.stream(client, "ingress") == cap.stream(server, "egress") == received


def stream_end(cap: Capture, conn: str, direction: str) -> int:
    return max(r["offset"] + r["len"] for r in cap.data(conn_id=conn, direction=direction))


if __name__ == "__main__" and sys.argv[1:2] == ["traffic"]:
    _traffic_main()
