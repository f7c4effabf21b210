"""Fixtures for the fallback-proxy tests: each test gets its own pair of network
namespaces (tests/netns.py), so iptables rules and listeners never touch the host.

These tests need root, pyroute2 and iptables.  Where any is truly absent they skip with
the reason printed; on the project's machines all are present and CI runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import NetnsLab, lab_unavailable_reason, netns_lab

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = Path(__file__).parent / "programs"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "netns: builds network namespaces with iptables rules (needs root)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = lab_unavailable_reason()
    for item in items:
        if "tests/fallback" in str(item.fspath):
            item.add_marker(pytest.mark.netns)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns_lab() as built:
        yield built


def program_env() -> dict[str, str]:
    """Environment for tests/fallback/programs: the repo importable as `agent`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_program(
    lab: NetnsLab, ns: str, name: str, *args: str, timeout: float = 60
) -> tuple[int, dict]:
    """Run a helper from tests/fallback/programs inside `ns`; (returncode, its JSON line)."""
    out = lab.run(
        ns, [sys.executable, str(PROGRAMS / name), *args],
        cwd=REPO, env=program_env(), timeout=timeout,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    if not lines:
        raise AssertionError(f"{name} printed nothing (rc {out.returncode}):\n{out.stderr}")
    return out.returncode, json.loads(lines[-1])


def start_ready(lab: NetnsLab, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
    """Start a long-running program in `ns` and wait for its "ready" line."""
    proc = lab.popen(
        ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )  # fmt: skip
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"{Path(argv[0]).name} did not start: {line!r}\n{err}")
    return proc


def start_program(lab: NetnsLab, ns: str, name: str, *args: str) -> subprocess.Popen:
    """Start a long-running helper from tests/fallback/programs in `ns`."""
    argv = [sys.executable, str(PROGRAMS / name), *args]
    return start_ready(lab, ns, argv, cwd=REPO, env=program_env())


@pytest.fixture
def programs(lab: NetnsLab) -> Iterator:
    """programs(ns, name, *args) -> a started helper; killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(ns: str, name: str, *args: str) -> subprocess.Popen:
        proc = start_program(lab, ns, name, *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.communicate(timeout=10)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory):
    from tests.fallback.proxyharness import UpstreamPki

    return UpstreamPki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def echo_binary() -> Path:
    from tests.fallback.proxyharness import echo_server_binary

    built = echo_server_binary()
    if isinstance(built, str):
        pytest.skip(built)
    return built


@pytest.fixture
def start_echo(lab: NetnsLab, echo_binary: Path, pki) -> Iterator:
    """start_echo(port, *flags) -> the Go HTTPS echo server in the server namespace."""
    from tests.fallback import proxyharness

    started: list[subprocess.Popen] = []

    def start(port: int = 443, *flags: str, cert=None, key=None) -> subprocess.Popen:
        proc = proxyharness.start_echo(
            lab, echo_binary, port, cert or pki.server_cert, key or pki.server_key, *flags
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.communicate(timeout=10)


@pytest.fixture
def start_agent(lab: NetnsLab, tmp_path: Path) -> Iterator:
    """start_agent(*args, ns=lab.client) -> a running ProxyAgent; stopped at teardown,
    after which no tlscap rule may remain in its namespace."""
    from tests.fallback.proxyharness import ProxyAgent

    agents: list = []

    def start(*args: str, ns: str | None = None, env: dict | None = None):
        workdir = tmp_path / f"agent{len(agents)}"
        agent = ProxyAgent(lab, ns or lab.client, workdir, *args, env=env)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
        for tool in ("iptables-save", "ip6tables-save"):
            left = lab.run(agent.ns, [tool, "-t", "nat"]).stdout
            assert "TLSCAP" not in left, f"rules left behind after exit:\n{left}"
