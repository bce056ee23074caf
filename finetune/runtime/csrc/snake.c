/* The Snake activation of a [rows, channels] float32 array, in place of numpy's four passes:
 *
 *   out = x + gain[c] * sin(x * scale[c])^2
 *
 * x * scale is rounded to float32 as numpy does; sin^2 y = (1 - cos 2y) / 2 with 2y reduced to
 * [-pi, pi] and cos taken from its Taylor series, both in double (|error| < 1e-12 there, so the
 * result is float32-rounded sin^2 for |y| up to 1e6). One pass over memory, vectorised for the
 * best instruction set the CPU has (target_clones), rows split over threads.
 */
#include <stddef.h>

#include "parts.h"

#define MIN_PART 32768 /* elements a thread is worth starting for */

struct part {
    const float *x, *scale, *gain;
    float *out;
    long begin, end, channels;
};

__attribute__((target_clones("avx512f", "avx2", "default")))
static void snake_rows(const struct part *p) {
    const double two_pi = 6.283185307179586476925;
    const double inv_two_pi = 0.159154943091895335768883;
    const double round_magic = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to integer */
    long channels = p->channels;
    for (long r = p->begin; r < p->end; r++) {
        const float *x = p->x + r * channels;
        float *out = p->out + r * channels;
        for (long c = 0; c < channels; c++) {
            float y = x[c] * p->scale[c];
            double t = 2.0 * (double)y;
            double turns = (t * inv_two_pi + round_magic) - round_magic;
            double u = t - turns * two_pi;
            double z = u * u;
            /* cos u = sum (-1)^n z^n / (2n)!, n <= 11: the first term left out is < 3e-13. */
            double acc = -1.0 / 1.1240007277776077e21; /* -1/22! */
            acc = acc * z + 1.0 / 2.43290200817664e18;
            acc = acc * z - 1.0 / 6.402373705728e15;
            acc = acc * z + 1.0 / 2.0922789888e13;
            acc = acc * z - 1.0 / 8.71782912e10;
            acc = acc * z + 1.0 / 479001600.0;
            acc = acc * z - 1.0 / 3628800.0;
            acc = acc * z + 1.0 / 40320.0;
            acc = acc * z - 1.0 / 720.0;
            acc = acc * z + 1.0 / 24.0;
            acc = acc * z - 0.5;
            acc = acc * z + 1.0;
            float sin2 = (float)(0.5 - 0.5 * acc);
            out[c] = x[c] + p->gain[c] * sin2;
        }
    }
}

static void *run(void *arg) {
    snake_rows((const struct part *)arg);
    return NULL;
}

/* Returns 0, or -1 when a thread could not start (its rows are then done by the caller). */
int vf_snake(const float *x, float *out, const float *scale, const float *gain, long rows,
             long channels, int threads) {
    threads = part_count(rows * channels, MIN_PART, threads);
    struct part parts[MAX_THREADS];
    for (int i = 0; i < threads; i++) {
        parts[i] = (struct part){x, scale, gain, out, rows * i / threads, rows * (i + 1) / threads,
                                 channels};
    }
    return run_parts(run, parts, sizeof parts[0], threads);
}
