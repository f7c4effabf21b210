"""PodWatcher against a fake API server on loopback: list, watch, re-watch, relist,
outages, credentials (in-cluster over TLS, kubeconfig), and a prompt stop."""

from __future__ import annotations

import base64
import copy
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.export.backoff import Backoff
from agent.k8s.api import ApiConfig, KubeApi
from agent.k8s.podwatch import PodWatcher
from tests.k8s.fake_apiserver import FakeApiServer, free_port, load_fixture

NODE = "node-a"
WEB_UID = "3f1c2a4e-8b7d-4e21-9a6f-5c0d1e2f3a4b"
EXPORTER_UID = "b7e9d1c3-2f4a-4b6c-8d0e-1f2a3b4c5d6e"
WEB = "eaad67a374baafc7245151ce2c5fdff0c0873e66e0c9d10244f526a76fe13e8a"
WEB_RESTARTED = "b6e0209d6ededba6fe67e835bc93634606cb2a3e045a1b79539eede0f34c50a8"
CACHE_REDIS = "d9730e223238744819b7b6149768e22288eb60450ad5464946124aa025f5aea8"
NODE_A_PODS = 4  # the fixture's fifth pod runs on node-b


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def event_object(kind: str) -> dict[str, Any]:
    return next(e["object"] for e in load_fixture("watch_events.json") if e["type"] == kind)


def fixture_pod(name: str) -> dict[str, Any]:
    return next(p for p in load_fixture("pods.json")["items"] if p["metadata"]["name"] == name)


def populate(server: FakeApiServer) -> FakeApiServer:
    server.load("pods", load_fixture("pods.json")["items"])
    server.load("namespaces", load_fixture("namespaces.json")["items"])
    return server


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, maximum=0.2, jitter=0.1)


def make_watcher(config: ApiConfig) -> PodWatcher:
    api = KubeApi(config, connect_timeout=1.0, read_timeout=5.0)
    return PodWatcher(api, NODE, watch_timeout_s=60, backoff_factory=fast_backoff)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with populate(FakeApiServer()) as srv:
        yield srv


@pytest.fixture
def watcher(server: FakeApiServer) -> Iterator[PodWatcher]:
    w = make_watcher(ApiConfig(server=server.url))
    w.start()
    assert w.wait_synced(5)
    wait_for(lambda: server.watchers("pods") == 1, "the pods watch")
    try:
        yield w
    finally:
        w.stop()


def last_watch_rv(server: FakeApiServer) -> str:
    return server.requests_for("pods", watch=True)[-1].params["resourceVersion"]


# ---------------------------------------------------------------------------------------
# List and watch


def test_initial_list_populates_the_index(server: FakeApiServer, watcher: PodWatcher) -> None:
    assert len(watcher.index) == NODE_A_PODS
    pod, container = watcher.index.by_container(WEB) or (None, "")
    assert pod is not None and pod.namespace == "shop" and container == "web"
    assert watcher.index.namespace("payments").annotations == {  # type: ignore[union-attr]
        "tlscap.io/capture": "false"
    }
    assert watcher.connected
    (pod_list,) = server.requests_for("pods", watch=False)
    # resourceVersion=0: from the API server's cache, not a quorum read per agent
    assert pod_list.params == {"fieldSelector": "spec.nodeName=node-a", "resourceVersion": "0"}
    watch = server.requests_for("pods", watch=True)[0].params
    assert watch["fieldSelector"] == "spec.nodeName=node-a"
    assert watch["allowWatchBookmarks"] == "true"
    assert 60 <= int(watch["timeoutSeconds"]) < 120  # jittered
    assert watch["resourceVersion"] == str(server.resource_version)
    stats = watcher.stats()
    assert stats["k8s_connected"] == 1
    assert stats["k8s_pods"] == NODE_A_PODS
    assert stats["k8s_namespaces"] == 6
    assert stats["k8s_relists"] == stats["k8s_errors"] == stats["k8s_events"] == 0
    assert all(key.startswith("k8s_") and isinstance(v, int) for key, v in stats.items())


