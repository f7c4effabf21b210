// NSS probes.  Where agent/probes/nss_methods.py proves them, NSS's own
// SSL-layer methods in libssl3 (ssl_Write, ssl_Send, ssl_Read, ssl_Recv: the
// functions PR_Write & co. jump to on a TLS descriptor) are probed by address;
// otherwise PR_Write, PR_Send, PR_Read and PR_Recv in libnspr4, as below.
//
// NSPR routes every file descriptor through these functions - plain files and
// plaintext TCP sockets as much as TLS ones - by jumping to the top layer's
// method table.  A TLS socket is an NSPR layer stack with NSS's "SSL" layer
// in it, so a call is recorded only when that layer is found in the stack of
// the PRFileDesc it was given.  The layer's identity is a number NSPR hands
// out per process at run time; the return probe on libssl3's SSL_ImportFD
// (which returns the descriptor with the SSL layer on top) learns it.  For a
// process that imported its sockets before we attached, the identity is not
// known: any layer pushed on an NSPR socket is then taken as TLS (NSS is the
// layer nearly every program pushes), and plain sockets are still left out.
#include "tlscap.h"

// struct PRFileDesc (prio.h): methods, secret, lower, higher, dtor, identity.
#define PRFD_LOWER_OFF 16
#define PRFD_IDENTITY_OFF 40
#define PR_NSPR_IO_LAYER_ 0  // NSPR's own (bottom) layer: a plain fd
#define PR_IO_LAYER_HEAD_ -3 // the head of a stack made by PR_CreateIOLayer
#define NSS_STACK_DEPTH 4    // layers looked at below the one we were given

BPF_TABLE("lru_hash", u32, s32, nss_ssl_identity, 16384);  // tgid -> SSL layer id

int probe_nss_import_fd_return(struct pt_regs *ctx) {
    u64 fd = PT_REGS_RC(ctx);
    if (!fd)
        return 0;
    s32 identity = 0;
    if (bpf_probe_read_user(&identity, sizeof(identity), (void *)(fd + PRFD_IDENTITY_OFF)) != 0)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    nss_ssl_identity.update(&tgid, &identity);
    return 0;
}

static __always_inline int nss_is_tls(u32 tgid, u64 fd) {
    s32 *ssl_identity = nss_ssl_identity.lookup(&tgid);
    for (int i = 0; i < NSS_STACK_DEPTH; i++) {
        if (!fd)
            return 0;
        s32 identity = 0;
        if (bpf_probe_read_user(&identity, sizeof(identity), (void *)(fd + PRFD_IDENTITY_OFF)) != 0)
            return 0;
        if (identity != PR_IO_LAYER_HEAD_) {
            if (!ssl_identity)
                return identity > PR_NSPR_IO_LAYER_;
            if (identity == *ssl_identity)
                return 1;
            if (identity == PR_NSPR_IO_LAYER_)
                return 0;  // the bottom: no SSL layer above it
        }
        if (bpf_probe_read_user(&fd, sizeof(fd), (void *)(fd + PRFD_LOWER_OFF)) != 0)
            return 0;
    }
    return 0;
}

static __always_inline int nss_enter(struct pt_regs *ctx, u8 direction) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!tgid_wanted(tgid))
        return 0;
    if (!nss_is_tls(tgid, PT_REGS_PARM1(ctx))) {
        count(CNT_NSS_PLAIN, 1);
        return 0;
    }
    return tls_call_enter(ctx, direction, 0, SRC_NSS);
}

int probe_nss_write_enter(struct pt_regs *ctx) { return nss_enter(ctx, DIR_EGRESS); }
int probe_nss_read_enter(struct pt_regs *ctx) { return nss_enter(ctx, DIR_INGRESS); }

// The SSL layer's own methods take PR_Write's (fd, buf, amount) - fd being the
// SSL layer's PRFileDesc - and return its count; NSPR calls them for TLS
// descriptors only, so no layer walk: a plain descriptor never gets here.
int probe_nss_ssl_write_enter(struct pt_regs *ctx) {
    return tls_call_enter(ctx, DIR_EGRESS, 0, SRC_NSS);
}
int probe_nss_ssl_read_enter(struct pt_regs *ctx) {
    return tls_call_enter(ctx, DIR_INGRESS, 0, SRC_NSS);
}
