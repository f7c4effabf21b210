// GnuTLS probes: gnutls_record_send2 (gnutls_record_send jumps to it through
// the PLT, so one probe serves both), gnutls_record_send_range,
// gnutls_record_recv and gnutls_record_recv_seq.  All take (session, data,
// size, ...) and return the byte count, so they share OpenSSL's call path
// (calls.c); the session pointer is the connection object.
#include "tlscap.h"

int probe_gnutls_send_enter(struct pt_regs *ctx) {
    return tls_call_enter(ctx, DIR_EGRESS, 0, SRC_GNUTLS);
}
int probe_gnutls_recv_enter(struct pt_regs *ctx) {
    return tls_call_enter(ctx, DIR_INGRESS, 0, SRC_GNUTLS);
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
