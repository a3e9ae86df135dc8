/* Memory read bandwidth probe for the decode roofline (decode reads every weight once per token).
 * Sums a buffer of MIB MiB (default 1024, far larger than any cache) with T threads (OpenMP), each
 * thread reading its own contiguous slice as 4 concurrent streams (one stream per core does not keep
 * enough loads in flight to saturate memory here: ~33 instead of ~50 GB/s on 2 threads), and prints
 * the best of R passes in GB/s (1e9 bytes/s). With AVX-512 the loads are explicit 64-byte vector loads
 * (gcc's auto-vectorized loop reaches only ~34 GB/s here).
 * Plain pages (no MADV_HUGEPAGE), as model weights mmapped from a file get.
 * Build and run (compare.py does this into its cache):
 *   cc -O3 -march=native -fopenmp scripts/bench/bandwidth.c -o bandwidth && ./bandwidth T [MIB] [R]
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 1024;
    int reps = argc > 3 ? atoi(argv[3]) : 10;
    size_t n = mib * 1024 * 1024 / sizeof(uint64_t);
    uint64_t *buf = aligned_alloc(64, n * sizeof(uint64_t));
    if (!buf || threads < 1) return 1;
    omp_set_num_threads(threads);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = i; /* first touch by the reading thread */
    double best = 1e30;
    uint64_t total = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = omp_get_wtime();
        uint64_t s = 0;
#pragma omp parallel reduction(+ : s)
        {
            size_t per = n / (size_t)omp_get_num_threads(), q = per / 4;
            const uint64_t *p = buf + per * (size_t)omp_get_thread_num();
#ifdef __AVX512F__
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (size_t i = 0; i + 8 <= q; i += 8) {
                a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
                a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + q + i));
                a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + 2 * q + i));
                a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + 3 * q + i));
            }
            uint64_t s0 = _mm512_reduce_add_epi64(a0), s1 = _mm512_reduce_add_epi64(a1);
            uint64_t s2 = _mm512_reduce_add_epi64(a2), s3 = _mm512_reduce_add_epi64(a3);
#else
            uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            for (size_t i = 0; i < q; i++) {
                s0 += p[i];
                s1 += p[q + i];
                s2 += p[2 * q + i];
                s3 += p[3 * q + i];
            }
#endif
            s += s0 + s1 + s2 + s3;
        }
        double t = omp_get_wtime() - t0;
        total += s;
        if (t < best) best = t;
    }
    printf("%.2f\n", (double)(n * sizeof(uint64_t)) / best / 1e9);
    fprintf(stderr, "threads %d, %zu MiB, best of %d (checksum %llu)\n", threads, mib, reps,
            (unsigned long long)total);
    free(buf);
    return 0;
}
