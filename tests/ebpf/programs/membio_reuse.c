// membio_reuse: one SSL object over memory BIOs, reused (SSL_clear) for a second
// connection - what an event loop with its own TLS plumbing and a pool of SSL
// objects does.  The library never touches the sockets: this program moves the
// ciphertext between the BIOs and each connection's socket itself.
//
//   membio_reuse PORT ALPN1 FILE1 ALPN2 FILE2
//
// For i in 1, 2: connect to 127.0.0.1:PORT, handshake offering ALPNi ("http/1.1"
// or "h2"), SSL_write the bytes of FILEi, then SSL_read until the server has been
// quiet for a second (or closes), shut down and close the socket; then SSL_clear
// the same SSL* for the next one.  Prints one line per connection:
//   conn <i> local_port <p> sent <n> received <m>
// Build: gcc -O1 -o membio_reuse membio_reuse.c -lssl -lcrypto
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "membio_reuse: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

// Send what the library queued in the write BIO (its records) to the socket.
static void flush_out(int fd, BIO *wbio) {
    char buf[16384];
    int n;
    while ((n = BIO_read(wbio, buf, sizeof buf)) > 0) {
        for (int off = 0; off < n;) {
            ssize_t w = send(fd, buf + off, n - off, 0);
            if (w < 0)
                die("send");
            off += (int)w;
        }
    }
}

// Move what the socket has (waiting up to timeout_ms) into the read BIO; 0 at EOF
// or after a quiet timeout.
static int fill_in(int fd, BIO *rbio, int timeout_ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, timeout_ms) <= 0)
        return 0;
    char buf[16384];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0)
        return 0;
    BIO_write(rbio, buf, (int)n);
    return 1;
}

static char *read_file(const char *path, long *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        die("open input file");
    fseek(f, 0, SEEK_END);
    *len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = malloc(*len ? *len : 1);
    if (fread(data, 1, *len, f) != (size_t)*len)
        die("read input file");
    fclose(f);
    return data;
}

static void one_connection(SSL *ssl, BIO *rbio, BIO *wbio, int port, int idx,
                           const char *alpn, const char *path) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0)
        die("connect");
    struct sockaddr_in local;
    socklen_t len = sizeof local;
    getsockname(fd, (struct sockaddr *)&local, &len);

    unsigned char protos[32];
    size_t n = strlen(alpn);
    protos[0] = (unsigned char)n;
    memcpy(protos + 1, alpn, n);
    if (SSL_set_alpn_protos(ssl, protos, (unsigned)(n + 1)) != 0)
        die("SSL_set_alpn_protos");
    SSL_set_connect_state(ssl);
    for (;;) {
        int rc = SSL_do_handshake(ssl);
        flush_out(fd, wbio);
        if (rc == 1)
            break;
        if (SSL_get_error(ssl, rc) != SSL_ERROR_WANT_READ || !fill_in(fd, rbio, 5000))
            die("handshake");
    }

    long size;
    char *data = read_file(path, &size);
    if (SSL_write(ssl, data, (int)size) != size)
        die("SSL_write");
    flush_out(fd, wbio);
    free(data);

    long received = 0;
    char buf[16384];
    for (;;) {
        int r = SSL_read(ssl, buf, sizeof buf);
        if (r > 0) {
            received += r;
            flush_out(fd, wbio);  // HTTP/2: SETTINGS acks, window updates
            continue;
        }
        int err = SSL_get_error(ssl, r);
        flush_out(fd, wbio);
        if (err != SSL_ERROR_WANT_READ || !fill_in(fd, rbio, 1000))
            break;
    }
    SSL_shutdown(ssl);
    flush_out(fd, wbio);
    close(fd);
    printf("conn %d local_port %d sent %ld received %ld\n", idx, ntohs(local.sin_port), size,
           received);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: membio_reuse PORT ALPN1 FILE1 ALPN2 FILE2\n");
        return 2;
    }
    int port = atoi(argv[1]);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        die("SSL_CTX_new");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL *ssl = SSL_new(ctx);
    BIO *rbio = BIO_new(BIO_s_mem()), *wbio = BIO_new(BIO_s_mem());
    SSL_set_bio(ssl, rbio, wbio);  // the SSL owns both BIOs from here
    one_connection(ssl, rbio, wbio, port, 1, argv[2], argv[3]);
    // The same object, cleared, for the next connection; the BIOs stay, emptied.
    if (SSL_clear(ssl) != 1)
        die("SSL_clear");
    BIO_reset(rbio);
    BIO_reset(wbio);
    one_connection(ssl, rbio, wbio, port, 2, argv[4], argv[5]);
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    return 0;
}
