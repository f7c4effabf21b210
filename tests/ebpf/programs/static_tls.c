// static_tls: OpenSSL linked statically into the executable, for `tlscap targets`.
// Built twice by the tests, with and without symbols: the first is traceable (SSL_read
// and SSL_write are in .symtab), the stripped one is not.  Prints "ready <version>" and
// waits to be killed.
#include <openssl/ssl.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl = SSL_new(ctx);
    if (argc > 1) {
        char b[1] = {0};
        SSL_write(ssl, b, 1);
        SSL_read(ssl, b, 1);
    }
    printf("ready %s\n", OpenSSL_version(OPENSSL_VERSION));
    fflush(stdout);
    pause();
    return 0;
}
