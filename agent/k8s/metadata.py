"""The pods of this node as the agent needs them, and what the pods' annotations ask for.

Plain Python over the API's JSON: `PodIndex` is fed lists and watch events (by
`podwatch`, or by a test) and answers "which pod and container has this container id"
in O(1); `CapturePolicy` and `ProxyAnnotations` read the `tlscap.io/` annotations;
`PodResolver` joins a pid's cgroup (cached /proc read) to the index.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.k8s.cgroup import ContainerCache, ContainerRef
from agent.k8s.podspec import SecretMount, secret_mounts

log = logging.getLogger(__name__)

CAPTURE_ANNOTATION = "tlscap.io/capture"
INBOUND_CERT_SECRET_ANNOTATION = "tlscap.io/inbound-cert-secret"
INBOUND_PORTS_ANNOTATION = "tlscap.io/inbound-ports"
UPSTREAM_CLIENT_CERT_SECRET_ANNOTATION = "tlscap.io/upstream-client-cert-secret"
UPSTREAM_INSECURE_ANNOTATION = "tlscap.io/upstream-insecure"
UPSTREAM_INSECURE_DESTINATIONS_ANNOTATION = "tlscap.io/upstream-insecure-destinations"
# The kubelet runs a static pod under its own UID (a config hash) and the API shows a
# "mirror" pod with another UID; this annotation on the mirror pod holds the former,
# which is what the static pod's cgroup path carries.
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"

_HEX64 = re.compile(r"[0-9a-f]{64}")
# A Secret's name is a DNS-1123 subdomain.
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MAX_SECRET_NAME = 253

Scope = Literal["node", "annotated"]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str_map(value: Any) -> dict[str, str]:
    # The API never sends anything but a string map here; a hand-written fixture or a
    # proxy in the way might, and one bad object must not break the index.
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def strip_runtime_prefix(container_id: str) -> str | None:
    """``containerd://<hex>`` (``cri-o://``, ``docker://``) -> ``<hex>``; None if no id."""
    _, sep, rest = container_id.partition("://")
    cid = rest if sep else container_id
    return cid if _HEX64.fullmatch(cid) else None


@dataclass(frozen=True)
class PodInfo:
    name: str
    namespace: str
    uid: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    # container id (64 hex, runtime prefix stripped) -> container name
    containers: dict[str, str] = field(default_factory=dict)
    # Secrets mounted into the pod's (long-running) containers, for proxy mode, which
    # reads the certificates the annotations name from the pod's own mounts.
    secret_mounts: tuple[SecretMount, ...] = ()
    host_network: bool = False

    @classmethod
    def from_api(cls, obj: Mapping[str, Any]) -> PodInfo:
        """From a Pod object as the API returns it (list item or watch event object)."""
        meta = _dict(obj.get("metadata"))
        status = _dict(obj.get("status"))
        containers: dict[str, str] = {}
        # A container that has not started yet has no containerID; its earlier
        # instance (lastState) is gone with its processes, so only the current one counts.
        for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
            statuses = status.get(key)
            for cs in statuses if isinstance(statuses, list) else ():
                if not isinstance(cs, dict):
                    continue
                cid = strip_runtime_prefix(str(cs.get("containerID") or ""))
                if cid:
                    containers[cid] = str(cs.get("name") or "")
        spec = _dict(obj.get("spec"))
        return cls(
            name=str(meta.get("name") or ""),
            namespace=str(meta.get("namespace") or ""),
            uid=str(meta.get("uid") or ""),
            labels=_str_map(meta.get("labels")),
            annotations=_str_map(meta.get("annotations")),
            containers=containers,
            secret_mounts=secret_mounts(spec),
            host_network=spec.get("hostNetwork") is True,
        )


@dataclass(frozen=True)
class NamespaceInfo:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_api(cls, obj: Mapping[str, Any]) -> NamespaceInfo:
        meta = _dict(obj.get("metadata"))
        return cls(
            name=str(meta.get("name") or ""),
            labels=_str_map(meta.get("labels")),
            annotations=_str_map(meta.get("annotations")),
        )


