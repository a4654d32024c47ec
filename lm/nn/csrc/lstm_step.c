/* The element-wise work of one LSTM recurrence step, fused into one pass per step and direction.
 *
 * Companion of lm/nn/lstm_fused.py (which builds, caches and loads this file, and documents the
 * maths); the eager reference is lm/nn/lstm_kernel.py's _window_forward / _LSTMWindow._backward,
 * and both are tested against lm.nn.lstm.reference_loop.
 *
 * Every operand is a row-major (B, H)-shaped view given as a Slot: a base pointer, the distance
 * between rows and the distance between time steps (0: the same view every step), in elements.
 * A gate-shaped operand ((B, 4H): gate pre-activations, signs r, saved factors) holds gate j at
 * column j*H of each row. Element-wise state and factors are float32; the matmul products (p0,
 * p1), the left operands made for the next matmul (LEFT, LOW) and the gate gradients copied for
 * the products (SIGNED, DGLOW) are float32 or, with `low`, bfloat16; the input projection X is
 * float32 or, with `xlow`, bfloat16 as autocast's matmul hands it over (read without a cast pass).
 * The step masks (cell, zoneout) are float32 or exact uint8 bytes (`bytes`, mask_at).
 * With `flow` the saved backward factors (FAC, AUX) are bfloat16: written rounded, read back
 * exactly into float32, so only their storage is narrow; every sum, the state and the carried
 * gradients stay float32. Backward then never writes FAC (`nokeep` is required).
 *
 * Compiled with -O3 -march=native (or $FLIPOUT_LM_MARCH), on x86 -mprefer-vector-width=512, and
 * -fopenmp (lm/nn/cext.py; without -fopenmp where the compiler rejects it: then one thread, the
 * same results). σ and tanh are written out below (fexp, ftanh: float32 to about 1 ulp, no library
 * call), so gcc inlines them and vectorises each loop at its full width; glibc's vector expf/tanhf
 * (libmvec) ran at 256 bits only and cost more. IEEE semantics stay: no -ffast-math, whose
 * reciprocal turned 1 / (1 + inf) into NaN and whose finite-math would hide a NaN. OpenMP splits
 * rows across the threads torch uses (the same libgomp as torch, which is loaded first).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else  /* a compiler without OpenMP (Apple's clang): the pragmas are ignored and every row runs on thread 0 */
static inline int omp_get_thread_num(void) { return 0; }
#endif

typedef struct { void *base; int64_t row; int64_t step; } Slot;

enum {  /* forward slots */
    F_X, F_R, F_C, F_H, F_CELL, F_ZC, F_ZH, F_FAC, F_AUX, F_MASK, F_S, F_LEFT0, F_LEFT1, F_LOW0, F_BIAS, F_N
};
enum {  /* backward slots */
    B_FAC, B_AUX, B_ZC, B_ZH, B_R, B_S, B_MASK, B_DOUT, B_DH, B_DC, B_SIGNED, B_DGLOW, B_DB, B_N
};
enum { Z_NONE = 0, Z_MASK = 1, Z_SCALAR = 2 };

typedef struct {
    int64_t batch, hid;
    int32_t threads, low, save, zc_mode, zh_mode, xlow;  /* xlow: X is bfloat16 */
    int32_t nokeep, flow;  /* nokeep: backward leaves FAC as it is (the gradients go elsewhere);
                            * flow: FAC and AUX are bfloat16 */
    float zc, zh;     /* zoneout expectations (Z_SCALAR) */
    int32_t bytes;    /* bit i: mask slot i holds uint8 0/1 bytes (see mask_at) */
    float cell_scale; /* the value of a kept unit of a byte cell mask (1 / (1 - p)) */
    Slot s[16];
} Plan;

