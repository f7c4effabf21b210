"""The agent's collector token: a projected ServiceAccount token the kubelet rotates.

The kubelet rewrites the file (an atomic symlink swap) well before the token expires,
so the exporter reads it again for every new Ingest stream (the collector ends a
stream when the token it was opened with expires). A read that fails mid-rotation
keeps the last good token.
The token is a credential: it is never logged, and not in this object's repr.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class TokenFileError(OSError):
    """The token file cannot be read, or holds no token (one-line message)."""


class TokenFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._token = ""
        self._warned = False
        self.reads = 0  # good reads of the file
        self.read(strict=True)

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"

    def read(self, *, strict: bool = False) -> str:
        """Read the file now; the token (the last good one if this read fails).

        strict: raise TokenFileError instead (at start-up, to fail early)."""
        token = ""
        try:
            token = self.path.read_text(encoding="ascii").strip()
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
        except UnicodeDecodeError:
            problem = "not ASCII text"
        else:
            problem = "" if token else "empty"
            if any(c.isspace() for c in token):
                problem = "more than one line"
        if problem:
            if strict or not self._token:
                raise TokenFileError(f"cannot use token file {self.path}: {problem}")
            with self._lock:
                warn, self._warned = not self._warned, True
            if warn:  # once per failure spell: the kubelet's swap is over in a moment
                log.warning(
                    "cannot read the collector token file %s (%s); using the last token",
                    self.path,
                    problem,
                )
            return self._token
        with self._lock:
            self._token, self._warned = token, False
            self.reads += 1
        return token

    @staticmethod
    def metadata(token: str) -> tuple[tuple[str, str], ...]:
        """gRPC call metadata carrying `token`."""
        return (("authorization", f"Bearer {token}"),)