class PodIndex:
    """Pods by UID and by container id, namespaces by name.

    Written by one watcher thread, read by the capture path: every lookup is a dict
    read under a lock that writers hold only for a few dict operations, so a reader
    never waits on the API.  PodInfo objects are replaced, never mutated, so what a
    reader got stays consistent.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, PodInfo] = {}
        self._containers: dict[str, tuple[PodInfo, str]] = {}
        self._mirrors: dict[str, str] = {}  # static pod UID -> mirror pod UID
        self._namespaces: dict[str, NamespaceInfo] = {}

    # -- pods

    def replace_pods(self, objs: Iterable[Mapping[str, Any]]) -> None:
        """A full LIST: pods not in it are gone (their DELETED may have been missed)."""
        pods = [PodInfo.from_api(o) for o in objs]
        with self._lock:
            self._pods.clear()
            self._containers.clear()
            self._mirrors.clear()
            for pod in pods:
                if pod.uid:
                    self._put(pod)

    def apply_pod_event(self, event_type: str, obj: Mapping[str, Any]) -> None:
        """One watch event: ADDED / MODIFIED upsert, DELETED removes; others are ignored."""
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            return
        pod = PodInfo.from_api(obj)
        if not pod.uid:
            log.debug("pod event %s without metadata.uid ignored", event_type)
            return
        with self._lock:
            if event_type in ("ADDED", "MODIFIED"):
                self._remove(pod.uid)
                self._put(pod)
            elif event_type == "DELETED":
                self._remove(pod.uid)

    def _put(self, pod: PodInfo) -> None:
        self._pods[pod.uid] = pod
        for cid, name in pod.containers.items():
            self._containers[cid] = (pod, name)
        mirror_of = pod.annotations.get(MIRROR_ANNOTATION)
        if mirror_of:
            self._mirrors[mirror_of] = pod.uid

    def _remove(self, uid: str) -> None:
        old = self._pods.pop(uid, None)
        if old is None:
            return
        for cid in old.containers:
            entry = self._containers.get(cid)
            if entry is not None and entry[0].uid == uid:
                del self._containers[cid]
        mirror_of = old.annotations.get(MIRROR_ANNOTATION)
        if mirror_of and self._mirrors.get(mirror_of) == uid:
            del self._mirrors[mirror_of]

    def by_container(self, container_id: str) -> tuple[PodInfo, str] | None:
        """(pod, container name) for a 64-hex container id."""
        with self._lock:
            return self._containers.get(container_id)

    def by_uid(self, uid: str) -> PodInfo | None:
        """The pod with this UID; a static pod's cgroup UID finds its mirror pod."""
        with self._lock:
            pod = self._pods.get(uid)
            if pod is None and uid in self._mirrors:
                pod = self._pods.get(self._mirrors[uid])
            return pod

    def pods(self) -> list[PodInfo]:
        with self._lock:
            return list(self._pods.values())

    def __len__(self) -> int:
        return len(self._pods)

    # -- namespaces

    def replace_namespaces(self, objs: Iterable[Mapping[str, Any]]) -> None:
        namespaces = [NamespaceInfo.from_api(o) for o in objs]
        with self._lock:
            self._namespaces = {ns.name: ns for ns in namespaces if ns.name}

    def apply_namespace_event(self, event_type: str, obj: Mapping[str, Any]) -> None:
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            return
        ns = NamespaceInfo.from_api(obj)
        if not ns.name:
            return
        with self._lock:
            if event_type in ("ADDED", "MODIFIED"):
                self._namespaces[ns.name] = ns
            elif event_type == "DELETED":
                self._namespaces.pop(ns.name, None)

    def namespace(self, name: str) -> NamespaceInfo | None:
        with self._lock:
            return self._namespaces.get(name)

    def namespace_count(self) -> int:
        return len(self._namespaces)


# ---------------------------------------------------------------------------------------
# Annotations


def _parse_bool(value: str | None) -> bool | None:
    """ "true"/"false" in any case; None when unset or anything else."""
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    return None


