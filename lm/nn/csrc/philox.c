/* Counter-based random numbers for the training noise: Philox4x32-10 (Salmon, Moraes, Dror, Shaw,
 * "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the generator cuRAND and torch's CUDA
 * backend use. Companion of lm/nn/fastrand.py, which seeds it from a torch.Generator.
 *
 * Element i of a draw comes from block i / 4 of the stream (key = the 64-bit seed, counter = the
 * block index), so a draw depends on nothing but its seed and its length: not on the number of
 * threads, nor on how the work is split. Each block's four 32-bit words give four uniforms (the
 * top 24 bits, as torch.rand's float32 draws: multiples of 2^-24 in [0, 1)), or four normals by
 * Box-Muller on two pairs (the radius from a full 32-bit uniform in (0, 1], so |z| <= 6.66).
 *
 * Compiled like lstm_step.c (lm/nn/cext.py): -O3 -march=native -fno-math-errno -fopenmp (or without
 * OpenMP: one thread, the same numbers, since a draw does not depend on the thread count); the
 * vector logf / sinf / cosf of glibc's libmvec are declared below so that the loops vectorise.
 */
#include <math.h>
#include <stdint.h>

#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float sinf(float);
#pragma omp declare simd notinbranch
float cosf(float);

#define BLOCKS 256  /* blocks per unit of work: 4 KiB of output, the loops below vectorise over it */

static inline void philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                              uint32_t out[4]) {
    for (int r = 0; r < 10; r++) {
        const uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c0 = n0; c1 = (uint32_t)p1; c2 = n2; c3 = (uint32_t)p0;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* the words of blocks [first, first + count) into w[4][BLOCKS] (one array per word: vectorises).
 * `first` is a multiple of BLOCKS, so the counter's high word is the same for the whole unit and
 * the loop runs on 32-bit lanes only (twice the lanes of a 64-bit counter per vector). */
static inline void words(uint64_t first, int64_t count, uint64_t seed, uint32_t w[4][BLOCKS]) {
    const uint32_t lo = (uint32_t)first, hi = (uint32_t)(first >> 32), k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    _Pragma("GCC ivdep")
    for (int32_t b = 0; b < (int32_t)count; b++) {
        uint32_t o[4];
        philox4x32(lo + (uint32_t)b, hi, 0, 0, k0, k1, o);
        w[0][b] = o[0]; w[1][b] = o[1]; w[2][b] = o[2]; w[3][b] = o[3];
    }
}

static inline float unit24(uint32_t x) { return (float)(x >> 8) * 0x1p-24f; }            /* [0, 1) */
static inline float unit32_open0(uint32_t x) { return ((float)x + 1.0f) * 0x1p-32f; }   /* (0, 1] */

/* A unit's values into out (element type T) from element `base` on: element 4b + j is word j of
 * block b; the last unit is cut short at n (`left` elements). */
#define SCATTER(T, out, base) do {                                                                  \
        T *restrict o = (T *)(out) + (base);                                                        \
        if (left == 4 * count) {                                                                    \
            for (int64_t b = 0; b < count; b++) {                                                   \
                o[4 * b] = (T)v[0][b]; o[4 * b + 1] = (T)v[1][b];                                   \
                o[4 * b + 2] = (T)v[2][b]; o[4 * b + 3] = (T)v[3][b];                               \
            }                                                                                       \
        } else {                                                                                    \
            for (int64_t i = 0; i < left; i++) o[i] = (T)v[i & 3][i >> 2];                          \
        }                                                                                           \
    } while (0)

/* out[i] = keep_value if u_i < p_keep else drop_value; with p_keep = 2 and 1 / 0 it is the uniform
 * u_i itself (see philox_uniform). Mode 3 is mode 1 with keep 1 and drop 0 stored as bytes (uint8):
 * the same draw in a quarter of the memory. */
static void fill(void *out, int64_t n, uint64_t seed, int threads, int mode, float p_keep, float keep, float drop) {
    const int64_t blocks = (n + 3) / 4, units = (blocks + BLOCKS - 1) / BLOCKS;
    #pragma omp parallel for schedule(static) num_threads(threads) if(n >= 65536)
    for (int64_t u = 0; u < units; u++) {
        uint32_t w[4][BLOCKS];
        float v[4][BLOCKS];
        const uint64_t first = (uint64_t)u * BLOCKS;
        const int64_t count = blocks - (int64_t)first < BLOCKS ? blocks - (int64_t)first : BLOCKS;
        words(first, count, seed, w);
        if (mode == 0) {          /* uniform */
            for (int j = 0; j < 4; j++) { _Pragma("GCC ivdep") for (int64_t b = 0; b < count; b++) v[j][b] = unit24(w[j][b]); }
        } else if (mode == 1 || mode == 3) {   /* two-valued; bytes */
            for (int j = 0; j < 4; j++) {
                _Pragma("GCC ivdep") for (int64_t b = 0; b < count; b++) v[j][b] = unit24(w[j][b]) < p_keep ? keep : drop;
            }
        } else {                  /* standard normal, Box-Muller on words (0, 1) and (2, 3) */
            for (int j = 0; j < 4; j += 2) {
                const uint32_t *restrict wr = w[j], *restrict wa = w[j + 1];
                float *restrict z0 = v[j], *restrict z1 = v[j + 1];
                for (int64_t b = 0; b < count; b++) {  /* z1 holds the angle until the second loop */
                    z0[b] = sqrtf(-2.0f * logf(unit32_open0(wr[b])));
                    z1[b] = 6.2831853071795864769f * unit24(wa[b]);
                }
                /* cos and sin in separate loops: in one, gcc merges them into sincosf, which has
                 * no vector version, and the loop stays scalar */
                float rad[BLOCKS];
                for (int64_t b = 0; b < count; b++) { rad[b] = z0[b]; z0[b] = rad[b] * cosf(z1[b]); }
                for (int64_t b = 0; b < count; b++) z1[b] = rad[b] * sinf(z1[b]);
            }
        }
        const int64_t base = (int64_t)first * 4, left = n - base < 4 * count ? n - base : 4 * count;
        if (mode == 3) SCATTER(uint8_t, out, base);
        else SCATTER(float, out, base);
    }
}

void philox_uniform(float *out, int64_t n, uint64_t seed, int threads) { fill(out, n, seed, threads, 0, 0, 0, 0); }

void philox_two_valued(float *out, int64_t n, uint64_t seed, int threads, float p_keep, float keep, float drop) {
    fill(out, n, seed, threads, 1, p_keep, keep, drop);
}

/* out[i] = 1 if u_i < p_keep else 0, as bytes: philox_two_valued(out, n, seed, threads, p_keep, 1, 0)'s draw */
void philox_bytes(uint8_t *out, int64_t n, uint64_t seed, int threads, float p_keep) {
    fill(out, n, seed, threads, 3, p_keep, 1.0f, 0.0f);
}

void philox_normal(float *out, int64_t n, uint64_t seed, int threads) { fill(out, n, seed, threads, 2, 0, 0, 0); }

/* one Philox4x32-10 block, for the tests against Random123's known-answer vectors */
void philox_kat(const uint32_t *ctr, const uint32_t *key, uint32_t *out) {
    philox4x32(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1], out);
}
