/* Time N calls of one function of uprobe_kinds.S: `uprobe_kinds FUNCTION N`
 * prints the ns per call.  Driven by bench/uprobe_kinds.py. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <dlfcn.h>

typedef long (*fn_t)(int);

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s FUNCTION N\n", argv[0]);
        return 2;
    }
    fn_t fn = (fn_t)dlsym(RTLD_DEFAULT, argv[1]);
    if (!fn) {
        fprintf(stderr, "no %s\n", argv[1]);
        return 2;
    }
    long n = atol(argv[2]);
    for (long i = 0; i < n / 10; i++)
        fn(0);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        fn(0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / n);
    return 0;
}