class CapturePolicy:
    """Which processes to capture, from the ``tlscap.io/capture`` annotation.

    The most specific setting wins: the pod's annotation, else its namespace's, else
    the scope's default (``node``: capture everything on the node; ``annotated``:
    capture only what asks for it).  So a pod can opt out of a namespace that opted in,
    and, in node scope, opt back in where its namespace opted out.  Host processes have
    no annotations and get the default.
    """

    _MAX_WARNED = 1024

    def __init__(self, scope: Scope) -> None:
        if scope not in ("node", "annotated"):
            raise ValueError(f"capture scope must be 'node' or 'annotated', got {scope!r}")
        self.scope: Scope = scope
        self._warned: set[tuple[str, str]] = set()

    def wants(self, pod: PodInfo | None, namespace_annotations: Mapping[str, str] | None) -> bool:
        default = self.scope == "node"
        if pod is None:
            return default
        setting = self._setting(pod.annotations, f"pod {pod.namespace}/{pod.name}")
        if setting is None and namespace_annotations is not None:
            setting = self._setting(namespace_annotations, f"namespace {pod.namespace}")
        return default if setting is None else setting

    def _setting(self, annotations: Mapping[str, str], where: str) -> bool | None:
        value = annotations.get(CAPTURE_ANNOTATION)
        setting = _parse_bool(value)
        if value is not None and setting is None:
            # Once per object and value: this is asked for every record.
            key = (where, value)
            if key not in self._warned and len(self._warned) < self._MAX_WARNED:
                self._warned.add(key)
                log.warning(
                    "%s: %s=%r is neither true nor false; ignoring it",
                    where,
                    CAPTURE_ANNOTATION,
                    value,
                )
        return setting


def _check_secret_name(annotation: str, value: str, errors: list[str]) -> str | None:
    name = value.strip()
    if len(name) <= _MAX_SECRET_NAME and _SECRET_NAME.fullmatch(name):
        return name
    errors.append(f"{annotation}: {value!r} is not a valid Secret name")
    return None


def _parse_ports(value: str, errors: list[str]) -> tuple[int, ...]:
    ports: list[int] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            errors.append(f"{INBOUND_PORTS_ANNOTATION}: {item!r} is not a port number")
            continue
        if int(item) not in ports:
            ports.append(int(item))
    return tuple(ports)


def _parse_destinations(value: str, errors: list[str]) -> tuple[str, ...]:
    # The proxy's own destination syntax (--upstream-insecure DEST), checked here so
    # that a typo is reported with the other annotation problems.
    from agent.fallback.config import ConfigError, DestinationPattern

    found: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            DestinationPattern.parse(item)
        except ConfigError as exc:
            errors.append(f"{UPSTREAM_INSECURE_DESTINATIONS_ANNOTATION}: {exc}")
            continue
        found.append(item)
    if not found and not any(UPSTREAM_INSECURE_DESTINATIONS_ANNOTATION in e for e in errors):
        errors.append(f"{UPSTREAM_INSECURE_DESTINATIONS_ANNOTATION}: empty list")
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True)
class ProxyAnnotations:
    """What a pod asks of the TLS-terminating fallback proxy.

    Inbound termination needs a certificate the pod's clients trust (the pod's own,
    from a Secret with tls.crt/tls.key) and the ports to terminate; upstream, the proxy
    may present a client certificate (mTLS upstreams) or skip verifying the server.
    """

    inbound_cert_secret: str | None = None
    inbound_ports: tuple[int, ...] = ()
    upstream_client_cert_secret: str | None = None
    upstream_insecure: bool = False
    # Only these upstreams are not verified (names, *.suffix, IPs or CIDRs, :port).
    upstream_insecure_destinations: tuple[str, ...] = ()

    @classmethod
    def from_pod(cls, pod: PodInfo) -> tuple[ProxyAnnotations, list[str]]:
        """The pod's proxy settings and a list of problems (invalid parts are left out)."""
        ann = pod.annotations
        errors: list[str] = []

        inbound_secret = None
        if INBOUND_CERT_SECRET_ANNOTATION in ann:
            inbound_secret = _check_secret_name(
                INBOUND_CERT_SECRET_ANNOTATION, ann[INBOUND_CERT_SECRET_ANNOTATION], errors
            )
        ports: tuple[int, ...] = ()
        if INBOUND_PORTS_ANNOTATION in ann:
            ports = _parse_ports(ann[INBOUND_PORTS_ANNOTATION], errors)
        if inbound_secret and not ports:
            errors.append(
                f"{INBOUND_CERT_SECRET_ANNOTATION} needs {INBOUND_PORTS_ANNOTATION} "
                "(the ports to terminate); inbound termination is off"
            )
            inbound_secret = None
        elif ports and INBOUND_CERT_SECRET_ANNOTATION not in ann:
            errors.append(
                f"{INBOUND_PORTS_ANNOTATION} needs {INBOUND_CERT_SECRET_ANNOTATION} "
                "(the certificate to present); inbound termination is off"
            )
        if inbound_secret is None:
            ports = ()

        upstream_secret = None
        if UPSTREAM_CLIENT_CERT_SECRET_ANNOTATION in ann:
            upstream_secret = _check_secret_name(
                UPSTREAM_CLIENT_CERT_SECRET_ANNOTATION,
                ann[UPSTREAM_CLIENT_CERT_SECRET_ANNOTATION],
                errors,
            )
        insecure = False
        if UPSTREAM_INSECURE_ANNOTATION in ann:
            parsed = _parse_bool(ann[UPSTREAM_INSECURE_ANNOTATION])
            if parsed is None:
                errors.append(
                    f"{UPSTREAM_INSECURE_ANNOTATION}: {ann[UPSTREAM_INSECURE_ANNOTATION]!r} "
                    "is neither true nor false; upstream verification stays on"
                )
            insecure = bool(parsed)
        destinations: tuple[str, ...] = ()
        if UPSTREAM_INSECURE_DESTINATIONS_ANNOTATION in ann:
            destinations = _parse_destinations(
                ann[UPSTREAM_INSECURE_DESTINATIONS_ANNOTATION], errors
            )

        return (
            cls(
                inbound_cert_secret=inbound_secret,
                inbound_ports=ports,
                upstream_client_cert_secret=upstream_secret,
                upstream_insecure=insecure,
                upstream_insecure_destinations=destinations,
            ),
            errors,
        )


