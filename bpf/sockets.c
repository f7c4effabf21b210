// Socket probes: map a TLS call to its TCP connection without kprobes
// (DESIGN.md §4: only tracepoints and uprobes are available).
//
//  - connect/accept/accept4 record the remote address and the role of a new
//    socket in `sockets`, keyed by (tgid, fd);
//  - the read/write/send/recv family tells a TLS call in progress which fd its
//    SSL object uses (the syscall is made by the same thread inside the call);
//  - close reports the end of a socket that carried TLS data;
//  - process exit reports the end of all of them.
#include "tlscap.h"

struct tlscap_sockaddr_in {
    u16 family;
    u16 port;  // network byte order
    u8 addr[4];
};

struct tlscap_sockaddr_in6 {
    u16 family;
    u16 port;
    u32 flowinfo;
    u8 addr[16];
};

struct pending_socket {
    u64 addr;  // user pointer to the sockaddr (may be 0 for accept)
    u64 sk;    // connect: the kernel socket, seen when it entered SYN_SENT
    s32 fd;
};

// Between a syscall's entry and its exit, per thread.
BPF_HASH(pending_connects, u32, struct pending_socket, 16384);
BPF_HASH(pending_accepts, u32, struct pending_socket, 16384);

// The local end of a connection is not in any syscall's arguments; the TCP
// state tracepoint has it.  A client's socket enters SYN_SENT inside connect()
// (so we learn which fd it is) and ESTABLISHED either before connect returns
// (loopback) or later from softirq; an accepted socket is ESTABLISHED before
// accept() returns and is found by its peer address.
struct endpoint_pair {
    u8 laddr[16];
    u8 raddr[16];
    u16 lport;
    u16 rport;
    u16 family;
    u16 _pad;
};
struct peer_key {
    u8 addr[16];  // IPv4 as ::ffff:a.b.c.d, as a dual-stack accept reports it
    u16 port;
    u16 _pad[3];
};
BPF_TABLE("lru_hash", u64, struct endpoint_pair, active_established, 16384);  // sk -> ends
BPF_TABLE("lru_hash", u64, u64, sk_sockets, 16384);  // sk -> sockets key, awaiting ESTABLISHED
BPF_TABLE("lru_hash", struct peer_key, struct endpoint_pair, passive_established, 16384);

// An accept() already blocked when the agent attached returns a socket whose
// peer address buffer we never saw.  Its endpoints are in the TCP state
// tracepoint all the same, keyed by the kernel socket; the first send/recv on
// the new fd names that socket (sock:sock_{send,recv}_length, Linux 6.3+), and
// the fd is known from the syscall's entry.  Without those tracepoints user
// space reads the endpoints from /proc at the first TLS call (racy for a
// connection that is already gone by then).
#if TLSCAP_SOCK_LENGTH_TP
BPF_TABLE("lru_hash", u64, struct endpoint_pair, passive_by_sk, 16384);  // sk -> ends
BPF_HASH(unresolved_accepts, u64, u8, 4096);  // sockets key -> 1
BPF_ARRAY(unresolved_count, s64, 1);          // != 0: the probes below have work
BPF_HASH(syscall_socket, u32, u64, 4096);     // tid -> sockets key, inside a syscall
#endif

#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_ 2
#define TCP_SYN_RECV_ 3
#define IPPROTO_TCP_ 6

static __always_inline void set_peer_key(struct peer_key *k, u16 family, const u8 *addr, u16 port) {
    if (family == AF_INET_) {
        k->addr[10] = 0xff;
        k->addr[11] = 0xff;
        __builtin_memcpy(&k->addr[12], addr, 4);
    } else {
        __builtin_memcpy(k->addr, addr, 16);
    }
    k->port = port;
}

