"""deploy/kubernetes: schema-valid, complete, and as locked down as the docs promise."""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from agent import __version__
from tests.deploy.manifests import (
    CAPABILITIES_OVERLAY,
    DEPLOY,
    KUBERNETES,
    KUSTOMIZATION,
    REPO,
    config_file,
    containers,
    find,
    kustomization,
    load_documents,
    long_options,
    manifest_files,
    parse_config,
    render,
)

# The oldest and the newest Kubernetes minor in upstream support when these manifests
# were written (2026-11); kubernetes-validate ships both schemas. Strict mode: an
# unknown or misspelt field fails instead of being silently dropped by the API server.
KUBERNETES_VERSIONS = ("1.35", "1.37")

IMAGE = f"ghcr.io/tlscap/tlscap:{__version__}"
HEALTH_PORT = 9090
COLLECTOR_PORT = 7300

# What overlays/capabilities grants instead of privileged (docs/kubernetes.md explains
# each): nothing more, nothing less.
OVERLAY_CAPABILITIES = {
    "BPF",
    "PERFMON",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "SYS_RESOURCE",
    "NET_ADMIN",
}

# TLSCAP_* environment variables the agent reads that are not `tlscap run` options.
NON_OPTION_ENV = {"TLSCAP_HOST_PROC", "TLSCAP_CACHE_DIR", "TLSCAP_BPF_DIR"}

# `tlscap run` options the deployment uses that were still being added to the CLI
# when these tests were written (see test_agent_config_keys_are_run_options).


def base_docs() -> list[dict]:
    return render(KUBERNETES)


def overlay_docs() -> list[dict]:
    return render(CAPABILITIES_OVERLAY)


def agent_daemonset(docs: list[dict]) -> dict:
    return find(docs, "DaemonSet", "tlscap-agent")


def agent_container(docs: list[dict]) -> dict:
    (container,) = agent_daemonset(docs)["spec"]["template"]["spec"]["containers"]
    return container


def collector_deployment(docs: list[dict]) -> dict:
    return find(docs, "Deployment", "tlscap-collector")


