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
FD_PROBES = "".join(
    f"TRACEPOINT_PROBE(syscalls, sys_enter_{n}) {{ return learn_fd((s32)args->fd); }}\n"
    for n in ("write", "read", "sendto", "recvfrom", "sendmsg", "recvmsg", "writev", "readv")
)
EMIT_ORIG = """        if (bpf_probe_read_user(e->data, n, (void *)(buf + off)) != 0) {
            count(CNT_READ_ERRORS, 1);
            count(CNT_LOST_BYTES, captured - off);
            break;
        }
        u64 size = DATA_HEADER_SIZE + n;
        if (events.ringbuf_output(e, size, wake_flag(size)) != 0) {
            count(CNT_LOST_EVENTS, 1);
            count(CNT_LOST_BYTES, captured - off);
            break;
        }
        count(CNT_CHUNKS, 1);
"""

# Reserve the ring slot in a few constant size classes (the verifier wants a constant
# reserve size) and read user memory straight into it: one payload copy instead of two,
# at most 2x ring space for sizes between classes, none at 256 B / 1 KiB / 4 KiB / 16 KiB.
# Calls larger than one chunk keep the loop, with full-size slots.  One function per
# class, written out (bcc cannot rewrite map calls inside macros).
SIZE_CLASSES = (256, 1024, 4096, 16384)


def _sized_function(cls: int) -> str:
    return f"""
static __always_inline int emit_sized_{cls}(struct data_event *e, u64 src, u64 n) {{
    struct data_event *r = events.ringbuf_reserve(DATA_HEADER_SIZE + {cls});
    if (!r)
        return -1;
    __builtin_memcpy(r, e, DATA_HEADER_SIZE);
    u64 m = n - 1;
    asm volatile("%0 &= {cls - 1}" : "+r"(m));  // 1 <= m + 1 <= {cls}, for the verifier
    if (bpf_probe_read_user(r->data, m + 1, (void *)src) != 0) {{
        bpf_ringbuf_discard(r, BPF_RB_NO_WAKEUP);
        return -2;
    }}
    bpf_ringbuf_submit(r, wake_flag(DATA_HEADER_SIZE + {cls}));
    return 0;
}}
"""


SIZED_PAYLOAD = (
    "".join(_sized_function(c) for c in SIZE_CLASSES)
    + """
static __always_inline int account_chunk(int rc, u32 left) {
    if (rc == 0) {
        count(CNT_CHUNKS, 1);
        return 0;
    }
    count(rc == -2 ? CNT_READ_ERRORS : CNT_LOST_EVENTS, 1);
    count(CNT_LOST_BYTES, left);
    return -1;
}

static __always_inline void emit_payload(struct data_event *e, u64 buf, u32 captured) {
    if (captured <= CHUNK_SIZE) {
        e->chunk_off = 0;
        e->chunk_len = captured;
        int rc;
        if (captured <= 256)
            rc = emit_sized_256(e, buf, captured);
        else if (captured <= 1024)
            rc = emit_sized_1024(e, buf, captured);
        else if (captured <= 4096)
            rc = emit_sized_4096(e, buf, captured);
        else
            rc = emit_sized_16384(e, buf, captured);
        account_chunk(rc, captured);
        return;
    }
    // Larger calls: the original two-copy loop (a reserve per iteration makes the
    // verifier explore too many states).
    for (u32 i = 0; i < MAX_CHUNKS; i++) {
        u32 off = i * CHUNK_SIZE;
        if (off >= captured)
            break;
        u64 n = (u64)captured - off;
        if (n > CHUNK_SIZE)
            n = CHUNK_SIZE;
        asm volatile("%0 &= 0x7fff" : "+r"(n));
        e->chunk_off = off;
        e->chunk_len = n;
        if (bpf_probe_read_user(e->data, n, (void *)(buf + off)) != 0) {
            account_chunk(-2, captured - off);
            break;
        }
        u64 size = DATA_HEADER_SIZE + n;
        if (account_chunk(events.ringbuf_output(e, size, wake_flag(size)), captured - off))
            break;
    }
}

"""
)
SIZED_EDITS: list[Edit] = [
    (
        "calls.c",
        (
            "static __always_inline void emit_payload(",
            "static __always_inline void emit_call(",
        ),
        SIZED_PAYLOAD,
    ),
]
TGID_EDITS: list[Edit] = [
    (
        "calls.c",
        "    tls_tgids.update(&tgid, &one);",
        "    if (!tls_tgids.lookup(&tgid))\n        tls_tgids.update(&tgid, &one);",
    )
]
# Wake the consumer from the ring's own fill level instead of a shared counter that
# every CPU increments atomically.
QUERY_WAKE_EDITS: list[Edit] = [
    (
        "tlscap.h",
        "    u32 zero = 0;\n    u64 *pending = pending_bytes.lookup(&zero);",
        # bcc 0.26 has no events.ringbuf_query(); -1 is the map bcc numbered first
        # (`events`, the first map tlscap.h declares; the verifier log names it).
        "    if (bpf_ringbuf_query((void *)bpf_pseudo_fd(1, -1), BPF_RB_AVAIL_DATA)"
        " < TLSCAP_WAKE_BYTES)\n"
        "        return BPF_RB_NO_WAKEUP;\n"
        "    return BPF_RB_FORCE_WAKEUP;\n"
        "    u32 zero = 0;\n    u64 *pending = pending_bytes.lookup(&zero);",
    )
]

VARIANTS: dict[str, tuple[str, list[Edit]]] = {
    "no_emit": (
        "return probe closes the call but emits nothing (prices emit_call as a whole)",
        [("openssl.c", "        emit_call(&call, id >> 32, tid, len);", "        ;")],
    ),
    "no_payload": (
        "everything but the payload copy + ring output (prices emit_payload)",
        [("calls.c", "    emit_payload(e, a->buf, captured);", "    (void)e;")],
    ),
    "no_fd_tp": (
        "no read/write-family syscall tracepoints (prices learn_fd; fd stays unknown)",
        [("sockets.c", FD_PROBES, "")],
    ),
    "sized_copy": (
        "one payload copy: ring slots reserved in size classes (256/1K/4K/16K), "
        "user memory read straight into them",
        SIZED_EDITS,
    ),
    "tgid_lookup": (
        "tls_tgids: lookup before update (no LRU-hash update on every call)",
        TGID_EDITS,
    ),
    "combined": (
        "sized_copy + tgid_lookup + wake decided by bpf_ringbuf_query(AVAIL_DATA) instead "
        "of the shared counter (that change alone exceeds the verifier's complexity limit "
        "in the chunk loop)",
        SIZED_EDITS + TGID_EDITS + QUERY_WAKE_EDITS,
    ),
    "no_wake_acct": (
        "no shared pending-bytes counter (wake_flag = NO_WAKEUP; agent polls every 5 ms)",
        [
            (
                "tlscap.h",
                "    u32 zero = 0;\n    u64 *pending = pending_bytes.lookup(&zero);",
                "    return BPF_RB_NO_WAKEUP;\n    u32 zero = 0;\n"
                "    u64 *pending = pending_bytes.lookup(&zero);",
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
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None)
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
