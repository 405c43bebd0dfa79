/* kvsplice native kernels: read bit-packed transform-coder codes without materialising them.

   A payload row (one token, one codec) is `nbytes` bytes holding k codes; code j (in the caller's
   order) is  ((row[byte[j]] | row[next[j]] << 8) >> shift[j]) & mask[j]  (kvsplice/codecs/packing.py:
   widths <= 8 bits, a code lies inside two bytes; next[j] is clamped inside the row).
   Rows are addressed as  base + b * stride_b + t * stride_p  (bytes), b < B, t < P.

   kv_unpack   codes -> float (B, P, k)                        (decode path: one matmul follows)
   kv_scores   s[b, r, t] = (sum_j qa[b, r, j] code[b, t, j] + qa[b, r, k]) g[b, t] + qa[b, r, k + 1]
               qa (B, R, k + 2): A q, then q . b and q . mu (kvsplice/coded_attention.py); s (B, R, P)
   kv_weighted o[b, r, j] = sum_t p[b, r, t] g[b, t] code[b, t, j]   (j < k), then
               o[b, r, k] = sum_t p[b, r, t] g[b, t],  o[b, r, k + 1] = sum_t p[b, r, t]
               p (B, R, P), o (B, R, k + 2): one matmul with [A; b; mu] finishes the weighted values
   g: per-row gains (B, P) float32, or NULL (all 1).

   Rows go in blocks of 8 (one 8-float vector): a block's bytes are transposed (8x8 byte transposes,
   SSE2), then each code of the 8 rows is one 16-byte load, two widenings, a shift and a mask (AVX2;
   a scalar loop otherwise), into a buffer that stays in L1 (buf[j][8]: code j of the 8 rows); every
   query row r then uses it (GQA: a KV group's codes are read once for all its query heads). Only
   bytes inside the rows are read. Scores keep up to 12 query rows' accumulators in registers;
   weighted accumulates (R, k) vectors of 8 lanes and sums the lanes at the end. Threads (OpenMP) split the blocks; kv_weighted sums per-thread partials. float32 throughout;
   sums run in another order than torch's matmul (float tolerance, tests/test_native.py). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#define TB 8
#define MAXR 12
typedef float v8 __attribute__((vector_size(32)));

typedef struct {
    const uint8_t *base;
    int64_t B, P, stride_b, stride_p, nbytes;
    const int32_t *byte, *next, *shift, *mask;
    int64_t k;
} rows_t;

static rows_t make_rows(const uint8_t *base, int64_t B, int64_t P, int64_t sb, int64_t sp, int64_t nbytes,
                        const int32_t *byte, const int32_t *next, const int32_t *shift, const int32_t *mask, int64_t k) {
    rows_t c = {base, B, P, sb, sp, nbytes, byte, next, shift, mask, k};
    return c;
}

static inline const uint8_t *row_at(const rows_t *c, int64_t b, int64_t t) {
    return c->base + b * c->stride_b + t * c->stride_p;
}

/* Bytes of 8 rows transposed: tb[byte * 8 + i] = row_i[byte] (rows i >= n read as zeros), then 16
   zero bytes, so that one 16-byte load at tb + byte * 8 holds a code's two bytes for all 8 rows.
   SSE2 8x8 byte transposes (unpack 8 -> 16 -> 32 bits), a scalar tail. */
static void transpose_rows(const uint8_t *rows[TB], int64_t nbytes, uint8_t *tb) {
    int64_t c0 = 0;
#ifdef __SSE2__
    for (; c0 + 8 <= nbytes; c0 += 8) {
        __m128i r[TB];
        for (int i = 0; i < TB; i++) r[i] = _mm_loadl_epi64((const __m128i *)(rows[i] + c0));
        __m128i a0 = _mm_unpacklo_epi8(r[0], r[1]), a1 = _mm_unpacklo_epi8(r[2], r[3]);
        __m128i a2 = _mm_unpacklo_epi8(r[4], r[5]), a3 = _mm_unpacklo_epi8(r[6], r[7]);
        __m128i b0 = _mm_unpacklo_epi16(a0, a1), b1 = _mm_unpackhi_epi16(a0, a1);
        __m128i b2 = _mm_unpacklo_epi16(a2, a3), b3 = _mm_unpackhi_epi16(a2, a3);
        uint8_t *o = tb + c0 * TB; /* bytes c0 .. c0 + 7, 8 lanes each */
        _mm_storeu_si128((__m128i *)(o + 0), _mm_unpacklo_epi32(b0, b2));
        _mm_storeu_si128((__m128i *)(o + 16), _mm_unpackhi_epi32(b0, b2));
        _mm_storeu_si128((__m128i *)(o + 32), _mm_unpacklo_epi32(b1, b3));
        _mm_storeu_si128((__m128i *)(o + 48), _mm_unpackhi_epi32(b1, b3));
    }
#endif
    for (; c0 < nbytes; c0++)
        for (int i = 0; i < TB; i++) tb[c0 * TB + i] = rows[i][c0];
    memset(tb + nbytes * TB, 0, 2 * TB);
}