static __always_inline void copy_local(struct conn_info *c, const struct endpoint_pair *ends) {
    __builtin_memcpy(c->laddr, ends->laddr, 16);
    c->lport = ends->lport;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP_)
        return 0;
    u64 sk = (u64)args->skaddr;
    if (args->newstate == TCP_SYN_SENT_) {
        // Still inside connect(), in the caller's context.
        u32 tid = (u32)bpf_get_current_pid_tgid();
        struct pending_socket *p = pending_connects.lookup(&tid);
        if (p)
            p->sk = sk;
        return 0;
    }
    if (args->newstate != TCP_ESTABLISHED_)
        return 0;
    struct endpoint_pair ends = {};
    ends.family = args->family;
    ends.lport = args->sport;
    ends.rport = args->dport;
    if (args->family == AF_INET_) {
        __builtin_memcpy(ends.laddr, args->saddr, 4);
        __builtin_memcpy(ends.raddr, args->daddr, 4);
    } else {
        __builtin_memcpy(ends.laddr, args->saddr_v6, 16);
        __builtin_memcpy(ends.raddr, args->daddr_v6, 16);
    }
    if (args->oldstate == TCP_SYN_SENT_) {
        u64 *key = sk_sockets.lookup(&sk);
        if (key) {
            u64 k = *key;
            struct conn_info *c = find_socket(k);
            if (c)
                copy_local(c, &ends);
            sk_sockets.delete(&sk);
        } else {
            active_established.update(&sk, &ends);
        }
    } else if (args->oldstate == TCP_SYN_RECV_) {
        struct peer_key pk = {};
        set_peer_key(&pk, ends.family, ends.raddr, ends.rport);
        passive_established.update(&pk, &ends);
#if TLSCAP_SOCK_LENGTH_TP
        passive_by_sk.update(&sk, &ends);
#endif
    }
    return 0;
}

// The end of a TLS-carrying socket, for user space to close its connection.
static __always_inline void emit_close(u64 id, s32 fd, u64 gen) {
    struct close_event e = {};
    e.kind = EV_CLOSE;
    e.tgid = id >> 32;
    e.tid = (u32)id;
    e.fd = fd;
    e.ts_ns = bpf_ktime_get_ns();
    e.gen = gen;
    if (ring_output(&e, sizeof(e), wake_flag(sizeof(e))) != 0)
        count(CNT_LOST_EVENTS, 1);
}

// A new socket is being recorded at `key`: a TLS socket still known there was
// closed without a close() we saw (close_range, dup2 over it, close-on-exec):
// report its end now, and drop it.
static __always_inline void retire_tls_socket(u64 id, s32 fd, u64 key) {
    struct conn_info *old = tls_sockets.lookup(&key);
    if (!old)
        return;
    emit_close(id, fd, old->gen);
    tls_sockets.delete(&key);
}

static __always_inline void record_socket(u64 id, s32 fd, u64 key, struct conn_info *c) {
    retire_tls_socket(id, fd, key);
    membio_unbind(id >> 32, key);
    if (sockets.update(&key, c) != 0)
        count(CNT_MAP_FULL, 1);
}

static __always_inline int read_sockaddr(struct conn_info *c, u64 uaddr) {
    u16 family = 0;
    if (!uaddr || bpf_probe_read_user(&family, sizeof(family), (void *)uaddr) != 0)
        return -1;
    if (family == AF_INET_) {
        struct tlscap_sockaddr_in sa = {};
        if (bpf_probe_read_user(&sa, sizeof(sa), (void *)uaddr) != 0)
            return -1;
        c->family = AF_INET_;
        c->rport = __builtin_bswap16(sa.port);
        __builtin_memcpy(c->raddr, sa.addr, 4);
        return 0;
    }
    if (family == AF_INET6_) {
        struct tlscap_sockaddr_in6 sa = {};
        if (bpf_probe_read_user(&sa, sizeof(sa), (void *)uaddr) != 0)
            return -1;
        c->family = AF_INET6_;
        c->rport = __builtin_bswap16(sa.port);
        __builtin_memcpy(c->raddr, sa.addr, 16);
        return 0;
    }
    return -1;  // unix, netlink, ...: never TLS over TCP
}


