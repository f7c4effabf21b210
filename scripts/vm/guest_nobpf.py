#!/usr/bin/env python3
"""The `make test-kernels` guest without bpf(): run by guest-smoke.sh when the kernel
command line says `tlscap.nobpf=1`, with the checkout's .venv python.

It first puts itself under a seccomp filter that fails every bpf() with EPERM (what a
container runtime's seccomp profile does), so everything it starts - tlscap, curl,
openssl - runs on a kernel whose bpf() is unavailable to it.  Then, for real:

  1. bpf() itself fails with EPERM (the filter works);
  2. `tlscap run --mode ebpf` refuses to start: "eBPF capture cannot run here" and
     exactly one one-line reason naming the denied bpf() syscall;
  3. the same with bpf() failing ENOSYS (a kernel built without CONFIG_BPF_SYSCALL;
     a second filter, stacked for that run only): one line saying bpf() is not there;
  4. `tlscap run --mode auto` says it uses proxy mode instead, and captures: curl
     -> (iptables redirect, loopback intercepted) -> tlscap's proxy -> openssl
     s_server, and the request and response are in tlscap's JSON lines.

Prints a line per check and, last, "TLSCAP-RESULT: pass|fail <passed>/<total>" (the
format kernel_matrix.py parses).  Standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# seccomp (linux/seccomp.h, linux/filter.h, linux/audit.h)
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
BPF_NR_X86_64 = 321
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2


def deny_bpf_program(err: int) -> bytes:
    """A classic-BPF seccomp program: bpf() on x86_64 returns -err, all else is allowed.

    struct seccomp_data: nr at offset 0, arch at offset 4.
    """
    insns = [
        (BPF_LD_W_ABS, 0, 0, 4),  # A = arch
        (BPF_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),  # not x86_64: allow
        (BPF_LD_W_ABS, 0, 0, 0),  # A = nr
        (BPF_JEQ_K, 0, 1, BPF_NR_X86_64),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | (err & 0xFFFF)),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in insns)


def install_deny_bpf(err: int) -> None:
    """Put the calling process (and all it starts from now on) under the filter."""
    if platform.machine() != "x86_64":
        raise OSError(errno.ENOTSUP, "the filter is written for x86_64")
    code = deny_bpf_program(err)
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(code) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    # As root (CAP_SYS_ADMIN) no PR_SET_NO_NEW_PRIVS is needed, and none is set: the
    # processes under the filter keep every other privilege.  Others must set it.
    if os.geteuid() != 0 and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_SECCOMP): {os.strerror(e)}")


def bpf_map_create_errno() -> int:
    """0 if bpf(BPF_MAP_CREATE) works, else its errno."""
    attr = struct.pack("IIIII", BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(
        ctypes.c_long(BPF_NR_X86_64),
        ctypes.c_long(BPF_MAP_CREATE),
        buf,
        ctypes.c_uint(len(attr)),
    )
    if fd >= 0:
        os.close(fd)
        return 0
    return ctypes.get_errno()


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok))
        print(f"TLSCAP-NOBPF: {'ok  ' if ok else 'FAIL'} {name}", flush=True)
        if detail and not ok:
            for line in detail.rstrip().splitlines()[-30:]:
                print(f"    | {line}", flush=True)
        return ok

    def result_line(self) -> str:
        passed = sum(ok for _, ok in self.results)
        total = len(self.results)
        verdict = "pass" if total and passed == total else "fail"
        return f"TLSCAP-RESULT: {verdict} {passed}/{total}"


def reasons(stderr: str) -> list[str]:
    """The preflight's reason lines: the indented lines after "cannot run here"."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if "eBPF capture cannot run here" in line:
            return [ln.strip() for ln in lines[i + 1 :] if ln.startswith((" ", "\t"))]
    return []


