/* kvsplice native kernels: read bit-packed transform-coder codes without materialising them.

   A payload row (one token, one codec) is `nbytes` bytes holding k codes; code j (in the caller's
   order) is  ((row[byte[j]] | row[next[j]] << 8) >> shift[j]) & mask[j]  (kvsplice/codecs/packing.py:
   widths <= 8 bits, a code lies inside two bytes; next[j] is clamped inside the row).
   Rows are addressed as  base + b * stride_b + t * stride_p  (bytes), b < B, t < P.

   kv_unpack   codes -> float (B, P, k)                        (decode path: one matmul follows)
   kv_scores   s[b, r, t] = sum_j qa[b, r, j] * code[b, t, j]   qa (B, R, k), s (B, R, P)
   kv_weighted o[b, r, j] = sum_t  w[b, r, t] * code[b, t, j]   w  (B, R, P), o (B, R, k)

   Rows go in blocks of 8 (one 8-float vector): a block's codes are unpacked once, transposed
   (buf[j][8]: code j of the 8 rows), into a buffer that stays in L1; every query row r then uses it
   (GQA: a KV group's codes are read once for all its query heads). With AVX2 the unpack is one
   32-bit gather per code and block (8 rows at once); blocks whose 4-byte reads could pass the end of
   the codes tensor, and partial blocks, use the scalar unpack. Scores keep up to 12 query rows'
   accumulators in registers; weighted accumulates (R, k) vectors of 8 lanes and sums the lanes at the
   end. Threads (OpenMP) split the blocks; kv_weighted sums per-thread partials. float32 throughout;
   sums run in another order than torch's matmul (float tolerance, tests/test_native.py). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define TB 8
#define MAXR 12
typedef float v8 __attribute__((vector_size(32)));

typedef struct {
    const uint8_t *base;
    int64_t B, P, stride_b, stride_p, nbytes;
    const int32_t *byte, *next, *shift, *mask;
    int64_t k;
    const uint8_t *end; /* one past the last byte of the last row in memory */
} rows_t;

static rows_t make_rows(const uint8_t *base, int64_t B, int64_t P, int64_t sb, int64_t sp, int64_t nbytes,
                        const int32_t *byte, const int32_t *next, const int32_t *shift, const int32_t *mask, int64_t k) {
    rows_t c = {base, B, P, sb, sp, nbytes, byte, next, shift, mask, k, NULL};
    c.end = base + (B - 1) * sb + (P - 1) * sp + nbytes; /* strides are >= 0 (torch views of a payload) */
    return c;
}

static inline const uint8_t *row_at(const rows_t *c, int64_t b, int64_t t) {
    return c->base + b * c->stride_b + t * c->stride_p;
}

/* codes of rows t0 .. t0 + n - 1 (n <= 8) of sequence b into buf[j * 8 + i]; lanes i >= n are 0. */
static void unpack_block(const rows_t *c, int64_t b, int64_t t0, int64_t n, float *buf) {
    const int64_t k = c->k;
    const uint8_t *first = row_at(c, b, t0);
#ifdef __AVX2__
    if (n == TB && row_at(c, b, t0 + TB - 1) + c->nbytes + 3 <= c->end && c->stride_p * (TB - 1) < INT32_MAX) {
        const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)c->stride_p));
        for (int64_t j = 0; j < k; j++) {
            __m256i v = _mm256_i32gather_epi32((const int *)(first + c->byte[j]), idx, 1);
            v = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_set1_epi32(c->shift[j])), _mm256_set1_epi32(c->mask[j]));
            _mm256_storeu_ps(buf + j * TB, _mm256_cvtepi32_ps(v));
        }
        return;
    }
#endif
    for (int64_t i = 0; i < TB; i++) {
        const uint8_t *row = first + i * c->stride_p;
        for (int64_t j = 0; j < k; j++) {
            float f = 0.0f;
            if (i < n) {
                uint32_t v = ((uint32_t)row[c->byte[j]] | ((uint32_t)row[c->next[j]] << 8)) >> c->shift[j];
                f = (float)(v & (uint32_t)c->mask[j]);
            }
            buf[j * TB + i] = f;
        }
    }
}

static int64_t nblocks_of(int64_t P) { return (P + TB - 1) / TB; }

void kv_unpack(const uint8_t *base, int64_t B, int64_t P, int64_t stride_b, int64_t stride_p, int64_t nbytes,
               const int32_t *byte, const int32_t *next, const int32_t *shift, const int32_t *mask, int64_t k,
               float *out, int nthreads) {
    rows_t c = make_rows(base, B, P, stride_b, stride_p, nbytes, byte, next, shift, mask, k);
    const int64_t nb = nblocks_of(P), items = B * nb;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && items > 1)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(k * TB));
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            int64_t b = it / nb, t0 = (it % nb) * TB, n = P - t0 < TB ? P - t0 : TB;
            unpack_block(&c, b, t0, n, buf);
            float *o = out + (b * P + t0) * k;
            for (int64_t i = 0; i < n; i++)
                for (int64_t j = 0; j < k; j++) o[i * k + j] = buf[j * TB + i];
        }
        free(buf);
    }
}

