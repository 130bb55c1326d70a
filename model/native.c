/* gruflow's compiled helpers, loaded by model/native.py with ctypes:
   - gf_topk / gf_topk_avx2: the int8 pre-filtered exact top-K of model/topk.py (x86-64 with AVX-512 VNNI,
     or with AVX2 and FMA: same bound, same answers);
   - gf_encode: the recommendation JSON documents of a batch (stream/pipeline/processor.py; any platform).

   gf_topk computes the int8 pre-filtered exact top-K in one pass per row.

   Why: in torch the int8 product writes a [rows, items] int32 matrix (80 KB per row at 20,000 items) that
   block maxima, a top-k and gathers then read back; those passes cost more than the product. Here the
   product is computed 32 items (one block) at a time in registers and most blocks are dropped at once:
   a block is kept only while it can still reach the row's threshold, which only rises as the pass goes on.

   The bound is Int8Prefilter's (model/topk.py): every item of the exact top-k has an approximation
   I >= tau - 2 eps, tau being the k-th best block maximum of the approximations. During the pass, the
   k-th best block maximum SO FAR is at most the final tau, so a block whose maximum is below (k-th best
   so far) - 2 eps cannot hold a top-k item and needs no storing. Kept blocks are re-checked against
   the final threshold, their items above it re-scored in float32, and the best k of those returned.

   vpdpbusd multiplies unsigned by signed bytes: the item codes are stored + 128 (unsigned) and the hidden
   state's codes stay signed, so every approximation of a row carries the same offset, 128 * sum(x codes);
   the threshold is computed from the same offset values, so comparisons are unchanged.

   Built and loaded by model/native.py; rows it cannot prove (too many candidates, too few valid items)
   are left to the caller's float32 path (ok[row] = 0). */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define GROUP 16                 /* items per vector lane group */
#define BLOCK 32                 /* items per block: two groups */
#define ROWS 8                   /* rows computed together (each code vector is used ROWS times) */
#define ROWS2 2                  /* the same for the AVX2 pass (16 registers, not 32) */
#define MASKED (-(1 << 30))      /* accumulator start of retired and padding items */
#define INVALID (-(1 << 29))     /* a block maximum below this holds no valid item */
/* the functions of one instruction set run only where its gf_supported* said yes */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define AVX2 __attribute__((target("avx2,fma")))
/* the per-block bookkeeping shared by both passes, inlined into each: as calls out of the AVX-512 pass they
   halved its rate (its accumulators then went through memory around every call) */
#define INLINE __attribute__((always_inline)) inline

int gf_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vnni");
}

int gf_supported_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* the k best block maxima so far, as a binary min-heap: heap[0] is the k-th best once full */
typedef struct {
    int32_t *v;
    int n, k;
} Heap;

INLINE static void heap_push(Heap *h, int32_t value) {
    if (h->n < h->k) {
        int i = h->n++;
        while (i > 0) {
            int p = (i - 1) / 2;
            if (h->v[p] <= value) break;
            h->v[i] = h->v[p];
            i = p;
        }
        h->v[i] = value;
        return;
    }
    if (value <= h->v[0]) return;
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, s = i;
        int32_t sv = value;
        if (l < h->n && h->v[l] < sv) { s = l; sv = h->v[l]; }
        if (r < h->n && h->v[r] < sv) { s = r; sv = h->v[r]; }
        if (s == i) break;
        h->v[i] = h->v[s];
        i = s;
    }
    h->v[i] = value;
}

/* threshold implied by the heap: below it no block can matter (INT32_MIN while fewer than k blocks) */
INLINE static int32_t threshold(const Heap *h, double eps2) {
    if (h->n < h->k) return INT32_MIN;
    double t = ceil((double)h->v[0] - eps2);
    if (!(t > (double)INT32_MIN)) return INT32_MIN;  /* also NaN */
    if (t > (double)INT32_MAX) return INT32_MAX;
    return (int32_t)t;
}

/* per-row state of the pass: heap, kept blocks (their ids, maxima and 32 approximations) */
typedef struct {
    Heap heap;
    int32_t thr;
    double eps2;
    int kept, cap, overflow;
    int32_t *block_id, *block_max, *scores;
} Row;

