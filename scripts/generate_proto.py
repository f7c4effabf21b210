"""Generate the protobuf/gRPC Python modules from `proto/` (`make setup` runs this).

The `.proto` files are the one source of truth; the generated code lives in
`agent/schema/generated/` (git-ignored) and is rebuilt whenever a `.proto`
changes.  protoc's virtual path mapping (`-I agent/schema/generated=proto`)
makes the generated modules import each other as `agent.schema.generated...`,
so no sys.path tricks are needed.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
PACKAGE = "agent/schema/generated"
OUT_DIR = ROOT / PACKAGE
STAMP = OUT_DIR / ".proto-sha256"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(PROTO_DIR)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def generate(force: bool = False) -> bool:
    """Regenerate if needed; returns True if protoc ran."""
    files = proto_files()
    if not files:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    want = fingerprint(files)
    if not force and STAMP.exists() and STAMP.read_text().strip() == want:
        return False
    from grpc_tools import protoc  # a build-time dependency only

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *(f"{PACKAGE}/{f.relative_to(PROTO_DIR)}" for f in files),
    ]
    # protoc resolves the virtual names against the mapped directory.
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"protoc failed (exit {rc}) on {', '.join(map(str, files))}")
    for d in [OUT_DIR, *(p for p in OUT_DIR.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    STAMP.write_text(want + "\n")
    return True


def main() -> int:
    ran = generate(force="--force" in sys.argv[1:])
    print(f"bootstrap: protobuf code {'generated' if ran else 'up to date'} ({PACKAGE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
