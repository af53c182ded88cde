/* PLUS's fixed-point insertion (Optimization="FULL") compiled ahead of time.
 *
 * The C form of the numba kernels in ../kernels_plus.py that FreehandUS uses for
 * `--emulate-plus` (nearest and trilinear, PLUS's MEAN / MAXIMUM / LATEST): the same arithmetic,
 * so the buffers are bit-identical to numba's (tested). It exists so that a reconstruction in
 * PLUS's arithmetic starts without importing numba and LLVM (about half a second and 60 MB);
 * ../native.py loads it with ctypes and falls back to numba when it is not built.
 *
 * Build: python -m FreehandUSLib.reconstruction.native_build (make install runs it).
 * Needs IEEE double arithmetic without contraction (-ffp-contract=off, no -ffast-math) and an
 * arithmetic right shift of negative int64 (every compiler this is built with).
 */

#include <math.h>
#include <stdint.h>

#define FH_MODE_MAX 1
#define FH_MODE_LATEST 2
#define FH_MODE_MEAN_PLUS 4
#define FH_FIXED_SCALE 16384.0
#define FH_PLUS_UNIT 256.0
#define FH_PLUS_THRESHOLD 65279.0
#define FH_PLUS_MAXIMUM 65535.0
/* 1.5 * 2**38: adding it to a double rounds it to a multiple of 2**-14 (ties to even). */
#define FH_FIXED_MAGIC 412316860416.0

#ifndef FH_SOURCE_HASH
#define FH_SOURCE_HASH "unknown"
#endif

/* The hash of the sources this library was built from (../native.py refuses a stale build). */
const char *fh_source_hash(void) { return FH_SOURCE_HASH; }

/* 1 where >> of a negative int64 is arithmetic (floor), as the kernels assume. */
int fh_arithmetic_shift(void)
{
    volatile int64_t minus_three = -3;
    return (minus_three >> 1) == -2;
}

/* ceil(2**32 / d) for d = 1..256: (n * R[d]) >> 32 == n // d for 0 <= n < 2**16. */
static int64_t fh_reciprocal32[257];

static void fh_init_reciprocal(void)
{
    if (fh_reciprocal32[1] != 0)
        return;
    for (int64_t d = 256; d >= 1; d--)
        fh_reciprocal32[d] = (((int64_t)1 << 32) + d - 1) / d;
}

static inline int64_t fh_floordiv(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0)))
        q--;
    return q;
}

static inline int64_t fh_pymod(int64_t a, int64_t b) { return a - fh_floordiv(a, b) * b; }

/* floor(x) for 0 <= x < 2**63, by truncation: no libm call where the compiler targets a CPU
 * without a rounding instruction (baseline x86-64). */
static inline double fh_floor_nonneg(double x) { return (double)(int64_t)x; }

static inline int64_t fh_max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t fh_min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* kernels_plus._fixed_x_range: the x in xa..xb whose cell (b_q + x a_q) >> 14 lies in lo..hi. */
static inline void fh_fixed_x_range(int64_t b_q, int64_t a_q, int64_t lo, int64_t hi, int64_t xa, int64_t xb,
                                    int64_t *out_lo, int64_t *out_hi)
{
    int64_t p_lo = lo * 16384 - b_q, p_hi = hi * 16384 + 16383 - b_q, x0, x1;
    if (a_q == 0) {
        if (p_lo <= 0 && 0 <= p_hi) {
            *out_lo = xa;
            *out_hi = xb;
        } else {
            *out_lo = xa;
            *out_hi = xa - 1;
        }
        return;
    }
    if (a_q > 0) {
        x0 = -fh_floordiv(-p_lo, a_q);
        x1 = fh_floordiv(p_hi, a_q);
    } else {
        x0 = -fh_floordiv(-p_hi, a_q);
        x1 = fh_floordiv(p_lo, a_q);
    }
    *out_lo = fh_max64(xa, x0);
    *out_hi = fh_min64(xb, x1);
}

/* kernels_plus._frame_spans: the (row, first pixel, last pixel, first plane, last plane) pieces
 * of one frame (matrix m, row ranges rr) for worker `group` of `n_groups`; returns how many. */
static int64_t fh_frame_spans(const double *m, const int32_t *rr, int64_t n_rows, int64_t nk, int linear,
                              int64_t n_groups, int64_t group, int64_t slab, int64_t *spans)
{
    const int64_t n_slabs = (nk + slab - 1) / slab;
    const double pad = linear ? 1.0 : 0.5;
    const double ak = m[6];
    int64_t count = 0;
    for (int64_t y = 0; y < n_rows; y++) {
        int64_t x0 = rr[y * 4], x1 = rr[y * 4 + 1];
        if (x1 < x0)
            continue;
        if (n_groups == 1) {
            int64_t *s = spans + count * 5;
            s[0] = y, s[1] = x0, s[2] = x1, s[3] = 0, s[4] = nk - 1;
            count++;
            continue;
        }
        double bk = m[8] + (double)y * m[7];
        double ka = bk + (double)x0 * ak, kb = bk + (double)x1 * ak;
        double kmin = (ka < kb ? ka : kb) - pad, kmax = (ka > kb ? ka : kb) + pad;
        if (kmax < 0.0 || kmin > (double)nk)
            continue;
        int64_t first = fh_max64(0, fh_floordiv((int64_t)floor(kmin), slab));
        int64_t last = fh_min64(n_slabs - 1, fh_floordiv((int64_t)floor(kmax), slab));
        int64_t sl = first + fh_pymod(group - first, n_groups);
        while (sl <= last) {
            int64_t klo = sl * slab, khi = fh_min64(nk - 1, klo + slab - 1);
            int64_t xa = x0, xb = x1;
            if (ak != 0.0) {
                double t0 = ((double)klo - pad - bk) / ak, t1 = ((double)khi + pad - bk) / ak;
                if (t0 > t1) {
                    double t = t0;
                    t0 = t1;
                    t1 = t;
                }
                t0 = t0 > (double)x0 - 2.0 ? t0 : (double)x0 - 2.0;
                t1 = t1 < (double)x1 + 2.0 ? t1 : (double)x1 + 2.0;
                xa = fh_max64(x0, (int64_t)floor(t0) - 1);
                xb = fh_min64(x1, (int64_t)ceil(t1) + 1);
            }
            if (xa <= xb) {
                int64_t *s = spans + count * 5;
                s[0] = y, s[1] = xa, s[2] = xb, s[3] = klo, s[4] = khi;
                count++;
            }
            sl += n_groups;
        }
    }
    return count;
}

/* Called once by the loader before any insertion (fills the reciprocal table). */
void fh_init(void) { fh_init_reciprocal(); }

#define ELEM uint8_t
#define SUFFIX u8
#define INT_OUT 1
#include "plus_insert_impl.h"
#undef ELEM
#undef SUFFIX
#undef INT_OUT

#define ELEM float
#define SUFFIX f32
#define INT_OUT 0
#include "plus_insert_impl.h"
#undef ELEM
#undef SUFFIX
#undef INT_OUT
