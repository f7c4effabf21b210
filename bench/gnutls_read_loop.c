// gnutls_read_loop: time gnutls_record_recv over a loopback TLS connection.
//
//   gnutls_read_loop CERT KEY TOTAL_BYTES READ_SIZE
//
// The process forks its own GnuTLS server (CERT/KEY: a PEM certificate and key,
// made by the bench script), connects to it, and reads TOTAL_BYTES with
// gnutls_record_recv(READ_SIZE) until the server's close_notify. It prints one
// JSON line for the read loop alone (the handshake is not timed):
//
//   {"pid", "calls", "bytes", "ns_per_call", "cpu_ns_per_call", "child_status"}
//
// calls counts every gnutls_record_recv, the final one returning 0 included.
// It links against the system libgnutls, so uprobes on that file fire on every call.
//
// Why this shape:
// - The server sends full 16 KiB records and the client reads 1 KiB at a time, so
//   15 of every 16 calls are served from the record GnuTLS already decrypted: a cheap
//   call (a copy) on which a probe's cost per call shows, not the crypto's.
// - gnutls_record_recv is what the agent probes at its internal worker
//   (_gnutls_recv_int) or, with TLSCAP_PROBE_PLACEMENT=entry, at its entry; both
//   placements see exactly these calls.
// - One wall-clock figure for the whole loop (CLOCK_MONOTONIC around it, divided
//   by the calls): no clock read per call to blur a ~2 us call. cpu_ns_per_call is
//   the reading thread's own user + system time over the loop (getrusage
//   RUSAGE_THREAD), where a uprobe's trap is charged: it moves less than the wall
//   time when the machine is busy.
// - The server is a child of this process: no other program to start, and it dies
//   with us (PR_SET_PDEATHSIG). It is GnuTLS too, so with an agent running its
//   gnutls_record_send2 calls are probed and captured as well; the bench counts
//   the client's received bytes only.
//
// Build: gcc -O2 -o gnutls_read_loop gnutls_read_loop.c -lgnutls
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SEND_SIZE 16384 // one full TLS record per gnutls_record_send

static void die(const char *what) {
    fprintf(stderr, "gnutls_read_loop: %s: %s\n", what, errno ? strerror(errno) : "");
    exit(1);
}

static void die_gnutls(const char *what, int rc) {
    fprintf(stderr, "gnutls_read_loop: %s: %s\n", what, gnutls_strerror(rc));
    exit(1);
}

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static double thread_cpu_ns(void) {
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e9 +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e3;
}

static int handshake(gnutls_session_t s) {
    int rc;
    do {
        rc = gnutls_handshake(s);
    } while (rc < 0 && !gnutls_error_is_fatal(rc));
    return rc;
}

// The child: accept one connection, send `total` bytes of 'x' in full records, then
// close_notify. Exit codes say where it failed (the parent reports them).
static void serve(int listener, const char *cert, const char *key, long total) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int fd = accept(listener, NULL, NULL);
    if (fd < 0)
        _exit(2);
    gnutls_certificate_credentials_t creds;
    gnutls_certificate_allocate_credentials(&creds);
    if (gnutls_certificate_set_x509_key_file(creds, cert, key, GNUTLS_X509_FMT_PEM) < 0)
        _exit(3);
    gnutls_session_t s;
    gnutls_init(&s, GNUTLS_SERVER);
    gnutls_set_default_priority(s);
    gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, creds);
    gnutls_transport_set_int(s, fd);
    if (handshake(s) < 0)
        _exit(4);
    static char buf[SEND_SIZE];
    memset(buf, 'x', sizeof buf);
    for (long sent = 0; sent < total;) {
        size_t n = total - sent < SEND_SIZE ? (size_t)(total - sent) : SEND_SIZE;
        ssize_t w = gnutls_record_send(s, buf, n);
        if (w < 0)
            _exit(5);
        sent += w;
    }
    gnutls_bye(s, GNUTLS_SHUT_WR);
    close(fd);
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s CERT KEY TOTAL_BYTES READ_SIZE\n", argv[0]);
        return 2;
    }
    long total = atol(argv[3]);
    long read_size = atol(argv[4]);
    if (total <= 0 || read_size <= 0) {
        fprintf(stderr, "gnutls_read_loop: TOTAL_BYTES and READ_SIZE must be > 0\n");
        return 2;
    }
    gnutls_global_init();

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (listener < 0 || bind(listener, (void *)&addr, sizeof addr) || listen(listener, 1) ||
        getsockname(listener, (void *)&addr, &len))
        die("listen");
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0)
        serve(listener, argv[1], argv[2], total);
    close(listener);

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (void *)&addr, sizeof addr))
        die("connect");
    gnutls_certificate_credentials_t creds;
    gnutls_certificate_allocate_credentials(&creds); // no verification: our own server
    gnutls_session_t s;
    gnutls_init(&s, GNUTLS_CLIENT);
    gnutls_set_default_priority(s);
    gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, creds);
    gnutls_transport_set_int(s, fd);
    int rc = handshake(s);
    if (rc < 0)
        die_gnutls("handshake", rc);

    char *buf = malloc(read_size);
    if (buf == NULL)
        die("malloc");
    long got = 0, calls = 0;
    ssize_t n;
    double cpu0 = thread_cpu_ns(), t0 = now_ns();
    do {
        n = gnutls_record_recv(s, buf, read_size);
        calls++;
        if (n > 0)
            got += n;
    } while (n > 0);
    double t1 = now_ns(), cpu1 = thread_cpu_ns();
    if (n < 0)
        die_gnutls("gnutls_record_recv", (int)n);

    int status;
    if (waitpid(child, &status, 0) < 0)
        die("waitpid");
    printf("{\"pid\": %d, \"calls\": %ld, \"bytes\": %ld, \"ns_per_call\": %.1f, "
           "\"cpu_ns_per_call\": %.1f, \"child_status\": %d}\n",
           (int)getpid(), calls, got, (t1 - t0) / calls, (cpu1 - cpu0) / calls, status);
    gnutls_deinit(s);
    gnutls_certificate_free_credentials(creds);
    free(buf);
    close(fd);
    return got == total && status == 0 ? 0 : 1;
}
