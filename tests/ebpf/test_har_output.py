"""HAR files from a real capture, read back by mitmproxy's own HAR reader.

`tlscap run --output har` (live, also writing a --store) captures curl over HTTP/1.1
and HTTP/2 against programs/http_server.py; `tlscap export --har` writes the same
exchanges from the store.  Both files must be HAR 1.2, valid while the capture still
runs, and mitmproxy must load them into flows whose method, URL, status and bodies
are those curl sent and got.

mitmproxy lives in a venv of its own (it pins cryptography and h2 versions older
than tlscap's), made on first use in the tlscap cache directory.
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.ebpf.conftest import REPO, TLSCAP, wait_for
from tests.ebpf.test_l7_capture import curl
from tests.unit.har_check import check_har

# Made by `make setup` (scripts/bootstrap.sh): mitmproxy pins libraries older than ours.
MITM_VENV = REPO / ".cache" / "mitmproxy-venv"
READ_FLOWS = """
import base64, json, sys
from mitmproxy.io import FlowReader
with open(sys.argv[1], "rb") as f:
    flows = list(FlowReader(f).stream())
print(json.dumps([{
    "method": fl.request.method, "url": fl.request.url,
    "http_version": fl.request.http_version, "status": fl.response.status_code,
    "request_body": base64.b64encode(fl.request.content or b"").decode(),
    "response_body": base64.b64encode(fl.response.content or b"").decode(),
    "server": fl.server_conn.address[0] if fl.server_conn.address else None,
} for fl in flows]))
"""


@pytest.fixture(scope="session")
def mitm_python() -> Path:
    python = MITM_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{MITM_VENV} is missing: run `make setup` (scripts/bootstrap.sh makes it)")
    return python


def mitm_flows(python: Path, har: Path) -> list[dict]:
    out = subprocess.run(
        [str(python), "-c", READ_FLOWS, str(har)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_har_from_live_capture_and_export_read_by_mitmproxy(
    tmp_path: Path,
    http_server: int,
    mitm_python: Path,
) -> None:
    port = http_server
    har, store, ready = tmp_path / "live.har", tmp_path / "s.db", tmp_path / "ready"
    proc = subprocess.Popen(
        [*TLSCAP, "run", "--comm", "curl", "--output", "har", "--output-file", str(har),
         "--store", str(store), "--ready-file", str(ready)],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the agent")
        assert proc.poll() is None, proc.stderr.read()
        curl("--http1.1", f"{url}/har/one?x=1&y=two%20words", f"{url}/status/404")
        curl("--http1.1", "-d", "name=ada&lang=en", f"{url}/har/form")
        curl("--http2", f"{url}/har/two", f"{url}/chunked")

        # Valid while the capture runs (flushed every 0.5 s), not only at exit.
        def live_entries() -> bool:
            return len(json.loads(har.read_text())["log"]["entries"]) >= 5

        wait_for(live_entries, 10, "the live HAR file to hold the entries")
        assert stat.S_IMODE(har.stat().st_mode) == 0o600
    finally:
        proc.send_signal(2)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err

    entries = check_har(json.loads(har.read_text()))
    chunked = b"first chunk\nsecond, longer chunk of the body\nthird\n"
    want = [
        ("GET", f"{url}/har/one?x=1&y=two%20words", "HTTP/1.1", 200, b"",
         b"you asked for /har/one?x=1&y=two%20words\n"),
        ("GET", f"{url}/status/404", "HTTP/1.1", 404, b"", b"status body\n"),
        ("POST", f"{url}/har/form", "HTTP/1.1", 200, b"name=ada&lang=en",
         b"you asked for /har/form\n"),
        ("GET", f"{url}/har/two", "HTTP/2", 200, b"", b"you asked for /har/two\n"),
        ("GET", f"{url}/chunked", "HTTP/2", 200, b"", b"you asked for /chunked\n"),
    ]  # fmt: skip
    assert chunked  # (the HTTP/1.1 /chunked path; over HTTP/2 the server answers plainly)
    flows = mitm_flows(mitm_python, har)
    got = [
        (f["method"], f["url"], f["http_version"], f["status"],
         base64.b64decode(f["request_body"]), base64.b64decode(f["response_body"]))
        for f in flows
    ]  # fmt: skip
    assert got == want
    assert all(f["server"] == "127.0.0.1" for f in flows)

    one = entries[0]
    assert one["request"]["queryString"] == [
        {"name": "x", "value": "1"},
        {"name": "y", "value": "two words"},
    ]
    form = entries[2]["request"]["postData"]
    assert form["params"] == [{"name": "name", "value": "ada"}, {"name": "lang", "value": "en"}]
    for e in entries:
        x = e["_tlscap"]
        assert x["comm"] == "curl" and x["pid"] > 0 and x["role"] == "client"
        assert x["node"] and "pod" in x
        assert e["connection"] == x["conn_id"]
        assert e["serverIPAddress"] == "127.0.0.1"
        assert e["time"] > 0 and e["timings"]["wait"] > 0
    assert len({e["connection"] for e in entries}) == 3  # three curl runs

    # The same exchanges exported from the store, through the export filters.
    exported = tmp_path / "export.har"
    out = subprocess.run(
        [*TLSCAP, "export", "--store", str(store), "--har", str(exported), "--comm", "curl"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "wrote 5 HAR entries" in out.stderr
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    again = check_har(json.loads(exported.read_text()))
    strip = lambda e: {k: v for k, v in e.items() if k != "_tlscap"}  # noqa: E731
    assert [strip(e) for e in again] == [strip(e) for e in entries]
    assert mitm_flows(mitm_python, exported) == flows
    only_404 = tmp_path / "404.har"
    subprocess.run(
        [*TLSCAP, "export", "--store", str(store), "--har", str(only_404), "--status", "404"],
        cwd=REPO, capture_output=True, check=True,
    )  # fmt: skip
    assert [e["response"]["status"] for e in check_har(json.loads(only_404.read_text()))] == [404]


def test_har_file_complete_after_sigterm_mid_capture(tmp_path: Path, http_server: int) -> None:
    har, ready = tmp_path / "t.har", tmp_path / "ready"
    proc = subprocess.Popen(
        [*TLSCAP, "run", "--comm", "curl", "--output", "har", "--output-file", str(har),
         "--ready-file", str(ready)],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the agent")
        curl("--http1.1", f"https://127.0.0.1:{http_server}/t1")
        time.sleep(0.2)
    finally:
        proc.terminate()  # SIGTERM, at once: no wait for the periodic flush
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    entries = check_har(json.loads(har.read_text()))
    assert [e["request"]["url"].rsplit("/", 1)[1] for e in entries] == ["t1"]