def test_watch_events_apply(server: FakeApiServer, watcher: PodWatcher) -> None:
    index = watcher.index
    server.add("pods", event_object("ADDED"))
    wait_for(lambda: index.by_container(CACHE_REDIS), "ADDED cache-0")

    server.modify("pods", event_object("MODIFIED"))
    wait_for(lambda: index.by_container(WEB_RESTARTED), "MODIFIED web (restarted)")
    assert index.by_container(WEB) is None

    server.delete("pods", event_object("DELETED"))
    wait_for(lambda: index.by_uid(EXPORTER_UID) is None, "DELETED node-exporter")

    # A pod on another node never reaches us (the field selector holds for the watch).
    elsewhere = copy.deepcopy(event_object("ADDED"))
    elsewhere["metadata"]["uid"] = "00000000-0000-4000-8000-000000000001"
    elsewhere["spec"]["nodeName"] = "node-b"
    server.add("pods", elsewhere)
    server.add("namespaces", {"metadata": {"name": "fresh", "annotations": {"a": "b"}}})
    wait_for(lambda: index.namespace("fresh"), "ADDED namespace")
    assert index.by_uid("00000000-0000-4000-8000-000000000001") is None
    assert watcher.stats()["k8s_events"] == 4
    assert len(index) == NODE_A_PODS  # +cache-0, -node-exporter


def test_stream_closed_by_the_server_rewatches_from_the_last_version(
    server: FakeApiServer, watcher: PodWatcher
) -> None:
    rv = server.add("pods", event_object("ADDED"))
    wait_for(lambda: watcher.index.by_container(CACHE_REDIS), "ADDED cache-0")
    server.close_watches("pods")
    wait_for(lambda: len(server.requests_for("pods", watch=True)) == 2, "a second watch")
    assert last_watch_rv(server) == str(rv)
    # Nothing was listed again, and the new stream delivers.
    assert len(server.requests_for("pods", watch=False)) == 1
    server.modify("pods", event_object("MODIFIED"))
    wait_for(lambda: watcher.index.by_container(WEB_RESTARTED), "MODIFIED after re-watch")
    stats = watcher.stats()
    assert stats["k8s_rewatches"] == 1
    assert stats["k8s_relists"] == 0
    assert stats["k8s_errors"] == 0


def test_bookmark_moves_the_resource_version(server: FakeApiServer, watcher: PodWatcher) -> None:
    rv = server.send_bookmark("pods")
    wait_for(lambda: watcher.pods.resource_version == str(rv), "the bookmark")
    server.close_watches("pods")
    wait_for(lambda: len(server.requests_for("pods", watch=True)) == 2, "a second watch")
    assert last_watch_rv(server) == str(rv)
    assert watcher.stats()["k8s_bookmarks"] == 1
    assert watcher.stats()["k8s_events"] == 0


def test_error_410_event_relists(server: FakeApiServer, watcher: PodWatcher) -> None:
    # A pod the client never hears of (no event: history compacted), then "410 Gone"
    # in the stream: only a relist can find it.
    server.load("pods", [event_object("ADDED")])
    server.send_gone("pods")
    wait_for(lambda: watcher.index.by_container(CACHE_REDIS), "cache-0 from a relist")
    assert len(server.requests_for("pods", watch=False)) == 2
    wait_for(lambda: server.watchers("pods") == 1, "watching again")
    assert last_watch_rv(server) == str(server.resource_version)
    stats = watcher.stats()
    assert stats["k8s_relists"] == 1
    assert stats["k8s_errors"] == 0
    assert watcher.connected


def test_watch_from_a_compacted_version_gets_410_in_the_stream_and_relists(
    server: FakeApiServer, watcher: PodWatcher
) -> None:
    server.compact("pods")
    server.close_watches("pods")  # the re-watch from the old version gets ERROR 410
    wait_for(lambda: len(server.requests_for("pods", watch=False)) == 2, "a relist")
    assert watcher.stats()["k8s_relists"] == 1


def test_http_410_relists(server: FakeApiServer, watcher: PodWatcher) -> None:
    server.fail_next(410, resource="pods", watch=True)
    server.close_watches("pods")
    wait_for(lambda: len(server.requests_for("pods", watch=False)) == 2, "a relist")
    wait_for(lambda: server.watchers("pods") == 1, "watching again")
    stats = watcher.stats()
    assert stats["k8s_relists"] == 1
    assert stats["k8s_errors"] == 0
    assert len(watcher.index) == NODE_A_PODS


