"""Per function of a TLS library or Go binary: where tlscap puts its probe and why
(agent/probes/prologue.py), for ``tlscap targets --json``."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_KINDS = {"openssl": "libssl", "openssl (static)": "static", "gnutls": "gnutls", "nss": "nss"}


def placements(library: str, host_path: str) -> list[dict[str, object]]:
    """The placements for a file a targets row names; [] when it cannot be read."""
    try:
        if library == "go":
            return _go(host_path)
        kind = _KINDS.get(library)
        return _c_library(kind, host_path) if kind else []
    except Exception as exc:  # an unreadable or odd file: the report goes on
        log.debug("%s: no placement report: %s", host_path, exc)
        return []


def _c_library(kind: str, host_path: str) -> list[dict[str, object]]:
    from agent.probes.elf_symbols import find_symbols
    from agent.probes.library_probes import PROBED_SYMBOLS, plan_library
    from agent.probes.targets import TlsLibrary

    symbols = frozenset(find_symbols(host_path, PROBED_SYMBOLS))
    out = []
    for probe in plan_library(TlsLibrary(host_path, host_path, 0, 0, kind, symbols)):  # type: ignore[arg-type]
        entry = {"function": probe.name, "entry_program": probe.point.entry_fn,
                 "return_program": probe.point.return_fn, "attached": probe.attached,
                 "single_stepped_uretprobe": probe.single_stepped_uretprobe}  # fmt: skip
        if probe.placement is not None:
            entry.update(probe.placement.to_json())
            entry["function"] = probe.name
        else:
            entry.update({"placement": "entry", "reason": "code not analysed"})
        out.append(entry)
    return out


def _go(host_path: str) -> list[dict[str, object]]:
    from agent.probes.go_binary import analyze_go_tls
    from agent.probes.gotls import go_entry_placement, go_write_completion

    target = analyze_go_tls(host_path)
    out = []
    every_ret = (
        "a probe on every RET (single-stepped: no emulated instruction is "
        "common to all return paths)"
    )
    for fn, returns in ((target.write, target.write_returns), (target.read, target.read_returns)):
        if fn is None:
            continue
        entry = go_entry_placement(host_path, fn).to_json()
        entry["function"] = fn.name
        entry["returns"] = {
            "placement": "ret",
            "addresses": [f"{r:#x}" for r in returns],
            "reason": every_ret,
        }
        if fn is target.write:
            completion, why = go_write_completion(host_path, target)
            if completion is None:
                entry["returns"]["reason"] = f"{every_ret}; completion points not used: {why}"
            else:
                entry["returns"] = {
                    "placement": "completion",
                    "addresses": [f"{r:#x}" for r in completion.kept_returns],
                    "unprobed_returns": [f"{r:#x}" for r in completion.dropped_returns],
                    "points": [
                        {
                            "address": f"{p.address:#x}",
                            "offset": p.address - fn.address,
                            "call": f"{p.call:#x}",
                            "instruction": p.instruction,
                            "n": str(p.n),
                            "err": str(p.err),
                        }
                        for p in completion.points
                    ],
                    "reason": why,
                }
        out.append(entry)
    return out