TRACEPOINT_PROBE(syscalls, sys_enter_connect) {
    u64 id = bpf_get_current_pid_tgid();
    if (!tgid_wanted(id >> 32))
        return 0;
    u32 tid = (u32)id;
    struct pending_socket p = {.addr = (u64)args->uservaddr, .fd = (s32)args->fd};
    if (pending_connects.update(&tid, &p) != 0)
        count(CNT_MAP_FULL, 1);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct pending_socket *p = pending_connects.lookup(&tid);
    if (!p)
        return 0;
    // Non-blocking sockets (curl) answer EINPROGRESS; the connection is theirs
    // all the same.
    if (args->ret == 0 || args->ret == -115) {
        struct conn_info c = {};
        if (read_sockaddr(&c, p->addr) == 0) {
            c.gen = bpf_ktime_get_ns();
            c.role = ROLE_CLIENT;
            u64 key = socket_key(id >> 32, p->fd);
            u64 sk = p->sk;
            struct endpoint_pair *ends = sk ? active_established.lookup(&sk) : NULL;
            if (ends) {
                copy_local(&c, ends);
                active_established.delete(&sk);
            }
            record_socket(id, p->fd, key, &c);
            if (sk && !ends) {
                sk_sockets.update(&sk, &key);  // ESTABLISHED will fill it in
                // ...unless it ran on another CPU between our first look and
                // this update, found no sk_sockets entry and parked the ends
                // in active_established: look once more.
                ends = active_established.lookup(&sk);
                if (ends) {
                    struct conn_info *known = find_socket(key);
                    if (known)
                        copy_local(known, ends);
                    active_established.delete(&sk);
                    sk_sockets.delete(&sk);
                }
            }
        }
    }
    pending_connects.delete(&tid);
    return 0;
}

#if TLSCAP_SOCK_LENGTH_TP
static __always_inline s64 *unresolved(void) {
    u32 zero = 0;
    return unresolved_count.lookup(&zero);
}

static __always_inline void await_endpoints(u64 key) {
    u8 one = 1;
    s64 *n = unresolved();
    if (n && unresolved_accepts.insert(&key, &one) == 0)
        __sync_fetch_and_add(n, 1);
}

static __always_inline void stop_awaiting(u64 key) {
    s64 *n = unresolved();
    if (n && *n > 0 && unresolved_accepts.delete(&key) == 0)
        __sync_fetch_and_add(n, -1);
}

// A syscall on an fd: remember which socket it is, if it still awaits its
// endpoints (one array read otherwise: these run for every read and write).
static __always_inline void note_syscall_fd(u64 id, s32 fd) {
    s64 *n = unresolved();
    if (!n || *n <= 0)
        return;
    u32 tid = (u32)id;
    u64 key = socket_key(id >> 32, fd);
    if (!unresolved_accepts.lookup(&key)) {
        // A syscall that failed before reaching the socket layer must not
        // leave its socket to the next one.
        syscall_socket.delete(&tid);
        return;
    }
    syscall_socket.update(&tid, &key);
}

static __always_inline int resolve_accepted(u64 sk) {
    s64 *n = unresolved();
    if (!n || *n <= 0)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 *pending = syscall_socket.lookup(&tid);
    if (!pending)
        return 0;
    u64 key = *pending;
    syscall_socket.delete(&tid);
    struct endpoint_pair *ends = passive_by_sk.lookup(&sk);
    struct conn_info *c = find_socket(key);
    if (ends && c && !c->family) {
        c->family = ends->family;
        __builtin_memcpy(c->raddr, ends->raddr, 16);
        c->rport = ends->rport;
        copy_local(c, ends);
    }
    // Found or not (its handshake predates us too: user space reads /proc),
    // this socket is settled.
    stop_awaiting(key);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length) { return resolve_accepted((u64)args->sk); }
TRACEPOINT_PROBE(sock, sock_send_length) { return resolve_accepted((u64)args->sk); }
#else
static __always_inline void await_endpoints(u64 key) {}
static __always_inline void stop_awaiting(u64 key) {}
static __always_inline void note_syscall_fd(u64 id, s32 fd) {}
#endif