def test_a_server_that_always_says_gone_is_not_hammered(server: FakeApiServer) -> None:
    server.fail_next(410, count=10**6, resource="pods", watch=True)
    w = make_watcher(ApiConfig(server=server.url))
    with w:
        assert w.wait_synced(5)
        time.sleep(0.5)
    # Each relist pauses for the backoff (0.05 s here), instead of a tight loop.
    assert len(server.requests_for("pods", watch=False)) <= 15


def test_server_errors_back_off_and_recover(server: FakeApiServer, watcher: PodWatcher) -> None:
    server.fail_next(500, count=3, resource="pods", watch=True)
    server.close_watches("pods")
    wait_for(lambda: watcher.stats()["k8s_errors"] == 3, "three failed watches")
    wait_for(lambda: server.watchers("pods") == 1 and watcher.connected, "recovery")
    assert watcher.stats()["k8s_errors"] == 3
    # Errors re-watch from where we were; they do not relist.
    assert len(server.requests_for("pods", watch=False)) == 1


# ---------------------------------------------------------------------------------------
# Outages


def test_api_server_down_at_start_then_up(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    w = make_watcher(ApiConfig(server=f"http://127.0.0.1:{port}"))
    with caplog.at_level(logging.DEBUG, logger="agent.k8s.podwatch"):
        w.start()
        try:
            wait_for(lambda: w.stats()["k8s_errors"] >= 6, "several failed attempts")
            assert not w.connected
            assert len(w.index) == 0
            with populate(FakeApiServer(port=port)):
                wait_for(lambda: len(w.index) == NODE_A_PODS, "pods once the server is up")
                wait_for(lambda: w.connected, "connected")
                assert w.wait_synced(5)
                w.stop()  # before the server goes away again
        finally:
            w.stop()
    # One warning per resource when it broke, one line when it came back; not one a retry.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(r.getMessage().split(":")[0] for r in warnings) == [
        "k8s namespaces",
        "k8s pods",
    ]
    recovered = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(recovered) == 2


def test_server_goes_away_and_comes_back(server: FakeApiServer) -> None:
    port = server.port
    w = make_watcher(ApiConfig(server=server.url))
    w.start()
    try:
        assert w.wait_synced(5)
        wait_for(lambda: server.watchers("pods") == 1, "watching")
        server.stop()
        wait_for(lambda: not w.connected, "disconnected")
        with populate(FakeApiServer(port=port)) as again:
            # A new server, a new history: the old version is unknown there, so 410 and
            # a relist (or a clean re-watch when the versions happen to line up).
            again.add("pods", event_object("ADDED"))
            wait_for(lambda: w.index.by_container(CACHE_REDIS), "state from the new server")
            wait_for(lambda: w.connected, "connected again")
    finally:
        w.stop()


# ---------------------------------------------------------------------------------------
# Credentials


def _service_account(tmp_path: Path, server: FakeApiServer, token: str) -> tuple[Path, dict]:
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(token)
    (sa_dir / "ca.crt").write_bytes(server.ca_pem)
    (sa_dir / "namespace").write_text("tlscap")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)}
    return sa_dir, env


def test_in_cluster_over_tls_with_a_rotating_token(tmp_path: Path) -> None:
    with populate(FakeApiServer(tls=True, token="sa-token-1")) as server:
        sa_dir, env = _service_account(tmp_path, server, "sa-token-1\n")
        config = ApiConfig.discover(None, env=env, sa_dir=str(sa_dir))
        assert config is not None and config.server == f"https://127.0.0.1:{server.port}"
        w = make_watcher(config)
        w.start()
        try:
            assert w.wait_synced(5)
            assert len(w.index) == NODE_A_PODS
            wait_for(
                lambda: server.watchers("pods") == server.watchers("namespaces") == 1, "watching"
            )
            # The kubelet rotates the bound token; the server stops taking the old one.
            (sa_dir / "token").write_text("sa-token-2")
            server.token = "sa-token-2"
            server.close_watches("pods")
            wait_for(lambda: len(server.requests_for("pods", watch=True)) == 2, "re-watch")
            wait_for(lambda: server.watchers("pods") == 1, "watching again")
            last = server.requests_for("pods", watch=True)[-1]
            assert last.headers["authorization"] == "Bearer sa-token-2"
            assert w.stats()["k8s_errors"] == 0
        finally:
            w.stop()