/* codes of rows t0 .. t0 + n - 1 (n <= 8) of sequence b into buf[j * 8 + i]; lanes i >= n are 0.
   tb: scratch of (nbytes + 2) * 8 bytes; zero: nbytes zero bytes (the rows past n). */
static void unpack_block(const rows_t *c, int64_t b, int64_t t0, int64_t n, float *buf, uint8_t *tb, const uint8_t *zero) {
    const int64_t k = c->k;
    const uint8_t *rows[TB];
    for (int i = 0; i < TB; i++) rows[i] = i < n ? row_at(c, b, t0 + i) : zero;
    transpose_rows(rows, c->nbytes, tb);
#ifdef __AVX2__
    for (int64_t j = 0; j < k; j++) {
        /* next[j] is byte[j] + 1, or byte[j] for a code in a row's last byte (which never spans:
           its high byte is masked off either way) */
        __m128i x = _mm_loadu_si128((const __m128i *)(tb + c->byte[j] * TB));
        __m256i lo = _mm256_cvtepu8_epi32(x), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(x, 8));
        __m256i v = _mm256_or_si256(lo, _mm256_slli_epi32(hi, 8));
        v = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_set1_epi32(c->shift[j])), _mm256_set1_epi32(c->mask[j]));
        _mm256_storeu_ps(buf + j * TB, _mm256_cvtepi32_ps(v));
    }
#else
    for (int64_t j = 0; j < k; j++) {
        const uint8_t *lo = tb + c->byte[j] * TB, *hi = tb + c->next[j] * TB;
        for (int i = 0; i < TB; i++)
            buf[j * TB + i] = (float)((((uint32_t)lo[i] | ((uint32_t)hi[i] << 8)) >> c->shift[j]) & (uint32_t)c->mask[j]);
    }
#endif
}

static int64_t nblocks_of(int64_t P) { return (P + TB - 1) / TB; }

/* Per-thread scratch of the block kernels: unpacked codes (nfloat floats), transposed bytes, a zero row. */
typedef struct {
    float *buf;
    uint8_t *tb, *zero;
} scratch_t;

static int scratch_alloc(scratch_t *s, int64_t nfloat, int64_t nbytes) {
    s->buf = (float *)malloc(sizeof(float) * (size_t)nfloat);
    s->tb = (uint8_t *)malloc((size_t)((nbytes + 2) * TB));
    s->zero = (uint8_t *)calloc((size_t)nbytes + 1, 1);
    return s->buf != NULL && s->tb != NULL && s->zero != NULL;
}

static void scratch_free(scratch_t *s) {
    free(s->buf);
    free(s->tb);
    free(s->zero);
}

/* Runs fn on every block of 8 rows (b, t0, n <= 8 rows, their codes in buf[j * 8 + i]), blocks
   split over `nthreads` OpenMP threads, each with its own scratch. -1 when a scratch allocation
   failed (the Python side raises MemoryError). */
typedef void (*block_fn)(const rows_t *c, int64_t b, int64_t t0, int64_t n, const float *buf, void *ctx);

static int for_blocks(const rows_t *c, block_fn fn, void *ctx, int nthreads) {
    const int64_t nb = nblocks_of(c->P), items = c->B * nb;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && items > 1)
    {
        scratch_t sc;
        const int ok = scratch_alloc(&sc, c->k * TB, c->nbytes);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!ok) continue;
            int64_t b = it / nb, t0 = (it % nb) * TB, n = c->P - t0 < TB ? c->P - t0 : TB;
            unpack_block(c, b, t0, n, sc.buf, sc.tb, sc.zero);
            fn(c, b, t0, n, sc.buf, ctx);
        }
        scratch_free(&sc);
    }
    return failed ? -1 : 0;
}

static void unpack_to(const rows_t *c, int64_t b, int64_t t0, int64_t n, const float *buf, void *ctx) {
    const int64_t k = c->k;
    float *o = (float *)ctx + (b * c->P + t0) * k;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < k; j++) o[i * k + j] = buf[j * TB + i];
}

