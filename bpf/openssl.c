// OpenSSL / BoringSSL / LibreSSL probes: SSL_write, SSL_write_ex, SSL_read,
// SSL_read_ex.  An entry probe remembers the call; the shared return probe
// reads how many bytes really moved and emits them.  That is two probe hits
// per TLS call, the least that works: the byte count (and for reads the data)
// exists only at return.
#include "tlscap.h"

static __always_inline int ssl_enter(struct pt_regs *ctx, u8 direction, u8 ex) {
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
    c.source = SRC_OPENSSL;
    active_calls.update(&tid, &c);
    return 0;
}

int probe_ssl_write_enter(struct pt_regs *ctx) { return ssl_enter(ctx, DIR_EGRESS, 0); }
int probe_ssl_write_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, DIR_EGRESS, 1); }
int probe_ssl_read_enter(struct pt_regs *ctx) { return ssl_enter(ctx, DIR_INGRESS, 0); }
int probe_ssl_read_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, DIR_INGRESS, 1); }

int probe_ssl_return(struct pt_regs *ctx) {
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