INLINE static void keep_block(Row *row, int32_t block, int32_t bmax, const int32_t *s) {
    if (row->kept == row->cap) {  /* full: drop what the risen threshold has ruled out */
        int w = 0;
        for (int i = 0; i < row->kept; i++) {
            if (row->block_max[i] >= row->thr) {
                if (w != i) {
                    row->block_id[w] = row->block_id[i];
                    row->block_max[w] = row->block_max[i];
                    memcpy(row->scores + (size_t)w * BLOCK, row->scores + (size_t)i * BLOCK, BLOCK * 4);
                }
                w++;
            }
        }
        row->kept = w;
        if (w == row->cap) { row->overflow = 1; return; }
    }
    int i = row->kept++;
    row->block_id[i] = block;
    row->block_max[i] = bmax;
    memcpy(row->scores + (size_t)i * BLOCK, s, BLOCK * 4);
}

/* a block's maximum seen by a row: into the heap, the threshold raised; whether the block is worth keeping */
INLINE static int offer_max(Row *row, int32_t bmax) {
    heap_push(&row->heap, bmax);
    row->thr = threshold(&row->heap, row->eps2);
    return bmax >= row->thr && !row->overflow;
}

AVX512
static void pass512(const uint8_t *codes, const int32_t *init, int nblocks, int kw4,
                    const int8_t *xq, int width, Row *rows, int nrows) {
    for (int blk = 0; blk < nblocks; blk++) {
        const uint8_t *c0 = codes + (size_t)(2 * blk) * kw4 * 64;
        const uint8_t *c1 = c0 + (size_t)kw4 * 64;
        __m512i i0 = _mm512_loadu_si512((const void *)(init + (size_t)blk * BLOCK));
        __m512i i1 = _mm512_loadu_si512((const void *)(init + (size_t)blk * BLOCK + GROUP));
        for (int r0 = 0; r0 < nrows; r0 += ROWS) {
            /* named accumulators: with arrays, gcc copied every accumulator once per step */
            __m512i a00 = i0, a01 = i1, a10 = i0, a11 = i1, a20 = i0, a21 = i1, a30 = i0, a31 = i1;
            __m512i a40 = i0, a41 = i1, a50 = i0, a51 = i1, a60 = i0, a61 = i1, a70 = i0, a71 = i1;
            const int8_t *x = xq + (size_t)r0 * width;
            for (int q = 0; q < kw4; q++) {
                __m512i v0 = _mm512_loadu_si512((const void *)(c0 + (size_t)q * 64));
                __m512i v1 = _mm512_loadu_si512((const void *)(c1 + (size_t)q * 64));
#define STEP(r, A0, A1) do { int32_t w_; memcpy(&w_, x + (size_t)(r) * width + 4 * q, 4); \
                __m512i b_ = _mm512_set1_epi32(w_); \
                A0 = _mm512_dpbusd_epi32(A0, v0, b_); A1 = _mm512_dpbusd_epi32(A1, v1, b_); } while (0)
                STEP(0, a00, a01);
                STEP(1, a10, a11);
                STEP(2, a20, a21);
                STEP(3, a30, a31);
                STEP(4, a40, a41);
                STEP(5, a50, a51);
                STEP(6, a60, a61);
                STEP(7, a70, a71);
#undef STEP
            }
            __m512i a0[ROWS] = {a00, a10, a20, a30, a40, a50, a60, a70};
            __m512i a1[ROWS] = {a01, a11, a21, a31, a41, a51, a61, a71};
            int live = nrows - r0 < ROWS ? nrows - r0 : ROWS;
            for (int r = 0; r < live; r++) {
                Row *row = rows + r0 + r;
                __m512i mx = _mm512_max_epi32(a0[r], a1[r]);
                if (!_mm512_cmpge_epi32_mask(mx, _mm512_set1_epi32(row->thr))) continue;
                int32_t bmax = _mm512_reduce_max_epi32(mx);
                if (!offer_max(row, bmax)) continue;
                int32_t s[BLOCK];
                _mm512_storeu_si512((void *)s, a0[r]);
                _mm512_storeu_si512((void *)(s + GROUP), a1[r]);
                keep_block(row, blk, bmax, s);
            }
        }
    }
}

/* AVX2 has no vpdpbusd, and vpmaddubsw adds its pairs of u8 x s8 products in 16 bits with saturation.
   The codes of the hidden state and of the items are both in [-127, 127] (the +128 of the stored item
   codes is taken off again here), so the sign of each hidden code is moved onto the item code
   (vpsignb) and vpmaddubsw multiplies |x| <= 127 by it: a pair sums to at most 2 * 127 * 127 = 32,258,
   which cannot saturate; vpmaddwd then adds the pairs into 32 bits. The products are exact, the
   approximations those of the AVX-512 pass without its offset, and thresholds come from the same values. */
