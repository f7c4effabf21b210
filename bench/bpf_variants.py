"""Where does tlscap's per-call time go?  Measure edited copies of bpf/ side by side.

Each variant is bpf/ copied to bench/.build/bpf-variants/NAME with a few textual
edits; the agent runs on it through TLSCAP_BPF_DIR (bpf/ itself is never touched).
All variants run interleaved in one overhead.py run with the baseline and the
empty-probe floors, so their added latencies compare directly.  Variants that drop
work (no payload, no fd tracepoints) are not correct captures: they only price a
piece of the program.  Variants that keep the capture whole still pass overhead.py's
checks (lost == 0, captured bytes == written).

    .venv/bin/python bench/bpf_variants.py [--only a,b] [--rounds 5] [overhead.py options]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
import overhead

SRC = bl.REPO / "bpf"
OUT = bl.BUILD_DIR / "bpf-variants"

# name -> (what it tells, [(file, old, new), ...]); old is a text that must occur once, or
# (start, end): replace from `start` up to (not including) `end`.
Edit = tuple[str, str | tuple[str, str], str]
VARIANTS: dict[str, tuple[str, list[Edit]]] = {
    "no_emit": (
        "return probe closes the call but emits nothing (prices emit_call as a whole)",
        [("calls.c", "        emit_call(&call, id >> 32, tid, len);", "        ;")],
    ),
    "no_payload": (
        "everything but the payload read + ring output (prices emit_payload)",
        [
            (
                "calls.c",
                ("    // The ring is full: user space is behind.", "}\n\n// Open a call"),
                "    (void)e;\n",
            )
        ],
    ),
    "no_cut_check": (
        "no ring query after each call (prices the cut mark's check; calls over 16 KiB "
        "still ask before)",
        [("calls.c", "    return ring_pending_bytes() > TLSCAP_CUT_BYTES;", "    return 0;")],
    ),
    "no_fd_tp": (
        "read/write-family syscall tracepoints return at once (prices learn_fd; fd unknown)",
        [
            (
                "sockets.c",
                "u8 membio, u64 bytes) {\n",
                "u8 membio, u64 bytes) {\n    return 0;\n",
            )
        ],
    ),
    "no_comm": (
        "no bpf_get_current_comm per call (the header's comm left empty)",
        [("calls.c", "    bpf_get_current_comm(&e->comm, sizeof(e->comm));\n", "")],
    ),
    "no_cgroup": (
        "no bpf_get_current_cgroup_id per call",
        [("calls.c", "    e->cgroup_id = bpf_get_current_cgroup_id();", "    e->cgroup_id = 0;")],
    ),
    "no_tgid_lookup": (
        "no tls_tgids lookup per call (the process's exit is then not reported)",
        [("calls.c", "    if (!tls_tgids.lookup(&tgid)) {", "    if (0) {")],
    ),
    "no_socket_lookup": (
        "no tls_sockets/sockets lookup per call (the header's conn left empty)",
        [
            (
                "calls.c",
                "    if (fd >= 0) {\n        u64 key = socket_key(tgid, fd);\n",
                "    if (fd >= 0 && 0) {\n        u64 key = socket_key(tgid, fd);\n",
            )
        ],
    ),
    "reuse_call_entry": (
        "the return probe leaves the thread's active_calls entry in place, closed "
        "(depth 0), and the next entry probe overwrites it: no hash delete + insert per call "
        "(prices the OpenSSL path only: GnuTLS's worker probe is not adapted)",
        [
            (
                "calls.c",
                "    struct active_call *outer = active_calls.lookup(&tid);\n    if (outer) {",
                "    struct active_call *slot = active_calls.lookup(&tid);\n"
                "    struct active_call *outer = slot && slot->depth ? slot : NULL;\n"
                "    if (outer) {",
            ),
            (
                "calls.c",
                "    if (active_calls.update(&tid, &c) != 0)\n        count(CNT_MAP_FULL, 1);\n"
                "    return 0;\n}",
                "    if (slot)\n        *slot = c;\n"
                "    else if (active_calls.update(&tid, &c) != 0)\n"
                "        count(CNT_MAP_FULL, 1);\n    return 0;\n}",
            ),
            (
                "calls.c",
                "    struct active_call *a = active_calls.lookup(&tid);\n    if (!a)\n"
                "        return 0;\n    if (a->depth > 1) {",
                "    struct active_call *a = active_calls.lookup(&tid);\n    if (!a || !a->depth)\n"
                "        return 0;\n    if (a->depth > 1) {",
            ),
            (
                "calls.c",
                "    active_calls.delete(&tid);\n\n    int ret",
                "    a->depth = 0;\n\n    int ret",
            ),
            (
                "sockets.c",
                "    struct active_call *a = active_calls.lookup(&tid);\n    if (a) {",
                "    struct active_call *a = active_calls.lookup(&tid);\n    if (a && a->depth) {",
            ),
        ],
    ),
    "tgid_at_start": (
        "tls_tgids looked up once per connection (when its offsets start), not per call",
        [
            (
                "calls.c",
                "    if (!tls_tgids.lookup(&tgid)) {",
                "    if (started && !tls_tgids.lookup(&tgid)) {",
            )
        ],
    ),
}


def build_variant(name: str) -> Path:
    _, edits = VARIANTS[name]
    dst = OUT / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(SRC, dst)
    for file, old, new in edits:
        path = dst / file
        text = path.read_text()
        start, end = old if isinstance(old, tuple) else (old, None)
        i = text.find(start)
        j = text.find(end, i) if end is not None and i >= 0 else i + len(start)
        if i < 0 or j < 0 or text.count(start) != 1:
            raise bl.BenchError(
                f"variant {name}: the text to replace in {file} is not there exactly once "
                f"(bpf/ changed?): {start[:60]!r}"
            )
        path.write_text(text[:i] + new + text[j:])
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--only", type=bl.comma_list, default=None)
    p.add_argument("--list", action="store_true")
    ours, rest = p.parse_known_args(argv)
    if ours.list or "-h" in rest or "--help" in rest:
        for name, (what, _) in VARIANTS.items():
            print(f"{name:<14} {what}")
        if ours.list:
            return 0
    names = ours.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; see --list")
    variant_args = []
    for name in names:
        variant_args += ["--variant", f"{name}={build_variant(name)}"]
    args = overhead.parse_args([*rest, *variant_args])
    result = overhead.run(args)
    result["variants"] = {n: VARIANTS[n][0] for n in names}
    if args.json:
        import json

        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        overhead.print_table(result)
        for n in names:
            print(f"  tlscap@{n}: {VARIANTS[n][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
