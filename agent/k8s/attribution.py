"""Stamping records with their container and pod, and the `tlscap.io/capture` policy:
the one place a capture session asks "whose is this, and do we keep it?".

Container ids come from /proc/<pid>/cgroup and need nothing else; pod names come from
the API server through a PodWatcher when one could be set up.  Every lookup is a
cached file read or a dict lookup: attribution never waits for the network, and a
missing API server leaves records with container ids but no pod names (warned once).
"""

from __future__ import annotations

import logging
import os
from typing import Literal

from agent.k8s.api import ApiConfig, ConfigError, KubeApi
from agent.k8s.cgroup import ContainerCache, ContainerRef, parse_cgroup_path
from agent.k8s.cgroup_ids import CgroupPaths
from agent.k8s.metadata import CapturePolicy, PodIndex, PodInfo, PodResolver
from agent.k8s.podwatch import PodWatcher
from agent.records.record import PodRef, Record

log = logging.getLogger(__name__)

MetadataMode = Literal["auto", "on", "off"]
CACHE_SIZE = 65536  # cgroups / containers remembered; cleared (and refilled) beyond
Scope = Literal["node", "annotated"]


class AttributionError(RuntimeError):
    """Pod metadata was required (--k8s-metadata on) and cannot be had."""


class Attribution:
    def __init__(
        self,
        resolver: PodResolver,
        policy: CapturePolicy,
        watcher: PodWatcher | None = None,
        cgroups: CgroupPaths | None = None,
    ) -> None:
        self.resolver = resolver
        self.policy = policy
        self.watcher = watcher
        self.cgroups = cgroups if cgroups is not None else CgroupPaths()
        self.dropped_records = 0  # left out by the capture policy
        self._containers: dict[int, ContainerRef | None] = {}  # cgroup id -> container
        self._pod_refs: dict[str, tuple[PodInfo, PodRef]] = {}  # container id -> its pod

    def apply(self, record: Record) -> bool:
        """Fill in the record's container and pod; False when the policy drops it."""
        ref = self._container(record)
        pod_info = None
        if ref is not None:
            record.container_id = ref.container_id
            pod_info, pod_ref = self._pod(ref)
            if pod_ref is not None or record.pod is None:
                record.pod = pod_ref
        if pod_info is None and record.pod is not None and record.pod.uid:
            # The proxy of a pod's network namespace knows the pod even when the
            # client's process is not found: judge the record by that pod.
            pod_info = self.resolver.index.by_uid(record.pod.uid)
        if self.policy.scope == "node" and pod_info is None:
            return True  # the common case: nothing to look up
        namespace = self.resolver.index.namespace(pod_info.namespace) if pod_info else None
        if self.policy.wants(pod_info, namespace.annotations if namespace else None):
            return True
        self.dropped_records += 1
        return False

    def _container(self, record: Record) -> ContainerRef | None:
        # The cgroup id first: it outlives the process (usually gone by now if it was a
        # short-lived one); /proc/<pid>/cgroup where there is none (proxy records,
        # cgroup v1-only hosts).  Parsed once per id: this runs for every record.
        cgroup_id = record.cgroup_id
        if cgroup_id in self._containers:
            return self._containers[cgroup_id]
        path = self.cgroups.path_of(cgroup_id)
        if path is not None:
            if len(self._containers) >= CACHE_SIZE:
                self._containers.clear()
            ref = self._containers[cgroup_id] = parse_cgroup_path(path)
            return ref
        return self.resolver.cache.get(record.pid) if record.pid > 0 else None

    def _pod(self, ref: ContainerRef) -> tuple[PodInfo | None, PodRef | None]:
        found = self.resolver.pod_of(ref)
        if found is None:
            return None, None
        pod, container_name = found
        # One PodRef per container while its pod object is unchanged (the index makes a
        # new PodInfo on every update), shared by all of the container's records.
        cached = self._pod_refs.get(ref.container_id)
        if cached is not None and cached[0] is pod:
            return pod, cached[1]
        pod_ref = PodRef(pod.name, pod.namespace, pod.uid, container_name, pod.labels)
        if len(self._pod_refs) >= CACHE_SIZE:
            self._pod_refs.clear()
        self._pod_refs[ref.container_id] = (pod, pod_ref)
        return pod, pod_ref

    def forget(self, pid: int) -> None:
        self.resolver.forget(pid)

    def stats(self) -> dict[str, int]:
        out = {
            "k8s_policy_dropped_records": self.dropped_records,
            "k8s_cgroup_walks": self.cgroups.walks,
        }
        if self.watcher is not None:
            out.update(self.watcher.stats())
        return out

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()


def start_attribution(
    mode: MetadataMode,
    scope: Scope,
    node: str,
    kubeconfig: str | None = None,
    proc_root: str | None = None,
) -> Attribution:
    """Container ids always; pod metadata per `mode` (auto: where an API configuration
    is found; on: required; off: never).  Raises AttributionError for `on` without a
    usable configuration, and for `annotated` scope without pod metadata."""
    # In a container, the host's /proc may be mounted elsewhere (deploy/kubernetes).
    proc_root = proc_root or os.environ.get("TLSCAP_HOST_PROC") or "/proc"
    index = PodIndex()
    resolver = PodResolver(index, ContainerCache(proc_root=proc_root))
    policy = CapturePolicy(scope)
    watcher = None
    if mode != "off":
        config = _api_config(mode, kubeconfig)
        if config is not None:
            watcher = PodWatcher(KubeApi(config), node, index)
            watcher.start()
            log.info("pod metadata from %s (pods on node %s)", config.server, node)
    if scope == "annotated" and watcher is None:
        raise AttributionError(
            "--capture-scope annotated needs pod metadata (tlscap.io/capture annotations "
            "come from the API server): give --kubeconfig or run in a cluster"
        )
    return Attribution(resolver, policy, watcher)


def _api_config(mode: MetadataMode, kubeconfig: str | None) -> ApiConfig | None:
    try:
        config = ApiConfig.discover(kubeconfig)
    except (ConfigError, OSError) as exc:
        if mode == "on":
            raise AttributionError(f"Kubernetes API configuration: {exc}") from None
        log.warning("no pod metadata: Kubernetes API configuration unusable: %s", exc)
        return None
    if config is None:
        if mode == "on":
            raise AttributionError(
                "--k8s-metadata on: no Kubernetes API configuration (not in a cluster, "
                "no --kubeconfig, $KUBECONFIG or ~/.kube/config)"
            )
        log.debug("no Kubernetes API configuration found: records carry container ids only")
    return config