AVX2
static void pass256(const uint8_t *codes, const int32_t *init, int nblocks, int kw4,
                    const int8_t *xq, int width, Row *rows, int nrows) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    for (int blk = 0; blk < nblocks; blk++) {
        const uint8_t *c0 = codes + (size_t)(2 * blk) * kw4 * 64;
        const uint8_t *c1 = c0 + (size_t)kw4 * 64;
        const int32_t *ib = init + (size_t)blk * BLOCK;
        __m256i i0 = _mm256_loadu_si256((const __m256i *)ib), i1 = _mm256_loadu_si256((const __m256i *)(ib + 8));
        __m256i i2 = _mm256_loadu_si256((const __m256i *)(ib + 16)), i3 = _mm256_loadu_si256((const __m256i *)(ib + 24));
        for (int r0 = 0; r0 < nrows; r0 += ROWS2) {
            __m256i a00 = i0, a01 = i1, a02 = i2, a03 = i3, a10 = i0, a11 = i1, a12 = i2, a13 = i3;
            const int8_t *x = xq + (size_t)r0 * width;
            for (int q = 0; q < kw4; q++) {
                __m256i v0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(c0 + (size_t)q * 64)), flip);
                __m256i v1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(c0 + (size_t)q * 64 + 32)), flip);
                __m256i v2 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(c1 + (size_t)q * 64)), flip);
                __m256i v3 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(c1 + (size_t)q * 64 + 32)), flip);
#define MAC(A, V, B, AB) A = _mm256_add_epi32(A, _mm256_madd_epi16(_mm256_maddubs_epi16(AB, _mm256_sign_epi8(V, B)), ones))
#define STEP(r, A0, A1, A2, A3) do { int32_t w_; memcpy(&w_, x + (size_t)(r) * width + 4 * q, 4); \
                __m256i b_ = _mm256_set1_epi32(w_), ab_ = _mm256_abs_epi8(b_); \
                MAC(A0, v0, b_, ab_); MAC(A1, v1, b_, ab_); MAC(A2, v2, b_, ab_); MAC(A3, v3, b_, ab_); } while (0)
                STEP(0, a00, a01, a02, a03);
                STEP(1, a10, a11, a12, a13);
#undef STEP
#undef MAC
            }
            __m256i acc[ROWS2][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}};
            int live = nrows - r0 < ROWS2 ? nrows - r0 : ROWS2;
            for (int r = 0; r < live; r++) {
                Row *row = rows + r0 + r;
                __m256i mx = _mm256_max_epi32(_mm256_max_epi32(acc[r][0], acc[r][1]),
                                              _mm256_max_epi32(acc[r][2], acc[r][3]));
                __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32(row->thr), mx);
                if (_mm256_movemask_epi8(below) == -1) continue;  /* every item below the threshold */
                int32_t s[BLOCK];
                for (int j = 0; j < 4; j++) _mm256_storeu_si256((__m256i *)(s + 8 * j), acc[r][j]);
                int32_t bmax = s[0];
                for (int j = 1; j < BLOCK; j++) bmax = s[j] > bmax ? s[j] : bmax;
                if (offer_max(row, bmax)) keep_block(row, blk, bmax, s);
            }
        }
    }
}

AVX512
static float dot512(const float *a, const float *b, int h) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= h; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < h) {
        __mmask16 m = (__mmask16)((1u << (h - i)) - 1u);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

AVX2
static float dot256(const float *a, const float *b, int h) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= h; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; i < h; i++) sum += a[i] * b[i];
    return sum;
}

typedef void (*PassFn)(const uint8_t *, const int32_t *, int, int, const int8_t *, int, Row *, int);
typedef float (*DotFn)(const float *, const float *, int);

/* Top-k of rows [0, m) of x ([m, h] float32). codes: [nblocks*2][kw4][16][4] unsigned item codes; init:
   [nblocks*32] accumulator starts (0, or MASKED for retired and padding items); W: [n, h] float32, b: [n].
   The int8 codes of a row are x * 127 rounded for the h hidden columns, then the constant columns (127
   for the n_coarse bias columns, 1 for the fine one), then zeros up to width = 4 * kw4.
   Writes items/values ([m, k], best first) and ok[m]; returns the number of rows proven. */
