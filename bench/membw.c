/* The machine's read bandwidth for bench/peers.py's roofline: THREADS threads stream-read one buffer of MIB MiB
 * (far larger than the last-level cache), each its own contiguous share, summing it as 64-bit integers so the
 * reads cannot be elided; PASSES timed passes after one untimed pass, all threads starting each pass together.
 * Prints one JSON line: {"threads", "buffer_mib", "passes", "gbps_best", "gbps_median", "checksum"}.
 *
 *     cc -O3 -march=native -pthread -o membw bench/membw.c && ./membw THREADS MIB PASSES
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const uint64_t *p;
    size_t n;
    uint64_t sum;
} share_t;

static pthread_barrier_t start_barrier, end_barrier;
static int passes_total;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *reader(void *arg) {
    share_t *s = (share_t *)arg;
    for (int pass = 0; pass < passes_total; pass++) {
        pthread_barrier_wait(&start_barrier);
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;   /* four independent chains: the adds never limit the reads */
        size_t i = 0;
        for (; i + 4 <= s->n; i += 4) {
            a0 += s->p[i];
            a1 += s->p[i + 1];
            a2 += s->p[i + 2];
            a3 += s->p[i + 3];
        }
        for (; i < s->n; i++) a0 += s->p[i];
        s->sum += a0 + a1 + a2 + a3;
        pthread_barrier_wait(&end_barrier);
    }
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s THREADS MIB PASSES\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[1]), passes = atoi(argv[3]);
    size_t mib = strtoull(argv[2], NULL, 10);
    if (threads < 1 || threads > 1024 || passes < 1 || mib < 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    size_t bytes = mib << 20, n = bytes / sizeof(uint64_t);
    uint64_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, bytes)) {
        fprintf(stderr, "cannot allocate %zu MiB\n", mib);
        return 1;
    }
    for (size_t i = 0; i < n; i++) buf[i] = i;   /* every page written: resident, not the shared zero page */
    passes_total = passes + 1;
    pthread_barrier_init(&start_barrier, NULL, threads + 1);
    pthread_barrier_init(&end_barrier, NULL, threads + 1);
    pthread_t *tid = calloc(threads, sizeof(pthread_t));
    share_t *sh = calloc(threads, sizeof(share_t));
    size_t per = n / threads;
    for (int t = 0; t < threads; t++) {
        sh[t].p = buf + per * t;
        sh[t].n = t == threads - 1 ? n - per * t : per;
        pthread_create(&tid[t], NULL, reader, &sh[t]);
    }
    double *secs = calloc(passes, sizeof(double));
    for (int pass = 0; pass < passes_total; pass++) {
        pthread_barrier_wait(&start_barrier);
        double t0 = now();
        pthread_barrier_wait(&end_barrier);
        if (pass > 0) secs[pass - 1] = now() - t0;
    }
    uint64_t sum = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(tid[t], NULL);
        sum += sh[t].sum;
    }
    qsort(secs, passes, sizeof(double), cmp);
    printf("{\"threads\": %d, \"buffer_mib\": %zu, \"passes\": %d, \"gbps_best\": %.3f, \"gbps_median\": %.3f, "
           "\"checksum\": %llu}\n", threads, mib, passes, bytes / secs[0] / 1e9, bytes / secs[passes / 2] / 1e9,
           (unsigned long long)sum);
    return 0;
}