def ebpf_refused(tlscap: str, tmp: Path, err: int, checks: Checks, name: str, want: str) -> None:
    pre = None if err == errno.EPERM else (lambda: install_deny_bpf(err))
    out = subprocess.run(
        [tlscap, "run", "--mode", "ebpf", "--output", "jsonl",
         "--output-file", str(tmp / f"ebpf-{err}.jsonl"), "--duration", "1"],
        capture_output=True, text=True, timeout=600, preexec_fn=pre, check=False,
    )  # fmt: skip
    why = reasons(out.stderr)
    for line in why:
        print(f"TLSCAP-NOBPF:     reason: {line}", flush=True)
    matching = [ln for ln in why if want in ln]
    checks.check(
        f"{name}: --mode ebpf exits {out.returncode}, {len(why)} one-line reason(s), "
        f"{len(matching)} naming bpf()",
        out.returncode != 0 and bool(why) and len(matching) == 1,
        out.stderr,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def auto_mode_uses_the_proxy(tlscap: str, tmp: Path, checks: Checks) -> None:
    port = "8443"
    # The upstream server: openssl s_server with a certificate for 127.0.0.1.
    key, crt = tmp / "server.key", tmp / "server.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = subprocess.Popen(
        ["openssl", "s_server", "-quiet", "-www", "-accept", f"127.0.0.1:{port}",
         "-cert", str(crt), "-key", str(key)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ready, records = tmp / "ready", tmp / "auto.jsonl"
    agent_err = tmp / "agent.err"
    with open(agent_err, "w") as err_file:
        agent = subprocess.Popen(
            [tlscap, "run", "--mode", "auto", "--output", "jsonl",
             "--output-file", str(records), "--ready-file", str(ready),
             "--intercept-ports", port, "--intercept-loopback",
             "--upstream-ca", str(crt), "--ca-dir", str(tmp / "proxy-ca")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_file,
        )  # fmt: skip
    try:
        up = wait_for(ready, agent, 600)
        stderr = agent_err.read_text()
        checks.check(
            "--mode auto chooses proxy mode ('using proxy mode instead')",
            up and "using proxy mode instead" in stderr,
            stderr,
        )
        if not up:
            return
        ca = tmp / "proxy-ca" / "ca.crt"  # the proxy's root CA, made at its start
        curl = subprocess.run(
            ["curl", "-sS", "--max-time", "120", "--cacert", str(ca),
             f"https://127.0.0.1:{port}/tlscap-nobpf-probe"],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        time.sleep(2)
        agent.send_signal(signal.SIGINT)
        agent.wait(timeout=120)
        text = records.read_text() if records.exists() else ""
        payloads = []
        for line in text.splitlines():
            try:
                payloads.append(json.dumps(json.loads(line)))
            except ValueError:
                continue
        seen = any("tlscap-nobpf-probe" in p for p in payloads) or "tlscap-nobpf-probe" in text
        checks.check(
            f"proxy mode captures curl -> s_server (curl exit {curl.returncode}, "
            f"{len(payloads)} records)",
            curl.returncode == 0 and seen,
            curl.stderr + agent_err.read_text() + text[-2000:],
        )
    finally:
        for proc in (agent, server):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2])
    tlscap = str(src / ".venv" / "bin" / "tlscap")
    checks = Checks()
    try:
        install_deny_bpf(errno.EPERM)
    except OSError as exc:
        checks.check(f"seccomp filter installed ({exc})", False)
        print(checks.result_line(), flush=True)
        return 1
    err = bpf_map_create_errno()
    checks.check(
        f"bpf(BPF_MAP_CREATE) under the filter: {errno.errorcode.get(err, err)}",
        err == errno.EPERM,
    )
    tmp = Path(tempfile.mkdtemp(prefix="tlscap-nobpf-"))
    try:
        ebpf_refused(tlscap, tmp, errno.EPERM, checks, "bpf() EPERM", "bpf() syscall is denied")
        ebpf_refused(
            tlscap, tmp, errno.ENOSYS, checks, "bpf() ENOSYS", "bpf() syscall is not available"
        )
        if shutil.which("iptables") and shutil.which("curl"):
            auto_mode_uses_the_proxy(tlscap, tmp, checks)
        else:
            checks.check("--mode auto: iptables and curl are in the image", False)
    except Exception as exc:  # a crash is a failed check, with its reason
        checks.check(f"unexpected error: {exc!r}", False)
    print(checks.result_line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