int kv_unpack(const uint8_t *base, int64_t B, int64_t P, int64_t stride_b, int64_t stride_p, int64_t nbytes,
              const int32_t *byte, const int32_t *next, const int32_t *shift, const int32_t *mask, int64_t k,
              float *out, int nthreads) {
    rows_t c = make_rows(base, B, P, stride_b, stride_p, nbytes, byte, next, shift, mask, k);
    return for_blocks(&c, unpack_to, out, nthreads);
}

/* s[r][t0 + i] = sum_j q[r][j] * buf[j][i] for NR (compile-time after inlining) query rows. */
static inline __attribute__((always_inline)) void score_rows(const float *buf, const float *q, int64_t k,
                                                            const int NR, v8 g, float *out, int64_t P, int64_t n) {
    const int64_t kq = k + 2; /* row stride of q: A q, q . b, q . mu */
    v8 acc[MAXR];
    for (int r = 0; r < NR; r++) acc[r] = (v8){0};
    for (int64_t j = 0; j < k; j++) {
        v8 cj;
        memcpy(&cj, buf + j * TB, sizeof cj);
        for (int r = 0; r < NR; r++) acc[r] += q[r * kq + j] * cj;
    }
    for (int r = 0; r < NR; r++) {
        v8 sr = (acc[r] + q[r * kq + k]) * g + q[r * kq + k + 1];
        memcpy(out + r * P, &sr, sizeof(float) * (size_t)n);
    }
}

#define SCORE_CASE(N) case N: score_rows(buf, q, k, N, g, o, P, n); break;

/* gains of rows t0 .. t0 + n - 1 as one vector (1 without gains, 0 past n) */
static inline v8 gains_of(const float *gain, int64_t b, int64_t P, int64_t t0, int64_t n) {
    v8 g = (v8){0};
    if (gain == NULL) {
        for (int64_t i = 0; i < n; i++) g[i] = 1.0f;
    } else {
        memcpy(&g, gain + b * P + t0, sizeof(float) * (size_t)n);
    }
    return g;
}

typedef struct {
    const float *qa, *gain;
    int64_t R;
    float *out;
} scores_ctx;

static void scores_of(const rows_t *c, int64_t b, int64_t t0, int64_t n, const float *buf, void *ctx) {
    const scores_ctx *x = (const scores_ctx *)ctx;
    const int64_t k = c->k, P = c->P, R = x->R;
    const v8 g = gains_of(x->gain, b, P, t0, n);
    for (int64_t r0 = 0; r0 < R; r0 += MAXR) {
        const float *q = x->qa + (b * R + r0) * (k + 2);
        float *o = x->out + (b * R + r0) * P + t0;
        switch (R - r0 < MAXR ? R - r0 : MAXR) {
            SCORE_CASE(1) SCORE_CASE(2) SCORE_CASE(3) SCORE_CASE(4) SCORE_CASE(5) SCORE_CASE(6)
            SCORE_CASE(7) SCORE_CASE(8) SCORE_CASE(9) SCORE_CASE(10) SCORE_CASE(11) SCORE_CASE(12)
        }
    }
}

int kv_scores(const uint8_t *base, int64_t B, int64_t P, int64_t stride_b, int64_t stride_p, int64_t nbytes,
              const int32_t *byte, const int32_t *next, const int32_t *shift, const int32_t *mask, int64_t k,
              const float *qa, int64_t R, const float *gain, float *out, int nthreads) {
    rows_t c = make_rows(base, B, P, stride_b, stride_p, nbytes, byte, next, shift, mask, k);
    scores_ctx x = {qa, gain, R, out};
    return for_blocks(&c, scores_of, &x, nthreads);
}

#define SB 4 /* kv_weighted: blocks per pass, so each accumulator load / store carries SB FMAs */

