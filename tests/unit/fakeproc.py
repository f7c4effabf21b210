"""A fake /proc tree for target discovery tests: maps files and per-process roots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class FakeProc:
    """<root>/<pid>/maps and <root>/<pid>/root/<path>, shaped like /proc."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lines: dict[int, list[str]] = {}

    def place(
        self, pid: int, path: str, source: Path | bytes, link_from: Path | None = None
    ) -> Path:
        """Put a file at <pid>/root<path>: a copy of source, its bytes, or a hard link."""
        dest = self.root / str(pid) / "root" / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if link_from is not None:
            os.link(link_from, dest)
        elif isinstance(source, bytes):
            dest.write_bytes(source)
        else:
            shutil.copyfile(source, dest)
        return dest

    def map(self, pid: int, path: str, inode: int | None = None, suffix: str = "") -> None:
        """Add an r-xp line for <pid>/root<path> (the file's real inode unless given)."""
        st = os.stat(self.root / str(pid) / "root" / path.lstrip("/"))
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        ino = st.st_ino if inode is None else inode
        base = 0x7F0000000000 + 0x100000 * len(self._lines.setdefault(pid, []))
        self._lines[pid].append(
            f"{base:x}-{base + 0x1000:x} r-xp 00000000 {dev} {ino:<10d} {path}{suffix}"
        )
        self._write(pid)

    def map_anonymous(self, pid: int) -> None:
        self._lines.setdefault(pid, []).extend(
            [
                "7ffd4a5f6000-7ffd4a5f8000 r-xp 00000000 00:00 0          [vdso]",
                "7f3a1c000000-7f3a1c021000 rwxp 00000000 00:00 0 ",
            ]
        )
        self._write(pid)

    def _write(self, pid: int) -> None:
        (self.root / str(pid)).mkdir(parents=True, exist_ok=True)
        (self.root / str(pid) / "maps").write_text("\n".join(self._lines[pid]) + "\n")

    def set(self, pid: int, name: str, content: str | bytes) -> None:
        """Write <pid>/<name> (comm, cmdline, ...)."""
        path = self.root / str(pid) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