static __always_inline int accept_enter(u64 upeer) {
    u64 id = bpf_get_current_pid_tgid();
    if (!tgid_wanted(id >> 32))
        return 0;
    u32 tid = (u32)id;
    struct pending_socket p = {.addr = upeer, .fd = -1};
    if (pending_accepts.update(&tid, &p) != 0)
        count(CNT_MAP_FULL, 1);
    return 0;
}

static __always_inline int accept_exit(long ret) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct pending_socket *p = pending_accepts.lookup(&tid);
    if (!p) {
        // An accept() already blocked when we attached: its entry (and the
        // peer address buffer) went unseen.  The role is still certain; user
        // space reads the endpoints from /proc.
        if (ret >= 0 && tgid_wanted(id >> 32)) {
            struct conn_info c = {.gen = bpf_ktime_get_ns(), .role = ROLE_SERVER};
            u64 key = socket_key(id >> 32, (s32)ret);
            record_socket(id, (s32)ret, key, &c);
            await_endpoints(key);
        }
        return 0;
    }
    if (ret >= 0) {
        struct conn_info c = {};
        // A NULL peer address leaves the family unknown: user space resolves
        // the socket when it first carries TLS.  A non-INET peer is not ours.
        if (read_sockaddr(&c, p->addr) == 0 || p->addr == 0) {
            c.gen = bpf_ktime_get_ns();
            c.role = ROLE_SERVER;
            if (c.family) {
                struct peer_key pk = {};
                set_peer_key(&pk, c.family, c.raddr, c.rport);
                struct endpoint_pair *ends = passive_established.lookup(&pk);
                if (ends) {
                    copy_local(&c, ends);
                    passive_established.delete(&pk);
                }
            }
            u64 key = socket_key(id >> 32, (s32)ret);
            record_socket(id, (s32)ret, key, &c);
            // No peer address asked for (libuv: Node): like an accept we did
            // not see begin, its first send/recv names its endpoints.
            if (!c.family)
                await_endpoints(key);
        }
    }
    pending_accepts.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept) { return accept_enter((u64)args->upeer_sockaddr); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return accept_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return accept_enter((u64)args->upeer_sockaddr); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return accept_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_close) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u64 key = socket_key(tgid, (s32)args->fd);
    struct conn_info *c = find_socket(key);
    if (!c)
        return 0;
    if (c->flags & CONN_TLS_SEEN)
        emit_close(id, (s32)args->fd, c->gen);
    membio_unbind(tgid, key);
    tls_sockets.delete(&key);
    sockets.delete(&key);
    stop_awaiting(key);
    return 0;
}

// A syscall on an fd made inside a TLS call names the SSL object's socket.
// Not every one: a keylog callback (SSLKEYLOGFILE), a session cache or a log
// line written during a handshake inside SSL_read/SSL_write is a write() on a
// file, and taking it would bind the connection to the wrong fd (and restart
// its offsets when the real socket shows up).  send/recv-family syscalls only
// take sockets.  A read/write fd is trusted when the kernel knows it as a
// socket (connect/accept, or user space registered it); otherwise it is a weak
// guess (counted in CNT_UNKNOWN_FDS): kept only if the call meets no known
// socket, and never allowed to displace a socket the connection already has
// (calls.c, emit_call).  Not ignored outright: a socket this program never saw
// created (passed over a unix socket, inherited as stdin, open before the
// agent and not yet registered) is only found this way, and user space
// registers it once its first record names it.
// Outside any TLS call, the same syscalls may carry a memory-BIO object's
// ciphertext (calls.c, membio_sent / membio_received).
#define MEMBIO_NONE 0
#define MEMBIO_SEND 1
#define MEMBIO_RECV 2

