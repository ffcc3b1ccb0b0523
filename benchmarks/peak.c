/* This CPU's arithmetic peak for the physical floor in bench_cpu_int8.py (issue 17).
 *
 *   gcc -O2 -mavx2 -mfma -pthread peak.c -o peak && ./peak THREADS SECONDS
 *
 * Prints one JSON line: G MAC/s with THREADS threads for
 *   fp32: vfmadd231ps on 12 independent 8-lane accumulators (8 MACs per instruction);
 *   int8: the AVX2 u8 x s8 dot-product sequence INT8 convolution kernels use without VNNI (oneDNN's avx2 path):
 *         vpmaddubsw (32 products -> 16 int16 pairs) + vpmaddwd with ones (-> 8 int32) + vpaddd, 8 chains;
 *         (6 accumulators from 3 x 2 distinct operand registers, as in a GEMM micro-kernel's register block);
 *   int8_add16: vpmaddubsw + vpaddw, accumulating in int16 (2 instructions per 32 MACs; it overflows, so no exact
 *         convolution uses it: an upper bound for any AVX2 INT8 kernel on this CPU).
 * Operands stay in registers: no loads, no stores, so this is the arithmetic ceiling, and MACs / peak is a floor
 * that no implementation can beat on this CPU.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double seconds_per_run = 1.0;
static volatile int sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define ITERS 4096L

static void *fp32(void *arg) {
    double *macs = arg;
    __m256 a = _mm256_set1_ps(1.0001f), b = _mm256_set1_ps(0.9999f);
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
           c9 = c0, c10 = c0, c11 = c0;
    long n = 0;
    double t0 = now();
    do {
        for (long i = 0; i < ITERS; i++) {
            c0 = _mm256_fmadd_ps(a, b, c0); c1 = _mm256_fmadd_ps(a, b, c1); c2 = _mm256_fmadd_ps(a, b, c2);
            c3 = _mm256_fmadd_ps(a, b, c3); c4 = _mm256_fmadd_ps(a, b, c4); c5 = _mm256_fmadd_ps(a, b, c5);
            c6 = _mm256_fmadd_ps(a, b, c6); c7 = _mm256_fmadd_ps(a, b, c7); c8 = _mm256_fmadd_ps(a, b, c8);
            c9 = _mm256_fmadd_ps(a, b, c9); c10 = _mm256_fmadd_ps(a, b, c10); c11 = _mm256_fmadd_ps(a, b, c11);
            __asm__ volatile("" : "+x"(c0), "+x"(c1), "+x"(c2), "+x"(c3), "+x"(c4), "+x"(c5));
            __asm__ volatile("" : "+x"(c6), "+x"(c7), "+x"(c8), "+x"(c9), "+x"(c10), "+x"(c11));
        }
        n += ITERS;
    } while (now() - t0 < seconds_per_run);
    double dt = now() - t0;
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                             _mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11)));
    sink = (int)_mm256_cvtss_f32(s);
    *macs = n * 12.0 * 8.0 / dt;
    return NULL;
}

static void *int8(void *arg) {
    double *macs = arg;
    __m256i a0 = _mm256_set1_epi8(3), a1 = _mm256_set1_epi8(5), a2 = _mm256_set1_epi8(7);
    __m256i b0 = _mm256_set1_epi8(-2), b1 = _mm256_set1_epi8(-3), ones = _mm256_set1_epi16(1);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
    long n = 0;
    double t0 = now();
    do {
        for (long i = 0; i < ITERS; i++) {
#define STEP(c, a, b) c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
            STEP(c0, a0, b0) STEP(c1, a0, b1) STEP(c2, a1, b0) STEP(c3, a1, b1) STEP(c4, a2, b0) STEP(c5, a2, b1)
#undef STEP
            __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(b0), "+x"(b1));
            __asm__ volatile("" : "+x"(c0), "+x"(c1), "+x"(c2), "+x"(c3), "+x"(c4), "+x"(c5));
        }
        n += ITERS;
    } while (now() - t0 < seconds_per_run);
    double dt = now() - t0;
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
                                 _mm256_add_epi32(c4, c5));
    sink = _mm256_extract_epi32(s, 0);
    *macs = n * 6.0 * 32.0 / dt;
    return NULL;
}

static void *int8_add16(void *arg) {
    double *macs = arg;
    __m256i a0 = _mm256_set1_epi8(3), a1 = _mm256_set1_epi8(5), a2 = _mm256_set1_epi8(7), a3 = _mm256_set1_epi8(9);
    __m256i b0 = _mm256_set1_epi8(-2), b1 = _mm256_set1_epi8(-3);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    long n = 0;
    double t0 = now();
    do {
        for (long i = 0; i < ITERS; i++) {
#define STEP(c, a, b) c = _mm256_add_epi16(c, _mm256_maddubs_epi16(a, b));
            STEP(c0, a0, b0) STEP(c1, a0, b1) STEP(c2, a1, b0) STEP(c3, a1, b1)
            STEP(c4, a2, b0) STEP(c5, a2, b1) STEP(c6, a3, b0) STEP(c7, a3, b1)
#undef STEP
            __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(b0), "+x"(b1));
            __asm__ volatile("" : "+x"(c0), "+x"(c1), "+x"(c2), "+x"(c3), "+x"(c4), "+x"(c5), "+x"(c6), "+x"(c7));
        }
        n += ITERS;
    } while (now() - t0 < seconds_per_run);
    double dt = now() - t0;
    __m256i s = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(c0, c1), _mm256_add_epi16(c2, c3)),
                                 _mm256_add_epi16(_mm256_add_epi16(c4, c5), _mm256_add_epi16(c6, c7)));
    sink = _mm256_extract_epi16(s, 0);
    *macs = n * 8.0 * 32.0 / dt;
    return NULL;
}

/* Best of three runs of `kernel` on `threads` threads at once; the sum of the threads' rates, in G MAC/s. */
static double measure(void *(*kernel)(void *), int threads) {
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        pthread_t tid[64];
        double rate[64];
        for (int t = 0; t < threads; t++) pthread_create(&tid[t], NULL, kernel, &rate[t]);
        double total = 0;
        for (int t = 0; t < threads; t++) {
            pthread_join(tid[t], NULL);
            total += rate[t];
        }
        if (total > best) best = total;
    }
    return best / 1e9;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (argc > 2) seconds_per_run = atof(argv[2]);
    if (threads < 1 || threads > 64) {
        fprintf(stderr, "peak: threads must be 1..64\n");
        return 2;
    }
    printf("{\"threads\": %d, \"fp32_gmacs\": %.2f, \"int8_gmacs\": %.2f, \"int8_add16_gmacs\": %.2f}\n",
           threads, measure(fp32, threads), measure(int8, threads), measure(int8_add16, threads));
    return 0;
}
