"""Keep a PodIndex current: list, then watch, the pods of this node and all namespaces.

The loop is client-go's reflector in miniature.  LIST gives the state and a
resourceVersion; WATCH from that version gives every change after it.  The server
ends each watch after timeoutSeconds (or when it restarts), and we watch again from
the last version we saw, so nothing is missed and nothing is listed twice; BOOKMARK
events move that version forward on quiet streams so it does not fall out of the
server's history.  When it has anyway ("410 Gone", as an HTTP status or as an ERROR
event in the stream), only a fresh LIST can tell what changed, so we list again.

Lookups never wait for any of this: the capture path reads the index, which the
watcher threads update under a short lock.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.export.backoff import Backoff
from agent.k8s.api import ApiConnectionError, ApiError, ConfigError, KubeApi
from agent.k8s.metadata import PodIndex

log = logging.getLogger(__name__)

PODS_PATH = "/api/v1/pods"
NAMESPACES_PATH = "/api/v1/namespaces"
WATCH_TIMEOUT_S = 300
GONE = 410
# A watch that ends this fast without an event is a server or proxy refusing to hold
# it open; re-watching at once would spin.
_SHORT_WATCH_S = 1.0


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return str(rv) if rv else None


class _Gone(Exception):
    """The resourceVersion we watch from is too old: relist."""


class ListWatch:
    """List then watch one resource path forever, feeding `on_list` and `on_event`.

    `run` is the body of a thread; it returns when `stop` is set (and the KubeApi has
    been closed, which aborts a blocked read).
    """

    def __init__(
        self,
        api: KubeApi,
        path: str,
        params: Mapping[str, str],
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        *,
        name: str,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
        backoff: Backoff | None = None,
    ) -> None:
        self.api = api
        self.path = path
        self.params = dict(params)
        self.on_list = on_list
        self.on_event = on_event
        self.name = name
        self.watch_timeout_s = watch_timeout_s
        self.backoff = backoff or Backoff(initial=0.5, maximum=30.0, jitter=0.2)
        self.resource_version: str | None = None
        self.synced = threading.Event()  # set after the first successful LIST
        self.connected = False
        self.lists = 0
        self.relists = 0
        self.rewatches = 0
        self.errors = 0
        self.events = 0
        self.bookmarks = 0
        self._failing_since: float | None = None
        self._listed_at = 0.0
        self._rng = random.Random()
        self._failures = 0

    def run(self, stop: threading.Event) -> None:
        watches = 0
        while not stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                    watches = 0
                if watches:
                    self.rewatches += 1
                watches += 1
                self._watch(stop)
            except (_Gone, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status != GONE:
                    self._failed(exc, stop)
                    continue
                self.relists += 1
                self.resource_version = None
                if time.monotonic() - self._listed_at < _SHORT_WATCH_S:
                    # Gone straight after a fresh LIST: the server's history is shorter
                    # than our round trip.  Relisting at once would just spin.
                    log.debug("k8s %s: 410 right after a list; pausing", self.name)
                    stop.wait(self.backoff.next_delay())
                else:
                    log.info("k8s %s: resourceVersion too old; listing again", self.name)
            except (ApiConnectionError, ConfigError) as exc:
                self._failed(exc, stop)
            except Exception as exc:
                # A bug in an index callback must not end metadata for the agent's life.
                log.exception("k8s %s: unexpected error", self.name)
                self._failed(exc, stop)

    def _list(self) -> None:
        # resourceVersion=0: served from the API server's watch cache.  Without it every
        # agent of a DaemonSet would make a quorum read of all pods from etcd (which
        # cannot filter by node) at start and after each 410.
        result = self.api.list(self.path, {**self.params, "resourceVersion": "0"})
        items = result.get("items")
        rv = _resource_version(result)
        if not isinstance(items, list) or rv is None:
            raise ApiConnectionError(f"LIST {self.path}: not a list (no items/resourceVersion)")
        self.on_list([i for i in items if isinstance(i, dict)])
        self.lists += 1
        self._listed_at = time.monotonic()
        self.resource_version = rv
        self.synced.set()
        self._succeeded()

    def _watch(self, stop: threading.Event) -> None:
        params = {
            **self.params,
            "resourceVersion": str(self.resource_version),
            "allowWatchBookmarks": "true",
        }
        # As client-go: a timeout in [T, 2T), so watches opened together (after an API
        # server restart) do not all expire and reconnect together again.
        timeout_s = int(self.watch_timeout_s * (1 + self._rng.random()))
        started = time.monotonic()
        seen = 0
        with self.api.watch(self.path, params, timeout_s) as stream:
            self._succeeded()
            for event in stream:
                if stop.is_set():
                    return
                seen += 1
                self._handle(event)
        if not seen and time.monotonic() - started < _SHORT_WATCH_S and not stop.is_set():
            stop.wait(self.backoff.next_delay())

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise ApiConnectionError(f"watch event {kind} without an object")
        if kind == "ERROR":
            # A Status object; 410 means our resourceVersion left the server's window.
            if obj.get("code") == GONE:
                raise _Gone()
            raise ApiError(int(obj.get("code") or 500), str(obj.get("reason") or ""), str(obj))
        rv = _resource_version(obj)
        if kind == "BOOKMARK":
            self.bookmarks += 1
        elif kind in ("ADDED", "MODIFIED", "DELETED"):
            self.on_event(kind, obj)
            self.events += 1
        else:
            log.debug("k8s %s: ignoring watch event type %r", self.name, kind)
        if rv is not None:
            self.resource_version = rv

    def _succeeded(self) -> None:
        self.connected = True
        if self._failures:
            log.info(
                "k8s %s: API server reachable again after %d failed attempts (%.0f s)",
                self.name,
                self._failures,
                time.monotonic() - (self._failing_since or time.monotonic()),
            )
        self._failures = 0
        self._failing_since = None
        self.backoff.reset()

    def _failed(self, exc: BaseException, stop: threading.Event) -> None:
        if stop.is_set():
            return  # the failure is our own close()
        self.errors += 1
        self.connected = False
        if not self._failures:
            self._failing_since = time.monotonic()
            log.warning(
                "k8s %s: %s; pod metadata may be stale, retrying with backoff", self.name, exc
            )
        else:
            log.debug("k8s %s: still failing: %s", self.name, exc)
        self._failures += 1
        stop.wait(self.backoff.next_delay())


class PodWatcher:
    """Pods of one node and all namespaces, kept current in a PodIndex by two threads.

    `connected` reflects the pods' watch only: namespace annotations refine the
    capture policy, but an agent whose role may not list namespaces still attributes
    records to pods (and the namespace failure is logged and counted).
    """

    def __init__(
        self,
        api: KubeApi,
        node_name: str,
        index: PodIndex | None = None,
        *,
        watch_namespaces: bool = True,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
        backoff_factory: Callable[[], Backoff] | None = None,
    ) -> None:
        if not node_name:
            raise ValueError("node_name is required: the agent watches its own node's pods")
        self.api = api
        self.node_name = node_name
        self.index = index if index is not None else PodIndex()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

        def backoff() -> Backoff | None:
            return backoff_factory() if backoff_factory else None

        self.pods = ListWatch(
            api,
            PODS_PATH,
            {"fieldSelector": f"spec.nodeName={node_name}"},
            self.index.replace_pods,
            self.index.apply_pod_event,
            name="pods",
            watch_timeout_s=watch_timeout_s,
            backoff=backoff(),
        )
        self.namespaces = (
            ListWatch(
                api,
                NAMESPACES_PATH,
                {},
                self.index.replace_namespaces,
                self.index.apply_namespace_event,
                name="namespaces",
                watch_timeout_s=watch_timeout_s,
                backoff=backoff(),
            )
            if watch_namespaces
            else None
        )

    @property
    def watches(self) -> list[ListWatch]:
        return [w for w in (self.pods, self.namespaces) if w is not None]

    @property
    def connected(self) -> bool:
        return self.pods.connected

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("PodWatcher already started")
        for watch in self.watches:
            thread = threading.Thread(
                target=watch.run, args=(self._stop,), name=f"k8s-{watch.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def wait_synced(self, timeout: float) -> bool:
        """Wait until every resource has been listed once (e.g. before the first record)."""
        deadline = time.monotonic() + timeout
        for watch in self.watches:
            if not watch.synced.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """End the threads: closing the client aborts a watch blocked in a read."""
        self._stop.set()
        self.api.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stats(self) -> dict[str, int]:
        watches = self.watches
        return {
            "k8s_connected": int(self.connected),
            "k8s_namespaces_connected": int(bool(self.namespaces and self.namespaces.connected)),
            "k8s_lists": sum(w.lists for w in watches),
            "k8s_relists": sum(w.relists for w in watches),
            "k8s_rewatches": sum(w.rewatches for w in watches),
            "k8s_errors": sum(w.errors for w in watches),
            "k8s_events": sum(w.events for w in watches),
            "k8s_bookmarks": sum(w.bookmarks for w in watches),
            "k8s_pods": len(self.index),
            "k8s_namespaces": self.index.namespace_count(),
        }

    def __enter__(self) -> PodWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