INLINE static int topk_run(PassFn pass, DotFn dot, const uint8_t *codes, const int32_t *init, int nblocks, int kw4,
                    const float *W, const float *b, int n, int h, int n_coarse,
                    double w_norm, double e_norm, double fp_slack,
                    const float *x, int m, int k, int max_candidates, int block_cap,
                    int64_t *items, float *values, uint8_t *ok) {
    int width = 4 * kw4;
    if (k < 1 || h + n_coarse + 1 > width || m <= 0) return 0;
    int8_t *xq = calloc((size_t)(m + ROWS) * width, 1);
    Row *rows = calloc((size_t)m, sizeof(Row));
    int32_t *heaps = malloc((size_t)m * k * sizeof(int32_t));
    int32_t *ids = malloc((size_t)m * block_cap * sizeof(int32_t));
    int32_t *maxima = malloc((size_t)m * block_cap * sizeof(int32_t));
    int32_t *scores = malloc((size_t)m * block_cap * BLOCK * sizeof(int32_t));
    int32_t *cand = malloc((size_t)max_candidates * sizeof(int32_t));
    float *exact = malloc((size_t)max_candidates * sizeof(float));
    int proven = 0;
    if (!xq || !rows || !heaps || !ids || !maxima || !scores || !cand || !exact) goto done;

    for (int r = 0; r < m; r++) {
        const float *xr = x + (size_t)r * h;
        int8_t *q = xq + (size_t)r * width;
        double d2 = 0.0, q2 = 0.0;
        for (int j = 0; j < h; j++) {
            double v = (double)xr[j] * 127.0;
            double c = nearbyint(v);
            if (c > 127.0) c = 127.0;
            if (c < -127.0) c = -127.0;
            if (!isfinite(v)) c = 0.0, v = INFINITY;
            q[j] = (int8_t)c;
            d2 += (v - c) * (v - c);
            q2 += c * c;
        }
        for (int j = 0; j < n_coarse; j++) q[h + j] = 127;
        q[h + n_coarse] = 1;
        double eps = sqrt(d2) * w_norm + sqrt(q2) * e_norm + 0.5 + fp_slack;
        Row *row = rows + r;
        row->heap.v = heaps + (size_t)r * k;
        row->heap.k = k;
        row->thr = INT32_MIN;
        row->eps2 = 2.0 * eps;
        row->cap = block_cap;
        row->block_id = ids + (size_t)r * block_cap;
        row->block_max = maxima + (size_t)r * block_cap;
        row->scores = scores + (size_t)r * block_cap * BLOCK;
        if (!isfinite(eps)) row->overflow = 1;
    }

    pass(codes, init, nblocks, kw4, xq, width, rows, m);

    for (int r = 0; r < m; r++) {
        Row *row = rows + r;
        ok[r] = 0;
        if (row->overflow || row->heap.n < k || row->heap.v[0] <= INVALID || row->thr == INT32_MIN) continue;
        int32_t thr = row->thr;
        int nc = 0, full = 0;
        for (int i = 0; i < row->kept && !full; i++) {
            if (row->block_max[i] < thr) continue;
            const int32_t *s = row->scores + (size_t)i * BLOCK;
            for (int j = 0; j < BLOCK; j++) {
                if (s[j] < thr) continue;
                int32_t item = row->block_id[i] * BLOCK + j;
                if (item >= n) continue;
                if (nc == max_candidates) { full = 1; break; }
                cand[nc++] = item;
            }
        }
        if (full || nc < k) continue;
        const float *xr = x + (size_t)r * h;
        for (int i = 0; i < nc; i++) exact[i] = dot(xr, W + (size_t)cand[i] * h, h) + b[cand[i]];
        /* the k best, best first (ties: lower item first), by insertion into the output row */
        int64_t *it = items + (size_t)r * k;
        float *va = values + (size_t)r * k;
        int filled = 0;
        for (int i = 0; i < nc; i++) {
            float v = exact[i];
            int32_t c = cand[i];
            if (filled == k && !(v > va[k - 1] || (v == va[k - 1] && c < it[k - 1]))) continue;
            int p = filled < k ? filled++ : k - 1;
            while (p > 0 && (va[p - 1] < v || (va[p - 1] == v && it[p - 1] > c))) {
                va[p] = va[p - 1];
                it[p] = it[p - 1];
                p--;
            }
            va[p] = v;
            it[p] = c;
        }
        ok[r] = 1;
        proven++;
    }
done:
    free(xq); free(rows); free(heaps); free(ids); free(maxima); free(scores); free(cand); free(exact);
    return proven;
}