def test_kubeconfig_with_inline_ca_and_token(tmp_path: Path) -> None:
    with populate(FakeApiServer(tls=True, token="kc-token")) as server:
        kubeconfig = tmp_path / "config"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "kind-lab",
                    "clusters": [
                        {
                            "name": "kind-lab",
                            "cluster": {
                                "server": server.url,
                                "certificate-authority-data": base64.b64encode(
                                    server.ca_pem
                                ).decode(),
                            },
                        }
                    ],
                    "users": [{"name": "kind-lab", "user": {"token": "kc-token"}}],
                    "contexts": [
                        {"name": "kind-lab", "context": {"cluster": "kind-lab", "user": "kind-lab"}}
                    ],
                }
            )
        )
        config = ApiConfig.discover(str(kubeconfig), env={})
        assert config is not None
        w = make_watcher(config)
        with w:
            assert w.wait_synced(5)
            assert len(w.index) == NODE_A_PODS
            assert w.connected


def test_kubeconfig_with_a_client_certificate(tmp_path: Path) -> None:
    with populate(FakeApiServer(tls=True, require_client_cert=True)) as server:
        assert server.ca is not None
        client = server.ca.issue("tlscap-agent", server=False, client=True)
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        kubeconfig = tmp_path / "config"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "current-context": "admin@lab",
                    "clusters": [
                        {
                            "name": "lab",
                            "cluster": {
                                "server": server.url,
                                "certificate-authority-data": b64(server.ca_pem),
                            },
                        }
                    ],
                    "users": [
                        {
                            "name": "admin",
                            "user": {
                                "client-certificate-data": b64(client.cert_pem),
                                "client-key-data": b64(client.key_pem),
                            },
                        }
                    ],
                    "contexts": [
                        {"name": "admin@lab", "context": {"cluster": "lab", "user": "admin"}}
                    ],
                }
            )
        )
        with make_watcher(ApiConfig.from_kubeconfig(kubeconfig)) as w:
            assert w.wait_synced(5)
            assert len(w.index) == NODE_A_PODS


def test_wrong_token_is_counted_not_raised() -> None:
    with populate(FakeApiServer(token="right")) as server:
        w = make_watcher(ApiConfig(server=server.url, token="wrong"))
        with w:
            wait_for(lambda: w.stats()["k8s_errors"] >= 2, "401s")
            assert not w.connected
            assert not w.wait_synced(0.05)


def test_untrusted_server_certificate_is_an_error(tmp_path: Path) -> None:
    with populate(FakeApiServer(tls=True)) as server:
        # Trust some other CA: verification must fail, not be skipped.
        with populate(FakeApiServer(tls=True)) as other:
            w = make_watcher(ApiConfig(server=server.url, ca_data=other.ca_pem))
            with w:
                wait_for(lambda: w.stats()["k8s_errors"] >= 2, "TLS failures")
                assert len(w.index) == 0
        # ... and insecure-skip-tls-verify is the explicit way around it.
        with make_watcher(ApiConfig(server=server.url, insecure_skip_verify=True)) as w:
            assert w.wait_synced(5)


# ---------------------------------------------------------------------------------------
# Stopping


def test_stop_returns_promptly_during_an_idle_watch(server: FakeApiServer) -> None:
    w = make_watcher(ApiConfig(server=server.url))
    w.start()
    assert w.wait_synced(5)
    wait_for(lambda: server.watchers("pods") == 1 and server.watchers("namespaces") == 1, "watch")
    started = time.monotonic()
    w.stop()
    assert time.monotonic() - started < 2.0
    assert not any(t.is_alive() for t in w._threads)
    assert w.stats()["k8s_errors"] == 0  # our own close is not an error


def test_stop_returns_promptly_while_backing_off() -> None:
    w = make_watcher(ApiConfig(server=f"http://127.0.0.1:{free_port()}"))
    w.pods.backoff = Backoff(initial=30, maximum=30, jitter=0)
    w.start()
    wait_for(lambda: w.stats()["k8s_errors"] >= 1, "a failure")
    started = time.monotonic()
    w.stop()
    assert time.monotonic() - started < 2.0
    assert not any(t.is_alive() for t in w._threads)


def test_node_name_is_required() -> None:
    with pytest.raises(ValueError):
        PodWatcher(KubeApi(ApiConfig(server="http://127.0.0.1:1")), "")
