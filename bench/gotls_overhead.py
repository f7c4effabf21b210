"""Per-call crypto/tls.(*Conn).Write overhead of tlscap on a Go program, next to the floors.

Go forbids uretprobes (they rewrite the return address on a stack Go may move), so a
Go TLS capture needs a uprobe at the function's entry *and* one at every RET
instruction of it; one call hits the entry and one RET.  Modes, measured round-robin
in one run:

  baseline    no probes
  empty       an empty bcc uprobe at Write's entry only (the floor of any uprobe tool)
  empty_rets  an empty uprobe at the entry and at every RET of Write (the floor of the
              no-uretprobe technique every Go TLS capture has to use)
  empty_emul  (optional) the empty uprobe on the first instruction of Write the kernel
              emulates instead of single-stepping (after the stack-bound check)
  empty_emul_rets  (optional) that one and every RET: the floor of the jbe placement
  empty_emul_done  (optional) that one, Write's completion points and the RETs that
              keep a probe (agent/probes/go_write_completion.py): the floor of
              tlscap's placement since issue 23's Go part
  tlscap      the real agent: `tlscap run --output jsonl --pid <load generator>`

Each sample is one go_tls_write_loop process (GOMAXPROCS 1 by default, see --procs) doing
WARMUP + COUNT Writes of SIZE bytes over loopback TLS 1.3; its median per-call latency is
the sample's number.  The sampling,
the pairing with the same round's baseline and the capture checks (lost == 0, captured
egress bytes == bytes written, payload intact) are overhead.py's.

    .venv/bin/python bench/gotls_overhead.py [--go pypi|debian] [--rounds 5] [--count 10000]
        [--size 4096] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl
import overhead as ov

CALL = "crypto/tls.(*Conn).Write"
ALL_MODES = (
    "baseline", "empty", "empty_rets", "empty_emul", "empty_emul_rets", "empty_emul_done",
    "tlscap", "tlscap_entry",
)  # fmt: skip
DEFAULT_MODES = ("baseline", "empty", "empty_rets", "tlscap")
FLOORS = ("empty", "empty_rets")
# The agent programs one Write runs: its entry probe, the probe at the RET it leaves
# by, and the write(2) it makes.
GO_WRITE_PROGRAMS = {
    "probe_gotls_write_enter": "Write entry",
    "probe_gotls_return": "RET",
    "probe_gotls_write_done": "completion point",
    "tracepoint__syscalls__sys_enter_write": "sys_enter_write",
}


class GoEmptyProbe:
    """Empty probes on one Go binary's (*Conn).Write, attached only while a sample runs.

    Placed where the agent places its own: the addresses come from the agent's Go
    binary analysis (agent/probes/go_binary.py), so the floors and tlscap probe the
    very same instructions.
    """

    def __init__(self, binary: Path) -> None:
        bl.prepare_bcc_env()
        from bcc import BPF

        from agent.probes.go_binary import analyze_go_tls

        self.binary = str(binary)
        self.target = analyze_go_tls(self.binary)
        self.entry = self.target.write.address
        self.returns = tuple(self.target.write_returns)
        if not self.returns:
            raise bl.BenchError(f"{binary}: the analysis found no RET in {CALL}")
        from agent.probes.gotls import go_write_completion

        self.completion, self.completion_reason = go_write_completion(self.binary, self.target)
        self.bpf = BPF(text=ov.EMPTY_PROBE)
        self.attached: list[int] = []
        self.entry_insn = first_instruction(self.binary, self.entry)
        found = bl.first_emulated_instruction_at(self.binary, self.entry)
        self.emulated_offset, self.emulated_insn = found if found else (None, None)

    def addresses(self, mode: str) -> list[int]:
        if mode == "empty_emul":
            if self.emulated_offset is None:
                raise bl.BenchError(f"no emulated instruction found near the start of {CALL}")
            return [self.entry + self.emulated_offset]
        if mode == "empty_emul_rets":
            # The floor of tlscap's Go placement: the jbe and every RET.
            if self.emulated_offset is None:
                raise bl.BenchError(f"no emulated instruction found near the start of {CALL}")
            return [*self.returns, self.entry + self.emulated_offset]
        if mode == "empty_emul_done":
            if self.emulated_offset is None or self.completion is None:
                raise bl.BenchError(f"no emulated entry or no completion points in {CALL}")
            points = [p.address for p in self.completion.points]
            return [*self.completion.kept_returns, *points, self.entry + self.emulated_offset]
        if mode == "empty_rets":
            # RETs first, as the agent does: no entry hit without its return probe.
            return [*self.returns, self.entry]
        return [self.entry]

    def attach(self, mode: str) -> None:
        for addr in self.addresses(mode):
            self.bpf.attach_uprobe(name=self.binary, addr=addr, fn_name="probe")
            self.attached.append(addr)

    def detach(self) -> None:
        for addr in reversed(self.attached):
            self.bpf.detach_uprobe(name=self.binary, addr=addr)
        self.attached.clear()

    def close(self) -> None:
        self.detach()
        self.bpf.cleanup()

    def describe(self) -> dict:
        return {
            "go_version": self.target.version.raw,
            "pie": self.target.pie,
            "write_address": f"{self.entry:#x}",
            "write_size": self.target.write.size,
            "write_rets": len(self.returns),
            "write_first_insn": self.entry_insn,
            "write_completion": self.completion_reason,
            "empty_emul_probe": (
                f"Write+{self.emulated_offset:#x}: {self.emulated_insn}"
                if self.emulated_offset is not None
                else None
            ),
        }


def first_instruction(path: str, address: int) -> str:
    """The instruction at `address` (objdump), to show what the entry probe single-steps."""
    found = bl.disassemble(path, address, 16)
    return found[0][1] if found else "?"


def run(args: argparse.Namespace) -> dict:
    bl.require_root()
    binary = bl.build_go_loadgen(args.go)
    modes = list(args.modes)
    # Built even without floor modes: the analysis describes the probed function.
    probe = GoEmptyProbe(binary)
    t_start = time.monotonic()
    try:
        samples = ov.run_rounds(
            args,
            modes,
            lambda mode, workdir: ov.one_sample(
                mode,
                args,
                binary,
                probe,
                workdir,
                latency_key="tls_write",
                loadgen_extra=("--procs", str(args.procs)),
            ),
        )
    finally:
        probe.close()
    return {
        "benchmark": "gotls_overhead",
        "machine": bl.machine_info(),
        "args": {
            "call": CALL,
            "ratio_goal": None,  # the 1.2 goal is the OpenSSL path's
            "go_toolchain": args.go,
            "loadgen": str(binary),
            "gomaxprocs": args.procs,
            "rounds": args.rounds,
            "count": args.count,
            "warmup": args.warmup,
            "size": args.size,
            "modes": modes,
            "agent_arg": args.agent_arg,
            "variants": {k: str(v) for k, v in args.variants.items()},
            **probe.describe(),
        },
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "summary": ov.summarize(samples, modes, floors=FLOORS, hot_programs=GO_WRITE_PROGRAMS),
        "samples": samples,
    }


def print_table(result: dict, out=sys.stdout) -> None:
    a = result["args"]
    print(
        f"{a['go_version']} load generator ({a['go_toolchain']} toolchain, "
        f"{'PIE' if a['pie'] else 'not PIE'}): Write at {a['write_address']} "
        f"({a['write_size']} B, {a['write_rets']} RETs; "
        f"first instruction `{a['write_first_insn']}`)",
        file=out,
    )
    ov.print_table(result, out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ov.add_sample_args(p, "Write", ALL_MODES, DEFAULT_MODES)
    p.add_argument(
        "--go",
        choices=("pypi", "debian"),
        default="pypi",
        help="toolchain for the load generator: the venv's current Go, or Debian's 1.19",
    )
    p.add_argument(
        "--procs",
        type=int,
        default=1,
        help="the load generator's GOMAXPROCS (0: one per CPU).  1 keeps its server "
        "goroutine off the other CPU: a steadier baseline (see go_tls_write_loop.go)",
    )
    return ov.check_sample_args(p, p.parse_args(argv), ALL_MODES)


def main(argv: list[str] | None = None) -> int:
    return bl.run_cli(argv, parse_args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
