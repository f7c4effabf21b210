"""A Go process holding more idle keep-alive TLS connections than the agent's call map
used to hold (16,384 entries), every connection still captured when it wakes up.

An idle connection is a (*tls.Conn).Read blocked in the kernel; the agent remembers
each such call from its entry probe until one of its return probes runs.
programs/go_idle.go opens 8,400 HTTPS connections to itself (server and client in one
process, both Go's crypto/tls), so 16,800 reads wait at once.  The test checks that the
kernel really holds that many calls, then that one more request on every connection
is captured on both ends, with nothing lost and no map full.  The program exits
right after round 2: its exit, not the agent's periodic sweep, closes its connections.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests import golang
from tests.ebpf.conftest import PROGRAMS, wait_for

CONNECTIONS = 8400  # two blocked reads each: 16,800 > the old 16,384
OLD_MAP_SIZE = 16384


def calls_in_flight(agent_pid: int) -> int:
    """Entries of the go_calls map the agent with pid `agent_pid` holds open: its map
    ids come from its fds' fdinfo, the names from bpftool."""
    own = set()
    for info in Path(f"/proc/{agent_pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue  # an fd closed meanwhile
        if m := re.search(r"^map_id:\s*(\d+)", text, re.M):
            own.add(int(m.group(1)))
    maps = json.loads(subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    ids = [m["id"] for m in maps if m.get("name") == "go_calls" and m["id"] in own]
    assert len(ids) == 1, f"go_calls maps of the agent: {ids}"
    dump = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(ids[0])],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return len(json.loads(dump.stdout))


def test_more_idle_go_connections_than_the_old_map_held_are_all_captured(agent) -> None:
    toolchain = golang.toolchains()["pypi"]
    if toolchain is None:
        pytest.skip(golang.MISSING_REASON["pypi"])
    binary = golang.build(toolchain, PROGRAMS / "go_idle.go")
    prog = subprocess.Popen(
        [str(binary), "-conns", str(CONNECTIONS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pid = json.loads(prog.stdout.readline())["pid"]
        a = agent("--pid", str(pid), "--l7", "off")
        wait_for(lambda: f"probing {binary}" in a.stderr_text(), 60, "the agent to probe go_idle")
        prog.stdin.write("go\n")
        prog.stdin.flush()
        idle = json.loads(prog.stdout.readline())
        assert idle["idle"] == CONNECTIONS, idle

        # Every connection now waits in two reads: the kernel must hold them all.
        def all_waiting() -> bool:
            return calls_in_flight(a.proc.pid) >= 2 * CONNECTIONS

        wait_for(all_waiting, 30, f"{2 * CONNECTIONS} Go reads to be in flight")
        held = calls_in_flight(a.proc.pid)
        assert held > OLD_MAP_SIZE

        prog.stdin.write("go\n")
        prog.stdin.flush()
        done = json.loads(prog.stdout.readline())
        assert done["round2"] == CONNECTIONS and done["failed"] == 0, done
        time.sleep(1.0)
        cap = a.stop()
    finally:
        prog.kill()
        prog.wait()

    # What each end read, per connection, in offset order: a request need not
    # come in one read (net/http's server reads one byte ahead while a handler
    # runs, so under load a request can arrive as "G" and "ET /r/...").
    streams: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
    for r in cap.of_type("data"):
        if r["direction"] == "ingress" and r["role"] in ("server", "client"):
            chunks = streams.setdefault((r["conn_id"], r["role"]), [])
            chunks.append((r["offset"], base64.b64decode(r["data_b64"])))
    requests: set[int] = set()
    responses: set[int] = set()
    request_line = re.compile(rb"GET /r/(\d+)/2 HTTP/1\.1")
    response_body = re.compile(rb"round 2 conn (\d+)")
    for (_, role), chunks in streams.items():
        stream = b"".join(payload for _, payload in sorted(chunks))
        if role == "server":
            requests.update(int(m) for m in request_line.findall(stream))
        else:
            responses.update(int(m) for m in response_body.findall(stream))
    stats = cap.stats
    assert stats["lost"] == 0, stats
    assert stats["kernel_map_full"] == 0, stats
    # go_idle exits right after round 2, often while the agent is still behind
    # (under load, by more than the sweep interval): its exit event closes its
    # connections.  The sweep must not have closed any of them from /proc's
    # view of a process that had already gone.
    assert stats["flow_closes_recovered"] == 0 and stats["flow_exits_recovered"] == 0, stats
    assert stats["flow_gaps"] == 0, stats
    everyone = set(range(CONNECTIONS))
    missing = sorted(everyone - requests)[:5], sorted(everyone - responses)[:5]
    assert requests == everyone and responses == everyone, (
        f"round-2 requests / responses not captured (first few): {missing}; stats {stats}"
    )
