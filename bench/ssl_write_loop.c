// ssl_write_loop: time SSL_write over a loopback TLS 1.3 connection.
//
// The process forks its own TLS server (a child with a self-signed P-256
// certificate made at start-up), connects to it, then calls SSL_write in a
// loop and prints one JSON object with the per-call latency (or, in
// --duration mode, the rate it achieved).  It links against the system
// libssl.so.3, so uprobes attached to that file fire on every call.
//
// The server drains the connection with plain read() by default: it never
// decrypts, so it makes no SSL_* calls and no uprobe slows it down; the
// client's SSL_write latency is then not coloured by a server that fell
// behind.  --server-drain ssl makes it SSL_read instead.
//
// --echo: the server answers each write with the same number of bytes and the
// client SSL_reads them back, so both SSL_write and SSL_read are timed.
//
// --wait-stdin: print "READY <pid>" after the handshake and wait for a line on
// stdin before the timed loop, so a tracer can be attached to this very pid.
//
// Build: gcc -O2 -o ssl_write_loop ssl_write_loop.c -lssl -lcrypto
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PATTERN "tlscap-bench-payload "

struct options {
    long count;        // timed calls (latency mode)
    long warmup;       // untimed calls before them
    long size;         // bytes per SSL_write
    double duration;   // >0: rate mode, write for this many seconds
    double rate;       // rate mode: target calls/s (0 = flat out)
    int wait_stdin;
    int echo;
    int drain_ssl;
};

static void die(const char *what) {
    fprintf(stderr, "ssl_write_loop: %s: %s\n", what, errno ? strerror(errno) : "");
    ERR_print_errors_fp(stderr);
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void self_signed(EVP_PKEY **key_out, X509 **cert_out) {
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *cert = X509_new();
    if (!key || !cert)
        die("key generation");
    X509_set_version(cert, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
    X509_gmtime_adj(X509_getm_notBefore(cert), -60);
    X509_gmtime_adj(X509_getm_notAfter(cert), 86400);
    X509_set_pubkey(cert, key);
    X509_NAME *name = X509_get_subject_name(cert);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"localhost", -1,
                               -1, 0);
    X509_set_issuer_name(cert, name);
    if (!X509_sign(cert, key, EVP_sha256()))
        die("certificate signing");
    *key_out = key;
    *cert_out = cert;
}

static SSL_CTX *make_ctx(const SSL_METHOD *method) {
    SSL_CTX *ctx = SSL_CTX_new(method);
    if (!ctx)
        die("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    return ctx;
}

static int read_full(SSL *ssl, char *buf, long n) {
    long got = 0;
    while (got < n) {
        int r = SSL_read(ssl, buf + got, (int)(n - got));
        if (r <= 0)
            return -1;
        got += r;
    }
    return 0;
}

static void serve(int listener, const struct options *o) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the client
    EVP_PKEY *key;
    X509 *cert;
    self_signed(&key, &cert);
    SSL_CTX *ctx = make_ctx(TLS_server_method());
    if (SSL_CTX_use_certificate(ctx, cert) != 1 || SSL_CTX_use_PrivateKey(ctx, key) != 1)
        die("server certificate");
    int fd = accept(listener, NULL, NULL);
    if (fd < 0)
        die("accept");
    close(listener);
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_accept(ssl) != 1)
        die("SSL_accept");
    static char buf[1 << 16];
    if (o->echo) {
        char *msg = malloc(o->size);
        if (!msg)
            die("malloc");
        while (read_full(ssl, msg, o->size) == 0)
            if (SSL_write(ssl, msg, (int)o->size) <= 0)
                break;
    } else if (o->drain_ssl) {
        while (SSL_read(ssl, buf, sizeof(buf)) > 0) {
        }
    } else {
        // Ciphertext is thrown away unread by OpenSSL: no SSL_* call, no probe.
        // A high receive low-water mark wakes us once per 256 KiB rather than
        // once per record: fewer cross-CPU wake-ups disturbing the writer.
        int lowat = 256 << 10;
        setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof(lowat));
        for (;;) {
            ssize_t r = read(fd, buf, sizeof(buf));
            if (r == 0 || (r < 0 && errno != EINTR))
                break;
        }
    }
    _exit(0);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void print_latency(const char *name, uint64_t *t, long n) {
    qsort(t, n, sizeof(*t), cmp_u64);
    double sum = 0;
    for (long i = 0; i < n; i++)
        sum += (double)t[i];
    double median = n % 2 ? (double)t[n / 2] : ((double)t[n / 2 - 1] + (double)t[n / 2]) / 2;
    printf("\"%s\":{\"mean_ns\":%.1f,\"median_ns\":%.1f,\"min_ns\":%llu,\"p10_ns\":%llu,"
           "\"p90_ns\":%llu,\"p99_ns\":%llu,\"max_ns\":%llu}",
           name, sum / n, median, (unsigned long long)t[0], (unsigned long long)t[n / 10],
           (unsigned long long)t[n * 9 / 10], (unsigned long long)t[n * 99 / 100],
           (unsigned long long)t[n - 1]);
}

static void usage(void) {
    fprintf(stderr,
            "usage: ssl_write_loop [--count N] [--warmup N] [--size BYTES] [--duration S]\n"
            "                      [--rate CALLS_PER_S] [--echo] [--server-drain raw|ssl]\n"
            "                      [--wait-stdin]\n");
    exit(2);
}

