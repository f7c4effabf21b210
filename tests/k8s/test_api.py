"""The small Kubernetes client: configuration discovery, kubeconfig parsing, the watch
stream decoder, errors and timeouts (against the fake API server on loopback)."""

from __future__ import annotations

import base64
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.k8s.api import (
    ApiConfig,
    ApiConnectionError,
    ApiError,
    ConfigError,
    KubeApi,
    WatchDecoder,
)
from tests.k8s.fake_apiserver import FakeApiServer, free_port, load_fixture

# ---------------------------------------------------------------------------------------
# WatchDecoder (pure)

EVENTS = load_fixture("watch_events.json")
STREAM = b"".join(json.dumps(e).encode() + b"\n" for e in EVENTS)


def test_decoder_whole_stream_in_one_chunk() -> None:
    decoder = WatchDecoder()
    assert decoder.feed(STREAM) == EVENTS
    assert decoder.finish() == []


@pytest.mark.parametrize("size", [1, 2, 7, 100, 4096])
def test_decoder_any_chunking(size: int) -> None:
    decoder = WatchDecoder()
    out: list[dict[str, Any]] = []
    for i in range(0, len(STREAM), size):
        out += decoder.feed(STREAM[i : i + size])
    assert out == EVENTS


def test_decoder_skips_blank_lines_and_takes_a_last_event_without_newline() -> None:
    decoder = WatchDecoder()
    last = json.dumps(EVENTS[0]).encode()
    assert decoder.feed(b"\n\r\n" + STREAM[:-1]) == EVENTS[:-1]
    assert decoder.feed(b"\n" + last) == [EVENTS[-1]]
    assert decoder.finish() == [EVENTS[0]]


def test_decoder_drops_an_event_cut_off_by_the_end_of_the_stream() -> None:
    decoder = WatchDecoder()
    assert decoder.feed(STREAM[:-40]) == EVENTS[:-1]
    assert decoder.finish() == []


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'{"object": {}}\n'])
def test_decoder_rejects_garbage(line: bytes) -> None:
    with pytest.raises(ApiConnectionError):
        WatchDecoder().feed(line)


def test_decoder_bounds_its_buffer() -> None:
    decoder = WatchDecoder(max_event_bytes=1000)
    with pytest.raises(ApiConnectionError):
        decoder.feed(b"{" + b" " * 2000)


# ---------------------------------------------------------------------------------------
# KubeApi against the fake server


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        srv.load("pods", load_fixture("pods.json")["items"])
        yield srv


def test_list(server: FakeApiServer) -> None:
    api = KubeApi(ApiConfig(server=server.url))
    result = api.list("/api/v1/pods", {"fieldSelector": "spec.nodeName=node-b"})
    assert result["kind"] == "PodList"
    assert [p["metadata"]["name"] for p in result["items"]] == ["payments-api-6b5c4d3e2f-k9j8h"]
    assert result["metadata"]["resourceVersion"] == str(server.resource_version)
    assert server.requests[-1].headers["user-agent"] == "tlscap-agent"
    assert "authorization" not in server.requests[-1].headers


def test_non_2xx_is_an_api_error_with_the_status_message(server: FakeApiServer) -> None:
    api = KubeApi(ApiConfig(server=server.url))
    with pytest.raises(ApiError) as err:
        api.list("/api/v1/services")
    assert err.value.status == 404
    assert err.value.reason == "Not Found"
    assert json.loads(err.value.body)["kind"] == "Status"
    assert "could not find /api/v1/services" in str(err.value)


def test_bearer_token_and_401(server: FakeApiServer) -> None:
    server.token = "s3cret"
    assert KubeApi(ApiConfig(server=server.url, token="s3cret")).list("/api/v1/pods")["items"]
    assert server.requests[-1].headers["authorization"] == "Bearer s3cret"
    with pytest.raises(ApiError) as err:
        KubeApi(ApiConfig(server=server.url, token="nope")).list("/api/v1/pods")
    assert err.value.status == 401


def test_watch_streams_events_split_across_chunks_until_the_server_ends_it(
    server: FakeApiServer,
) -> None:
    api = KubeApi(ApiConfig(server=server.url))
    rv = str(server.resource_version)
    added = load_fixture("watch_events.json")[0]["object"]
    with api.watch("/api/v1/pods", {"resourceVersion": rv}, timeout_s=30) as stream:
        events = iter(stream)
        server.add("pods", added)
        server.send_bookmark("pods")
        first = next(events)
        assert first["type"] == "ADDED"
        assert first["object"]["metadata"]["name"] == "cache-0"
        assert next(events)["type"] == "BOOKMARK"
        server.close_watches("pods")
        assert list(events) == []
    params = server.requests[-1].params
    assert params["watch"] == "true" and params["timeoutSeconds"] == "30"


