/* cblas_sgemm for MLX's CPU backend, with decode's few-row products done here.
 *
 * MLX computes every fp32 matmul with cblas_sgemm, the few-row products of decoding included
 * (x[rows, K] @ W.T, rows = the requests in a batch). OpenBLAS's sgemm packs the whole weight
 * for such a call and reads it at a third of the speed of its sgemv, and its time hardly falls
 * with fewer rows. Here, up to few_rows_max rows of x @ W.T are computed in one pass over W (blocks
 * of 3-4 weight rows x 4 input rows, AVX-512 or AVX2), split over the BLAS's threads: memory-bound
 * like sgemv for one row, and each row's sums are taken in the same order whatever the row count,
 * so a row of a batch is bit-exact to the same row alone. Small one-row products of another
 * layout are summed here on the calling thread; other one-row / one-column products go to
 * cblas_sgemv; the rest to the real cblas_sgemm. Loaded into the global scope before OpenBLAS
 * (finetune/runtime/blas.py), this cblas_sgemm is the one MLX binds.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86_KERNELS 1
#endif

enum { ROW_MAJOR = 101, COL_MAJOR = 102 };
enum { NO_TRANS = 111, TRANS = 112, CONJ_TRANS = 113 };
enum { KERNEL_NONE = 0, KERNEL_AVX2 = 1, KERNEL_AVX512 = 2 };
enum { MAX_THREADS = 64 };
/* The most rows the kernel takes, by kernel: measured against OpenBLAS's sgemm on the same
 * products (the 0.6B's 3072x1024, 1024x3072, 2048x1024). AVX2 (2-core EPYC): 110-138 GFLOP/s
 * at 16-64 rows, where OpenBLAS's sgemm makes 55-120 between its 16-row tiles (1.2-2.3x
 * slower: a prompt's prefill is 20-60 tokens) and 135-150 on them (48, 64: 2-15 % faster);
 * from 72 rows it is ahead. AVX-512: measured up to 16 rows only. */
static int few_rows_max;
/* Below this many weights a product runs on the calling thread alone (waking costs more). */
static const long THREADED_WEIGHTS = 1L << 16;

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*rows_fn)(int, int, const float *, int, const float *, int, float *, int, int, int,
                        float, float);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static rows_fn kernel_rows;
static unsigned long counts[5]; /* few-row kernel, sgemv, real sgemm, packed, bf16 */

/* --- the few-row kernel ------------------------------------------------------------------- */
/* Fully unrolled block loops keep the MB x NB sums in registers, not on the stack. */
#define UNROLL _Pragma("GCC unroll 16")
/* y[i, j] = alpha * sum_k x[i, k] w[j, k] + beta * y[i, j] for MB input rows and NB weight rows;
 * every (i, j) is summed lane-wise over k in steps of LANES, then across lanes, then the tail
 * by fused multiply-adds (written out: left to the compiler, AVX-512's fp32 and bf16 blocks fused
 * theirs differently and disagreed in the last bit).
 * The weight's elements are WT (float, or bf16 widened exactly by WLOAD / WGET): the same sums
 * over the same values, so a bf16 weight gives the fp32 kernel's bits on its fp32 cast. */