#define AT(p, sl, t, b) ((float *)(p)->s[sl].base + (t) * (p)->s[sl].step + (b) * (p)->s[sl].row)
#define HAS(p, sl) ((p)->s[sl].base != 0)
#define PAR _Pragma("omp parallel for schedule(static) num_threads(p->threads) if(p->batch * p->hid >= 8192)")

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does (NaN stays NaN) */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float load(const void *p, int64_t i, int low) {
    return low ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void store(void *p, int64_t i, float v, int low) {
    if (low) ((uint16_t *)p)[i] = f32_to_bf16(v); else ((float *)p)[i] = v;
}
/* e^x in float32 without a library call, so that gcc inlines and vectorises it at the loop's own
 * width: n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts: the first has 9 bits, so n C1 is
 * exact), e^r on [-ln2/2, ln2/2] by Cephes' expf polynomial (about 1 ulp), times 2^n built from
 * exponent bits in two factors, so that n from -150 to 128 scales exactly into the subnormals or
 * overflows to inf. x is clamped to [-104, 89] (e^x is 0 or inf beyond); NaN stays NaN (every
 * comparison with it is false, and it passes through r). */
static inline float pow2i(int32_t n) { uint32_t u = (uint32_t)(n + 127) << 23; float f; memcpy(&f, &u, 4); return f; }
static inline float fexp(float x) {
    x = x < -104.0f ? -104.0f : x > 89.0f ? 89.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest: 1.5 * 2^23 */
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    const float e = q * (r * r) + r + 1.0f;
    const int32_t ni = (int32_t)(n == n ? n : 0.0f), half = ni / 2;  /* n is NaN only when x is: e is NaN then */
    return e * pow2i(half) * pow2i(ni - half);
}
static inline float sigm(float x) { return 1.0f / (1.0f + fexp(-x)); }
/* tanh: Cephes' tanhf: x + x^3 P(x^2) below |x| = 0.625, else 1 - 2 / (e^{2|x|} + 1) with x's sign
 * (inf: ±1; NaN: NaN). Both branches are computed and one is chosen, so the loop stays vectorised. */
static inline float ftanh(float x) {
    const float a = fabsf(x), z = x * x;
    float q = -5.70498872745e-3f;
    q = q * z + 2.06390887954e-2f;
    q = q * z - 5.37397155531e-2f;
    q = q * z + 1.33314422036e-1f;
    q = q * z - 3.33332819422e-1f;
    const float small = copysignf(q * z * x + x, x), big = copysignf(1.0f - 2.0f / (fexp(a + a) + 1.0f), x);
    return a < 0.625f ? small : big;
}
/* a + w (b - a) as torch.lerp computes it: exact at both ends, so a zoned-out unit (w = 1) keeps
 * its previous value bit for bit */
static inline float lerp(float a, float b, float w) { return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w); }

#define K 256  /* elements of a row processed at once: the temporaries stay in L1 */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
/* ivdep: the rows a loop reads and writes never overlap at different k (same-k in-place updates
 * are fine), so gcc may vectorise without run-time alias checks, which it gives up on past ten */
#define LOOP _Pragma("GCC ivdep") for (int64_t k = 0; k < m; k++)

static inline void fill(float *a, float v) { for (int k = 0; k < K; k++) a[k] = v; }

/* Elements k0 .. k0+m of row b of step t of mask slot `sl` as float32: a float32 mask where it
 * lies, a byte mask (bit `sl` of `bytes`: exact 0/1, a quarter of the memory) converted into
 * `tmp` (K floats, in L1) and multiplied by `scale` (the cell mask's 1 / (1 - p), so the values are
 * those of the float32 mask it replaces: 1.0f * (float)scale). */
static inline const float *mask_at(const Plan *p, int sl, int64_t t, int64_t b, int64_t k0, int64_t m, float scale,
                                   float *restrict tmp) {
    if (!((p->bytes >> sl) & 1)) return AT(p, sl, t, b) + k0;
    const uint8_t *q = (const uint8_t *)p->s[sl].base + t * p->s[sl].step + b * p->s[sl].row + k0;
    if (scale == 1.0f) { LOOP tmp[k] = (float)q[k]; } else { LOOP tmp[k] = (float)q[k] * scale; }
    return tmp;
}