def test_watch_refused_raises_at_once(server: FakeApiServer) -> None:
    server.fail_next(410, watch=True)
    with pytest.raises(ApiError) as err:
        KubeApi(ApiConfig(server=server.url)).watch("/api/v1/pods", {"resourceVersion": "1"})
    assert err.value.status == 410


def test_server_path_prefix(server: FakeApiServer) -> None:
    api = KubeApi(ApiConfig(server=server.url + "/k8s/clusters/c-1/"))
    with pytest.raises(ApiError):
        api.list("/api/v1/pods")
    assert server.requests[-1].path == "/k8s/clusters/c-1/api/v1/pods"


def test_connection_refused() -> None:
    api = KubeApi(ApiConfig(server=f"http://127.0.0.1:{free_port()}"), connect_timeout=1)
    with pytest.raises(ApiConnectionError):
        api.list("/api/v1/pods")


def test_read_timeout_on_a_server_that_never_answers() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # the kernel completes the handshake; nobody ever reads
        port = listener.getsockname()[1]
        api = KubeApi(ApiConfig(server=f"http://127.0.0.1:{port}"), read_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(ApiConnectionError):
            api.list("/api/v1/pods")
        assert time.monotonic() - started < 2


def test_close_aborts_a_blocked_watch_and_refuses_new_requests(server: FakeApiServer) -> None:
    api = KubeApi(ApiConfig(server=server.url))
    stream = api.watch("/api/v1/pods", {"resourceVersion": str(server.resource_version)})
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(list(stream))
        except ApiConnectionError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.1)
    api.close()
    reader.join(2)
    assert not reader.is_alive() and len(outcome) == 1
    with pytest.raises(ApiConnectionError):
        api.list("/api/v1/pods")


def test_tls_server_name_overrides_the_name_checked() -> None:
    with FakeApiServer(tls=True) as server:
        ok = ApiConfig(server=server.url, ca_data=server.ca_pem, tls_server_name="localhost")
        assert KubeApi(ok).list("/api/v1/pods")["kind"] == "PodList"
        bad = ApiConfig(server=server.url, ca_data=server.ca_pem, tls_server_name="other.test")
        with pytest.raises(ApiConnectionError):
            KubeApi(bad).list("/api/v1/pods")


def test_unsupported_server_url() -> None:
    with pytest.raises(ConfigError):
        KubeApi(ApiConfig(server="unix:///var/run/k8s.sock"))


# ---------------------------------------------------------------------------------------
# In-cluster configuration


def _sa_dir(tmp_path: Path, token: str = "tok-1") -> Path:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(token)
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    return sa


