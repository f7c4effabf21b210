// GnuTLS probes: gnutls_record_send2 (gnutls_record_send jumps to it through
// the PLT, so one probe serves both), gnutls_record_send_range,
// gnutls_record_recv and gnutls_record_recv_seq (or the worker behind both,
// below).  All take (session, data, size, ...) and return the byte count, so
// they share OpenSSL's call path (calls.c); the session pointer is the
// connection object.
#include "tlscap.h"

int probe_gnutls_send_enter(struct pt_regs *ctx) {
    return tls_call_enter(ctx, DIR_EGRESS, 0, SRC_GNUTLS);
}
int probe_gnutls_recv_enter(struct pt_regs *ctx) {
    return tls_call_enter(ctx, DIR_INGRESS, 0, SRC_GNUTLS);
}

// _gnutls_recv_int(session, type, data, size, seq, timeout): the internal worker
// gnutls_record_recv and gnutls_record_recv_seq tail-jump to with type 23, probed
// instead of them where agent/probes/gnutls_worker.py proves it (it begins with an
// emulated push; they do not).  Its other callers read other record types into
// GnuTLS's own buffers (alerts in gnutls_bye, change cipher spec in the handshake,
// heartbeats): no call is opened for them.  Their return probe still runs, so a
// call nested in one already open only deepens it (probe_tls_return steps back
// out), and a stale entry is dropped rather than completed with their result.
#define GNUTLS_APPLICATION_DATA 23

int probe_gnutls_recv_worker_enter(struct pt_regs *ctx) {
    if ((u32)PT_REGS_PARM2(ctx) == GNUTLS_APPLICATION_DATA)
        return tls_call_open(ctx, DIR_INGRESS, 0, SRC_GNUTLS, PT_REGS_PARM3(ctx));
    u64 id = bpf_get_current_pid_tgid();
    if (!tgid_wanted(id >> 32))
        return 0;
    u32 tid = (u32)id;
    struct active_call *outer = active_calls.lookup(&tid);
    if (!outer)
        return 0;
    if (PT_REGS_SP(ctx) < outer->sp && bpf_ktime_get_ns() - outer->ts < NEST_WINDOW_NS) {
        outer->depth++;
        count(CNT_NESTED, 1);
    } else {
        active_calls.delete(&tid);
        count(CNT_STALE_CALLS, 1);
    }
    return 0;
}

// gnutls_transport_set_int2(session, recv_fd, send_fd), and the
// gnutls_transport_set_int macro over it: the session's socket, known before
// any data moves.  Without it a first read served from GnuTLS's record buffer
// (no syscall inside the call) would have no fd to map to a connection.  A
// new transport starts a new connection: its offsets start again.
int probe_gnutls_set_int2(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    if (!tgid_wanted(id >> 32))
        return 0;
    struct ssl_key sk = {.ssl = PT_REGS_PARM1(ctx), .tgid = id >> 32};
    struct ssl_state fresh = {.fd = (s32)PT_REGS_PARM2(ctx)};
    if (ssl_states.update(&sk, &fresh) != 0)
        count(CNT_MAP_FULL, 1);
    return 0;
}
