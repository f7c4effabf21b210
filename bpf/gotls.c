// Go crypto/tls probes: (*Conn).Write and (*Conn).Read (Go >= 1.17, amd64
// register ABI).
//
// No uretprobes: a uretprobe rewrites the return address on the stack, and Go
// moves (copies) goroutine stacks, which then crashes the program.  User space
// attaches an entry probe at the function and a probe at every RET instruction
// of it instead.  A call is keyed by its goroutine (the g pointer, in R14 under
// the register ABI), not by thread: a goroutine that blocks inside Read can
// resume, and return, on another thread.  Its fd comes from walking the
// *tls.Conn, or failing that from the socket syscall the goroutine makes
// inside the call.
//
// That syscall names its goroutine through the task's saved user registers
// (bpf_task_pt_regs, Linux 5.15+).  Kernels without it (TLSCAP_TASK_PT_REGS=0)
// get the program without that code: the goroutine that last entered Write or
// Read on the syscall's thread stands in for it (see go_thread_g).
//
//   entry:  RAX = *tls.Conn, RBX = b.ptr, RCX = b.len
//   RET:    RAX = n (bytes written / read), RBX:RCX = error
//
// Write is closed earlier where user space proved it can be (non-PIE binaries;
// agent/probes/go_write_completion.py): at the first emulated instruction after
// each call of writeRecordLocked(23, b), a "completion point", which knows that
// call's n and whether its error is nil.  Write's RETs reached only through
// such a point then carry no probe: a RET is single-stepped (~5 µs), the point
// is emulated.
#include "tlscap.h"

struct go_call_key {
    u64 g;
    u32 tgid;
    u32 _pad;
};
// One entry per goroutine inside Write or Read.  What grows with idle
// connections is Read: net/http (and most Go servers) keep a goroutine blocked
// in (*tls.Conn).Read on every idle keep-alive connection, so a server with
// 50k idle connections holds 50k entries here while moving no data.  Sized
// for a busy node (256k calls in flight; ~100 B each, not preallocated, so
// memory follows use).  Not an LRU: evicting the oldest entry would silently
// drop the next request on the longest-idle connection; a refused update is
// counted in CNT_MAP_FULL instead.
BPF_F_TABLE("hash", struct go_call_key, struct active_call, go_calls, 262144, BPF_F_NO_PREALLOC);

// Processes with a Go call whose fd the struct walk could not find (the conn
// is not a plain *net.TCPConn: a wrapper, a test double; or a PIE binary, see
// go_tls_configs).  Their socket syscalls are matched to the call by the
// goroutine making them (sockets.c -> go_learn_fd), as OpenSSL calls are by
// thread.  The set keeps that lookup off every other process's syscalls.
BPF_TABLE("lru_hash", u32, u8, go_fallback_tgids, 4096);

#if !TLSCAP_TASK_PT_REGS
// Without bpf_task_pt_regs a syscall tracepoint cannot see R14 (g).  A Go call
// makes its first socket syscall on the thread it entered on, before it can
// park (Read tries the read first; EAGAIN parks it): so thread -> the goroutine
// of the fallback call it last entered, cleared by that call's first syscall on
// a known socket.  A goroutine preempted and moved between its entry and that
// syscall is not matched (its data then has no socket), never mismatched to a
// later call: the entry it names must still be open and without an fd.
BPF_TABLE("lru_hash", u32, u64, go_thread_g, 16384);
#endif

// Per probed Write/Read entry address: what user space read from the binary
// to walk *tls.Conn -> conn (net.Conn) -> *net.TCPConn -> *netFD -> pfd.Sysfd.
// Keyed by the runtime address, so position-independent Go binaries (mapped
// at a different address in each process) find no entry and use the fallback.
struct go_tls_config {
    u64 tcpconn_close;  // net.(*TCPConn).Close: the first method of the itab we expect
    u32 conn_off;       // tls.Conn.conn
    u32 iface_data_off; // data word of an interface value
    u32 fd_off;         // net.TCPConn -> its conn.fd (*netFD)
    u32 sysfd_off;      // netFD -> pfd.Sysfd
};
BPF_HASH(go_tls_configs, u64, struct go_tls_config, 4096);

// The socket fd behind a *tls.Conn, or -1.  The itab's first method proves the
// interface holds a *net.TCPConn before any of its fields are trusted.
static __always_inline s32 go_conn_fd(u64 entry_ip, u64 conn) {
    struct go_tls_config *cfg = go_tls_configs.lookup(&entry_ip);
    if (!cfg)
        return -1;
    u64 iface[2] = {};
    if (bpf_probe_read_user(&iface[0], sizeof(u64), (void *)(conn + cfg->conn_off)) != 0)
        return -1;
    if (bpf_probe_read_user(&iface[1], sizeof(u64),
                            (void *)(conn + cfg->conn_off + cfg->iface_data_off)) != 0)
        return -1;
    if (!iface[0] || !iface[1])
        return -1;
    u64 first_method = 0;
    // itab: inter, _type (pointers), hash (u32) + pad, then fun[].
    if (bpf_probe_read_user(&first_method, sizeof(first_method), (void *)(iface[0] + 24)) != 0)
        return -1;
    if (first_method != cfg->tcpconn_close)
        return -1;
    u64 netfd = 0;
    if (bpf_probe_read_user(&netfd, sizeof(netfd), (void *)(iface[1] + cfg->fd_off)) != 0 || !netfd)
        return -1;
    s64 sysfd = -1;
    if (bpf_probe_read_user(&sysfd, sizeof(sysfd), (void *)(netfd + cfg->sysfd_off)) != 0)
        return -1;
    if (sysfd < 0 || sysfd > 0x7fffffff)
        return -1;
    return (s32)sysfd;
}

