// Process probes: tell user space when new attach targets may have appeared
// (a process exec'd, or mapped a file executable — the dynamic loader or a
// dlopen bringing in a libssl of its own), and keep --pid/--comm filters
// current across exec and fork.
#include "tlscap.h"

#define PROT_EXEC_ 0x4

// mmap's entry knows the protection, its exit knows the mapping exists: user
// space must not read /proc/<pid>/maps before the new mapping is in it.
BPF_HASH(exec_mmaps, u32, u8, 16384);

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
#if TLSCAP_FILTER
    // comm is already the new program's name here.
    struct comm_key key = {};
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    if (allowed_comms.lookup(&key)) {
        u8 one = 1;
        if (allowed_tgids.update(&tgid, &one) != 0)
            count(CNT_MAP_FULL, 1);
    }
#endif
    if (tgid_wanted(tgid))
        emit_proc_event(EV_EXEC, tgid);
    return 0;
}

#if TLSCAP_FILTER
// Children of an allowed process (pre-forked servers) are allowed too.
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 parent = args->parent_pid;
    if (!allowed_tgids.lookup(&parent))
        return 0;
    // child_pid is a thread id when the parent made a thread rather than a
    // process (this tracepoint fires for both): sched_process_exit (sockets.c)
    // removes every ending thread's id, so these do not pile up.
    u32 child = args->child_pid;
    u8 one = 1;
    if (allowed_tgids.update(&child, &one) != 0)
        count(CNT_MAP_FULL, 1);
    return 0;
}
#endif

#define MMAP_EXEC 1
#define MMAP_EXEC_TLS_LIB 2

#if TLSCAP_HOLD
// --hold-new-libraries: a short-lived process that loads a TLS library the
// agent has not probed yet (a private copy, a new container image's) would
// finish before the probes are on.  So a process that maps a file named like
// a TLS library executable is stopped (SIGSTOP) on its way out of mmap(),
// before any of the library's code can run, and user space resumes it
// (SIGCONT) once the library is probed - or after a bounded wait, whatever
// happens (agent/capture/attacher.py).  The name is all the kernel side can
// check cheaply; user space decides whether the file is new.
#define SIGSTOP_ 19
#define NAME_LEN 256  // a power of two: offsets are masked with NAME_LEN - 1
BPF_HASH(tls_lib_opens, u32, u8, 4096);    // tid -> 1: its openat names a TLS library
BPF_HASH(tls_lib_fds, u64, u8, 16384);     // (tgid, fd) -> 1: an open TLS library file
struct name_buf {
    char name[NAME_LEN];
};
BPF_PERCPU_ARRAY(name_bufs, struct name_buf, 1);

// The file name's last component starts like one of the TLS libraries'
// sonames.  Spelled out a character at a time: bcc cannot read string
// constants from a BPF program's read-only data.
static __always_inline int looks_like_tls_library(const char *name, long len) {
    // Walk back from the end (`len` counts the NUL) to the last '/', breaking
    // at it: a forward scan that remembers every '/' explodes the verifier's
    // states.  A soname is short; 64 characters back is plenty.
    u32 base = 0;
    for (int k = 2; k < 66; k++) {
        long i = len - k;
        if (i < 0)
            break;
        if (name[i & (NAME_LEN - 1)] == '/') {
            base = i + 1;
            break;
        }
    }
#define AT(k, ch) (name[(base + (k)) & (NAME_LEN - 1)] == (ch))
    if (!(AT(0, 'l') && AT(1, 'i') && AT(2, 'b')))
        return 0;
    if (AT(3, 's') && AT(4, 's') && AT(5, 'l'))  // libssl.so (OpenSSL), libssl3.so (NSS)
        return (AT(6, '.') && AT(7, 's') && AT(8, 'o')) ||
               (AT(6, '3') && AT(7, '.') && AT(8, 's') && AT(9, 'o'));
    if (AT(3, 'g') && AT(4, 'n') && AT(5, 'u') && AT(6, 't') && AT(7, 'l') && AT(8, 's'))
        return AT(9, '.') && AT(10, 's') && AT(11, 'o');  // libgnutls.so
    if (AT(3, 'n') && AT(4, 's'))  // libnspr4.so, libnss3.so (Firefox's folded NSS)
        return (AT(5, 'p') && AT(6, 'r') && AT(7, '4') && AT(8, '.') && AT(9, 's') &&
                AT(10, 'o')) ||
               (AT(5, 's') && AT(6, '3') && AT(7, '.') && AT(8, 's') && AT(9, 'o'));
#undef AT
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    u64 id = bpf_get_current_pid_tgid();
    if (!tgid_wanted(id >> 32))
        return 0;
    u32 zero = 0;
    struct name_buf *buf = name_bufs.lookup(&zero);
    if (!buf)
        return 0;
    long len = bpf_probe_read_user_str(buf->name, sizeof(buf->name), args->filename);
    if (len <= 0 || !looks_like_tls_library(buf->name, len))
        return 0;
    u32 tid = (u32)id;
    u8 one = 1;
    tls_lib_opens.update(&tid, &one);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    if (!tls_lib_opens.lookup(&tid))
        return 0;
    tls_lib_opens.delete(&tid);
    if (args->ret < 0)
        return 0;
    u64 key = socket_key(id >> 32, (s32)args->ret);
    u8 one = 1;
    if (tls_lib_fds.update(&key, &one) != 0)
        count(CNT_MAP_FULL, 1);
    return 0;
}

static __always_inline u8 mmap_kind(u64 id, s64 fd) {
    u64 key = socket_key(id >> 32, (s32)fd);
    if (!tls_lib_fds.lookup(&key))
        return MMAP_EXEC;
    // The loader closes the file right after mapping it: one hold per open.
    tls_lib_fds.delete(&key);
    return MMAP_EXEC_TLS_LIB;
}
#else
static __always_inline u8 mmap_kind(u64 id, s64 fd) { return MMAP_EXEC; }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_mmap) {
    if (!(args->prot & PROT_EXEC_) || (s64)args->fd < 0)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if (!tgid_wanted(id >> 32))
        return 0;
    u32 tid = (u32)id;
    u8 kind = mmap_kind(id, (s64)args->fd);
    exec_mmaps.update(&tid, &kind);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_mmap) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u8 *kind = exec_mmaps.lookup(&tid);
    if (!kind)
        return 0;
    u8 k = *kind;
    exec_mmaps.delete(&tid);
    if (args->ret < 0 && args->ret > -4096)
        return 0;  // the mapping failed
#if TLSCAP_HOLD && TLSCAP_SEND_SIGNAL
    if (k == MMAP_EXEC_TLS_LIB && bpf_send_signal(SIGSTOP_) == 0) {
        emit_proc_event(EV_HOLD, id >> 32);
        return 0;
    }
#endif
    emit_proc_event(EV_EXEC_MAP, id >> 32);
    return 0;
}
