"""A busy node: every request nginx serves under wrk load is captured, nothing is lost.

nginx (1 worker, keep-alive, a 1.5 KiB body, tests/ebpf/nginx_lab.py) is started first,
then `tlscap run --comm nginx --comm wrk --output jsonl`, then wrk for a few seconds
with a unique target per request.  The agent must report `lost == 0`, and each line of
nginx's access log must be one `type:"exchange"` record on nginx's side with the same
target, status and body.  Correctness under load, not timing: wrk is paced (its Lua
`delay()`) to a steady rate the agent sustains with L7 parsing on both ends on this
2-core machine, shared with nginx and wrk; bench/load_nginx.py measures the flat-out
ceiling and the cost.

With `--workers 2` the same must hold with the pipeline in two processes: nginx and
wrk each on a worker of their own, each appending to the one output file.

nginx and wrk are installed by `make setup`; their absence fails the test, it does
not skip it.
"""

from __future__ import annotations

import base64
import json
import random
import re
from pathlib import Path

import pytest

from tests.ebpf import nginx_lab

WRK_SECONDS = 3
WRK_CONNECTIONS = 8
WRK_DELAY_MS = 5  # per connection: about 8 * 1000 / 5 = 1600 requests/s at most
SAMPLE = 200  # access log lines compared field by field with their exchange


def start_nginx(tmp_path: Path) -> nginx_lab.Nginx:
    """nginx, after checking that it and wrk are there (`make setup` installs them)."""
    missing = nginx_lab.missing_tools()
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `make setup` (it installs them)")
    return nginx_lab.start_nginx(tmp_path / "nginx")


@pytest.mark.parametrize("workers", [1, 2])
def test_every_request_under_load_is_an_exchange(agent, tmp_path: Path, workers: int) -> None:
    lab = start_nginx(tmp_path)
    try:
        a = agent("--comm", "nginx", "--comm", "wrk", "--workers", str(workers))
        wrk = nginx_lab.run_wrk(
            lab.url, WRK_CONNECTIONS, WRK_SECONDS, tmp_path, delay_ms=WRK_DELAY_MS
        )
        served = lab.served()
        # The agent drains what is left in the ring on SIGINT; a slow one takes a while.
        cap = a.stop(settle=1.0)
    finally:
        lab.stop()
    assert cap.returncode == 0, cap.stderr

    found = nginx_lab.read_exchanges(a.output, lab.pids, wrk.pid)
    stats = cap.stats
    numbers = (
        f"wrk: {wrk.requests} requests in {wrk.duration_s:.1f} s ({wrk.req_per_s:.0f}/s, "
        f"errors {wrk.errors}); nginx served {len(served)}; exchanges on nginx's side "
        f"{found.server_total} ({len(found.server)} distinct targets), on wrk's side "
        f"{found.client_total}; agent stats: lost={stats.get('lost')} "
        f"kernel_lost_events={stats.get('kernel_lost_events')} events={stats.get('events')} "
        f"records={stats.get('records')} incomplete_calls={stats.get('incomplete_calls')} "
        f"flow_gaps={stats.get('flow_gaps')} l7_gaps={stats.get('l7_gaps')} "
        f"shed_connections={stats.get('shed_connections')} shed_calls={stats.get('shed_calls')}"
    )
    print(numbers)
    assert served, f"nginx served nothing under wrk\n{wrk.output}"
    assert all(e.status == 200 for e in served), numbers
    assert stats["lost"] == 0, f"the agent lost events under load: {numbers}"

    targets = [e.target for e in served]
    assert len(set(targets)) == len(targets), "wrk's targets are unique per request"
    not_captured = [t for t in targets if t not in found.server]
    assert not not_captured, (
        f"{len(not_captured)} served request(s) have no exchange on nginx's side, "
        f"e.g. {not_captured[:5]}: {numbers}"
    )
    assert found.server_total == len(served), numbers
    if workers > 1:
        # Each writer numbers its records in its own slot (seq mod workers + 1): nginx's
        # and wrk's records came from different workers, all in one valid JSON file.
        slots = {}
        for line in a.output.read_text().splitlines():
            record = json.loads(line)
            if record["type"] == "exchange":
                slots.setdefault(record["comm"], set()).add((record["seq"] - 1) % (workers + 1))
        assert stats["workers"] == workers and stats["worker_failures"] == 0, numbers
        assert len(slots["nginx"]) == 1 and len(slots["wrk"]) == 1, slots
        assert slots["nginx"] != slots["wrk"], slots

    for entry in random.Random(7).sample(served, min(SAMPLE, len(served))):
        record = found.server[entry.target]
        assert record["role"] == "server", record
        request, response = record["exchange"]["request"], record["exchange"]["response"]
        assert (request["method"], request["target"]) == ("GET", entry.target)
        assert response is not None, f"{entry.target}: no response captured ({record})"
        assert response["status"] == entry.status
        assert response["body_len"] == entry.body_bytes_sent == len(lab.body)
        assert base64.b64decode(response["body_b64"]) == lab.body


def test_nothing_is_lost_at_full_speed_without_l7(agent, tmp_path: Path) -> None:
    """wrk flat out, `--l7 off`, a ring that holds the whole run: nothing may be lost, not a
    chunk nor a retry, and every request nginx served is in the bytes captured on nginx's
    side.  (The torn consumer position that once made the kernel refuse records with room
    to spare is guarded by tests/unit/test_ring_positions.py: with a ring this big its
    torn values no longer look full.)"""
    lab = start_nginx(tmp_path)
    try:
        # A ring for the whole run: JSON lines flat out can fall seconds behind on this
        # machine, and a full ring is not what this test is about.
        a = agent("--comm", "nginx", "--comm", "wrk", "--l7", "off", "--ringbuf-mb", "512")
        wrk = nginx_lab.run_wrk(lab.url, WRK_CONNECTIONS, WRK_SECONDS, tmp_path)
        served = lab.served()
        cap = a.stop(settle=1.0)
    finally:
        lab.stop()
    assert cap.returncode == 0, cap.stderr
    stats = cap.stats
    numbers = (
        f"wrk: {wrk.requests} requests ({wrk.req_per_s:.0f}/s); nginx served {len(served)}; "
        f"agent: lost={stats.get('lost')} events={stats.get('events')} "
        f"ring_retried={stats.get('kernel_ring_retried')} "
        f"peak={stats.get('ring_peak_pending_bytes')} of {stats.get('ring_bytes')} "
        f"flow_gaps={stats.get('flow_gaps')} shed={stats.get('shed_connections')}"
        f"/{stats.get('shed_midstream')}"
    )
    print(numbers)
    assert len(served) > 1000, numbers
    assert stats["lost"] == 0 and stats["flow_gaps"] == 0, numbers
    assert not stats.get("kernel_ring_retried"), numbers
    # nginx's request bytes, whole: every served target's request line is in them.
    received = b"".join(
        base64.b64decode(r["data_b64"])
        for r in sorted(cap.data(direction="ingress"), key=lambda r: (r["conn_id"], r["offset"]))
        if r["pid"] in lab.pids
    )
    requested = {m.decode() for m in re.findall(rb"GET (\S+) HTTP/1\.1\r\n", received)}
    missing_targets = [e.target for e in served if e.target not in requested]
    assert not missing_targets, f"{len(missing_targets)} not captured: {numbers}"
