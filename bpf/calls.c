// Completing a TLS call, shared by every probe family: per-connection byte
// offsets and sending the payload to user space in chunks.  A family's probes
// fill a struct active_call (tlscap.h) and hand it to emit_call() with the byte
// count once the call has returned.
#include "tlscap.h"

// Per TLS connection object (an SSL*, a Go *tls.Conn): its fd, for calls that
// make no syscall (reads served from the record buffer) and so cannot learn it
// themselves; and the running byte offset of each direction.  Offsets live here rather than in user space so
// that a call lost to a full ring leaves a visible gap instead of shifting
// every later offset.
struct ssl_key {
    u64 ssl;
    u32 tgid;
    u32 _pad;
};
// ssl_state.shed: why a connection sends no data.
#define SHED_AT_START 1  // it started while the ring was above the high-water mark
#define SHED_CUT 2       // the full ring refused one of its chunks; resumes below the mark

struct ssl_state {
    s32 fd;
    u8 shed;     // 0: followed; SHED_AT_START or SHED_CUT
    u8 fd_weak;  // fd not (yet) known to be a socket: see emit_call
    u8 membio;   // its socket was found by membio_bind: its close ends this state
    u8 _pad[1];
    u64 gen;     // the socket's gen when last seen
    u64 off[2];  // indexed by direction
};
// An LRU because memory-BIO connections (and processes killed mid-stream) are
// never seen to end.  An idle connection's entry evicted by churn would restart
// its offsets, so it is sized for a busy node's live TLS connections, idle
// keep-alive ones included (256k x ~100 B preallocated, ~26 MiB).
BPF_TABLE("lru_hash", struct ssl_key, struct ssl_state, ssl_states, 262144);

// Shed connections per process (tgid), with the comm it had when the first one
// was shed.  A plain hash, not an LRU: when it is full a process is counted in
// CNT_SHED_UNATTRIBUTED instead of silently evicting another's count.
struct shed_proc {
    u64 connections;
    char comm[16];
};
BPF_HASH(shed_procs, u32, struct shed_proc, 10240);

// A connection starts (its first call, or its SSL object reused for a new
// socket): follow it, or shed it whole if user space is already behind.
// Connections already followed keep emitting until the ring is truly full.
static __always_inline u8 shed_new_connection(u32 tgid, const char *comm) {
#if TLSCAP_SHED_BYTES > 0
    if (ring_pending_bytes() <= TLSCAP_SHED_BYTES)
        return 0;
    count(CNT_SHED_CONNECTIONS, 1);
    struct shed_proc *p = shed_procs.lookup(&tgid);
    if (!p) {
        struct shed_proc fresh = {};
        __builtin_memcpy(fresh.comm, comm, sizeof(fresh.comm));
        shed_procs.insert(&tgid, &fresh);  // fails when full, or lost a race: look again
        p = shed_procs.lookup(&tgid);
    }
    if (p)
        __sync_fetch_and_add(&p->connections, 1);
    else
        count(CNT_SHED_UNATTRIBUTED, 1);
    return 1;
#else
    return 0;
#endif
}

// Send the call's payload in chunks; stop at the first chunk the ring refuses
// (later ones would be refused too, and a gap-free prefix is easier to use).
// 1 when the ring refused one.  (No check of the cut mark between chunks: a
// branch out of this loop per chunk took 5.10's verifier past its 1M
// instructions; emit_call checks before and after.)
static __always_inline int emit_payload(struct data_event *e, u64 buf, u32 captured) {
    for (u32 i = 0; i < MAX_CHUNKS; i++) {
        u32 off = i * CHUNK_SIZE;
        if (off >= captured)
            break;
        u64 n = (u64)captured - off;
        if (n > CHUNK_SIZE)
            n = CHUNK_SIZE;
        // No-op for the value, but proves 0 <= n < 2*CHUNK_SIZE to the
        // verifier (clang's min() loses the bound otherwise).
        asm volatile("%0 &= 0x7fff" : "+r"(n));
        e->chunk_off = off;
        e->chunk_len = n;
        if (bpf_probe_read_user(e->data, n, (void *)(buf + off)) != 0) {
            count(CNT_READ_ERRORS, 1);
            count(CNT_LOST_BYTES, captured - off);
            break;
        }
        u64 size = DATA_HEADER_SIZE + n;
        if (ring_output(e, size, wake_flag(size)) != 0) {
            count(CNT_LOST_EVENTS, 1);
            count(CNT_LOST_BYTES, captured - off);
            return 1;
        }
        count(CNT_CHUNKS, 1);
    }
    return 0;
}

