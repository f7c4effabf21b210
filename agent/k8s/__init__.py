"""Kubernetes and container attribution: which container and pod a traced process is in.

`cgroup` maps a pid to its container (from /proc/<pid>/cgroup), `metadata` holds the
pods of this node and the capture policy (pure), `api` is a small Kubernetes API client
and `podwatch` keeps `metadata`'s index current with list/watch.
"""