int kv_weighted(const uint8_t *base, int64_t B, int64_t P, int64_t stride_b, int64_t stride_p, int64_t nbytes,
                 const int32_t *byte, const int32_t *next, const int32_t *shift, const int32_t *mask, int64_t k,
                 const float *w, int64_t R, const float *gain, float *out, int nthreads) {
    rows_t c = make_rows(base, B, P, stride_b, stride_p, nbytes, byte, next, shift, mask, k);
    const int64_t nb = nblocks_of(P), ns = (nb + SB - 1) / SB;
    /* work item = (b, chunk of super-blocks of SB * 8 rows) with its own partial: (R, k) vectors of 8
       lanes (one per row of a block), summed over lanes and chunks at the end */
    int64_t chunks = nthreads > 1 ? (ns < nthreads ? ns : nthreads) : 1;
    if (chunks < 1) chunks = 1; /* P = 0: one empty chunk (the output is zeros) */
    const int64_t items = B * chunks, per = (ns + chunks - 1) / chunks;
    const int64_t ko = k + 2; /* partial / output row: the codes' sums, sum p g, sum p */
    const size_t part_bytes = sizeof(v8) * (size_t)(items * R * ko);
    v8 *part = (v8 *)aligned_alloc(32, part_bytes > 0 ? part_bytes : 32); /* v8 loads / stores need 32-byte alignment */
    if (part == NULL) return -1;
    memset(part, 0, part_bytes);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && items > 1)
    {
        scratch_t sc;
        const int ok = scratch_alloc(&sc, SB * k * TB, nbytes);
        float *buf = sc.buf;
        uint8_t *tb = sc.tb, *zero = sc.zero;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (!ok) continue;
            int64_t b = it / chunks, ch = it % chunks;
            v8 *acc = part + it * R * ko;
            for (int64_t sblk = ch * per; sblk < (ch + 1) * per && sblk < ns; sblk++) {
                v8 wv[SB], gv[SB];
                int64_t t0 = sblk * SB * TB;
                for (int s = 0; s < SB; s++) {
                    int64_t ts = t0 + s * TB, n = P - ts < TB ? (P - ts > 0 ? P - ts : 0) : TB;
                    gv[s] = gains_of(gain, b, P, ts, n);
                }
                for (int s = 0; s < SB; s++) { /* blocks past P: zero codes (their weights are zero too) */
                    int64_t ts = t0 + s * TB, n = P - ts < TB ? (P - ts > 0 ? P - ts : 0) : TB;
                    if (n > 0) unpack_block(&c, b, ts, n, buf + s * k * TB, tb, zero);
                    else memset(buf + s * k * TB, 0, sizeof(float) * (size_t)(k * TB));
                }
                for (int64_t r = 0; r < R; r++) {
                    const float *wr = w + (b * R + r) * P;
                    for (int s = 0; s < SB; s++) {
                        int64_t ts = t0 + s * TB, n = P - ts < TB ? (P - ts > 0 ? P - ts : 0) : TB;
                        wv[s] = (v8){0};
                        if (n > 0) memcpy(&wv[s], wr + ts, sizeof(float) * (size_t)n);
                    }
                    v8 *ar = acc + r * ko;
                    ar[k + 1] += (wv[0] + wv[1]) + (wv[2] + wv[3]); /* sum p */
                    for (int s = 0; s < SB; s++) wv[s] *= gv[s];   /* p g */
                    ar[k] += (wv[0] + wv[1]) + (wv[2] + wv[3]);     /* sum p g */
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
        scratch_free(&sc);
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t x = 0; x < R * ko; x++) {
            v8 s = part[(b * chunks) * R * ko + x];
            for (int64_t ch = 1; ch < chunks; ch++) s += part[(b * chunks + ch) * R * ko + x];
            out[b * R * ko + x] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
        }
    free(part);
    return failed ? -1 : 0;
}

/* Mid-rise quantisation and packing of N rows of k coefficients (the encode of one new row per
   step): code = min(max(floor((y + clip) / step), 0), top) (kvsplice/codecs/quant.midrise_codes,
   the same float32 operations, so the same codes; NaN -> 0), packed at (byte, shift) as
   packing.pack_fast does. y (N, k) contiguous; out (N, nbytes) is written whole. */
void kv_quant_pack(const float *y, int64_t N, int64_t k, const float *clip, const float *step, const float *top,
                   const int32_t *byte, const int32_t *shift, int64_t nbytes, uint8_t *out) {
    for (int64_t i = 0; i < N; i++) {
        const float *yi = y + i * k;
        uint8_t *o = out + i * nbytes;
        memset(o, 0, (size_t)nbytes);
        for (int64_t j = 0; j < k; j++) {
            float v = __builtin_floorf((yi[j] + clip[j]) / step[j]);
            if (!(v >= 0.0f)) v = 0.0f;
            if (v > top[j]) v = top[j];
            uint32_t c = (uint32_t)v << shift[j];
            o[byte[j]] |= (uint8_t)(c & 0xFF);
            if (c >> 8) o[byte[j] + 1] |= (uint8_t)(c >> 8);
        }
    }
}

/* ---- one decode step of one affine group, with the glue in C (kvsplice/coded_attention.py, q = 1,
   no raw rows: every row is in the payload; rows r = h * G + g, h < n heads of the group) ---------- */

/* s[b, r, t] = scaling * score, exact scores at the sink columns, -FLT_MAX where not allowed.
   sink_s (B, R, ns) exact sink scores (unscaled) or NULL; sink_col (B, ns) int64, -1 = empty slot;
   allowed (B, P) uint8 or NULL (all allowed). */
int kv_step_scores(const uint8_t *base, int64_t B, int64_t P, int64_t stride_b, int64_t stride_p, int64_t nbytes,
                   const int32_t *byte, const int32_t *next, const int32_t *shift, const int32_t *mask, int64_t k,
                   const float *qa, int64_t R, const float *gain, const float *sink_s, const int64_t *sink_col, int64_t ns,
                   const uint8_t *allowed, float scaling, float *out, int nthreads) {
    int rc = kv_scores(base, B, P, stride_b, stride_p, nbytes, byte, next, shift, mask, k, qa, R, gain, out, nthreads);
    if (rc != 0) return rc;
    for (int64_t b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++) {
            float *s = out + (b * R + r) * P;
            for (int64_t j = 0; sink_s != NULL && j < ns; j++) {
                int64_t c = sink_col[b * ns + j];
                if (c >= 0 && c < P) s[c] = sink_s[(b * R + r) * ns + j];
            }
            const uint8_t *a = allowed != NULL ? allowed + b * P : NULL;
            for (int64_t t = 0; t < P; t++) s[t] = (a != NULL && !a[t]) ? -3.40282347e+38f : s[t] * scaling;
        }
    return 0;
}

/* out[b, r, :] = sum_t p[b, r, t] x_t with the payload rows decoded as g_t (c_t A + b) + mu, except the
   sink columns, whose weight goes to the exact rows sink_v (B, n, ns, hd). p (B, R, P) is modified
   (sink columns zeroed). Aext (n, k + 2, hd) = [A; b; mu] per head; G = R / n query rows per head. */
int kv_step_values(const uint8_t *base, int64_t B, int64_t P, int64_t stride_b, int64_t stride_p, int64_t nbytes,
                   const int32_t *byte, const int32_t *next, const int32_t *shift, const int32_t *mask, int64_t k,
                   float *p, int64_t R, const float *gain, const int64_t *sink_col, int64_t ns, const float *sink_v,
                   const float *Aext, int64_t n, int64_t hd, float *out, int nthreads) {
    const int64_t G = R / n, ko = k + 2;
    float *ws = (float *)calloc((size_t)(B * R * (ns > 0 ? ns : 1)), sizeof(float));
    float *acc = (float *)malloc(sizeof(float) * (size_t)(B * R * ko));
    if (ws == NULL || acc == NULL) {
        free(ws);
        free(acc);
        return -1;
    }
    for (int64_t b = 0; b < B && sink_v != NULL; b++)
        for (int64_t j = 0; j < ns; j++) {
            int64_t c = sink_col[b * ns + j];
            if (c < 0 || c >= P) continue;
            for (int64_t r = 0; r < R; r++) {
                ws[(b * R + r) * ns + j] = p[(b * R + r) * P + c];
                p[(b * R + r) * P + c] = 0.0f;
            }
        }
    int rc = kv_weighted(base, B, P, stride_b, stride_p, nbytes, byte, next, shift, mask, k, p, R, gain, acc, nthreads);
    if (rc == 0)
        for (int64_t b = 0; b < B; b++)
            for (int64_t r = 0; r < R; r++) {
                const int64_t h = r / G;
                float *o = out + (b * R + r) * hd;
                const float *ar = acc + (b * R + r) * ko, *Ah = Aext + h * ko * hd;
                for (int64_t d = 0; d < hd; d++) o[d] = 0.0f;
                for (int64_t j = 0; j < ko; j++) {
                    const float w = ar[j], *row = Ah + j * hd;
                    for (int64_t d = 0; d < hd; d++) o[d] += w * row[d];
                }
                for (int64_t j = 0; sink_v != NULL && j < ns; j++) {
                    const float w = ws[(b * R + r) * ns + j], *row = sink_v + ((b * n + h) * ns + j) * hd;
                    for (int64_t d = 0; d < hd; d++) o[d] += w * row[d];
                }
            }
    free(ws);
    free(acc);
    return rc;
}
