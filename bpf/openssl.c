// OpenSSL / BoringSSL / LibreSSL probes: SSL_write, SSL_write_ex, SSL_read,
// SSL_read_ex.  An entry probe remembers the call; the shared return probe
// (probe_tls_return, calls.c) reads how many bytes really moved and emits them.
// That is two probe hits per TLS call, the least that works: the byte count
// (and for reads the data) exists only at return.
#include "tlscap.h"

int probe_ssl_write_enter(struct pt_regs *ctx) {
    return tls_call_enter(ctx, DIR_EGRESS, 0, SRC_OPENSSL);
}
int probe_ssl_write_ex_enter(struct pt_regs *ctx) {
    return tls_call_enter(ctx, DIR_EGRESS, 1, SRC_OPENSSL);
}
int probe_ssl_read_enter(struct pt_regs *ctx) {
    return tls_call_enter(ctx, DIR_INGRESS, 0, SRC_OPENSSL);
}
int probe_ssl_read_ex_enter(struct pt_regs *ctx) {
    return tls_call_enter(ctx, DIR_INGRESS, 1, SRC_OPENSSL);
}