/* acc[k] += src[k] (bfloat16 or float32), or acc[k] += src[k] * sign[k] when sign is given */
static inline void add_from(float *restrict acc, const void *src, int64_t off, const float *restrict sign,
                            int64_t m, int low) {
    if (low) {
        const uint16_t *q = (const uint16_t *)src + off;
        if (sign) { LOOP acc[k] += bf16_to_f32(q[k]) * sign[k]; } else { LOOP acc[k] += bf16_to_f32(q[k]); }
    } else {
        const float *q = (const float *)src + off;
        if (sign) { LOOP acc[k] += q[k] * sign[k]; } else { LOOP acc[k] += q[k]; }
    }
}

static inline void to_low(uint16_t *restrict out, const float *restrict src, int64_t m) { LOOP out[k] = f32_to_bf16(src[k]); }
static inline void from_low(float *restrict out, const uint16_t *restrict src, int64_t m) { LOOP out[k] = bf16_to_f32(src[k]); }

/* row b of step t of a bfloat16 slot (2-byte elements) */
#define AT16(p, sl, t, b) ((uint16_t *)(p)->s[sl].base + (t) * (p)->s[sl].step + (b) * (p)->s[sl].row)

/* Step t's left operands of the matmuls, from h_t (= H slot at t): h̃ = h ∘ mask into LEFT0 (when
 * there is a mask or flipout) and h̃ ∘ s into LEFT1 (flipout), in the matmul dtype: float32, or
 * with `low` bfloat16, which is what the products and the window's weight gradients read. With
 * `low` and no LEFT0, LOW0 gets h itself in bfloat16. */
static void left_row(const Plan *p, int64_t t, int64_t b) {
    const int64_t n = p->hid;
    const float *h = AT(p, F_H, t, b);
    const float *mk = HAS(p, F_MASK) ? AT(p, F_MASK, t, b) : 0, *s = HAS(p, F_S) ? AT(p, F_S, t, b) : 0;
    const int has0 = HAS(p, F_LEFT0), has1 = HAS(p, F_LEFT1);
    if (!p->low) {
        float *l0 = has0 ? AT(p, F_LEFT0, t, b) : 0, *l1 = has1 ? AT(p, F_LEFT1, t, b) : 0;
        const int64_t m = n;
        if (l0) { if (mk) { LOOP l0[k] = h[k] * mk[k]; } else { LOOP l0[k] = h[k]; } }
        const float *src0 = l0 ? l0 : h;
        if (l1) { LOOP l1[k] = src0[k] * s[k]; }
        return;
    }
    if (!has0) {  /* no mask, no flipout: the product reads h in bfloat16 */
        if (HAS(p, F_LOW0)) to_low(AT16(p, F_LOW0, 0, b), h, n);
        return;
    }
    uint16_t *l0 = AT16(p, F_LEFT0, t, b), *l1 = has1 ? AT16(p, F_LEFT1, t, b) : 0;
    float v[K];
    for (int64_t k0 = 0; k0 < n; k0 += K) {
        const int64_t m = MIN(K, n - k0);
        const float *hk = h + k0;
        if (mk) { const float *mm = mk + k0; LOOP v[k] = hk[k] * mm[k]; } else { LOOP v[k] = hk[k]; }
        to_low(l0 + k0, v, m);
        if (l1) { const float *sk = s + k0; LOOP v[k] *= sk[k]; to_low(l1 + k0, v, m); }
    }
}

void lstm_left(const Plan *p, int64_t t) {
    PAR
    for (int64_t b = 0; b < p->batch; b++) left_row(p, t, b);
}

/* Forward step t: gates = X_t (+ BIAS, a (4H) vector, when the window projects its input
 * itself) + p0 + p1 ∘ r, the cell and hidden updates (with the cell mask and
 * zoneout), the saved derivative factors (lm/nn/lstm_kernel.py's _window_forward docstring), and
 * step t+1's left operands. */