static __always_inline int go_tls_enter(struct pt_regs *ctx, u8 direction) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!tgid_wanted(tgid))
        return 0;
    if (ctx->cx == 0)
        return 0;  // an empty buffer moves nothing
    struct go_call_key key = {.g = ctx->r14, .tgid = tgid};
    struct active_call c = {};
    c.ssl = ctx->ax;
    c.buf = ctx->bx;
    c.fd = go_conn_fd(PT_REGS_IP(ctx), ctx->ax);
    c.len_ptr = ctx->cx;  // b.len: a completion point tells the last call by it
    c.depth = 1;
    c.direction = direction;
    c.source = SRC_GOTLS;
    // A growing stack re-runs the function from its first instruction (after
    // runtime.morestack) with the same arguments: the update just repeats.
    if (go_calls.update(&key, &c) != 0) {
        count(CNT_MAP_FULL, 1);
        return 0;
    }
    if (c.fd < 0) {
        count(CNT_GO_FD_FALLBACK, 1);
#if !TLSCAP_TASK_PT_REGS
        u32 tid = (u32)id;
        if (go_thread_g.update(&tid, &key.g) != 0)
            count(CNT_MAP_FULL, 1);
#endif
        if (!go_fallback_tgids.lookup(&tgid)) {
            u8 one = 1;
            if (go_fallback_tgids.update(&tgid, &one) != 0)
                count(CNT_MAP_FULL, 1);
        }
    }
    return 0;
}

int probe_gotls_write_enter(struct pt_regs *ctx) { return go_tls_enter(ctx, DIR_EGRESS); }
int probe_gotls_read_enter(struct pt_regs *ctx) { return go_tls_enter(ctx, DIR_INGRESS); }

// At every RET of Write and Read.
int probe_gotls_return(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct go_call_key key = {.g = ctx->r14, .tgid = tgid};
    struct active_call *a = go_calls.lookup(&key);
    if (!a)
        return 0;
    struct active_call call = *a;
    go_calls.delete(&key);
    s64 n = (s64)ctx->ax;
    if (n > 0)
        emit_call(&call, tgid, (u32)id, (u64)n);
    return 0;
}

// Per completion point of Write (runtime address == file address: non-PIE
// binaries only): where writeRecordLocked's results are when it runs.
struct go_write_point {
    s32 n_sp_off;    // -1: n is in RAX; else at [rsp + n_sp_off]
    s32 err_sp_off;  // -1: the error's itab word is in RBX; else at [rsp + err_sp_off]
};
BPF_HASH(go_write_points, u64, struct go_write_point, 4096);

// At a completion point of Write: one writeRecordLocked(23, ...) call returned
// n and err.  Write returns (the bytes of earlier calls) + n, so the call ends
// here, exactly as its RET would end it, unless this was TLS 1.0 CBC's
// first-byte call (no error, fewer bytes than b.len so far): then the count is
// kept and the next point (the call with the rest of b) ends the call.
int probe_gotls_write_done(struct pt_regs *ctx) {
    u64 ip = PT_REGS_IP(ctx);
    struct go_write_point *pt = go_write_points.lookup(&ip);
    if (!pt)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct go_call_key key = {.g = ctx->r14, .tgid = tgid};
    struct active_call *a = go_calls.lookup(&key);
    if (!a)
        return 0;
    u64 n = ctx->ax;
    u64 err = ctx->bx;
    int bad = 0;
    if (pt->n_sp_off >= 0)
        bad |= bpf_probe_read_user(&n, sizeof(n), (void *)(ctx->sp + pt->n_sp_off));
    if (pt->err_sp_off >= 0)
        bad |= bpf_probe_read_user(&err, sizeof(err), (void *)(ctx->sp + pt->err_sp_off));
    if (bad) {  // the stack is mapped: not expected; the call is dropped, counted
        go_calls.delete(&key);
        count(CNT_READ_ERRORS, 1);
        return 0;
    }
    if ((s64)n < 0)
        n = 0;
    u64 done = a->go_done + n;
    if (!err && done < a->len_ptr && done <= 0xffffffffULL) {
        a->go_done = (u32)done;
        return 0;
    }
    struct active_call call = *a;
    go_calls.delete(&key);
    if (done > 0)
        emit_call(&call, tgid, (u32)id, done);
    return 0;
}

// Called by sockets.c for a socket syscall made outside any OpenSSL call.  The
// syscall's saved user registers hold the goroutine making it: R14 is g in Go
// code, and the runtime's syscall stubs leave it alone.  As in learn_fd
// (sockets.c), a read/write on an fd not known as a socket is only a guess.
static __always_inline void go_learn_fd(u32 tgid, s32 fd, u8 socket_call) {
    if (!go_fallback_tgids.lookup(&tgid))
        return;
    struct go_call_key key = {.tgid = tgid};
#if TLSCAP_TASK_PT_REGS
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    if (bpf_probe_read_kernel(&key.g, sizeof(key.g), &regs->r14) != 0)
        return;
#else
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *g = go_thread_g.lookup(&tid);
    if (!g)
        return;
    key.g = *g;
#endif
    struct active_call *a = go_calls.lookup(&key);
    if (!a || (a->fd >= 0 && !a->fd_weak))
        return;
    u8 weak = !socket_call && !find_socket(socket_key(tgid, fd));
#if !TLSCAP_TASK_PT_REGS
    if (!weak)
        go_thread_g.delete(&tid);  // this thread's later syscalls are not that call's
#endif
    if (weak)
        count(CNT_UNKNOWN_FDS, 1);
    // The call's first socket syscall; a known socket replaces a weak guess.
    if (a->fd < 0 || !weak) {
        a->fd = fd;
        a->fd_weak = weak;
    }
}
