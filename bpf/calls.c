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
struct ssl_state {
    s32 fd;
    u32 _pad;
    u64 gen;     // the socket's gen when last seen
    u64 off[2];  // indexed by direction
};
BPF_TABLE("lru_hash", struct ssl_key, struct ssl_state, ssl_states, 65536);

// Send the call's payload in chunks; stop at the first chunk the ring refuses
// (later ones would be refused too, and a gap-free prefix is easier to use).
static __always_inline void emit_payload(struct data_event *e, u64 buf, u32 captured) {
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
        if (events.ringbuf_output(e, size, wake_flag(size)) != 0) {
            count(CNT_LOST_EVENTS, 1);
            count(CNT_LOST_BYTES, captured - off);
            break;
        }
        count(CNT_CHUNKS, 1);
    }
}

static __always_inline void emit_call(struct active_call *a, u32 tgid, u32 tid, u64 len) {
    u32 zero = 0;
    struct data_event *e = scratch.lookup(&zero);
    if (!e)
        return;

    struct ssl_key sk = {.ssl = a->ssl, .tgid = tgid};
    struct ssl_state *st = ssl_states.lookup(&sk);
    if (!st) {
        struct ssl_state fresh = {.fd = -1};
        ssl_states.update(&sk, &fresh);
        st = ssl_states.lookup(&sk);
        if (!st)
            return;
    }
    // A freed SSL* reused for a new connection shows up as a new fd (or a new
    // socket on the same fd): its offsets start again.
    if (a->fd >= 0 && a->fd != st->fd) {
        if (st->fd >= 0) {
            st->off[0] = 0;
            st->off[1] = 0;
        }
        st->fd = a->fd;
    }
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
    e->cgroup_id = bpf_get_current_cgroup_id();
    __builtin_memset(&e->conn, 0, sizeof(e->conn));
    if (fd >= 0) {
        u64 key = socket_key(tgid, fd);
        struct conn_info *c = sockets.lookup(&key);
        if (c) {
            c->flags |= CONN_TLS_SEEN;
            __builtin_memcpy(&e->conn, c, sizeof(e->conn));
            // gen 0 -> known is the same socket becoming known (user space
            // registered a socket that predates us); known -> other is new.
            if (st->gen && c->gen != st->gen) {
                st->off[0] = 0;
                st->off[1] = 0;
            }
            st->gen = c->gen;
        }
    }
    u32 dir = a->direction & 1;
    e->offset = st->off[dir];
    st->off[dir] += len;
    // Read before writing: an update per call costs ~90 ns on a hot path.
    if (!tls_tgids.lookup(&tgid)) {
        u8 one = 1;
        tls_tgids.update(&tgid, &one);
    }

    u32 captured = len < TLSCAP_MAX_CAPTURE ? (u32)len : TLSCAP_MAX_CAPTURE;
    e->captured_len = captured;
    count(CNT_CALLS, 1);
    if (len > captured) {
        count(CNT_TRUNCATED, 1);
        count(CNT_TRUNCATED_BYTES, len - captured);
    }
    emit_payload(e, a->buf, captured);
}

// Open a call of a C TLS library whose data functions take (connection object,
// buffer, ...): SSL_write(ssl, buf, n), gnutls_record_send2(session, buf, n,
// ...), PR_Write(fd, buf, n).  `ex`: the byte count is stored through the 4th
// argument (SSL_*_ex) instead of returned.
static __always_inline int tls_call_enter(struct pt_regs *ctx, u8 direction, u8 ex, u8 source) {
    u64 id = bpf_get_current_pid_tgid();
    if (!tgid_wanted(id >> 32))
        return 0;
    u32 tid = (u32)id;
    u64 ssl = PT_REGS_PARM1(ctx);
    struct active_call *outer = active_calls.lookup(&tid);
    // LibreSSL's SSL_write_ex calls SSL_write: report the outer call only.  A
    // different SSL* means the old entry is stale (its return never ran).
    if (outer && outer->ssl == ssl) {
        outer->depth++;
        count(CNT_NESTED, 1);
        return 0;
    }
    struct active_call c = {};
    c.ssl = ssl;
    c.buf = PT_REGS_PARM2(ctx);
    c.len_ptr = ex ? PT_REGS_PARM4(ctx) : 0;
    c.fd = -1;
    c.depth = 1;
    c.direction = direction;
    c.ex = ex;
    c.source = source;
    active_calls.update(&tid, &c);
    return 0;
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
    return 0;
}