static void fwd_row(const Plan *p, int64_t t, int64_t b, const void *p0, const void *p1) {
    const int64_t n = p->hid;
    const float *r = HAS(p, F_R) ? AT(p, F_R, t, b) : 0, *bias = HAS(p, F_BIAS) ? AT(p, F_BIAS, 0, 0) : 0;
    const void *x = p->xlow ? (const void *)AT16(p, F_X, t, b) : (const void *)AT(p, F_X, t, b);
    const float *c = AT(p, F_C, t, b), *h = AT(p, F_H, t, b);
    const int cellm = HAS(p, F_CELL), zcm = p->zc_mode == Z_MASK, zhm = p->zh_mode == Z_MASK;
    float *cn = AT(p, F_C, t + 1, b), *hn = AT(p, F_H, t + 1, b);
    float *fac = 0, *aux = 0;
    uint16_t *fac16 = 0, *aux16 = 0;
    if (p->save && p->flow) { fac16 = AT16(p, F_FAC, t, b); aux16 = AT16(p, F_AUX, t, b); }
    else if (p->save) { fac = AT(p, F_FAC, t, b); aux = AT(p, F_AUX, t, b); }
    float a[4][K], ones[K], zcs[K], zhs[K], sv[6][K], mt[3][K];
    fill(ones, 1.0f);
    fill(zcs, p->zc_mode == Z_SCALAR ? p->zc : 0.0f);
    fill(zhs, p->zh_mode == Z_SCALAR ? p->zh : 0.0f);
    for (int64_t k0 = 0; k0 < n; k0 += K) {
        const int64_t m = MIN(K, n - k0);
        for (int j = 0; j < 4; j++) {
            float *aj = a[j];
            if (p->xlow) { const uint16_t *xj = (const uint16_t *)x + j * n + k0; LOOP aj[k] = bf16_to_f32(xj[k]); }
            else { const float *xj = (const float *)x + j * n + k0; LOOP aj[k] = xj[k]; }
            if (bias) { const float *bj = bias + j * n + k0; LOOP aj[k] += bj[k]; }
            if (p0) add_from(aj, p0, b * 4 * n + j * n + k0, 0, m, p->low);
            if (p1) add_from(aj, p1, b * 4 * n + j * n + k0, r + j * n + k0, m, p->low);
        }
        float *gi = a[0], *gf = a[1], *gg = a[2], *go = a[3];
        LOOP { gi[k] = sigm(gi[k]); gf[k] = sigm(gf[k]); gg[k] = ftanh(gg[k]); go[k] = sigm(go[k]); }
        const float *dm = cellm ? mask_at(p, F_CELL, t, b, k0, m, p->cell_scale, mt[0]) : ones;
        const float *zc = zcm ? mask_at(p, F_ZC, t, b, k0, m, 1.0f, mt[1]) : zcs;
        const float *zh = zhm ? mask_at(p, F_ZH, t, b, k0, m, 1.0f, mt[2]) : zhs;
        const float *cp = c + k0, *hp = h + k0;
        float *cnk = cn + k0, *hnk = hn + k0;
        if (fac || fac16) {  /* bfloat16 factors go through L1 and are rounded once below */
            float *fi = fac16 ? sv[0] : fac + k0, *ff = fac16 ? sv[1] : fac + n + k0;
            float *fg = fac16 ? sv[2] : fac + 2 * n + k0, *fo = fac16 ? sv[3] : fac + 3 * n + k0;
            float *bc = fac16 ? sv[4] : aux + k0, *ft = fac16 ? sv[5] : aux + n + k0;
            LOOP {
                const float u = gi[k] * gg[k] * dm[k], v = gf[k] * cp[k], cc = u + v, tc = ftanh(cc);
                const float hh = go[k] * tc, keep = 1.0f - zh[k];
                cnk[k] = lerp(cc, cp[k], zc[k]);
                hnk[k] = lerp(hh, hp[k], zh[k]);
                fi[k] = u - u * gi[k];                             /* σ'(i) g̃ */
                ff[k] = v - v * gf[k];                             /* σ'(f) c_{t-1} */
                fg[k] = (gi[k] - gi[k] * gg[k] * gg[k]) * dm[k];   /* σ(i) tanh'(g) d */
                fo[k] = (hh - hh * go[k]) * keep;                  /* σ'(o) tanh(c̃) (1 - z^h) */
                bc[k] = (go[k] - hh * tc) * keep;                  /* σ(o) tanh'(c̃) (1 - z^h) */
                ft[k] = gf[k];
            }
            if (fac16) {
                for (int j = 0; j < 4; j++) to_low(fac16 + j * n + k0, sv[j], m);
                to_low(aux16 + k0, sv[4], m);
                to_low(aux16 + n + k0, sv[5], m);
            }
        } else {
            LOOP {
                const float u = gi[k] * gg[k] * dm[k], v = gf[k] * cp[k], cc = u + v, hh = go[k] * ftanh(cc);
                cnk[k] = lerp(cc, cp[k], zc[k]);
                hnk[k] = lerp(hh, hp[k], zh[k]);
            }
        }
    }
}

