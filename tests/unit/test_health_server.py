"""HealthServer over real loopback HTTP: probes, metrics, lifecycle, listen parsing."""

from __future__ import annotations

import errno
import http.client
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.health.server import HealthServer, ListenError, parse_listen


class Agent:
    """Stands in for a session: flags and counters the test flips."""

    def __init__(self) -> None:
        self.ready = False
        self.alive = True
        self.counters: dict[str, int | float] = {"records": 0, "bytes": 0}
        self.fail: Exception | None = None

    def snapshot(self) -> Mapping[str, int | float]:
        if self.fail is not None:
            raise self.fail
        return dict(self.counters)


@pytest.fixture
def agent() -> Agent:
    return Agent()


@pytest.fixture
def start(agent: Agent) -> Iterator[Callable[[str], HealthServer]]:
    servers: list[HealthServer] = []

    def _start(listen: str = "127.0.0.1:0") -> HealthServer:
        server = HealthServer(
            listen, agent.snapshot, ready=lambda: agent.ready, alive=lambda: agent.alive
        )
        server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start: Callable[[str], HealthServer]) -> HealthServer:
    return start("127.0.0.1:0")


def request(
    server: HealthServer,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    host: str | None = None,
) -> tuple[int, dict[str, str], str]:
    bound, port = server.address
    conn = http.client.HTTPConnection(host or bound, port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def metrics(server: HealthServer) -> dict[str, float]:
    status, _headers, body = request(server, "/metrics")
    assert status == 200
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


# -- endpoints ---------------------------------------------------------------


def test_healthz_follows_alive(server: HealthServer, agent: Agent) -> None:
    assert request(server, "/healthz")[::2] == (200, "ok\n")
    agent.alive = False
    status, _headers, body = request(server, "/healthz")
    assert status == 503
    assert body.endswith("\n") and body.count("\n") == 1


def test_readyz_flips_with_ready(server: HealthServer, agent: Agent) -> None:
    assert request(server, "/readyz")[::2] == (503, "not ready\n")
    agent.ready = True
    assert request(server, "/readyz")[0] == 200
    agent.ready = False
    assert request(server, "/readyz")[0] == 503


def test_a_probe_that_raises_is_a_one_line_503(server: HealthServer, agent: Agent) -> None:
    def broken() -> bool:
        raise RuntimeError("lost the\nsession")

    server._ready = broken  # the callable as a session would misbehave
    status, _headers, body = request(server, "/readyz")
    assert status == 503
    assert "lost the session" in body and body.count("\n") == 1


def test_metrics_content_type_and_openmetrics_negotiation(server: HealthServer) -> None:
    status, headers, body = request(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert "tlscap_up 1.0" in body
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, headers, body = request(server, "/metrics", headers={"Accept": accept})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_counter_moves_between_scrapes(server: HealthServer, agent: Agent) -> None:
    agent.counters.update(records=5, targets_attached=2)
    first = metrics(server)
    agent.counters.update(records=9)
    second = metrics(server)
    assert first["tlscap_records_total"] == 5
    assert second["tlscap_records_total"] == 9
    assert second["tlscap_attached_targets"] == 2


def test_unknown_keys_are_exposed(server: HealthServer, agent: Agent) -> None:
    agent.counters["k8s_pods_resolved"] = 3
    assert metrics(server)["tlscap_k8s_pods_resolved"] == 3


def test_failing_snapshot_is_200_with_up_0_and_a_warning(
    server: HealthServer, agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    agent.fail = RuntimeError("summary exploded")
    with caplog.at_level(logging.WARNING):
        values = metrics(server)
    assert values["tlscap_up"] == 0
    assert values["tlscap_snapshot_errors_total"] == 1
    assert "tlscap_records_total" not in values
    assert any("summary exploded" in r.getMessage() for r in caplog.records)


def test_head_unknown_paths_and_query_strings(server: HealthServer) -> None:
    status, headers, body = request(server, "/metrics", method="HEAD")
    assert status == 200 and body == ""
    assert int(headers["Content-Length"]) > 0
    assert request(server, "/healthz?verbose=1")[0] == 200
    assert request(server, "/")[0] == 404
    assert request(server, "/metricsx")[0] == 404
    assert request(server, "/healthz", method="POST")[0] == 501


def test_requests_log_at_debug_only(
    server: HealthServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG, logger="agent.health"):
        for path in ("/metrics", "/healthz", "/nope"):
            request(server, path)
    assert caplog.records, "requests should be logged at debug level"
    assert all(r.levelno <= logging.DEBUG for r in caplog.records)
    assert capfd.readouterr().err == ""


# -- lifecycle -----------------------------------------------------------------


def test_stop_is_prompt_and_frees_the_port(start: Callable[[str], HealthServer]) -> None:
    server = start("127.0.0.1:0")
    port = server.address[1]
    assert request(server, "/healthz")[0] == 200
    began = time.monotonic()
    server.stop()
    assert time.monotonic() - began < 1.0
    server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    again = start(f"127.0.0.1:{port}")
    assert again.address == ("127.0.0.1", port)
    assert request(again, "/healthz")[0] == 200


def test_port_in_use_names_the_address(agent: Agent) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = HealthServer(f"127.0.0.1:{port}", agent.snapshot, lambda: True, lambda: True)
        with pytest.raises(ListenError, match=rf"127\.0\.0\.1:{port}") as info:
            server.start()
    assert info.value.errno == errno.EADDRINUSE
    assert "in use" in str(info.value)


def test_context_manager_and_double_start(agent: Agent) -> None:
    with HealthServer("127.0.0.1:0", agent.snapshot, lambda: True, lambda: True) as server:
        assert request(server, "/readyz")[0] == 200
        with pytest.raises(RuntimeError):
            server.start()


def test_all_interfaces_answers_on_loopback(start: Callable[[str], HealthServer]) -> None:
    server = start(":0")
    assert server.address[0] in ("::", "0.0.0.0")
    assert request(server, "/healthz", host="127.0.0.1")[0] == 200


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="host has no IPv6 loopback (::1)")
def test_ipv6_loopback(start: Callable[[str], HealthServer]) -> None:
    server = start("[::1]:0")
    assert server.address[0] == "::1"
    assert request(server, "/healthz")[0] == 200
    assert metrics(server)["tlscap_up"] == 1


# -- parse_listen ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:9090", ("0.0.0.0", 9090)),
        (":9090", ("", 9090)),
        ("*:9090", ("", 9090)),
        ("[::1]:9090", ("::1", 9090)),
        ("[::]:9090", ("::", 9090)),
        ("localhost:9090", ("localhost", 9090)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        (" node.example:65535 ", ("node.example", 65535)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("9090", "expected HOST:PORT"),
        ("localhost", "expected HOST:PORT"),
        ("localhost:", "port must be a number"),
        ("localhost:http", "port must be a number"),
        ("localhost:65536", "port must be a number"),
        ("localhost:-1", "port must be a number"),
        ("::1:9090", "in brackets"),
        ("[::1]9090", r"\[IPV6\]:PORT"),
        ("[::1", r"\[IPV6\]:PORT"),
        ("[localhost]:9090", "not an IPv6 address"),
    ],
)
def test_parse_listen_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(value)


def test_bad_listen_fails_at_construction(agent: Agent) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        HealthServer("9090", agent.snapshot, lambda: True, lambda: True)