def volume_mounts(docs: list[dict], workload: dict, container: dict) -> dict[str, tuple]:
    """mountPath -> (volume source kind, volume source, mount)."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    mounts = {}
    for mount in container["volumeMounts"]:
        volume = dict(volumes[mount["name"]])
        volume.pop("name")
        ((kind, source),) = volume.items()
        mounts[mount["mountPath"]] = (kind, source, mount)
    return mounts


def named_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = (p["containerPort"] for p in container["ports"] if p.get("name") == port)
    return number


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (cores or bytes), for the suffixes used here."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# -- schema -------------------------------------------------------------------------


def _documents() -> list[tuple[str, int, dict]]:
    return [
        (str(path.relative_to(REPO)), i, doc)
        for path in manifest_files(KUBERNETES)
        for i, doc in enumerate(load_documents(path))
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("path", "index", "doc"), _documents(), ids=[f"{p}#{i}" for p, i, _ in _documents()]
)
def test_manifest_documents_are_valid_kubernetes_objects(path, index, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_capabilities_overlay_renders_to_valid_objects(version):
    docs = overlay_docs()
    assert len(docs) == len(base_docs())
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_an_unknown_field():
    # The validation above must not be vacuous: a misspelt field has to fail.
    doc = agent_daemonset(base_docs())
    doc["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_kubernetes_versions_are_shipped_by_kubernetes_validate():
    latest = kubernetes_validate.latest_version()
    for version in KUBERNETES_VERSIONS:
        assert tuple(map(int, version.split("."))) <= tuple(map(int, latest.split("."))), (
            f"kubernetes-validate {latest} has no schema for {version}: upgrade it (make setup)"
        )


# -- kustomization -------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_nothing_else():
    listed = kustomization(KUBERNETES)["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    present = {p.name for p in manifest_files(KUBERNETES)}
    assert set(listed) == present


def test_overlay_uses_every_file_in_it():
    spec = kustomization(CAPABILITIES_OVERLAY)
    assert spec["resources"] == ["../.."]
    patches = {p["path"] for p in spec["patches"]}
    assert patches == {p.name for p in manifest_files(CAPABILITIES_OVERLAY)}


def test_every_workload_uses_the_release_image():
    spec = kustomization(KUBERNETES)
    (rule,) = spec["images"]
    assert f"{rule['newName']}:{rule['newTag']}" == IMAGE
    images = {c["image"] for d in base_docs() for c in containers(d)}
    assert images == {IMAGE}


def test_every_object_lives_in_the_tlscap_namespace():
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for doc in base_docs():
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in cluster_scoped:
            assert namespace is None, doc["metadata"]["name"]
        else:
            assert namespace == "tlscap", f"{doc['kind']} {doc['metadata']['name']}"
    labels = find(base_docs(), "Namespace", "tlscap")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_selectors_match_their_pods():
    docs = base_docs()
    for workload in (agent_daemonset(docs), collector_deployment(docs)):
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    service = find(docs, "Service", "tlscap-collector")
    pod_labels = collector_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# -- the agent DaemonSet -------------------------------------------------------------


def test_agent_sees_the_host():
    pod = agent_daemonset(base_docs())["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["serviceAccountName"] == "tlscap-agent"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["terminationGracePeriodSeconds"] == 30


def test_agent_is_privileged_in_the_base():
    assert agent_container(base_docs())["securityContext"] == {"privileged": True}


def test_capabilities_overlay_grants_exactly_the_documented_capabilities():
    security = agent_container(overlay_docs())["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    added = security["capabilities"]["add"]
    assert len(added) == len(set(added))
    assert set(added) == OVERLAY_CAPABILITIES
    assert "SYS_ADMIN" not in added
    assert security["seccompProfile"] == {"type": "Unconfined"}
    assert security["appArmorProfile"] == {"type": "Unconfined"}
    # The overlay changes the security context and nothing else.
    base, overlay = agent_container(base_docs()), agent_container(overlay_docs())
    assert {k: v for k, v in base.items() if k != "securityContext"} == {
        k: v for k, v in overlay.items() if k != "securityContext"
    }


def test_capabilities_are_documented():
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    patch = (CAPABILITIES_OVERLAY / "agent-capabilities.yaml").read_text()
    for capability in OVERLAY_CAPABILITIES | {"SYS_ADMIN"}:
        assert f"`{capability}`" in docs, f"docs/kubernetes.md does not explain {capability}"
    for capability in OVERLAY_CAPABILITIES:
        assert re.search(rf"^#\s+{capability}\s", patch, re.M), f"patch: {capability}?"


def test_no_mount_propagates_back_to_the_host():
    # Bidirectional would leak the agent's mounts to the node, and is refused for the
    # overlay's non-privileged container.
    for docs in (base_docs(), overlay_docs()):
        for mount in agent_container(docs)["volumeMounts"]:
            assert mount.get("mountPropagation", "None") in ("None", "HostToContainer")


@pytest.mark.parametrize(
    ("mount_path", "kind", "source", "read_only"),
    [
        ("/sys/kernel/tracing", "hostPath", "/sys/kernel/tracing", False),
        ("/sys/kernel/debug", "hostPath", "/sys/kernel/debug", False),
        ("/sys/fs/bpf", "hostPath", "/sys/fs/bpf", False),
        ("/lib/modules", "hostPath", "/lib/modules", True),
        ("/usr/src", "hostPath", "/usr/src", True),
        ("/host/proc", "hostPath", "/proc", True),
        ("/var/cache/tlscap", "hostPath", "/var/cache/tlscap", False),
        ("/var/lib/tlscap", "hostPath", "/var/lib/tlscap", False),
        ("/etc/tlscap", "configMap", "tlscap-agent-config", True),
        ("/etc/tlscap/tls", "secret", "tlscap-agent-tls", True),
    ],
)
def test_agent_mounts(mount_path, kind, source, read_only):
    docs = base_docs()
    mounts = volume_mounts(docs, agent_daemonset(docs), agent_container(docs))
    assert mount_path in mounts, f"{mount_path} is not mounted"
    actual_kind, volume, mount = mounts[mount_path]
    assert actual_kind == kind
    assert volume.get("path", volume.get("name", volume.get("secretName"))) == source
    assert mount.get("readOnly", False) is read_only


def test_bpffs_sees_later_host_mounts():
    docs = base_docs()
    mounts = volume_mounts(docs, agent_daemonset(docs), agent_container(docs))
    assert mounts["/sys/fs/bpf"][2]["mountPropagation"] == "HostToContainer"


def test_agent_secret_key_is_private():
    docs = base_docs()
    mounts = volume_mounts(docs, agent_daemonset(docs), agent_container(docs))
    assert mounts["/etc/tlscap/tls"][1]["defaultMode"] == 0o400


def test_agent_environment():
    env = {e["name"]: e for e in agent_container(base_docs())["env"]}
    assert env["TLSCAP_NODE"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["TLSCAP_HOST_PROC"]["value"] == "/host/proc"
    assert env["TLSCAP_CACHE_DIR"]["value"] == "/var/cache/tlscap"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_agent_environment_options_exist():
    # TLSCAP_<OPTION> sets a `tlscap run` option: every such name must be a real option
    # (or one of the few non-option variables), or it would be silently ignored.
    options = long_options("run")
    for name in (e["name"] for e in agent_container(base_docs())["env"]):
        if name.startswith("TLSCAP_") and name not in NON_OPTION_ENV:
            assert name.removeprefix("TLSCAP_").lower().replace("_", "-") in options, name


def test_agent_probes_use_the_health_port():
    container = agent_container(base_docs())
    (port,) = container["ports"]
    assert port == {"name": "http-health", "containerPort": HEALTH_PORT, "protocol": "TCP"}
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe_name, path in expected.items():
        probe = container[probe_name]["httpGet"]
        assert probe["path"] == path
        assert named_port(container, probe["port"]) == HEALTH_PORT
    startup = container["startupProbe"]
    # bcc compiles the probes at start-up: give it minutes, not seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    config = config_file(base_docs(), "tlscap-agent-config", "agent.toml")
    host, _, port_text = config["health-listen"].rpartition(":")
    assert int(port_text) == HEALTH_PORT
    assert ipaddress.ip_address(host) == ipaddress.ip_address("0.0.0.0")


def test_agent_tolerates_every_taint():
    tolerations = agent_daemonset(base_docs())["spec"]["template"]["spec"]["tolerations"]
    assert {"operator": "Exists"} in tolerations


def test_agent_rolls_out_gradually():
    strategy = agent_daemonset(base_docs())["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}


@pytest.mark.parametrize("workload", ["agent", "collector"])
def test_resources_requested_and_limited(workload):
    docs = base_docs()
    container = (
        agent_container(docs)
        if workload == "agent"
        else collector_deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    )
    resources = container["resources"]
    for resource in ("cpu", "memory"):
        request = quantity(resources["requests"][resource])
        limit = quantity(resources["limits"][resource])
        assert 0 < request <= limit, resource
    if workload == "agent":
        # bcc's in-process clang needs room to compile the probes.
        assert quantity(resources["limits"]["memory"]) >= 2**30


def test_agent_command_matches_the_image_default():
    assert agent_container(base_docs())["args"] == ["run", "--config", "/etc/tlscap/agent.toml"]


# -- RBAC ------------------------------------------------------------------------------


def test_rbac_is_read_only_on_pods_and_namespaces():
    docs = base_docs()
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    assert {r["metadata"]["name"] for r in roles} == {
        "tlscap-agent",
        "tlscap-collector-tokenreview",
    }
    for role in roles:
        if role["metadata"]["name"] == "tlscap-collector-tokenreview":
            continue  # test_collector_may_only_review_tokens
        for rule in role["rules"]:
            assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule
            for field in rule.values():
                assert "*" not in field and not any("*" in item for item in field), rule
            assert rule["apiGroups"] == [""]
            assert set(rule["verbs"]) <= {"get", "list", "watch"}
            assert set(rule["resources"]) <= {"pods", "namespaces"}
    binding = find(docs, "ClusterRoleBinding", "tlscap-agent")
    assert binding["roleRef"]["name"] == "tlscap-agent"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tlscap-agent", "namespace": "tlscap"}
    ]
    assert not [d for d in docs if d["kind"] in ("RoleBinding", "Role")]


def test_collector_may_only_review_tokens():
    # TokenReview for the agents' tokens, and nothing else: not even the
    # SubjectAccessReview half of system:auth-delegator, and no object of the cluster.
    docs = base_docs()
    role = find(docs, "ClusterRole", "tlscap-collector-tokenreview")
    assert role["rules"] == [
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        }
    ]
    binding = find(docs, "ClusterRoleBinding", "tlscap-collector-tokenreview")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "tlscap-collector-tokenreview",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tlscap-collector", "namespace": "tlscap"}
    ]
    bound = {
        (s["name"], b["roleRef"]["name"])
        for b in docs
        if b["kind"] == "ClusterRoleBinding"
        for s in b["subjects"]
    }
    assert bound == {
        ("tlscap-agent", "tlscap-agent"),
        ("tlscap-collector", "tlscap-collector-tokenreview"),
    }
    # The collector needs its own token for those calls.
    account = find(docs, "ServiceAccount", "tlscap-collector")
    assert account["automountServiceAccountToken"] is True
    pod = collector_deployment(docs)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tlscap-collector"
    assert pod["automountServiceAccountToken"] is True


# -- per-node agent identity: projected ServiceAccount tokens ---------------------------


def test_agent_gets_a_projected_token_for_the_collector():
    docs = base_docs()
    mounts = volume_mounts(docs, agent_daemonset(docs), agent_container(docs))
    kind, volume, mount = mounts["/var/run/secrets/tlscap"]
    assert kind == "projected" and mount["readOnly"] is True
    (source,) = volume["sources"]
    assert source == {
        "serviceAccountToken": {
            "path": "collector-token",
            "audience": "tlscap-collector",
            "expirationSeconds": 3600,
        }
    }
    assert volume["defaultMode"] == 0o400
    # The agent sends that file; the collector reviews it for the same audience and
    # the agent's ServiceAccount, and tokens travel over TLS only.
    agent = config_file(docs, "tlscap-agent-config", "agent.toml")
    assert agent["collector-token-file"] == "/var/run/secrets/tlscap/collector-token"
    assert "insecure" not in agent
    collector = config_file(docs, "tlscap-collector-config", "collector.toml")
    assert collector["token-review"] is True
    assert collector["token-audience"] == source["serviceAccountToken"]["audience"]
    pod = agent_daemonset(docs)["spec"]["template"]["spec"]
    assert collector["agent-service-account"] == f"tlscap:{pod['serviceAccountName']}"
    assert "insecure" not in collector and collector["tls-ca"]


def test_token_settings_parse_as_the_cli_reads_them(tmp_path):
    docs = base_docs()
    run = parse_config(
        "run", find(docs, "ConfigMap", "tlscap-agent-config")["data"]["agent.toml"], tmp_path
    )
    assert str(run.collector_token_file) == "/var/run/secrets/tlscap/collector-token"
    text = find(docs, "ConfigMap", "tlscap-collector-config")["data"]["collector.toml"]
    collector = parse_config("collector", text, tmp_path)
    assert collector.token_review is True
    assert (collector.token_audience, collector.agent_service_account) == (
        "tlscap-collector",
        "tlscap:tlscap-agent",
    )


# -- configuration files -----------------------------------------------------------------


def test_agent_config_keys_are_run_options():
    config = config_file(base_docs(), "tlscap-agent-config", "agent.toml")
    assert set(config) <= long_options("run")


def test_agent_config_values_parse(tmp_path):
    text = find(base_docs(), "ConfigMap", "tlscap-agent-config")["data"]["agent.toml"]
    args = parse_config("run", text, tmp_path)
    assert args.collector == ["tlscap-collector.tlscap.svc:7300"]
    assert args.mode == "ebpf"
    assert args.max_capture == 1 << 20
    assert args.health_listen == f"0.0.0.0:{HEALTH_PORT}"
    assert (args.k8s_metadata, args.capture_scope) == ("on", "node")


def test_collector_config_keys_are_collector_options(tmp_path):
    config = config_file(base_docs(), "tlscap-collector-config", "collector.toml")
    assert set(config) <= long_options("collector")
    text = find(base_docs(), "ConfigMap", "tlscap-collector-config")["data"]["collector.toml"]
    args = parse_config("collector", text, tmp_path)
    assert args.listen == f"0.0.0.0:{COLLECTOR_PORT}"


@pytest.mark.parametrize(
    ("configmap", "key", "workload", "secret"),
    [
        ("tlscap-agent-config", "agent.toml", "agent", "tlscap-agent-tls"),
        ("tlscap-collector-config", "collector.toml", "collector", "tlscap-collector-tls"),
    ],
)
def test_config_paths_point_into_the_mounts(configmap, key, workload, secret):
    docs = base_docs()
    config = config_file(docs, configmap, key)
    if workload == "agent":
        owner, container = agent_daemonset(docs), agent_container(docs)
    else:
        owner = collector_deployment(docs)
        container = owner["spec"]["template"]["spec"]["containers"][0]
    mounts = volume_mounts(docs, owner, container)
    assert mounts["/etc/tlscap"][1]["name"] == configmap
    assert container["args"][-2:] == ["--config", f"/etc/tlscap/{key}"]
    assert mounts["/etc/tlscap/tls"][1]["secretName"] == secret
    # make-secrets.sh puts exactly these keys in both Secrets.
    assert {config["tls-cert"], config["tls-key"], config["tls-ca"]} == {
        "/etc/tlscap/tls/tls.crt",
        "/etc/tlscap/tls/tls.key",
        "/etc/tlscap/tls/ca.crt",
    }
    data_path = config.get("spool-dir", config.get("store"))
    writable = [p for p, (_, _, m) in mounts.items() if not m.get("readOnly")]
    assert any(Path(data_path).is_relative_to(p) for p in writable), data_path


def test_agent_reaches_the_collector_service():
    docs = base_docs()
    config = config_file(docs, "tlscap-agent-config", "agent.toml")
    service = find(docs, "Service", "tlscap-collector")
    (port,) = service["spec"]["ports"]
    assert config["collector"] == f"tlscap-collector.tlscap.svc:{port['port']}"
    assert port["name"] == "grpc" and port["port"] == COLLECTOR_PORT
    assert service["spec"]["type"] == "ClusterIP"


# -- the collector ---------------------------------------------------------------------


def test_collector_runs_unprivileged():
    deployment = collector_deployment(base_docs())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert not pod.get("hostPID") and not pod.get("hostNetwork")
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert not security.get("privileged")
    for volume in pod["volumes"]:
        assert "hostPath" not in volume


def test_collector_is_a_single_sqlite_writer():
    docs = base_docs()
    spec = collector_deployment(docs)["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pvc = find(docs, "PersistentVolumeClaim", "tlscap-collector-data")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "tlscap-collector-data"


def test_collector_probes_the_grpc_port():
    (container,) = collector_deployment(base_docs())["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        # tcpSocket, not grpc: the kubelet's gRPC probe cannot do the mutual TLS the
        # port demands (see the comment in collector-deployment.yaml).
        assert named_port(container, container[probe]["tcpSocket"]["port"]) == COLLECTOR_PORT


# -- secrets ----------------------------------------------------------------------------


def test_no_key_material_is_committed():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text), path
            assert not re.search(r"^kind:\s*Secret\s*$", text, re.M), path


FAKE_KUBECTL = textwrap.dedent(
    """\
    #!{python}
    # Stands in for `kubectl create secret generic NAME --namespace NS
    # --from-file=KEY=PATH... --dry-run=client -o yaml`, the only call make-secrets.sh makes.
    import base64, sys, yaml
    args = sys.argv[1:]
    assert args[:3] == ["create", "secret", "generic"], args
    assert "--dry-run=client" in args and args[args.index("-o") + 1] == "yaml", args
    data = {{}}
    for arg in args:
        if arg.startswith("--from-file="):
            key, path = arg.removeprefix("--from-file=").split("=", 1)
            data[key] = base64.b64encode(open(path, "rb").read()).decode()
    secret = {{
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {{"name": args[3], "namespace": args[args.index("--namespace") + 1]}},
        "data": data,
    }}
    sys.stdout.write(yaml.safe_dump(secret))
    """
)


def test_make_secrets_produces_the_secrets_the_manifests_mount(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    tlscap = bin_dir / "tlscap"
    tlscap.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m agent "$@"\n')
    for tool in (kubectl, tlscap):
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    pki = tmp_path / "pki"
    env = {**os.environ, "KUBECTL": str(kubectl), "TLSCAP": str(tlscap)}
    result = subprocess.run(
        [str(KUBERNETES / "make-secrets.sh"), str(pki)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout) if d}
    assert set(secrets) == {"tlscap-agent-tls", "tlscap-collector-tls"}
    mounted = {
        v["secret"]["secretName"]
        for d in base_docs()
        for pod in [d.get("spec", {}).get("template", {}).get("spec", {})]
        for v in pod.get("volumes", ())
        if "secret" in v
    }
    assert mounted == set(secrets)
    for secret in secrets.values():
        kubernetes_validate.validate(secret, KUBERNETES_VERSIONS[-1], strict=True)
        assert secret["metadata"]["namespace"] == "tlscap"
        assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    pem = base64.b64decode(secrets["tlscap-collector-tls"]["data"]["tls.crt"])
    names = (
        x509.load_pem_x509_certificate(pem)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.DNSName)
    )
    assert "tlscap-collector.tlscap.svc" in names
    assert "tlscap-collector.tlscap.svc.cluster.local" in names
    # The CA key stays in the PKI directory, never in a Secret.
    ca_key = (pki / "ca.key").read_bytes()
    assert all(
        base64.b64decode(value) != ca_key
        for secret in secrets.values()
        for value in secret["data"].values()
    )
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600


def test_kustomization_names_no_missing_file():
    # Every file a kustomization refers to exists (kubectl apply -k fails otherwise).
    for directory in (KUBERNETES, CAPABILITIES_OVERLAY):
        spec = kustomization(directory)
        for ref in spec.get("resources", []) + [p["path"] for p in spec.get("patches", [])]:
            assert (directory / ref).exists(), f"{directory / KUSTOMIZATION}: {ref}"


# -- the NATS JetStream overlay (docs/nats.md) -------------------------------------------

NATS_OVERLAY = KUBERNETES / "overlays" / "nats"


def nats_docs() -> list[dict]:
    return render(NATS_OVERLAY)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_nats_overlay_renders_to_valid_objects(version):
    docs = nats_docs()
    assert len(docs) == len(base_docs()) + 3
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"].get("namespace") in ("tlscap", None)


def test_nats_overlay_uses_every_file_in_it():
    spec = kustomization(NATS_OVERLAY)
    files = {p.name for p in manifest_files(NATS_OVERLAY)}
    patches = {p["path"] for p in spec["patches"]}
    assert spec["resources"][0] == "../.."
    assert set(spec["resources"][1:]) | patches == files
    for ref in spec["resources"][1:] + sorted(patches):
        assert (NATS_OVERLAY / ref).exists()


def test_nats_overlay_runs_stateless_collector_replicas(tmp_path):
    docs = nats_docs()
    deployment = collector_deployment(docs)
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" not in volumes["data"]
    assert volumes["nats-tls"]["secret"]["secretName"] == "tlscap-nats-tls"
    text = find(docs, "ConfigMap", "tlscap-collector-config")["data"]["collector.toml"]
    config = config_file(docs, "tlscap-collector-config", "collector.toml")
    assert set(config) <= long_options("collector")
    args = parse_config("collector", text, tmp_path)
    assert args.store is None and args.replicas == 3
    # Never plaintext NATS in the manifests.
    assert not args.nats_insecure and "nats-insecure" not in config
    assert args.backend.startswith("tls://")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    mounts = volume_mounts(docs, deployment, container)
    assert mounts["/etc/tlscap/nats"][1]["secretName"] == "tlscap-nats-tls"
    for key in ("nats-tls-ca", "nats-tls-cert", "nats-tls-key"):
        assert Path(config[key]).parent == Path("/etc/tlscap/nats")
    from agent.cli.collector import nats_config_from_args
    from agent.collector.jetstream.config import NatsConfigError

    # Everything but the files (mounted in the pod) checks out as the CLI sees it.
    with pytest.raises(NatsConfigError, match="no such file"):
        nats_config_from_args(args)
    service = find(docs, "Service", "tlscap-nats")
    hosts = [s.split("://")[-1] for s in args.backend.split(",")]
    assert hosts == [
        f"tlscap-nats-{i}.{service['metadata']['name']}.tlscap.svc:4222" for i in range(3)
    ]


def test_nats_cluster_is_three_jetstream_servers_with_tls():
    docs = nats_docs()
    statefulset = find(docs, "StatefulSet", "tlscap-nats")
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["serviceName"] == "tlscap-nats"
    service = find(docs, "Service", "tlscap-nats")
    assert service["spec"]["clusterIP"] == "None"
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    conf = find(docs, "ConfigMap", "tlscap-nats-config")["data"]["nats.conf"]
    assert "jetstream {" in conf and "cluster {" in conf
    assert conf.count("verify: true") == 2  # clients and routes: mutual TLS
    for i in range(3):
        assert f"nats-route://tlscap-nats-{i}.tlscap-nats.tlscap.svc:6222" in conf
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert ":" in container["image"] and not container["image"].endswith(":latest")
    for resource in ("cpu", "memory"):
        assert resource in container["resources"]["requests"]
        assert resource in container["resources"]["limits"]