void lstm_forward_step(const Plan *p, int64_t t, int64_t steps, const void *p0, const void *p1) {
    const int more = t + 1 < steps;
    PAR
    for (int64_t b = 0; b < p->batch; b++) {
        fwd_row(p, t, b, p0, p1);
        if (more) left_row(p, t + 1, b);
    }
}

/* Backward, first half of step t: from dh_t, dc_t (DH, DC at parity (t+1)&1) turn the saved
 * factors into the gate gradients, write dc_{t-1} (parity t&1), and hand the gate gradients on:
 * in place into FAC (unless `nokeep`: under bf16 nothing reads the float32 copy once DGLOW and DB
 * have it), signed by r into SIGNED (flipout; a (B, 4H) buffer, or window-long (T, B, 4H) for
 * the window's dΔŴ), copied to the matmul dtype into DGLOW, and summed over rows and steps into
 * DB (the bias gradient when the window projected its input): one (4H) row of partial sums per
 * OpenMP thread, which the caller adds up, so that no two threads write the same sums. */
static void bwd_gates_row(const Plan *p, int64_t t, int64_t b, int tid) {
    const int64_t n = p->hid;
    /* with flow the factors are bfloat16 (read into L1 as float32) and FAC is never written */
    float *fac = p->flow ? 0 : AT(p, B_FAC, t, b);
    const uint16_t *fac16 = p->flow ? AT16(p, B_FAC, t, b) : 0, *aux16 = p->flow ? AT16(p, B_AUX, t, b) : 0;
    const float *aux = p->flow ? 0 : AT(p, B_AUX, t, b), *ft = p->flow ? 0 : aux + n;
    const float *dh = AT(p, B_DH, (t + 1) & 1, b), *dc = AT(p, B_DC, (t + 1) & 1, b);
    float *dcp = AT(p, B_DC, t & 1, b);
    const float *r = HAS(p, B_SIGNED) ? AT(p, B_R, t, b) : 0;
    void *sg = HAS(p, B_SIGNED) ? (p->low ? (void *)AT16(p, B_SIGNED, t, b) : (void *)AT(p, B_SIGNED, t, b)) : 0;
    uint16_t *dgl = HAS(p, B_DGLOW) ? AT16(p, B_DGLOW, t, b) : 0;
    float *db = HAS(p, B_DB) ? (float *)p->s[B_DB].base + tid * p->s[B_DB].row : 0;
    const int zcm = p->zc_mode == Z_MASK;
    float a[4][K], dcn[K], zcs[K], au16[K], ft16[K], f16[K], mt[K];
    fill(zcs, p->zc_mode == Z_SCALAR ? p->zc : 0.0f);
    for (int64_t k0 = 0; k0 < n; k0 += K) {
        const int64_t m = MIN(K, n - k0);
        const float *au = au16, *fk = ft16;
        if (aux16) { from_low(au16, aux16 + k0, m); from_low(ft16, aux16 + n + k0, m); }
        else { au = aux + k0; fk = ft + k0; }
        const float *zc = zcm ? mask_at(p, B_ZC, t, b, k0, m, 1.0f, mt) : zcs, *dhk = dh + k0, *dck = dc + k0;
        float *dcpk = dcp + k0;
        LOOP {
            dcn[k] = dhk[k] * au[k] + dck[k] * (1.0f - zc[k]);
            dcpk[k] = dcn[k] * fk[k] + dck[k] * zc[k];
        }
        for (int j = 0; j < 4; j++) {
            const int64_t o = j * n + k0;
            const float *by = j == 3 ? dhk : dcn;  /* o: × dh_t; i, f, g: × dc̃_t */
            float *aj = p->nokeep ? a[j] : fac + o;  /* in place, or only in L1 */
            const float *f = f16;
            if (fac16) from_low(f16, fac16 + o, m); else f = fac + o;
            LOOP aj[k] = f[k] * by[k];
            if (dgl) to_low(dgl + o, aj, m);
            if (db) { float *d = db + o; LOOP d[k] += aj[k]; }
            if (sg) {
                const float *rk = r + o;
                if (p->low) { uint16_t *q = (uint16_t *)sg + o; LOOP q[k] = f32_to_bf16(aj[k] * rk[k]); }
                else { float *q = (float *)sg + o; LOOP q[k] = aj[k] * rk[k]; }
            }
        }
    }
}