static void parse(int argc, char **argv, struct options *o) {
    *o = (struct options){.count = 20000, .warmup = 1000, .size = 4096};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--wait-stdin")) {
            o->wait_stdin = 1;
        } else if (!strcmp(a, "--echo")) {
            o->echo = 1;
        } else if (!v) {
            usage();
        } else if (!strcmp(a, "--count")) {
            o->count = atol(v), i++;
        } else if (!strcmp(a, "--warmup")) {
            o->warmup = atol(v), i++;
        } else if (!strcmp(a, "--size")) {
            o->size = atol(v), i++;
        } else if (!strcmp(a, "--duration")) {
            o->duration = atof(v), i++;
        } else if (!strcmp(a, "--rate")) {
            o->rate = atof(v), i++;
        } else if (!strcmp(a, "--server-drain")) {
            if (!strcmp(v, "ssl"))
                o->drain_ssl = 1;
            else if (strcmp(v, "raw"))
                usage();
            i++;
        } else {
            usage();
        }
    }
    // SSL_write sends at most 16 KiB per record; larger writes loop inside it.
    if (o->count < 1 || o->warmup < 0 || o->size < 1 || o->size > (1 << 24) || o->rate < 0)
        usage();
}

int main(int argc, char **argv) {
    struct options o;
    parse(argc, argv, &o);
    signal(SIGPIPE, SIG_IGN);

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(addr);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof(addr)) != 0 ||
        listen(listener, 1) != 0 || getsockname(listener, (struct sockaddr *)&addr, &alen) != 0)
        die("listen");
    pid_t server = fork();
    if (server < 0)
        die("fork");
    if (server == 0)
        serve(listener, &o);
    close(listener);

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
        die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    SSL_CTX *ctx = make_ctx(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);  // our own self-signed server
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1)
        die("SSL_connect");

    char *msg = malloc(o.size);
    char *reply = malloc(o.size);
    if (!msg || !reply)
        die("malloc");
    for (long i = 0; i < o.size; i++)
        msg[i] = PATTERN[i % (sizeof(PATTERN) - 1)];

    if (o.wait_stdin) {
        printf("READY %d\n", (int)getpid());
        fflush(stdout);
        char line[64];
        if (!fgets(line, sizeof(line), stdin))
            die("stdin closed before go");
    }

    long calls = 0;
    uint64_t *wt = NULL, *rt = NULL;
    uint64_t start = 0, end = 0;
    if (o.duration > 0) {
        // Rate mode: as many calls as the duration allows, paced to --rate if given.
        start = now_ns();
        uint64_t stop = start + (uint64_t)(o.duration * 1e9);
        double gap = o.rate > 0 ? 1e9 / o.rate : 0;
        for (;;) {
            uint64_t t = now_ns();
            if (t >= stop)
                break;
            if (gap > 0) {
                uint64_t due = start + (uint64_t)(calls * gap);
                if (due > t + 20000) {
                    struct timespec ts = {.tv_sec = due / 1000000000ull,
                                          .tv_nsec = due % 1000000000ull};
                    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                }
            }
            if (SSL_write(ssl, msg, (int)o.size) != o.size)
                die("SSL_write");
            if (o.echo && read_full(ssl, reply, o.size) != 0)
                die("SSL_read");
            calls++;
        }
        end = now_ns();
    } else {
        wt = malloc(o.count * sizeof(*wt));
        rt = malloc(o.count * sizeof(*rt));
        if (!wt || !rt)
            die("malloc");
        for (long i = 0; i < o.warmup + o.count; i++) {
            if (i == o.warmup)
                start = now_ns();
            uint64_t t0 = now_ns();
            if (SSL_write(ssl, msg, (int)o.size) != o.size)
                die("SSL_write");
            uint64_t t1 = now_ns();
            if (o.echo && read_full(ssl, reply, o.size) != 0)
                die("SSL_read");
            uint64_t t2 = now_ns();
            if (i >= o.warmup) {
                wt[i - o.warmup] = t1 - t0;
                rt[i - o.warmup] = t2 - t1;
            }
            calls++;
        }
        end = now_ns();
    }

    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);
    int status = 0;
    waitpid(server, &status, 0);

    double secs = (double)(end - start) / 1e9;
    long timed = o.duration > 0 ? calls : o.count;
    printf("{\"pid\":%d,\"server_pid\":%d,\"size\":%ld,\"calls\":%ld,\"timed_calls\":%ld,"
           "\"bytes_written\":%ld,\"seconds\":%.6f,\"calls_per_s\":%.1f,\"mb_per_s\":%.3f,"
           "\"echo\":%s",
           (int)getpid(), (int)server, o.size, calls, timed, calls * o.size, secs,
           secs > 0 ? timed / secs : 0.0, secs > 0 ? timed * o.size / secs / 1e6 : 0.0,
           o.echo ? "true" : "false");
    if (wt) {
        printf(",");
        print_latency("ssl_write", wt, o.count);
        if (o.echo) {
            printf(",");
            print_latency("ssl_read", rt, o.count);
        }
    }
    printf("}\n");
    return 0;
}