static __always_inline int learn_fd(s32 fd, u8 socket_call, u8 membio, u64 bytes) {
    u64 id = bpf_get_current_pid_tgid();
    note_syscall_fd(id, fd);
    u32 tid = (u32)id;
    struct active_call *a = active_calls.lookup(&tid);
    if (a) {
        if (a->fd >= 0 && !a->fd_weak)
            return 0;
        u8 weak = !socket_call && !find_socket(socket_key(id >> 32, fd));
        if (weak)
            count(CNT_UNKNOWN_FDS, 1);
        if (a->fd < 0 || !weak) {
            a->fd = fd;
            a->fd_weak = weak;
        }
        return 0;
    }
    go_learn_fd(id >> 32, fd, socket_call);
    if (membio == MEMBIO_SEND)
        membio_sent(id, fd, bytes);
    else if (membio == MEMBIO_RECV)
        membio_received(id, fd);
    return 0;
}

// Bytes an iovec array asks to move; 0 (unknown) past MAX_IOV entries or when
// unreadable.  Only read when a memory-BIO write waits for its socket.
#define MAX_IOV 8
struct tlscap_iovec {
    u64 base;
    u64 len;
};
static __always_inline u64 iov_bytes(u64 iov, u64 n) {
    if (n == 0 || n > MAX_IOV)
        return 0;
    u64 total = 0;
    for (u32 i = 0; i < MAX_IOV; i++) {
        if (i >= n)
            break;
        struct tlscap_iovec v = {};
        if (bpf_probe_read_user(&v, sizeof(v), (void *)(iov + i * sizeof(v))) != 0)
            return 0;
        total += v.len;
    }
    return total;
}

static __always_inline int vectored_send(s32 fd, u8 socket_call, u64 iov, u64 n) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 bytes = membio_writes.lookup(&tid) ? iov_bytes(iov, n) : 0;
    return learn_fd(fd, socket_call, MEMBIO_SEND, bytes);
}

// struct user_msghdr: msg_iov at 16, msg_iovlen at 24 (x86-64, arm64).
struct tlscap_msghdr {
    u64 name;
    u32 namelen;
    u32 _pad;
    u64 iov;
    u64 iovlen;
};

TRACEPOINT_PROBE(syscalls, sys_enter_write) {
    return learn_fd((s32)args->fd, 0, MEMBIO_SEND, args->count);
}
TRACEPOINT_PROBE(syscalls, sys_enter_read) { return learn_fd((s32)args->fd, 0, MEMBIO_RECV, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) {
    return learn_fd((s32)args->fd, 1, MEMBIO_SEND, args->len);
}
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) {
    return learn_fd((s32)args->fd, 1, MEMBIO_RECV, 0);
}
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct tlscap_msghdr m = {};
    if (membio_writes.lookup(&tid) &&
        bpf_probe_read_user(&m, sizeof(m), (void *)args->msg) == 0)
        return vectored_send((s32)args->fd, 1, m.iov, m.iovlen);
    return learn_fd((s32)args->fd, 1, MEMBIO_SEND, 0);
}
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) {
    return learn_fd((s32)args->fd, 1, MEMBIO_RECV, 0);
}
TRACEPOINT_PROBE(syscalls, sys_enter_writev) {
    return vectored_send((s32)args->fd, 0, (u64)args->vec, args->vlen);
}
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return learn_fd((s32)args->fd, 0, MEMBIO_RECV, 0); }

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 tid = (u32)id;
    // A thread that ends inside a TLS call leaves its entry behind; its tid
    // may come back for another thread.
    active_calls.delete(&tid);
#if TLSCAP_FILTER
    // sched_process_fork cannot tell a new thread from a new process, so
    // allowed_tgids gains thread ids too: drop each as its thread ends.  (A
    // thread id is never another live task's tgid, so this removes nothing
    // that is still wanted.)
    allowed_tgids.delete(&tid);
#endif
    if (tgid != tid)
        return 0;  // a thread, not the process
    if (!tls_tgids.lookup(&tgid))
        return 0;
    tls_tgids.delete(&tgid);
    struct proc_event e = {};
    e.kind = EV_EXIT;
    e.tgid = tgid;
    e.ts_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    if (ring_output(&e, sizeof(e), wake_flag(sizeof(e))) != 0)
        count(CNT_LOST_EVENTS, 1);
    return 0;
}