void lstm_backward_gates(const Plan *p, int64_t t) {
    PAR
    for (int64_t b = 0; b < p->batch; b++) bwd_gates_row(p, t, b, omp_get_thread_num());
}

/* Backward, second half of step t: dh_{t-1} = dout_{t-1} + m ∘ (p0 + p1 ∘ s) + dh_t ∘ z^h, with
 * dout_{t-1} the gradient of step t-1's output (DOUT, the window's (T, B, H); none at t = 0, whose
 * h_{-1} is the initial state), p0 = dgates W_hh and p1 = (dgates ∘ r) ΔŴ, into DH at parity t&1. */
static void bwd_hidden_row(const Plan *p, int64_t t, int64_t b, const void *p0, const void *p1) {
    const int64_t n = p->hid;
    const float *base = t > 0 ? AT(p, B_DOUT, t - 1, b) : 0, *dh = AT(p, B_DH, (t + 1) & 1, b);
    float *out = AT(p, B_DH, t & 1, b);
    const float *mk = HAS(p, B_MASK) ? AT(p, B_MASK, t, b) : 0, *s = HAS(p, B_S) ? AT(p, B_S, t, b) : 0;
    const int zhm = p->zh_mode == Z_MASK;
    float v[K], ones[K], zeros[K], zhs[K], mt[K];
    fill(ones, 1.0f);
    fill(zeros, 0.0f);
    fill(zhs, p->zh_mode == Z_SCALAR ? p->zh : 0.0f);
    for (int64_t k0 = 0; k0 < n; k0 += K) {
        const int64_t m = MIN(K, n - k0);
        LOOP v[k] = 0.0f;
        add_from(v, p0, b * n + k0, 0, m, p->low);
        if (p1) add_from(v, p1, b * n + k0, s + k0, m, p->low);
        const float *mm = mk ? mk + k0 : ones, *bs = base ? base + k0 : zeros;
        const float *zh = zhm ? mask_at(p, B_ZH, t, b, k0, m, 1.0f, mt) : zhs;
        const float *dhk = dh + k0;
        float *o = out + k0;
        LOOP o[k] = bs[k] + v[k] * mm[k] + dhk[k] * zh[k];
    }
}