#define BLOCK(ISA, TARGET, VEC, LANES, ZERO, LOAD, FMA, HSUM, WT, WLOAD, WGET, MB, NB)             \
    TARGET static inline void ISA##_block_##MB##_##NB(int k, const float *x, int ldx,              \
                                                      const WT *w, int ldw, float *y, int ldy,     \
                                                      float alpha, float beta) {                   \
        VEC acc[MB][NB];                                                                           \
        UNROLL for (int i = 0; i < MB; ++i)                                                        \
            UNROLL for (int j = 0; j < NB; ++j) acc[i][j] = ZERO();                                \
        int kv = k - k % LANES;                                                                    \
        for (int kk = 0; kk < kv; kk += LANES) {                                                   \
            VEC wv[NB];                                                                            \
            UNROLL for (int j = 0; j < NB; ++j) wv[j] = WLOAD(w + (size_t)j * ldw + kk);           \
            UNROLL for (int i = 0; i < MB; ++i) {                                                  \
                VEC xv = LOAD(x + (size_t)i * ldx + kk);                                           \
                UNROLL for (int j = 0; j < NB; ++j) acc[i][j] = FMA(xv, wv[j], acc[i][j]);         \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < MB; ++i)                                                               \
            for (int j = 0; j < NB; ++j) {                                                         \
                float s = HSUM(acc[i][j]);                                                         \
                for (int kk = kv; kk < k; ++kk) /* fused: the same whatever the compiler fuses */ \
                    s = fmaf(x[(size_t)i * ldx + kk], WGET(w[(size_t)j * ldw + kk]), s);           \
                float *out = y + (size_t)i * ldy + j;                                              \
                *out = beta == 0.0f ? alpha * s : alpha * s + beta * *out;                         \
            }                                                                                      \
    }

/* y[:, o0:o1] for m <= few_rows_max rows: weight blocks outside, each read from memory once. */
#define ROWS(ISA, TARGET, WT, NB)                                                                  \
    TARGET static void ISA##_rows(int m, int k, const float *x, int ldx, const WT *w, int ldw,    \
                                  float *y, int ldy, int o0, int o1, float alpha, float beta) {    \
        for (int o = o0; o < o1; o += NB) {                                                        \
            int full = o1 - o >= NB;                                                               \
            for (int m0 = 0; m0 < m; m0 += 4) {                                                    \
                int mb = m - m0 < 4 ? m - m0 : 4;                                                  \
                const float *xm = x + (size_t)m0 * ldx;                                            \
                for (int j = 0; j < (full ? 1 : o1 - o); ++j) {                                    \
                    const WT *wo = w + (size_t)(o + j) * ldw;                                      \
                    float *ym = y + (size_t)m0 * ldy + o + j;                                      \
                    if (full) {                                                                    \
                        switch (mb) {                                                              \
                        case 1: ISA##_block_1_##NB(k, xm, ldx, wo, ldw, ym, ldy, alpha, beta); break; \
                        case 2: ISA##_block_2_##NB(k, xm, ldx, wo, ldw, ym, ldy, alpha, beta); break; \
                        case 3: ISA##_block_3_##NB(k, xm, ldx, wo, ldw, ym, ldy, alpha, beta); break; \
                        default: ISA##_block_4_##NB(k, xm, ldx, wo, ldw, ym, ldy, alpha, beta);    \
                        }                                                                          \
                    } else {                                                                       \
                        switch (mb) {                                                              \
                        case 1: ISA##_block_1_1(k, xm, ldx, wo, ldw, ym, ldy, alpha, beta); break; \
                        case 2: ISA##_block_2_1(k, xm, ldx, wo, ldw, ym, ldy, alpha, beta); break; \
                        case 3: ISA##_block_3_1(k, xm, ldx, wo, ldw, ym, ldy, alpha, beta); break; \
                        default: ISA##_block_4_1(k, xm, ldx, wo, ldw, ym, ldy, alpha, beta);       \
                        }                                                                          \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }

#define KERNELS(ISA, TARGET, VEC, LANES, ZERO, LOAD, FMA, HSUM, WT, WLOAD, WGET, NB)              \
    BLOCK(ISA, TARGET, VEC, LANES, ZERO, LOAD, FMA, HSUM, WT, WLOAD, WGET, 1, NB)                  \
    BLOCK(ISA, TARGET, VEC, LANES, ZERO, LOAD, FMA, HSUM, WT, WLOAD, WGET, 2, NB)                  \
    BLOCK(ISA, TARGET, VEC, LANES, ZERO, LOAD, FMA, HSUM, WT, WLOAD, WGET, 3, NB)                  \
    BLOCK(ISA, TARGET, VEC, LANES, ZERO, LOAD, FMA, HSUM, WT, WLOAD, WGET, 4, NB)                  \
    BLOCK(ISA, TARGET, VEC, LANES, ZERO, LOAD, FMA, HSUM, WT, WLOAD, WGET, 1, 1)                   \
    BLOCK(ISA, TARGET, VEC, LANES, ZERO, LOAD, FMA, HSUM, WT, WLOAD, WGET, 2, 1)                   \
    BLOCK(ISA, TARGET, VEC, LANES, ZERO, LOAD, FMA, HSUM, WT, WLOAD, WGET, 3, 1)                   \
    BLOCK(ISA, TARGET, VEC, LANES, ZERO, LOAD, FMA, HSUM, WT, WLOAD, WGET, 4, 1)                   \
    ROWS(ISA, TARGET, WT, NB)
#define SAME(v) (v)

#ifdef HAVE_X86_KERNELS
/* What this CPU runs (the compiler's cpu-model check, initialised on first use). */
static int has_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
static int has_avx512f(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* bf16 weights (the top half of an fp32), widened exactly: half the bytes of an fp32 copy. Each
 * ISA's bf16 kernel has its fp32 kernel's blocks and order of sums. */
static inline float bf16_value(uint16_t v) {
    union { uint32_t u; float f; } bits = {.u = (uint32_t)v << 16};
    return bits.f;
}

#define T512 __attribute__((target("avx512f,fma")))
T512 static inline __m512 z512(void) { return _mm512_setzero_ps(); }
T512 static inline float h512(__m512 v) { return _mm512_reduce_add_ps(v); }
KERNELS(avx512, T512, __m512, 16, z512, _mm512_loadu_ps, _mm512_fmadd_ps, h512, float,
        _mm512_loadu_ps, SAME, 4)
T512 static inline __m512 load_bf16_512(const uint16_t *w) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
KERNELS(avx512bf16, T512, __m512, 16, z512, _mm512_loadu_ps, _mm512_fmadd_ps, h512, uint16_t,
        load_bf16_512, bf16_value, 4)

#define T256 __attribute__((target("avx2,fma")))
T256 static inline __m256 z256(void) { return _mm256_setzero_ps(); }
T256 static inline float h256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
/* 16 ymm registers: blocks of 4 x 3 keep the 12 sums, 3 weights and an input in registers. On a
 * 2-core AVX2 EPYC this is 10-25 % faster than 4 x 2 from 4 rows up (batched decode is
 * compute-bound there) and the same for one row; the sums are the same either way. */
KERNELS(avx2, T256, __m256, 8, z256, _mm256_loadu_ps, _mm256_fmadd_ps, h256, float,
        _mm256_loadu_ps, SAME, 3)

T256 static inline __m256 load_bf16(const uint16_t *w) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
KERNELS(avx2bf16, T256, __m256, 8, z256, _mm256_loadu_ps, _mm256_fmadd_ps, h256, uint16_t,
        load_bf16, bf16_value, 3)
#endif

/* --- threads: the caller and up to MAX_THREADS - 1 workers, each a share of the weight rows -- */
struct job {
    int m, k, ldx, ldw, ldy, o_total, parts;
    const float *x, *w;
    float *y;
    float alpha, beta;
    /* A packed product's weight (MLX's affine layout), its per-group scales and biases. */
    const uint32_t *wq;
    const float *scales, *biases;
    const uint16_t *wh; /* a bf16 product's weight */
    int bits, group;
    void (*rows)(const struct job *, int o0, int o1); /* y[:, o0:o1] */
};

/* --- packed 4/8-bit weights: MLX's affine layout, read packed --------------------------------- */
/* A weight row of k values is k * bits / 32 uint32 words, value i of a word in its bits
 * [bits * i, bits * (i + 1)); each group of `group` values has a scale s and a bias b, and the
 * weight is q * s + b. So an output is sum_g s_g (q . x)_g + sum_g b_g (sum of x over g).
 *
 * A 32-byte load holds 8 words; masking every lane the same way gives one value of each word,
 * left in place: values c, c + P, c + 2P, ... (P values a word). The input is permuted and scaled
 * once a call to match (`permute`), so each 8 values cost a mask, a conversion and a fused
 * multiply-add. The weight is read packed, once a block of input rows
 * (0.53 / 1.03 bytes a weight with fp32 scales, against 4 for an fp32 copy). Each output is
 * summed in the same order whatever the row count or the block (per group lane-wise, scaled into
 * a lane-wise total, across lanes, then the biases' term): a row of a batch is bit-exact to the
 * row alone, as with the fp32 kernel. */
#ifdef HAVE_X86_KERNELS
/* Values a 32-byte load holds: 64 (4-bit), 32 (8-bit); a group is whole chunks. */
#define CHUNK(BITS) (256 / (BITS))
/* A block loads the weight rows this far ahead into the cache: a packed row (0.5-1.5 KiB) is
 * too short for the hardware's prefetcher to catch. Measured on the 0.6B's shapes, weights cycled
 * past the caches: one row of 3072x1024 4-bit 228 -> 150 us; 8 and 16 rows ahead did no better. */
#define PREFETCH_ROWS 4

/* xp[c * CHUNK + v * 8 + lane] = x[c * CHUNK + lane * (32 / bits) + v] * 2^-(bits * v) for
 * every shift v but the last: the value of word `lane` that mask v keeps, still at its place in
 * the word (QVALUES), so each product x q is the same real number and rounds the same (for
 * |x| > 2^-102; smaller inputs may lose bits to subnormals, in products below 4e-30). One
 * integer op a value instead of a shift and a mask: 106 instead of 157 us for one row of
 * 3072x1024 4-bit in the caches, ~5 % of a real-0.6B 4-bit frame. The last value of a word is
 * shifted down instead (its top bit is the int32 sign). xsum[g] = the sum of x over group g,
 * summed in order. */
static void permute(int bits, int k, int group, const float *x, float *xp, float *xsum) {
    const int per_word = 32 / bits, chunk = 256 / bits;
    for (int c = 0; c < k; c += chunk)
        for (int v = 0; v < per_word; ++v) {
            const float scale = v + 1 < per_word ? ldexpf(1.0f, -bits * v) : 1.0f;
            for (int lane = 0; lane < 8; ++lane)
                xp[c + v * 8 + lane] = x[c + lane * per_word + v] * scale;
        }
    for (int g = 0; g < k / group; ++g) {
        float total = 0.0f;
        for (int i = g * group; i < (g + 1) * group; ++i) total += x[i];
        xsum[g] = total;
    }
}

T256 static inline float dot256(int n, const float *a, const float *b) {
    __m256 acc = z256();
    int nv = n - n % 8;
    for (int i = 0; i < nv; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float total = h256(acc);
    for (int i = nv; i < n; ++i) total += a[i] * b[i];
    return total;
}

/* The values of 8 words under mask v, as floats: value v kept in place (q 2^(bits v), exact: at
 * most bits significant bits, below the sign), the last one shifted down to q. One integer op
 * and a conversion each. */
#define QVALUES(BITS, WORDS, V)                                                                    \
    _mm256_cvtepi32_ps((V) + 1 < 32 / (BITS)                                                       \
                           ? _mm256_and_si256(WORDS, _mm256_set1_epi32(((1 << (BITS)) - 1)         \
                                                                       << ((BITS) * (V))))         \
                           : _mm256_srli_epi32(WORDS, (BITS) * (V)))

/* MB input rows x NB weight rows: x here is the permuted input, xsum its group sums. */
#define QBLOCK(BITS, MB, NB)                                                                       \
    T256 static void q##BITS##_block_##MB##_##NB(const struct job *j, int m0, int o) {            \
        const int k = j->k, group = j->group, groups = k / group, words = k * (BITS) / 32;         \
        if (m0 == 0 && o + PREFETCH_ROWS + NB <= j->o_total) { /* rows too short to prefetch */  \
            const char *ahead = (const char *)(j->wq + (size_t)(o + PREFETCH_ROWS) * words);       \
            for (int line = 0; line < NB * words * 4; line += 64)                                  \
                _mm_prefetch(ahead + line, _MM_HINT_T0);                                           \
        }                                                                                          \
        __m256 acc[MB][NB];                                                                        \
        UNROLL for (int i = 0; i < MB; ++i)                                                        \
            UNROLL for (int n = 0; n < NB; ++n) acc[i][n] = z256();                                \
        for (int g = 0; g < groups; ++g) {                                                         \
            __m256 part[MB][NB];                                                                   \
            UNROLL for (int i = 0; i < MB; ++i) UNROLL for (int n = 0; n < NB; ++n)                \
                part[i][n] = z256();                                                               \
            for (int c = g * group; c < (g + 1) * group; c += CHUNK(BITS)) {                       \
                __m256i packed[NB];                                                                \
                UNROLL for (int n = 0; n < NB; ++n) packed[n] = _mm256_loadu_si256(               \
                    (const __m256i *)(j->wq + (size_t)(o + n) * words + c * (BITS) / 32));         \
                UNROLL for (int v = 0; v < 32 / (BITS); ++v) {                                     \
                    __m256 wv[NB];                                                                 \
                    UNROLL for (int n = 0; n < NB; ++n) wv[n] = QVALUES(BITS, packed[n], v);       \
                    UNROLL for (int i = 0; i < MB; ++i) {                                          \
                        __m256 xv = _mm256_loadu_ps(j->x + (size_t)(m0 + i) * k + c + v * 8);      \
                        UNROLL for (int n = 0; n < NB; ++n)                                        \
                            part[i][n] = _mm256_fmadd_ps(xv, wv[n], part[i][n]);                   \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            UNROLL for (int n = 0; n < NB; ++n) {                                                  \
                __m256 scale = _mm256_broadcast_ss(j->scales + (size_t)(o + n) * groups + g);      \
                UNROLL for (int i = 0; i < MB; ++i)                                                \
                    acc[i][n] = _mm256_fmadd_ps(scale, part[i][n], acc[i][n]);                     \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < MB; ++i)                                                               \
            for (int n = 0; n < NB; ++n)                                                           \
                j->y[(size_t)(m0 + i) * j->ldy + o + n] =                                          \
                    h256(acc[i][n]) + dot256(groups, j->biases + (size_t)(o + n) * groups,         \
                                             j->w + (size_t)(m0 + i) * groups);                    \
    }

/* One input row: four weight rows a block (four independent sums); more rows: blocks of up to
 * four input rows x two weight rows; a last odd weight row alone. */
#define QROWS(BITS)                                                                                \
    QBLOCK(BITS, 1, 4) QBLOCK(BITS, 1, 2) QBLOCK(BITS, 2, 2) QBLOCK(BITS, 3, 2) QBLOCK(BITS, 4, 2) \
    QBLOCK(BITS, 1, 1) QBLOCK(BITS, 2, 1) QBLOCK(BITS, 3, 1) QBLOCK(BITS, 4, 1)                    \
    T256 static void q##BITS##_rows(const struct job *j, int o0, int o1) {                        \
        int o = o0;                                                                                \
        if (j->m == 1)                                                                             \
            for (; o + 4 <= o1; o += 4) q##BITS##_block_1_4(j, 0, o);                              \
        while (o < o1) {                                                                           \
            int two = o + 2 <= o1;                                                                 \
            for (int m0 = 0; m0 < j->m; m0 += 4) {                                                 \
                switch ((j->m - m0 < 4 ? j->m - m0 : 4) * 2 + two) {                               \
                case 2: q##BITS##_block_1_1(j, m0, o); break;                                      \
                case 3: q##BITS##_block_1_2(j, m0, o); break;                                      \
                case 4: q##BITS##_block_2_1(j, m0, o); break;                                      \
                case 5: q##BITS##_block_2_2(j, m0, o); break;                                      \
                case 6: q##BITS##_block_3_1(j, m0, o); break;                                      \
                case 7: q##BITS##_block_3_2(j, m0, o); break;                                      \
                case 8: q##BITS##_block_4_1(j, m0, o); break;                                      \
                default: q##BITS##_block_4_2(j, m0, o);                                            \
                }                                                                                  \
            }                                                                                      \
            o += two ? 2 : 1;                                                                      \
        }                                                                                          \
    }
QROWS(4)
QROWS(8)
#endif

static int n_threads = 1;
static int workers_started;
static struct job current;
static unsigned long generation; /* bumped under wake_lock for each threaded product */
static int pending;               /* workers still on the current product */
static int sleeping;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* one threaded product at a time */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cond = PTHREAD_COND_INITIALIZER;

static void relax(int spins) {
#ifdef HAVE_X86_KERNELS
    if (spins < 2000) {
        _mm_pause();
        return;
    }
#endif
    (void)spins;
    sched_yield();
}

/* A threaded product is cut into chunks of CHUNK_ROWS weight rows, which the caller and the
 * workers take in turn from one counter: a thread that starts late (woken from sleep) or runs
 * slower (its core shared with MLX's other threads) takes fewer, where fixed equal shares left
 * the caller waiting for the slowest. A row is summed the same way in whichever chunk it falls
 * (48: whole blocks of the kernels' 3 and 4 rows). */
#define CHUNK_ROWS 48
static int next_chunk;

static void run_chunks(const struct job *j) {
    for (;;) {
        int o0 = __atomic_fetch_add(&next_chunk, 1, __ATOMIC_RELAXED) * CHUNK_ROWS;
        if (o0 >= j->o_total) return;
        j->rows(j, o0, o0 + CHUNK_ROWS < j->o_total ? o0 + CHUNK_ROWS : j->o_total);
    }
}

static void dense_rows(const struct job *j, int o0, int o1) {
    kernel_rows(j->m, j->k, j->x, j->ldx, j->w, j->ldw, j->y, j->ldy, o0, o1, j->alpha, j->beta);
}

static void *worker(void *arg) {
    int part = (int)(intptr_t)arg;
    unsigned long seen = 0;
    for (;;) {
        unsigned long now;
        /* Decode calls come a fraction of a millisecond apart: spin a while before sleeping. */
        for (int spins = 0; (now = __atomic_load_n(&generation, __ATOMIC_ACQUIRE)) == seen; ++spins) {
            if (spins < 20000) {
                relax(spins);
                continue;
            }
            pthread_mutex_lock(&wake_lock);
            ++sleeping;
            while ((now = __atomic_load_n(&generation, __ATOMIC_ACQUIRE)) == seen)
                pthread_cond_wait(&wake_cond, &wake_lock);
            --sleeping;
            pthread_mutex_unlock(&wake_lock);
            break;
        }
        seen = now;
        if (part < current.parts) run_chunks(&current);
        __atomic_sub_fetch(&pending, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}

static int start_workers(void) {
    for (int i = 1; i < n_threads; ++i) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker, (void *)(intptr_t)i);
        pthread_attr_destroy(&attr);
        if (failed) return i; /* the workers made so far still take their shares */
    }
    return n_threads;
}

static void reset_after_fork(void) {
    /* A forked child has none of the parent's workers: start afresh if it multiplies. */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
    pool_lock = fresh;
    wake_lock = fresh;
    wake_cond = fresh_cond;
    workers_started = 0;
    generation = 0;
    pending = 0;
    sleeping = 0;
}

/* Runs a product's shares on the pool's threads, or alone on this one when it is small or the pool
 * is busy (another thread's product). */
static void run_job(struct job j) {
    if (n_threads < 2 || (long)j.o_total * j.k < THREADED_WEIGHTS ||
        pthread_mutex_trylock(&pool_lock) != 0) {
        j.rows(&j, 0, j.o_total);
        return;
    }
    if (!workers_started) workers_started = start_workers();
    j.parts = workers_started;
    current = j;
    next_chunk = 0;
    __atomic_store_n(&pending, j.parts - 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&wake_lock);
    __atomic_add_fetch(&generation, 1, __ATOMIC_ACQ_REL);
    if (sleeping) pthread_cond_broadcast(&wake_cond);
    pthread_mutex_unlock(&wake_lock);
    run_chunks(&current);
    for (int spins = 0; __atomic_load_n(&pending, __ATOMIC_ACQUIRE) > 0; ++spins) relax(spins);
    pthread_mutex_unlock(&pool_lock);
}

static void few_rows(int m, int n, int k, float alpha, const float *x, int ldx, const float *w,
                     int ldw, float beta, float *y, int ldy) {
    struct job j = {.m = m, .k = k, .ldx = ldx, .ldw = ldw, .ldy = ldy, .o_total = n, .parts = 1,
                    .x = x, .w = w, .y = y, .alpha = alpha, .beta = beta, .rows = dense_rows};
    run_job(j);
}

/* y[m, n] = x[m, k] @ dequantise(wq)[n, k]^T for MLX's affine 4- or 8-bit layout (fp32 scales
 * and biases, [n, k / group]); x and y row-major and contiguous. Returns 0, or -1 when this CPU
 * has no AVX2 / FMA or the layout is not one this kernel takes (bits, a group not a multiple of
 * 8, k not a multiple of the group): the caller then takes another path. */
int vf_qgemm(int m, int n, int k, const float *x, const uint32_t *wq, const float *scales,
             const float *biases, int bits, int group, float *y) {
#ifdef HAVE_X86_KERNELS
    if (!has_avx2_fma() || (bits != 4 && bits != 8) || group <= 0 || group % CHUNK(bits) ||
        k % group)
        return -1;
    if (m <= 0 || n <= 0) return 0;
    const int groups = k / group;
    float *scratch = malloc(sizeof(float) * (size_t)m * (k + groups));
    if (scratch == NULL) return -2;
    float *xp = scratch, *xsum = scratch + (size_t)m * k;
    for (int i = 0; i < m; ++i)
        permute(bits, k, group, x + (size_t)i * k, xp + (size_t)i * k, xsum + (size_t)i * groups);
    /* .w carries the group sums: a packed product has no fp32 weight. */
    struct job j = {.m = m, .k = k, .ldx = k, .ldy = n, .o_total = n, .parts = 1, .x = xp,
                    .w = xsum, .y = y, .alpha = 1.0f, .wq = wq, .scales = scales,
                    .biases = biases, .bits = bits, .group = group,
                    .rows = bits == 4 ? q4_rows : q8_rows};
    run_job(j);
    free(scratch);
    __atomic_add_fetch(&counts[3], 1, __ATOMIC_RELAXED);
    return 0;
#else
    (void)m, (void)n, (void)k, (void)x, (void)wq, (void)scales, (void)biases, (void)bits,
        (void)group, (void)y;
    return -1;
#endif
}

#ifdef HAVE_X86_KERNELS
static void bf16_rows_avx2(const struct job *j, int o0, int o1) {
    avx2bf16_rows(j->m, j->k, j->x, j->ldx, j->wh, j->ldw, j->y, j->ldy, o0, o1, 1.0f, 0.0f);
}
static void bf16_rows_avx512(const struct job *j, int o0, int o1) {
    avx512bf16_rows(j->m, j->k, j->x, j->ldx, j->wh, j->ldw, j->y, j->ldy, o0, o1, 1.0f, 0.0f);
}
#endif

/* y[m, n] = x[m, k] @ w[n, k]^T with w bf16 (uint16 bit patterns), x and y fp32, all row-major
 * and contiguous: the bound few-row kernel's ISA, blocks and order of sums (AVX-512 where it is
 * bound, else AVX2), so up to vf_few_rows_max() rows each output equals the fp32 kernel's on the
 * weight cast to fp32, bit for bit. Returns 0, or -1 when this CPU has no AVX2 / FMA (the caller
 * then takes another path). */
int vf_bgemm(int m, int n, int k, const float *x, const uint16_t *w, float *y) {
#ifdef HAVE_X86_KERNELS
    if (!has_avx2_fma()) return -1;
    if (m <= 0 || n <= 0) return 0;
    struct job j = {.m = m, .k = k, .ldx = k, .ldw = k, .ldy = n, .o_total = n, .parts = 1, .x = x,
                    .y = y, .alpha = 1.0f, .wh = w,
                    .rows = kernel_rows == avx512_rows ? bf16_rows_avx512 : bf16_rows_avx2};
    run_job(j);
    __atomic_add_fetch(&counts[4], 1, __ATOMIC_RELAXED);
    return 0;
#else
    (void)m, (void)n, (void)k, (void)x, (void)w, (void)y;
    return -1;
#endif
}

/* --- binding ------------------------------------------------------------------------------ */
static int pick_kernel(int wanted) {
#ifdef HAVE_X86_KERNELS
    int avx512 = has_avx512f();
    int avx2 = has_avx2_fma();
    if (wanted < 0) wanted = avx512 ? KERNEL_AVX512 : (avx2 ? KERNEL_AVX2 : KERNEL_NONE);
    if (wanted == KERNEL_AVX512 && avx512) {
        kernel_rows = avx512_rows;
        few_rows_max = 16;
        return KERNEL_AVX512;
    }
    if (wanted >= KERNEL_AVX2 && avx2) {
        kernel_rows = avx2_rows;
        few_rows_max = 64;
        return KERNEL_AVX2;
    }
#else
    (void)wanted;
#endif
    kernel_rows = NULL;
    return KERNEL_NONE;
}

/* Resolve the real BLAS privately (the caller then loads it globally after this library), pick
 * the few-row kernel (-1: the best this CPU has; 0 none; 1 AVX2; 2 AVX-512) and the thread count.
 * Returns the kernel picked, or a negative number when the BLAS lacks sgemm / sgemv. */
int vf_bind(const char *blas_path, int threads, int kernel) {
    void *handle = dlopen(blas_path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) return -1;
    real_sgemm = (sgemm_fn)dlsym(handle, "cblas_sgemm");
    real_sgemv = (sgemv_fn)dlsym(handle, "cblas_sgemv");
    if (real_sgemm == NULL || real_sgemv == NULL) return -2;
    n_threads = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    static int fork_handler;
    if (!fork_handler) fork_handler = pthread_atfork(NULL, NULL, reset_after_fork) == 0;
    return pick_kernel(kernel);
}

/* The most rows the bound kernel takes in one product (0: none bound). */
int vf_few_rows_max(void) { return kernel_rows != NULL ? few_rows_max : 0; }

unsigned long vf_count(int which) {
    return which >= 0 && which < 5 ? __atomic_load_n(&counts[which], __ATOMIC_RELAXED) : 0;
}

static int transposed(int op) { return op == TRANS || op == CONJ_TRANS; }

/* c[1, n] = alpha * x[1, k] @ b[k, n] + beta * c, the rows of b added in order on this thread.
 * Small one-row products in this layout (a LoRA adapter's x @ A and h @ B, one call per row of a
 * batch) cost microseconds; OpenBLAS's sgemv wakes its own threads for them past ~9k weights,
 * which then queue behind the decode GEMM's workers: ~25 ms a real-0.6B frame with an adapter. */
enum { SMALL_ROW_MAX_N = 4096 };
#ifdef HAVE_X86_KERNELS
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void small_row(int n, int k, float alpha, const float *restrict x, int inc_x,
                      const float *restrict b, int ldb, float beta, float *restrict c) {
    float acc[SMALL_ROW_MAX_N];
    for (int j = 0; j < n; ++j) acc[j] = 0.0f;
    for (int kk = 0; kk < k; ++kk) {
        const float xv = x[(size_t)kk * inc_x];
        const float *restrict row = b + (size_t)kk * ldb;
        for (int j = 0; j < n; ++j) acc[j] += xv * row[j];
    }
    for (int j = 0; j < n; ++j) c[j] = beta == 0.0f ? alpha * acc[j] : alpha * acc[j] + beta * c[j];
}

/* beta == 0 means "do not read y" in BLAS; MLX hands over uninitialised output buffers. */
static void clear(float *y, int n, int inc) {
    for (int i = 0; i < n; ++i) y[(size_t)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (order == COL_MAJOR) {
        /* Column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T. */
        cblas_sgemm(ROW_MAJOR, trans_b, trans_a, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
        return;
    }
    if (k > 0 && m > 0 && n > 0) {
        if (kernel_rows != NULL && m <= few_rows_max && !transposed(trans_a) &&
            transposed(trans_b)) {
            /* x[m, k] @ w[n, k]^T, the layout of every linear layer. */
            few_rows(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
            __atomic_add_fetch(&counts[0], 1, __ATOMIC_RELAXED);
            return;
        }
        if (m == 1) {
            /* c[1, n] = op(a)[1, k] op(b)[k, n]: a is the vector, op(b)^T the matrix. */
            int inc_x = transposed(trans_a) ? lda : 1;
            if (!transposed(trans_b) && n <= SMALL_ROW_MAX_N && (long)n * k < THREADED_WEIGHTS) {
                small_row(n, k, alpha, a, inc_x, b, ldb, beta, c);
                __atomic_add_fetch(&counts[1], 1, __ATOMIC_RELAXED);
                return;
            }
            if (beta == 0.0f) clear(c, n, 1);
            if (transposed(trans_b))
                real_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_x, beta, c, 1);
            else
                real_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_x, beta, c, 1);
            __atomic_add_fetch(&counts[1], 1, __ATOMIC_RELAXED);
            return;
        }
        if (n == 1) {
            /* c[m, 1] = op(a)[m, k] op(b)[k, 1]: op(b) is the vector, a column of stride ldc out. */
            int inc_x = transposed(trans_b) ? 1 : ldb;
            if (beta == 0.0f) clear(c, m, ldc);
            if (transposed(trans_a))
                real_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_x, beta, c, ldc);
            else
                real_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_x, beta, c, ldc);
            __atomic_add_fetch(&counts[1], 1, __ATOMIC_RELAXED);
            return;
        }
    }
    __atomic_add_fetch(&counts[2], 1, __ATOMIC_RELAXED);
    real_sgemm(ROW_MAJOR, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