#define TOPK_PARAMS const uint8_t *codes, const int32_t *init, int nblocks, int kw4, \
    const float *W, const float *b, int n, int h, int n_coarse, double w_norm, double e_norm, double fp_slack, \
    const float *x, int m, int k, int max_candidates, int block_cap, int64_t *items, float *values, uint8_t *ok
#define TOPK_ARGS codes, init, nblocks, kw4, W, b, n, h, n_coarse, w_norm, e_norm, fp_slack, x, m, k, \
    max_candidates, block_cap, items, values, ok

/* topk_run inlined into each, with its own pass and dot product inlined too */
AVX512 int gf_topk(TOPK_PARAMS) { return topk_run(pass512, dot512, TOPK_ARGS); }
AVX2 int gf_topk_avx2(TOPK_PARAMS) { return topk_run(pass256, dot256, TOPK_ARGS); }

#else /* not x86-64: no top-K kernel */
int gf_supported(void) { return 0; }
int gf_supported_avx2(void) { return 0; }
int gf_topk(void) { return 0; }
int gf_topk_avx2(void) { return 0; }
#endif

/* The recommendation documents of a batch, written one after the other into out (offsets in off[0..n]).
   Event i's document is heads[i] + its items + mid + ts[i] + tail, where heads[i] is
   '{"user_id":<JSON id>,"items":[', mid '],"model_version":<v>,"event_ts":' and tail
   ',"published_ts":<ms>}'; its items are prefix[row] + score text for each row of rows[i] before the first
   pad, joined by '},' and closed by '}'. The score texts are orjson's own: scores holds orjson's text of
   the [n, k] array of rounded scores ('[[a,b],[c,d]]'), so the numbers are written exactly as
   orjson.dumps writes them. Returns the bytes written, or -1 when out_cap is too small or the score text
   does not match the shape. */
int64_t gf_encode(const char *scores, int64_t scores_len, const int64_t *rows, int64_t n, int64_t k,
                  int64_t pad, const char *prefixes, const int64_t *prefix_off, int64_t n_prefix,
                  const char *heads, const int64_t *head_off, const char *mid, int64_t mid_len,
                  const int64_t *ts, const char *tail, int64_t tail_len,
                  char *out, int64_t out_cap, int64_t *off) {
    const char *p = scores, *end = scores + scores_len;
    char *o = out, *o_end = out + out_cap;
    if (k > 0) {
        if (scores_len < 2 || p[0] != '[') return -1;
        p++;
    }
    off[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t *r = rows + i * k;
        int64_t hl = head_off[i + 1] - head_off[i];
        if (o_end - o < hl) return -1;
        memcpy(o, heads + head_off[i], (size_t)hl);
        o += hl;
        if (k > 0) {
            if (p >= end || *p != '[') return -1;
            p++;
        }
        int64_t items = 0;
        int padded = 0;  /* the rest of the row is padding: its score texts are skipped */
        for (int64_t j = 0; j < k; j++) {
            const char *t = p;
            while (p < end && *p != ',' && *p != ']') p++;
            if (p >= end) return -1;
            int64_t row = r[j];
            padded |= row == pad;
            if (!padded) {
                if (row < 0 || row >= n_prefix) return -1;
                int64_t pl = prefix_off[row + 1] - prefix_off[row];
                if (o_end - o < pl + (p - t) + 2) return -1;
                if (items > 0) { *o++ = '}'; *o++ = ','; }
                memcpy(o, prefixes + prefix_off[row], (size_t)pl);
                o += pl;
                memcpy(o, t, (size_t)(p - t));
                o += p - t;
                items++;
            }
            if (*p == ',') p++;
        }
        if (k > 0) {
            if (p >= end || *p != ']') return -1;
            p++;
            if (p < end && *p == ',') p++;
        }
        char num[24];
        int nl = snprintf(num, sizeof num, "%lld", (long long)ts[i]);
        if (o_end - o < 1 + mid_len + nl + tail_len) return -1;
        if (items > 0) *o++ = '}';
        memcpy(o, mid, (size_t)mid_len);
        o += mid_len;
        memcpy(o, num, (size_t)nl);
        o += nl;
        memcpy(o, tail, (size_t)tail_len);
        o += tail_len;
        off[i + 1] = o - out;
    }
    return o - out;
}