/* s[r][t0 + i] = sum_j q[r][j] * buf[j][i] for NR (compile-time after inlining) query rows. */
static inline __attribute__((always_inline)) void score_rows(const float *buf, const float *q, int64_t k,
                                                            const int NR, float *out, int64_t P, int64_t n) {
    v8 acc[MAXR];
    for (int r = 0; r < NR; r++) acc[r] = (v8){0};
    for (int64_t j = 0; j < k; j++) {
        v8 cj;
        memcpy(&cj, buf + j * TB, sizeof cj);
        for (int r = 0; r < NR; r++) acc[r] += q[r * k + j] * cj;
    }
    for (int r = 0; r < NR; r++) memcpy(out + r * P, &acc[r], sizeof(float) * (size_t)n);
}

#define SCORE_CASE(N) case N: score_rows(buf, q, k, N, o, P, n); break;

void kv_scores(const uint8_t *base, int64_t B, int64_t P, int64_t stride_b, int64_t stride_p, int64_t nbytes,
               const int32_t *byte, const int32_t *next, const int32_t *shift, const int32_t *mask, int64_t k,
               const float *qa, int64_t R, float *out, int nthreads) {
    rows_t c = make_rows(base, B, P, stride_b, stride_p, nbytes, byte, next, shift, mask, k);
    const int64_t nb = nblocks_of(P), items = B * nb;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && items > 1)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(k * TB));
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            int64_t b = it / nb, t0 = (it % nb) * TB, n = P - t0 < TB ? P - t0 : TB;
            unpack_block(&c, b, t0, n, buf);
            for (int64_t r0 = 0; r0 < R; r0 += MAXR) {
                const float *q = qa + (b * R + r0) * k;
                float *o = out + (b * R + r0) * P + t0;
                switch (R - r0 < MAXR ? R - r0 : MAXR) {
                    SCORE_CASE(1) SCORE_CASE(2) SCORE_CASE(3) SCORE_CASE(4) SCORE_CASE(5) SCORE_CASE(6)
                    SCORE_CASE(7) SCORE_CASE(8) SCORE_CASE(9) SCORE_CASE(10) SCORE_CASE(11) SCORE_CASE(12)
                }
            }
        }
        free(buf);
    }
}

#define SB 4 /* kv_weighted: blocks per pass, so each accumulator load / store carries SB FMAs */

void kv_weighted(const uint8_t *base, int64_t B, int64_t P, int64_t stride_b, int64_t stride_p, int64_t nbytes,
                 const int32_t *byte, const int32_t *next, const int32_t *shift, const int32_t *mask, int64_t k,
                 const float *w, int64_t R, float *out, int nthreads) {
    rows_t c = make_rows(base, B, P, stride_b, stride_p, nbytes, byte, next, shift, mask, k);
    const int64_t nb = nblocks_of(P), ns = (nb + SB - 1) / SB;
    /* work item = (b, chunk of super-blocks of SB * 8 rows) with its own partial: (R, k) vectors of 8
       lanes (one per row of a block), summed over lanes and chunks at the end */
    const int64_t chunks = nthreads > 1 ? (ns < nthreads ? ns : nthreads) : 1;
    const int64_t items = B * chunks, per = (ns + chunks - 1) / chunks;
    const size_t part_bytes = sizeof(v8) * (size_t)(items * R * k);
    v8 *part = (v8 *)aligned_alloc(32, part_bytes); /* v8 loads / stores need 32-byte alignment */
    memset(part, 0, part_bytes);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && items > 1)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(SB * k * TB));
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            int64_t b = it / chunks, ch = it % chunks;
            v8 *acc = part + it * R * k;
            for (int64_t sblk = ch * per; sblk < (ch + 1) * per && sblk < ns; sblk++) {
                v8 wv[SB];
                int64_t t0 = sblk * SB * TB;
                for (int s = 0; s < SB; s++) { /* blocks past P: zero codes (their weights are zero too) */
                    int64_t ts = t0 + s * TB, n = P - ts < TB ? (P - ts > 0 ? P - ts : 0) : TB;
                    if (n > 0) unpack_block(&c, b, ts, n, buf + s * k * TB);
                    else memset(buf + s * k * TB, 0, sizeof(float) * (size_t)(k * TB));
                }
                for (int64_t r = 0; r < R; r++) {
                    const float *wr = w + (b * R + r) * P;
                    for (int s = 0; s < SB; s++) {
                        int64_t ts = t0 + s * TB, n = P - ts < TB ? (P - ts > 0 ? P - ts : 0) : TB;
                        wv[s] = (v8){0};
                        if (n > 0) memcpy(&wv[s], wr + ts, sizeof(float) * (size_t)n);
                    }
                    v8 *ar = acc + r * k;
                    for (int64_t j = 0; j < k; j++) {
                        v8 c0, c1, c2, c3;
                        memcpy(&c0, buf + j * TB, sizeof c0);
                        memcpy(&c1, buf + (k + j) * TB, sizeof c1);
                        memcpy(&c2, buf + (2 * k + j) * TB, sizeof c2);
                        memcpy(&c3, buf + (3 * k + j) * TB, sizeof c3);
                        ar[j] += (wv[0] * c0 + wv[1] * c1) + (wv[2] * c2 + wv[3] * c3);
                    }
                }
            }
        }
        free(buf);
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t x = 0; x < R * k; x++) {
            v8 s = part[(b * chunks) * R * k + x];
            for (int64_t ch = 1; ch < chunks; ch++) s += part[(b * chunks + ch) * R * k + x];
            out[b * R * k + x] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
        }
    free(part);
}
