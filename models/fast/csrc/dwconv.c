/* Depthwise 3x3 convolutions for channels-last CPU tensors, built on first use by
 * models/fast/kernels.py and called through ctypes.
 *
 * Why: the enhancer spends a quarter of its CPU time in depthwise 3x3 convs and the GDFN gate
 * gelu(a) * b that follows them. Here each output pixel's 16 channels are accumulated in one
 * vector register, and the GDFN variant applies the gate before the store, so `a` and `b` after
 * the conv never reach memory. Same math as F.conv2d(padding=1, groups=C) (+ exact gelu); only
 * the summation order and a 1.5e-7-accurate erf differ.
 *
 * Layout: inputs and output (N, H, W, C) contiguous, C a multiple of 16; weights (9, C), tap-major
 * (row dy, column dx -> index 3 * dy + dx). Zero padding of one pixel.
 * Portable C with GCC/Clang vector extensions: the compiler maps the 16-float vectors to
 * AVX-512, AVX2 or NEON registers.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
enum { VL = 16 };

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float s) { return (vf){0} + s; }

/* Channels c0..c0+15 of output pixel (y, x). */
static inline vf dw_pixel(const float *src, const float *wt, int64_t h, int64_t w, int64_t c,
                          int64_t y, int64_t x, int64_t c0) {
    vf acc = {0};
    for (int dy = -1; dy <= 1; dy++) {
        int64_t yy = y + dy;
        if (yy < 0 || yy >= h) continue;
        for (int dx = -1; dx <= 1; dx++) {
            int64_t xx = x + dx;
            if (xx < 0 || xx >= w) continue;
            acc += load(wt + (3 * (dy + 1) + dx + 1) * c + c0) * load(src + (yy * w + xx) * c + c0);
        }
    }
    return acc;
}

/* exp(z) for z <= 0: 2^n e^r with |r| <= ln2 / 2 and a degree-6 Taylor polynomial (rel. err. < 2e-7). */
static inline vf exp_nonpositive(vf z) {
    vi low = z < splat(-87.f);
    z = (vf)(((vi)z & ~low) | ((vi)splat(-87.f) & low));
    vf n = (z * 1.44269504f + 12582912.f) - 12582912.f;  /* round to nearest */
    vf r = z - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    vf p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
}

/* gelu(v) = v (1 + erf(v / sqrt 2)) / 2, erf by Abramowitz & Stegun 7.1.26 (abs. error < 1.5e-7). */
static inline vf gelu(vf v) {
    vf x = v * 0.70710678118654752f;
    vi sign = (vi)x & (int32_t)0x80000000;
    vf ax = (vf)((vi)x ^ sign);
    vf t = 1.f / (1.f + 0.3275911f * ax);
    vf poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    vf erf_ax = 1.f - poly * exp_nonpositive(-ax * ax);
    return 0.5f * v * (1.f + (vf)((vi)erf_ax ^ sign));
}

/* out = depthwise3x3(a, wa). */
void dw3x3(const float *a, const float *wa, float *out, int64_t n, int64_t h, int64_t w, int64_t c,
           int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++)
        for (int64_t y = 0; y < h; y++) {
            const float *ai = a + i * h * w * c;
            float *o = out + (i * h + y) * w * c;
            for (int64_t x = 0; x < w; x++)
                for (int64_t c0 = 0; c0 < c; c0 += VL)
                    store(o + x * c + c0, dw_pixel(ai, wa, h, w, c, y, x, c0));
        }
}

/* out = depthwise3x3(a, wa), and the sum over pixels of out^2 per image and channel, added to
 * squares[thread][image][channel] (zeroed doubles, one slice per thread): MDTA's |q|^2 and |k|^2
 * without another pass over q and k. */
void dw3x3_squares(const float *a, const float *wa, float *out, double *squares, int64_t n, int64_t h,
                   int64_t w, int64_t c, int threads) {
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        double *mine = squares + (int64_t)omp_get_thread_num() * n * c;
#else
        double *mine = squares;
#endif
        float *row = __builtin_alloca(sizeof(float) * c);
#pragma omp for collapse(2) schedule(static)
        for (int64_t i = 0; i < n; i++)
            for (int64_t y = 0; y < h; y++) {
                const float *ai = a + i * h * w * c;
                float *o = out + (i * h + y) * w * c;
                memset(row, 0, sizeof(float) * c);
                for (int64_t x = 0; x < w; x++)
                    for (int64_t c0 = 0; c0 < c; c0 += VL) {
                        vf v = dw_pixel(ai, wa, h, w, c, y, x, c0);
                        store(o + x * c + c0, v);
                        store(row + c0, load(row + c0) + v * v);
                    }
                for (int64_t k = 0; k < c; k++) mine[i * c + k] += row[k];
            }
    }
}

/* out = gelu(depthwise3x3(a, wa)) * depthwise3x3(b, wb): the GDFN gate. */
void gated_dw3x3(const float *a, const float *b, const float *wa, const float *wb, float *out,
                 int64_t n, int64_t h, int64_t w, int64_t c, int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++)
        for (int64_t y = 0; y < h; y++) {
            const float *ai = a + i * h * w * c, *bi = b + i * h * w * c;
            float *o = out + (i * h + y) * w * c;
            for (int64_t x = 0; x < w; x++)
                for (int64_t c0 = 0; c0 < c; c0 += VL) {
                    vf ga = dw_pixel(ai, wa, h, w, c, y, x, c0);
                    vf gb = dw_pixel(bi, wb, h, w, c, y, x, c0);
                    store(o + x * c + c0, gelu(ga) * gb);
                }
        }
}
