/* A GnuTLS client reading its response on a non-blocking socket, alternating
 * gnutls_record_recv and gnutls_record_recv_seq, for tests/ebpf/test_gnutls_placement.py.
 *
 *     gnutls_nonblocking HOST PORT PRIORITY
 *
 * Sends one HTTP request, then reads into a 1000-byte buffer until the peer's
 * close_notify.  It prints "waiting" after its first GNUTLS_E_AGAIN (the test
 * then lets the server answer), and at the end one JSON line: its pid, socket
 * fd, the size of every read that returned data (in order), the sha256 of all
 * it read, how many reads returned GNUTLS_E_AGAIN, the calls of each function
 * and the last return code.  gnutls_bye(GNUTLS_SHUT_RDWR) at the end reads an
 * alert record through the same internal function.
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHECK(x)                                                            \
    do {                                                                    \
        int rc_ = (x);                                                      \
        if (rc_ < 0) {                                                      \
            fprintf(stderr, "%s: %s\n", #x, gnutls_strerror(rc_));          \
            exit(1);                                                        \
        }                                                                   \
    } while (0)

static void wait_for(int fd, short events) {
    struct pollfd p = {.fd = fd, .events = events};
    if (poll(&p, 1, 10000) != 1) {
        fprintf(stderr, "poll timed out\n");
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s HOST PORT PRIORITY\n", argv[0]);
        return 2;
    }
    gnutls_certificate_credentials_t cred;
    gnutls_session_t session;
    CHECK(gnutls_global_init());
    CHECK(gnutls_certificate_allocate_credentials(&cred));
    CHECK(gnutls_init(&session, GNUTLS_CLIENT));
    CHECK(gnutls_priority_set_direct(session, argv[3], NULL));
    CHECK(gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, cred));

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        perror("connect");
        return 1;
    }
    gnutls_transport_set_int(session, fd);
    int rc;
    do {
        rc = gnutls_handshake(session);
    } while (rc < 0 && !gnutls_error_is_fatal(rc));
    CHECK(rc);

    const char request[] = "GET /gnutls-nonblocking HTTP/1.1\r\nHost: localhost\r\n\r\n";
    CHECK(gnutls_record_send(session, request, sizeof(request) - 1));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);

    size_t cap = 1 << 16, got = 0, nsizes = 0;
    unsigned char *all = malloc(cap);
    long *sizes = malloc(sizeof(long) * 4096);
    char buf[1000];
    unsigned char seq[8];
    long eagain = 0, calls_recv = 0, calls_seq = 0, last = 0;
    for (long i = 0;; i++) {
        ssize_t n;
        if (i % 2 == 0) {
            n = gnutls_record_recv(session, buf, sizeof(buf));
            calls_recv++;
        } else {
            n = gnutls_record_recv_seq(session, buf, sizeof(buf), seq);
            calls_seq++;
        }
        last = n;
        if (n == GNUTLS_E_AGAIN) {
            if (eagain++ == 0) {
                printf("waiting\n");
                fflush(stdout);
            }
            wait_for(fd, POLLIN);
            continue;
        }
        if (n == 0)
            break;  // close_notify
        if (n < 0) {
            if (gnutls_error_is_fatal(n))
                break;
            continue;
        }
        if (got + n > cap) {
            cap *= 2;
            all = realloc(all, cap);
        }
        memcpy(all + got, buf, n);
        got += n;
        if (nsizes < 4096)
            sizes[nsizes++] = n;
    }
    do {
        rc = gnutls_bye(session, GNUTLS_SHUT_RDWR);
        if (rc == GNUTLS_E_AGAIN)
            wait_for(fd, POLLIN | POLLOUT);
    } while (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED);

    unsigned char digest[32];
    CHECK(gnutls_hash_fast(GNUTLS_DIG_SHA256, all, got, digest));
    printf("{\"pid\": %d, \"fd\": %d, \"sha256\": \"", getpid(), fd);
    for (int i = 0; i < 32; i++)
        printf("%02x", digest[i]);
    printf("\", \"bytes\": %zu, \"sizes\": [", got);
    for (size_t i = 0; i < nsizes; i++)
        printf("%s%ld", i ? ", " : "", sizes[i]);
    printf("], \"eagain\": %ld, \"recv\": %ld, \"recv_seq\": %ld, \"last\": %ld, "
           "\"version\": \"%s\"}\n",
           eagain, calls_recv, calls_seq, last,
           gnutls_protocol_get_name(gnutls_protocol_get_version(session)));
    close(fd);
    gnutls_deinit(session);
    gnutls_certificate_free_credentials(cred);
    gnutls_global_deinit();
    return 0;
}
