"""What proxy mode needs from a pod's spec: which Secrets its containers mount where.

Plain Python over the API's JSON.  The fallback proxy reads the certificates the
`tlscap.io/*-secret` annotations name from the pod's own mounts (through
/proc/<pid>/root), so the agent never needs RBAC on Secrets: naming a Secret the pod
does not mount gains nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class SecretMount:
    """Where a container sees a Secret: the files of the Secret's keys under
    `mount_path` (`files` maps a key to its path there when the volume's `items`
    rename them; keys not listed are absent, as the kubelet does)."""

    secret: str
    container: str
    mount_path: str
    files: tuple[tuple[str, str], ...] = ()

    def path_of(self, key: str) -> str | None:
        if not self.files:
            return f"{self.mount_path.rstrip('/')}/{key}"
        for name, path in self.files:
            if name == key:
                return f"{self.mount_path.rstrip('/')}/{path}"
        return None


def _secret_volumes(spec: Mapping[str, Any]) -> dict[str, list[tuple[str, tuple]]]:
    """volume name -> [(secret name, ((key, path), ...))] for secret and projected
    volumes (a projected volume may hold several Secrets)."""
    out: dict[str, list[tuple[str, tuple]]] = {}
    volumes = spec.get("volumes")
    for vol in volumes if isinstance(volumes, list) else ():
        if not isinstance(vol, dict) or not vol.get("name"):
            continue
        sources: list[tuple[str, Any]] = []
        secret = _dict(vol.get("secret"))
        if secret.get("secretName"):
            sources.append((str(secret["secretName"]), secret.get("items")))
        projected = _dict(vol.get("projected")).get("sources")
        for source in projected if isinstance(projected, list) else ():
            inner = _dict(_dict(source).get("secret"))
            if inner.get("name"):
                sources.append((str(inner["name"]), inner.get("items")))
        for name, items in sources:
            files = tuple(
                (str(i["key"]), str(i["path"]))
                for i in (items if isinstance(items, list) else ())
                if isinstance(i, dict) and i.get("key") and i.get("path")
            )
            out.setdefault(str(vol["name"]), []).append((name, files))
    return out


def secret_mounts(spec: Mapping[str, Any]) -> tuple[SecretMount, ...]:
    volumes = _secret_volumes(spec)
    mounts: list[SecretMount] = []
    containers = spec.get("containers")
    for container in containers if isinstance(containers, list) else ():
        if not isinstance(container, dict):
            continue
        vms = container.get("volumeMounts")
        for vm in vms if isinstance(vms, list) else ():
            # A subPath mount is one file or directory of the volume, not the volume.
            if not isinstance(vm, dict) or vm.get("subPath") or not vm.get("mountPath"):
                continue
            for secret, files in volumes.get(str(vm.get("name")), ()):
                mounts.append(
                    SecretMount(
                        secret, str(container.get("name") or ""), str(vm["mountPath"]), files
                    )
                )
    return tuple(mounts)