/* The second half of step t and, for t > 0, the first half of step t-1, row by row in one pass:
 * step t-1's gates read row b of dh_{t-1} just as it was written (in L1), and a step takes one
 * call and one parallel region instead of two. Rows are independent in both halves. */
void lstm_backward_hidden_gates(const Plan *p, int64_t t, const void *p0, const void *p1) {
    PAR
    for (int64_t b = 0; b < p->batch; b++) {
        bwd_hidden_row(p, t, b, p0, p1);
        if (t > 0) bwd_gates_row(p, t - 1, b, omp_get_thread_num());
    }
}

int lstm_step_abi(void) { return (int)sizeof(Plan); }

/* sig[i] = σ(x[i]), th[i] = tanh(x[i]) as the steps compute them (for the accuracy tests) */
void lstm_activations(const float *x, float *sig, float *th, int64_t n) {
    for (int64_t k0 = 0; k0 < n; k0 += K) {
        const int64_t m = MIN(K, n - k0);
        const float *xk = x + k0;
        float *sk = sig + k0, *tk = th + k0;
        LOOP { sk[k] = sigm(xk[k]); tk[k] = ftanh(xk[k]); }
    }
}

/* dst (cols x rows) = src (rows x cols)ᵀ, both row-major, in 32 x 32 tiles so that reads and
 * writes both stay within cache lines: the backward products' weights W_hhᵀ (and ΔŴᵀ), once per
 * window. torch's strided copy_ of a 4000 x 1000 float32 transpose takes about 10 ms on two cores;
 * tiles take a fraction of that. `kind`: T_F32 and T_BF16 copy 4- or 2-byte elements; T_ROUND
 * rounds float32 to bfloat16 as it goes (f32_to_bf16, torch's rounding), so that under bf16 the
 * weight is cast and transposed in one pass instead of a cast pass and a transpose of its copy. */
#define TILE 32
enum { T_F32, T_BF16, T_ROUND };
static void transpose_tiles(const void *src, void *dst, int64_t rows, int64_t cols, int kind, int threads) {
    const int64_t tiles_r = (rows + TILE - 1) / TILE, tiles_c = (cols + TILE - 1) / TILE;
    #pragma omp parallel for schedule(static) num_threads(threads) if(rows * cols >= 65536)
    for (int64_t tr = 0; tr < tiles_r; tr++) {
        const int64_t r0 = tr * TILE, r1 = MIN(rows, r0 + TILE);
        for (int64_t tc = 0; tc < tiles_c; tc++) {
            const int64_t c0 = tc * TILE, c1 = MIN(cols, c0 + TILE);
            for (int64_t c = c0; c < c1; c++) {
                if (kind == T_F32) {
                    const float *s = (const float *)src; float *d = (float *)dst + c * rows;
                    for (int64_t r = r0; r < r1; r++) d[r] = s[r * cols + c];
                } else if (kind == T_BF16) {
                    const uint16_t *s = (const uint16_t *)src; uint16_t *d = (uint16_t *)dst + c * rows;
                    for (int64_t r = r0; r < r1; r++) d[r] = s[r * cols + c];
                } else {
                    const float *s = (const float *)src; uint16_t *d = (uint16_t *)dst + c * rows;
                    for (int64_t r = r0; r < r1; r++) d[r] = f32_to_bf16(s[r * cols + c]);
                }
            }
        }
    }
}

/* elements of `size` bytes (4: float32, 2: bfloat16), copied */
void transpose_2d(const void *src, void *dst, int64_t rows, int64_t cols, int size, int threads) {
    transpose_tiles(src, dst, rows, cols, size == 4 ? T_F32 : T_BF16, threads);
}

/* float32 in, bfloat16 out */
void transpose_to_bf16(const float *src, uint16_t *dst, int64_t rows, int64_t cols, int threads) {
    transpose_tiles(src, dst, rows, cols, T_ROUND, threads);
}