// Whether the call just sent left the ring above the cut mark.  Asked right after
// its output, whose reserve has just read both ring positions: their cache lines
// are still here, unlike on a cold query.
static __always_inline int past_cut_mark(void) {
#if TLSCAP_CUT_BYTES > 0
    return ring_pending_bytes() > TLSCAP_CUT_BYTES;
#else
    return 0;
#endif
}

// Whether a call of several chunks would take the ring past the cut mark: it is
// not started then.  A cold query (~400 ns), only for calls over one chunk.
static __always_inline int would_pass_cut_mark(u32 captured) {
#if TLSCAP_CUT_BYTES > 0
    return captured > CHUNK_SIZE &&
           ring_pending_bytes() + captured + MAX_CHUNKS * DATA_HEADER_SIZE > TLSCAP_CUT_BYTES;
#else
    return 0;
#endif
}

// Memory-BIO connections (asyncio's SSLObject, Node's TLSWrap, anything over
// BIO_s_mem): the library never touches the socket, so no syscall inside its
// calls names it.  The thread that drives the object moves the ciphertext
// right around the call instead: it writes the records an SSL_write made to
// the socket just after the call returns (asyncio: transport.write ->
// sock.send; Node: EncOut -> uv_try_write), and it read()/recv()s the records
// an SSL_read decrypts just before the call.  So a call that leaves its object
// without a socket is bound to the socket its thread writes next (egress) or
// read last (ingress) - if that comes within MEMBIO_WINDOW_NS, the socket is
// known to the kernel (connect/accept, or registered by user space), no other
// TLS object owns it, and a write is big enough to hold the call's records.
// A socket, once bound, belongs to its object until it is closed (or its fd
// is reused): then the object's state is dropped, so an SSL* reused for a new
// connection starts again from offset 0 and is bound afresh.
#define MEMBIO_WINDOW_NS (50ULL * 1000 * 1000)
#define TLS_RECORD_HEADER 5

struct membio_write {
    u64 ssl;
    u64 ts;
    u64 len;
};
struct membio_read {
    u64 ts;
    s32 fd;
    u32 _pad;
};
// Per thread (tid): the last egress call left without a socket, and the last
// known socket read outside a TLS call.  LRUs: an evicted entry only costs
// one chance to bind (the next call gets another).
BPF_TABLE("lru_hash", u32, struct membio_write, membio_writes, 16384);
BPF_TABLE("lru_hash", u32, struct membio_read, membio_reads, 16384);
// Processes that made calls with no socket: only their reads are remembered
// (membio_reads), so the read()s of every other process cost one lookup.
BPF_TABLE("lru_hash", u32, u8, membio_tgids, 16384);
// sockets key -> the SSL* bound to it.  An evicted entry lets a second object
// claim the socket and leaves the first one's close unseen (its state then
// ages out of ssl_states).
BPF_TABLE("lru_hash", u64, u64, bound_sockets, 65536);

// A socket that starts carrying TLS moves out of reach of the host's
// connect/accept churn (tlscap.h, tls_sockets).  Full: it stays in the LRU,
// marked, as before.
static __always_inline struct conn_info *claim_tls_socket(u64 key, struct conn_info *c) {
    c->flags |= CONN_TLS_SEEN;
    if (tls_sockets.lookup(&key))
        return c;
    struct conn_info moved = *c;
    if (tls_sockets.update(&key, &moved) != 0) {
        count(CNT_MAP_FULL, 1);
        return c;
    }
    sockets.delete(&key);
    struct conn_info *now = tls_sockets.lookup(&key);
    return now ? now : c;
}

static __always_inline void mark_membio_tgid(u32 tgid) {
    if (membio_tgids.lookup(&tgid))
        return;
    u8 one = 1;
    membio_tgids.update(&tgid, &one);  // an LRU: never full
}

// Make `fd` (its conn_info at `c`, sockets key `key`) the socket of `st`, the
// state of `ssl`.  0 when refused.
static __always_inline int membio_claim(u64 ssl, u64 key, s32 fd, struct conn_info *c,
                                        struct ssl_state *st) {
    u64 *owner = bound_sockets.lookup(&key);
    if (owner && *owner != ssl) {
        count(CNT_MEMBIO_REFUSED, 1);
        return 0;
    }
    if (!owner && bound_sockets.update(&key, &ssl) != 0) {
        count(CNT_MAP_FULL, 1);
        return 0;
    }
    st->fd = fd;
    st->fd_weak = 0;
    st->membio = 1;
    // The same socket becoming known: no offset restart for it (emit_call).
    st->gen = c->gen;
    count(CNT_MEMBIO_BINDS, 1);
    return 1;
}