def test_in_cluster(tmp_path: Path) -> None:
    sa = _sa_dir(tmp_path)
    env = {"KUBERNETES_SERVICE_HOST": "198.18.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    config = ApiConfig.in_cluster(env, str(sa))
    assert config.server == "https://198.18.0.1:443"
    assert config.ca_file == str(sa / "ca.crt")
    assert config.current_token() == "tok-1"
    (sa / "token").write_text("tok-2\n")  # rotated by the kubelet
    assert config.current_token() == "tok-2"
    (sa / "token").unlink()  # mid-rotation: keep the last one
    assert config.current_token() == "tok-2"
    assert "tok-2" not in repr(config)


def test_in_cluster_ipv6_service_address(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "443"}
    config = ApiConfig.in_cluster(env, str(_sa_dir(tmp_path)))
    assert config.server == "https://[fd00:10:96::1]:443"


def test_in_cluster_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        ApiConfig.in_cluster({}, str(tmp_path))
    env = {"KUBERNETES_SERVICE_HOST": "198.18.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(ConfigError, match="token"):
        ApiConfig.in_cluster(env, str(tmp_path))


# ---------------------------------------------------------------------------------------
# kubeconfig


def _kubeconfig(path: Path, **overrides: Any) -> Path:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "dev",
        "clusters": [
            {"name": "dev", "cluster": {"server": "https://198.18.0.1:6443"}},
            {"name": "prod", "cluster": {"server": "https://198.18.0.2:6443"}},
        ],
        "users": [{"name": "dev-user", "user": {"token": "dev-token"}}],
        "contexts": [
            {"name": "dev", "context": {"cluster": "dev", "user": "dev-user"}},
            {"name": "prod", "context": {"cluster": "prod", "user": "dev-user"}},
        ],
    }
    doc.update(overrides)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_kubeconfig_current_and_named_context(tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path / "config")
    config = ApiConfig.from_kubeconfig(path)
    assert (config.server, config.token) == ("https://198.18.0.1:6443", "dev-token")
    assert ApiConfig.from_kubeconfig(path, context="prod").server == "https://198.18.0.2:6443"
    with pytest.raises(ConfigError, match="no context named 'staging'"):
        ApiConfig.from_kubeconfig(path, context="staging")


def test_kubeconfig_files_are_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    path = _kubeconfig(
        tmp_path / "config",
        clusters=[
            {
                "name": "dev",
                "cluster": {
                    "server": "https://198.18.0.1:6443",
                    "certificate-authority": "pki/ca.crt",
                    "insecure-skip-tls-verify": True,
                    "tls-server-name": "kubernetes.default",
                },
            }
        ],
        users=[
            {
                "name": "dev-user",
                "user": {"client-certificate": "pki/me.crt", "client-key": "/abs/me.key"},
            }
        ],
    )
    config = ApiConfig.from_kubeconfig(path)
    assert config.ca_file == str(tmp_path / "pki" / "ca.crt")
    assert config.client_cert_file == str(tmp_path / "pki" / "me.crt")
    assert config.client_key_file == "/abs/me.key"
    assert config.insecure_skip_verify is True
    assert config.tls_server_name == "kubernetes.default"
    assert config.token is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"current-context": None}, "no current-context"),
        ({"users": [{"name": "dev-user", "user": {"exec": {"command": "aws"}}}]}, "exec"),
        (
            {"users": [{"name": "dev-user", "user": {"client-certificate-data": "AAAA"}}]},
            "not both",
        ),
        (
            {"users": [{"name": "dev-user", "user": {"client-key-data": "!!not base64!!"}}]},
            "not valid base64",
        ),
        ({"clusters": [{"name": "dev", "cluster": {}}]}, "has no server"),
        ({"clusters": []}, "no cluster named 'dev'"),
    ],
)
def test_kubeconfig_errors(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ApiConfig.from_kubeconfig(_kubeconfig(tmp_path / "config", **overrides))


def test_kubeconfig_unreadable_or_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        ApiConfig.from_kubeconfig(tmp_path / "missing")
    (tmp_path / "bad").write_text("clusters: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ApiConfig.from_kubeconfig(tmp_path / "bad")
    (tmp_path / "list").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="not a kubeconfig"):
        ApiConfig.from_kubeconfig(tmp_path / "list")


def test_inline_client_key_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeApiServer(tls=True, require_client_cert=True) as server:
        assert server.ca is not None
        client = server.ca.issue("agent", server=False, client=True)
        config = ApiConfig(
            server=server.url,
            ca_data=server.ca_pem,
            client_cert_data=client.cert_pem,
            client_key_data=client.key_pem,
        )
        scratch = tmp_path / "tmp"
        scratch.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        assert KubeApi(config).list("/api/v1/pods")["kind"] == "PodList"
        assert list(scratch.iterdir()) == []
        # Without the client certificate the server refuses the handshake.
        with pytest.raises(ApiConnectionError):
            KubeApi(ApiConfig(server=server.url, ca_data=server.ca_pem)).list("/api/v1/pods")


# ---------------------------------------------------------------------------------------
# discover


def test_discover_order(tmp_path: Path) -> None:
    explicit = _kubeconfig(tmp_path / "explicit")
    from_env = _kubeconfig(tmp_path / "from-env", **{"current-context": "prod"})
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    _kubeconfig(home / ".kube" / "config", users=[{"name": "dev-user", "user": {"token": "h"}}])
    sa = _sa_dir(tmp_path)
    cluster_env = {"KUBERNETES_SERVICE_HOST": "198.18.0.9", "KUBERNETES_SERVICE_PORT": "443"}
    kubeconfig_env = {"KUBECONFIG": f"{tmp_path / 'nope'}{os.pathsep}{from_env}"}

    # 1. an explicit kubeconfig beats being in a cluster
    got = ApiConfig.discover(str(explicit), env=cluster_env, sa_dir=str(sa))
    assert got is not None and got.server == "https://198.18.0.1:6443"
    # 2. in-cluster beats $KUBECONFIG
    got = ApiConfig.discover(None, env={**cluster_env, **kubeconfig_env}, sa_dir=str(sa))
    assert got is not None and got.server == "https://198.18.0.9:443"
    # 3. the first existing $KUBECONFIG file
    got = ApiConfig.discover(None, env={**kubeconfig_env, "HOME": str(home)})
    assert got is not None and got.server == "https://198.18.0.2:6443"
    # 4. ~/.kube/config
    got = ApiConfig.discover(None, env={"HOME": str(home)})
    assert got is not None and got.token == "h"
    # 5. nothing at all
    assert ApiConfig.discover(None, env={"HOME": str(tmp_path / "empty")}) is None


def test_discover_inline_ca_data_is_used(tmp_path: Path) -> None:
    with FakeApiServer(tls=True) as server:
        path = _kubeconfig(
            tmp_path / "config",
            clusters=[
                {
                    "name": "dev",
                    "cluster": {
                        "server": server.url,
                        "certificate-authority-data": base64.b64encode(server.ca_pem).decode(),
                    },
                }
            ],
        )
        config = ApiConfig.discover(str(path))
        assert config is not None and config.ca_data == server.ca_pem
        assert KubeApi(config).list("/api/v1/namespaces")["kind"] == "NamespaceList"