# ---------------------------------------------------------------------------------------
# pid -> pod


@dataclass(frozen=True)
class PodMeta:
    """A process's container and, once the index knows it, its pod.

    Pod fields are empty while the pod is unknown (API down, pod not yet in a watch
    event); `pod_uid` may still be set from the cgroup path alone.  `labels` is the
    pod's own dict, shared: do not mutate it.
    """

    container_id: str
    runtime: str
    pod_name: str = ""
    namespace: str = ""
    pod_uid: str = ""
    container_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)


class PodResolver:
    """pid -> PodMeta: a cached /proc/<pid>/cgroup read, then dict lookups in the index.

    Only the cgroup read is cached; the index is asked every time, so a pod that shows
    up in the API after its first records is attributed from then on.
    """

    def __init__(self, index: PodIndex, cache: ContainerCache | None = None) -> None:
        self.index = index
        self.cache = cache if cache is not None else ContainerCache()

    def resolve(self, pid: int) -> PodMeta | None:
        """None for host processes (and pids that are gone before we looked)."""
        return self.resolve_container(self.cache.get(pid))

    def resolve_container(self, ref: ContainerRef | None) -> PodMeta | None:
        """The pod of a container found some other way (e.g. from a cgroup id)."""
        if ref is None:
            return None
        found = self.pod_of(ref)
        if found is None:
            return PodMeta(
                container_id=ref.container_id, runtime=ref.runtime, pod_uid=ref.pod_uid or ""
            )
        pod, container_name = found
        return PodMeta(
            container_id=ref.container_id,
            runtime=ref.runtime,
            pod_name=pod.name,
            namespace=pod.namespace,
            pod_uid=pod.uid,
            container_name=container_name,
            labels=pod.labels,
        )

    def pod_of(self, ref: ContainerRef) -> tuple[PodInfo, str] | None:
        """(pod, container name) of a container, or None while the pod is unknown."""
        found = self.index.by_container(ref.container_id)
        if found is not None:
            return found
        # The container is not in the pod's status yet (just started): the pod UID
        # from the cgroup still names the pod.
        pod = self.index.by_uid(ref.pod_uid) if ref.pod_uid else None
        return (pod, "") if pod is not None else None

    def forget(self, pid: int) -> None:
        """The process exited: drop its cached container."""
        self.cache.forget(pid)