// The socket at `key` is gone (closed, or its fd reused): the object bound to
// it, if any, is a finished connection.
static __always_inline void membio_unbind(u32 tgid, u64 key) {
    u64 *owner = bound_sockets.lookup(&key);
    if (!owner)
        return;
    struct ssl_key sk = {.ssl = *owner, .tgid = tgid};
    struct ssl_state *st = ssl_states.lookup(&sk);
    if (st && st->membio && st->fd == (s32)(u32)key)
        ssl_states.delete(&sk);
    bound_sockets.delete(&key);
}

// emit_call, ingress, no socket yet: the socket this thread read last.
static __always_inline void membio_bind_read(u32 tgid, u32 tid, u64 ssl, struct ssl_state *st) {
    struct membio_read *r = membio_reads.lookup(&tid);
    if (!r)
        return;
    if (bpf_ktime_get_ns() - r->ts > MEMBIO_WINDOW_NS) {
        count(CNT_MEMBIO_STALE, 1);
        return;
    }
    s32 fd = r->fd;
    u64 key = socket_key(tgid, fd);
    struct conn_info *c = find_socket(key);
    if (c)
        membio_claim(ssl, key, fd, c, st);
}

// A write-family syscall outside any TLS call (sockets.c): the ciphertext of
// the thread's last socket-less SSL_write, if it is on a known socket.
// `bytes`: what the syscall asks to send, 0 when not known.
static __always_inline void membio_sent(u64 id, s32 fd, u64 bytes) {
    u32 tid = (u32)id;
    struct membio_write *w = membio_writes.lookup(&tid);
    if (!w)
        return;
    u32 tgid = id >> 32;
    u64 key = socket_key(tgid, fd);
    struct conn_info *c = find_socket(key);
    if (!c)
        return;  // a file, a pipe, a socket we do not know: keep waiting
    struct membio_write pending = *w;
    if (bpf_ktime_get_ns() - pending.ts > MEMBIO_WINDOW_NS) {
        membio_writes.delete(&tid);
        count(CNT_MEMBIO_STALE, 1);
        return;
    }
    if (bytes && bytes < pending.len + TLS_RECORD_HEADER) {
        count(CNT_MEMBIO_REFUSED, 1);  // not these records: maybe the next write
        return;
    }
    membio_writes.delete(&tid);
    struct ssl_key sk = {.ssl = pending.ssl, .tgid = tgid};
    struct ssl_state *st = ssl_states.lookup(&sk);
    if (!st || (st->fd >= 0 && !st->fd_weak))
        return;  // evicted, or bound meanwhile
    if (!membio_claim(pending.ssl, key, fd, c, st))
        return;
    c = claim_tls_socket(key, c);
    struct bind_event e = {};
    e.kind = EV_BIND;
    e.tgid = tgid;
    e.tid = tid;
    e.fd = fd;
    e.ts_ns = bpf_ktime_get_ns();
    e.ssl = pending.ssl;
    __builtin_memcpy(&e.conn, c, sizeof(e.conn));
    if (ring_output(&e, sizeof(e), wake_flag(sizeof(e))) != 0)
        count(CNT_LOST_EVENTS, 1);
}

// A read-family syscall outside any TLS call (sockets.c), in a process that
// has memory-BIO objects: remember a known socket as this thread's last read.
static __always_inline void membio_received(u64 id, s32 fd) {
    u32 tgid = id >> 32;
    if (!membio_tgids.lookup(&tgid))
        return;
    if (!find_socket(socket_key(tgid, fd)))
        return;
    u32 tid = (u32)id;
    struct membio_read r = {.ts = bpf_ktime_get_ns(), .fd = fd};
    membio_reads.update(&tid, &r);
}

