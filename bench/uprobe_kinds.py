"""Which x86 instructions does this kernel's uprobe code emulate, and what does a hit cost?

Builds ``uprobe_kinds`` (uprobe_kinds_main.c + uprobe_kinds.S: tiny functions, each with
the instruction of one kind at a known offset), then for each kind times 2 M calls with
nothing attached and with an empty bcc uprobe on that instruction, side by side in one
run (rounds interleaved, order rotated).  A hit that the kernel emulates costs a few
hundred ns; one it single-steps out of line costs microseconds on this VM (the debug
exception of the single step is what is slow), so the two groups are far apart and the
kind of each instruction can be read off the number.

    .venv/bin/python bench/uprobe_kinds.py [--calls 200000] [--rounds 3] [--json]

Run as root.  See bench/README.md ("Which instructions this kernel emulates").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.benchlib import BUILD_DIR, machine_info, prepare_bcc_env, require_root  # noqa: E402

BINARY = BUILD_DIR / "uprobe_kinds"

# (label, function, offset of the probed instruction, also a uretprobe on the function)
CASES = [
    ("endbr64", "k_endbr64", 0, False),
    ("push %rbp", "k_push_rbp", 0, False),
    ("push %r12", "k_push_r12", 0, False),
    ("nop (90)", "k_nop1", 0, False),
    ("nopl 0(%rax) (4 B)", "k_nop4", 0, False),
    ("nop5 (0f 1f 44 00 00)", "k_nop5", 0, False),
    ("mov %rdi,%rax", "k_mov", 0, False),
    ("sub $0x18,%rsp", "k_sub_rsp", 0, False),
    ("lea -0x48(%rsp),%r12", "k_lea_r12", 2, False),
    ("xor %eax,%eax", "k_xor", 0, False),
    ("cmp 0x10(%rsp),%rsp", "k_cmp_mem", 0, False),
    ("jne rel8, not taken", "k_jcc_not_taken", 2, False),
    ("je rel8, taken", "k_jcc_taken", 2, False),
    ("jne rel32, not taken", "k_jcc_rel32", 2, False),
    ("jmp rel8", "k_jmp", 0, False),
    ("call rel32", "k_call", 0, False),
    ("ret", "k_ret", 0, False),
    ("jmp *%rax", "k_jmp_indirect", 7, False),
    ("uprobe+uretprobe at entry (sub)", "k_sub_then_jcc", 0, True),
    ("uprobe at +6 (jne) + uretprobe at entry", "k_sub_then_jcc", 6, "split"),
    ("uprobe+uretprobe at entry (push)", "k_push_rbp", 0, True),
]

EMPTY = "int empty(struct pt_regs *ctx) { return 0; }"


def build() -> Path:
    BUILD_DIR.mkdir(exist_ok=True)
    src = [str(BENCH / "uprobe_kinds_main.c"), str(BENCH / "uprobe_kinds.S")]
    subprocess.run(["gcc", "-O2", "-rdynamic", "-o", str(BINARY), *src, "-ldl"], check=True)
    return BINARY


def symbols(path: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout
    return {p[2]: int(p[0], 16) for p in (ln.split() for ln in out.splitlines()) if len(p) == 3}


def timed(fn: str, calls: int) -> float:
    out = subprocess.run([str(BINARY), fn, str(calls)], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    require_root()
    prepare_bcc_env()
    from bcc import BPF

    build()
    syms = symbols(BINARY)
    bpf = BPF(text=EMPTY)
    path = str(BINARY)
    added: dict[str, list[float]] = {c[0]: [] for c in CASES}
    for rnd in range(args.rounds):
        cases = CASES[rnd % len(CASES) :] + CASES[: rnd % len(CASES)]
        for label, fn, off, ret in cases:
            entry = syms[fn]
            base = timed(fn, args.calls)
            if ret == "split":
                bpf.attach_uretprobe(name=path, addr=entry, fn_name="empty")
            elif ret:
                bpf.attach_uretprobe(name=path, addr=entry + off, fn_name="empty")
            bpf.attach_uprobe(name=path, addr=entry + off, fn_name="empty")
            try:
                probed = timed(fn, args.calls)
            finally:
                bpf.detach_uprobe(name=path, addr=entry + off)
                if ret == "split":
                    bpf.detach_uretprobe(name=path, addr=entry)
                elif ret:
                    bpf.detach_uretprobe(name=path, addr=entry + off)
            added[label].append(probed - base)
    rows = [(label, statistics.median(v), v) for label, v in added.items()]
    if args.json:
        print(json.dumps({"machine": machine_info(), "added_ns": {r[0]: r[2] for r in rows}}))
        return 0
    print(f"{'instruction probed':42} {'added ns/call (median)':>22}  per round")
    for label, med, v in rows:
        kind = "emulated" if med < 1500 else "single-stepped"
        print(f"{label:42} {med:>22.0f}  {', '.join(f'{x:.0f}' for x in v)}  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
