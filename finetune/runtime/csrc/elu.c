/* The ELU activation (alpha 1) of a float32 array, in place of numpy's scalar expm1:
 *
 *   out = x > 0 ? x : expm1(x)
 *
 * expm1 is taken in double (x = k ln2 + r with |r| <= ln2 / 2, expm1(r) from its Taylor series
 * to r^11, relative error < 1e-13; then 2^k expm1(r) + (2^k - 1)) and rounded once to float32,
 * so the result is float32's rounding of the exact value but in rare ties: as close as numpy's
 * expm1 or closer. Each element is computed alone, the same way whatever the array's length
 * or split, so a row's result does not depend on the rows beside it. One pass over memory,
 * vectorised for the best instruction set the CPU has (target_clones), split over threads.
 * Built with -fno-trapping-math, without which GCC keeps the selects as branches and does not
 * vectorise the loop (4x slower).
 */
#include <stdint.h>
#include <string.h>

#include "parts.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BEST_ISA __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BEST_ISA
#endif

#define MIN_PART 65536 /* elements a thread is worth starting for */

struct part {
    const float *x;
    float *out;
    long begin, end;
};

BEST_ISA
static void elu_range(const struct part *p) {
    const double inv_ln2 = 1.44269504088896338700;
    const double ln2_hi = 6.93147180369123816490e-01; /* low 32 bits zero: k * ln2_hi exact */
    const double ln2_lo = 1.90821492927058770002e-10;
    const double round_magic = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to integer */
    int64_t magic_bits;
    memcpy(&magic_bits, &round_magic, sizeof magic_bits);
    const float *x = p->x;
    float *out = p->out;
    for (long i = p->begin; i < p->end; i++) {
        float v = x[i];
        double d = v < 0.0f ? (double)v : 0.0;
        d = d < -60.0 ? -60.0 : d; /* expm1(-60) is -1 in float32; keeps 2^k normal */
        double t = d * inv_ln2 + round_magic;
        double k = t - round_magic;
        double r = (d - k * ln2_hi) - k * ln2_lo;
        double e = 1.0 / 39916800.0; /* 1/11! */
        e = e * r + 1.0 / 3628800.0;
        e = e * r + 1.0 / 362880.0;
        e = e * r + 1.0 / 40320.0;
        e = e * r + 1.0 / 5040.0;
        e = e * r + 1.0 / 720.0;
        e = e * r + 1.0 / 120.0;
        e = e * r + 1.0 / 24.0;
        e = e * r + 1.0 / 6.0;
        e = e * r + 0.5;
        e = e * r * r + r; /* expm1(r) */
        int64_t t_bits;
        memcpy(&t_bits, &t, sizeof t_bits);
        int64_t scale_bits = (t_bits - magic_bits + 1023) << 52; /* 2^k, k = t - magic */
        double scale;
        memcpy(&scale, &scale_bits, sizeof scale);
        float elu = (float)(scale * e + (scale - 1.0));
        out[i] = v <= 0.0f ? elu : v; /* NaN stays NaN */
    }
}

static void *run(void *arg) {
    elu_range((const struct part *)arg);
    return NULL;
}

/* Returns 0, or -1 when a thread could not start (its part is then done by the caller). */
int vf_elu(const float *x, float *out, long count, int threads) {
    threads = part_count(count, MIN_PART, threads);
    struct part parts[MAX_THREADS];
    for (int i = 0; i < threads; i++) {
        parts[i] = (struct part){x, out, count * i / threads, count * (i + 1) / threads};
    }
    return run_parts(run, parts, sizeof parts[0], threads);
}