static __always_inline void emit_call(struct active_call *a, u32 tgid, u32 tid, u64 len) {
    u32 zero = 0;
    struct data_event *e = scratch.lookup(&zero);
    if (!e)
        return;

    struct ssl_key sk = {.ssl = a->ssl, .tgid = tgid};
    struct ssl_state *st = ssl_states.lookup(&sk);
    int started = 0;
    if (!st) {
        struct ssl_state fresh = {.fd = -1};
        if (ssl_states.update(&sk, &fresh) != 0)
            count(CNT_MAP_FULL, 1);
        st = ssl_states.lookup(&sk);
        if (!st)
            return;
        started = 1;
    }
    // A freed SSL* reused for a new connection shows up as a new fd (or a new
    // socket on the same fd): its offsets start again.  A weak fd (read/write
    // on an fd not known as a socket: maybe a keylog file written during the
    // handshake) never displaces a known socket, and a weak binding is
    // replaced by the next fd without restarting the offsets.
    if (a->fd >= 0 && a->fd != st->fd && !(a->fd_weak && st->fd >= 0 && !st->fd_weak)) {
        if (st->fd >= 0 && !st->fd_weak) {
            st->off[0] = 0;
            st->off[1] = 0;
            started = 1;
        }
        st->fd = a->fd;
        st->fd_weak = a->fd_weak;
        st->membio = 0;
    }
    u8 unbound = st->fd < 0 || st->fd_weak;
    if (unbound && a->direction == DIR_INGRESS)
        membio_bind_read(tgid, tid, a->ssl, st);
    s32 fd = st->fd;

    e->kind = EV_DATA;
    e->tgid = tgid;
    e->tid = tid;
    e->fd = fd;
    e->ts_ns = bpf_ktime_get_ns();
    e->ssl = a->ssl;
    e->len = len;
    e->direction = a->direction;
    e->source = a->source;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
#if TLSCAP_CGROUP_ID
    e->cgroup_id = bpf_get_current_cgroup_id();
#else
    e->cgroup_id = 0;
#endif
    __builtin_memset(&e->conn, 0, sizeof(e->conn));
    if (fd >= 0) {
        u64 key = socket_key(tgid, fd);
        struct conn_info *c = tls_sockets.lookup(&key);
        if (!c) {
            c = sockets.lookup(&key);
            if (c)
                c = claim_tls_socket(key, c);  // its first TLS call
        }
        if (c) {
            st->fd_weak = 0;  // the kernel knows it: a socket after all
            c->flags |= CONN_TLS_SEEN;
            __builtin_memcpy(&e->conn, c, sizeof(e->conn));
            // gen 0 -> known is the same socket becoming known (user space
            // registered a socket that predates us); known -> other is new.
            if (st->gen && c->gen != st->gen) {
                st->off[0] = 0;
                st->off[1] = 0;
                started = 1;
            }
            st->gen = c->gen;
        }
    }
    e->flags = fd >= 0 && st->fd_weak ? DATA_FD_WEAK : 0;
    if (st->fd < 0 || st->fd_weak) {
        // Still no socket: its thread's next socket write may name it.
        mark_membio_tgid(tgid);
        if (a->direction == DIR_EGRESS) {
            struct membio_write w = {.ssl = a->ssl, .ts = bpf_ktime_get_ns(), .len = len};
            membio_writes.update(&tid, &w);  // an LRU: never full
        }
    }
    if (started)
        st->shed = shed_new_connection(tgid, e->comm) ? SHED_AT_START : 0;
    u32 dir = a->direction & 1;
    e->offset = st->off[dir];
    // A shed connection's offsets keep counting all the same: they stay true
    // for whatever reads them later.
    st->off[dir] += len;
    // Read before writing: an update per call costs ~90 ns on a hot path.
    if (!tls_tgids.lookup(&tgid)) {
        u8 one = 1;
        if (tls_tgids.update(&tgid, &one) != 0)
            count(CNT_MAP_FULL, 1);
    }

    count(CNT_CALLS, 1);
    // A cut connection asks how full the ring is (~400 ns, the consumer's cache
    // line) on each of its calls: still cheaper than the payload it does not send.
    if (st->shed == SHED_CUT && ring_pending_bytes() <= TLSCAP_SHED_BYTES)
        st->shed = 0;  // resumes: its offsets, counted all along, show the gap
    if (st->shed) {
        // No data at all for it, so the connections followed keep the ring; its
        // close is still reported (CONN_TLS_SEEN above).
        count(CNT_SHED_CALLS, 1);
        count(CNT_SHED_BYTES, len);
        return;
    }
    u32 captured = len < TLSCAP_MAX_CAPTURE ? (u32)len : TLSCAP_MAX_CAPTURE;
    e->captured_len = captured;
    if (len > captured) {
        count(CNT_TRUNCATED, 1);
        count(CNT_TRUNCATED_BYTES, len - captured);
    }
    // The ring is nearly full: user space is behind.  Rather than lose a chunk
    // here and there in every connection, this one stops sending until the ring
    // drains, and the others keep what room comes free (not with shedding off).
    // Past the cut mark, before the ring has to refuse anything: the room above
    // it takes the chunks in flight and every other event.
    if (would_pass_cut_mark(captured)) {
        st->shed = SHED_CUT;
        count(CNT_SHED_MIDSTREAM, 1);
        count(CNT_SHED_CALLS, 1);
        count(CNT_SHED_BYTES, len);
        return;
    }
    if ((emit_payload(e, a->buf, captured) || past_cut_mark()) && TLSCAP_SHED_BYTES > 0) {
        st->shed = SHED_CUT;
        count(CNT_SHED_MIDSTREAM, 1);
    }
}

// Open a call of a C TLS library whose data functions take (connection object,
// buffer, ...): SSL_write(ssl, buf, n), gnutls_record_send2(session, buf, n,
// ...), PR_Write(fd, buf, n).  `ex`: the byte count is stored through the 4th
// argument (SSL_*_ex) instead of returned.
// A nested call starts right after the outer one (microseconds: a wrapper
// calling the function it wraps).  An entry older than this cannot be the
// outer call of a new one; see tls_call_enter.
#define NEST_WINDOW_NS (100ULL * 1000 * 1000)

// `buf`: the data pointer (PARM2 for every wrapper; a worker may take it elsewhere).
static __always_inline int tls_call_open(struct pt_regs *ctx, u8 direction, u8 ex, u8 source,
                                         u64 buf) {
    u64 id = bpf_get_current_pid_tgid();
    if (!tgid_wanted(id >> 32))
        return 0;
    u32 tid = (u32)id;
    u64 ssl = PT_REGS_PARM1(ctx);
    u64 sp = PT_REGS_SP(ctx);
    u64 now = bpf_ktime_get_ns();
    struct active_call *outer = active_calls.lookup(&tid);
    if (outer) {
        // LibreSSL's SSL_write_ex calls SSL_write: report the outer call only.
        // A call truly inside another runs on a deeper frame (a lower stack
        // pointer: the stack grows down) and starts right after it.  An entry
        // on a frame no deeper than ours is stale: its function has returned
        // without its return probe running (attached mid-call, a thread that
        // died or unwound out of the call, a reused tid).  So is one older
        // than NEST_WINDOW_NS, which a stale entry on a shallow frame would
        // otherwise pass for nested for every later call from deeper frames.
        // Taking a true nest for a new call is harmless: the inner call
        // carries the same bytes and its return reports them, once.  (Stack
        // pointer rather than time alone: a program looping on SSL_write
        // re-enters within microseconds, from the same frame.)
        int nested = sp < outer->sp && now - outer->ts < NEST_WINDOW_NS;
        if (nested && outer->ssl == ssl) {
            outer->depth++;
            count(CNT_NESTED, 1);
            return 0;
        }
        // A deeper call on another object (the SSL BIO method calling
        // SSL_write_ex) is reported itself, as before; anything else is stale.
        if (!nested)
            count(CNT_STALE_CALLS, 1);
    }
    struct active_call c = {};
    c.ssl = ssl;
    c.buf = buf;
    c.len_ptr = ex ? PT_REGS_PARM4(ctx) : 0;
    c.fd = -1;
    c.depth = 1;
    c.direction = direction;
    c.ex = ex;
    c.source = source;
    c.sp = sp;
    c.ts = now;
    if (active_calls.update(&tid, &c) != 0)
        count(CNT_MAP_FULL, 1);
    return 0;
}

static __always_inline int tls_call_enter(struct pt_regs *ctx, u8 direction, u8 ex, u8 source) {
    return tls_call_open(ctx, direction, ex, source, PT_REGS_PARM2(ctx));
}

// The return probe every C library family shares: a returned count (> 0) or,
// for the _ex shape, 1 and the count stored at len_ptr.
int probe_tls_return(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct active_call *a = active_calls.lookup(&tid);
    if (!a)
        return 0;
    if (a->depth > 1) {
        a->depth--;
        return 0;
    }
    struct active_call call = *a;
    active_calls.delete(&tid);

    int ret = (int)PT_REGS_RC(ctx);
    u64 len = 0;
    if (call.ex) {
        // SSL_*_ex return 1 on success and store the byte count.
        if (ret == 1 && call.len_ptr)
            bpf_probe_read_user(&len, sizeof(len), (void *)call.len_ptr);
    } else if (ret > 0) {
        len = (u64)ret;
    }
    if (len > 0)
        emit_call(&call, id >> 32, tid, len);
    else if (call.fd < 0 || call.fd_weak)
        // A handshake step or an SSL_read with nothing yet (Node, asyncio):
        // start remembering this process's socket reads before its first data.
        mark_membio_tgid(id >> 32);
    return 0;
}
