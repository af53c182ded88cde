/* PLUS's fixed-point insertion for one frame/accumulator element type.
 *
 * Included twice by plus_insert.c, with
 *   ELEM     the frame and accumulator element type (uint8_t or float),
 *   SUFFIX   the suffix of the exported function names (u8, f32),
 *   INT_OUT  1 when ELEM is an integer type (values are truncated / rounded to it), else 0.
 *
 * Every function here is the C form of a numba kernel in ../kernels_plus.py, operation for
 * operation (same float64 expressions in the same order, same integer arithmetic), so the two
 * engines give bit-identical buffers. Positions are in voxel indices; the fixed-point positions
 * are integers in units of 2**-14 (PLUS's 14 fractional bits). Arrays are C-contiguous:
 *   frames  (n_all, n_rows, n_cols, nc)   acc (nk, nj, ni, nc)   weight (nk, nj, ni) uint16
 *   mats    (n, 3, 3) float64: pixel (x, y, 1) -> continuous voxel index (i, j, k)
 *   ranges  (n_masks, n_rows, 4) int32: first, last kept pixel, skip segment first, last
 */

#define FH_CAT_(a, b) a##_##b
#define FH_CAT(a, b) FH_CAT_(a, b)
#define FH_FN(name) FH_CAT(name, SUFFIX)

typedef struct {
    const ELEM *frames;
    int64_t n_rows, n_cols, nc;
    ELEM *acc;
    uint16_t *weight;
    int64_t nk, nj, ni;
    int mode, use_reject;
    double reject;
} FH_FN(fh_ctx);

/* kernels_common._rejected: the pixel's channel sum below reject * nc. */
static inline int FH_FN(fh_rejected)(const ELEM *px, int64_t nc, double reject)
{
    double s = 0.0;
    for (int64_t c = 0; c < nc; c++)
        s += (double)px[c];
    return s < reject * (double)nc;
}

static inline ELEM FH_FN(fh_store_floor)(double v)
{
#if INT_OUT
    return (ELEM)fh_floor_nonneg(v); /* v >= 0: a mean of non-negative values */
#else
    return (ELEM)v;
#endif
}

/* kernels_plus._nearest_mean_plus: PLUS's nearest-neighbour MEAN update of one voxel. */
static inline void FH_FN(fh_nearest_mean_plus)(const ELEM *px, ELEM *av, uint16_t *wv, int64_t nc)
{
    uint16_t a = *wv;
    if ((double)a <= FH_PLUS_THRESHOLD) {
        double newa = (double)a + FH_PLUS_UNIT;
        for (int64_t c = 0; c < nc; c++) {
            double v = ((double)px[c] * FH_PLUS_UNIT + (double)av[c] * (double)a) / newa;
            av[c] = FH_FN(fh_store_floor)(v);
        }
        *wv = (uint16_t)(newa < FH_PLUS_MAXIMUM ? newa : FH_PLUS_MAXIMUM);
    } else {
        double v = (double)px[0] * 0.00390625 + (double)av[0] * 0.99609375;
        av[0] = FH_FN(fh_store_floor)(v);
    }
}

/* kernels_plus._nearest_span_fixed: pixels xa..xb (minus the skip segment s0..s1) of row y of
 * frame f, into planes klo..khi; returns how many pixels went in. */
static int64_t FH_FN(fh_nearest_span_fixed)(const FH_FN(fh_ctx) *cx, int64_t f, int64_t y, int64_t xa, int64_t xb,
                                            int64_t s0, int64_t s1, double bi, double bj, double bk, double ai,
                                            double aj, double ak, int64_t klo, int64_t khi)
{
    const int64_t nj = cx->nj, ni = cx->ni, nc = cx->nc;
    const int64_t half = 8192;
    const int64_t bi_q = (int64_t)(bi * FH_FIXED_SCALE) + half;
    const int64_t bj_q = (int64_t)(bj * FH_FIXED_SCALE) + half;
    const int64_t bk_q = (int64_t)(bk * FH_FIXED_SCALE) + half;
    const int64_t ai_q = (int64_t)(ai * FH_FIXED_SCALE);
    const int64_t aj_q = (int64_t)(aj * FH_FIXED_SCALE);
    const int64_t ak_q = (int64_t)(ak * FH_FIXED_SCALE);
    int64_t x_lo, x_hi;
    fh_fixed_x_range(bk_q, ak_q, klo, khi, xa, xb, &x_lo, &x_hi);
    fh_fixed_x_range(bi_q, ai_q, 0, ni - 1, x_lo, x_hi, &x_lo, &x_hi);
    fh_fixed_x_range(bj_q, aj_q, 0, nj - 1, x_lo, x_hi, &x_lo, &x_hi);
    const int gray = nc == 1 && !cx->use_reject;
    const int mode = cx->mode;
    const ELEM *row = cx->frames + (f * cx->n_rows + y) * cx->n_cols * nc;
    ELEM *acc = cx->acc;
    uint16_t *weight = cx->weight;
    int64_t inserted = 0;
    for (int part = 0; part < 2; part++) {
        int64_t r0, r1;
        if (part == 0) {
            r0 = x_lo;
            r1 = s0 <= s1 ? (x_hi < s0 - 1 ? x_hi : s0 - 1) : x_hi;
        } else {
            if (s0 > s1)
                break;
            r0 = x_lo > s1 + 1 ? x_lo : s1 + 1;
            r1 = x_hi;
        }
        if (r0 > r1)
            continue;
        int64_t pk = bk_q + r0 * ak_q, pi = bi_q + r0 * ai_q, pj = bj_q + r0 * aj_q;
#if INT_OUT
        if (gray && mode == FH_MODE_MEAN_PLUS) {
            /* (new + k old) // (k + 1) with the buffer at 256 k, by an exact reciprocal multiply;
             * past saturation (new + 255 old) >> 8; other buffers take the division. The voxel's
             * value and buffer stay in registers while consecutive pixels fall into it (a row's
             * pixels in one voxel are consecutive) and are stored when the row leaves it:
             * the same updates in the same order as one read-modify-write per pixel. */
            int64_t cur = -1, a = 0, old = 0;
            for (int64_t x = r0; x <= r1; x++) {
                int64_t v_ix = ((pk >> 14) * nj + (pj >> 14)) * ni + (pi >> 14);
                if (v_ix != cur) {
                    if (cur >= 0) {
                        acc[cur] = (ELEM)old;
                        weight[cur] = (uint16_t)a;
                    }
                    cur = v_ix;
                    a = weight[v_ix];
                    old = acc[v_ix];
                }
                int64_t v = row[x];
                if (a <= 65279) {
                    int64_t k = a >> 8, nn = v + k * old;
                    if ((a & 255) == 0 && nn < 65536)
                        old = (nn * fh_reciprocal32[k + 1]) >> 32;
                    else
                        old = (v * 256 + old * a) / (a + 256);
                    a += 256;
                } else {
                    old = (v + 255 * old) >> 8;
                }
                pk += ak_q;
                pi += ai_q;
                pj += aj_q;
            }
            if (cur >= 0) {
                acc[cur] = (ELEM)old;
                weight[cur] = (uint16_t)a;
            }
            inserted += r1 - r0 + 1;
            continue;
        }
#endif
        if (gray && mode == FH_MODE_MAX) {
            for (int64_t x = r0; x <= r1; x++) {
                int64_t v_ix = ((pk >> 14) * nj + (pj >> 14)) * ni + (pi >> 14);
                ELEM v = row[x];
                if (v > acc[v_ix])
                    acc[v_ix] = v;
                weight[v_ix] = 256;
                pk += ak_q;
                pi += ai_q;
                pj += aj_q;
            }
            inserted += r1 - r0 + 1;
        } else if (gray && mode == FH_MODE_LATEST) {
            for (int64_t x = r0; x <= r1; x++) {
                int64_t v_ix = ((pk >> 14) * nj + (pj >> 14)) * ni + (pi >> 14);
                acc[v_ix] = row[x];
                weight[v_ix] = 256;
                pk += ak_q;
                pi += ai_q;
                pj += aj_q;
            }
            inserted += r1 - r0 + 1;
        } else {
            for (int64_t x = r0; x <= r1; x++) {
                int64_t v_ix = ((pk >> 14) * nj + (pj >> 14)) * ni + (pi >> 14);
                pk += ak_q;
                pi += ai_q;
                pj += aj_q;
                const ELEM *px = row + x * nc;
                if (cx->use_reject && FH_FN(fh_rejected)(px, nc, cx->reject))
                    continue;
                ELEM *av = acc + v_ix * nc;
                if (mode == FH_MODE_MEAN_PLUS) {
                    FH_FN(fh_nearest_mean_plus)(px, av, weight + v_ix, nc);
                } else {
                    for (int64_t c = 0; c < nc; c++) {
                        ELEM v = px[c];
                        if (mode == FH_MODE_LATEST || v > av[c])
                            av[c] = v;
                    }
                    weight[v_ix] = 256;
                }
                inserted += 1;
            }
        }
    }
    return inserted;
}

/* kernels_plus._linear_mean_plus: PLUS's trilinear MEAN update of one voxel; w is the pixel's
 * weight for it in units of 2**-14. */
static inline void FH_FN(fh_linear_mean_plus)(const ELEM *px, ELEM *av, uint16_t *wv, int64_t nc, int64_t w)
{
    double wi = (double)w / FH_FIXED_SCALE * FH_FIXED_SCALE;
    double ri = (double)*wv * 64.0;
    double ai = wi + ri;
    for (int64_t c = 0; c < nc; c++) {
        double num = wi * (double)px[c] + ri * (double)av[c];
        double shifted = (num / ai) + FH_FIXED_MAGIC; /* rounded to 2**-14, ties to even */
        double q = shifted - FH_FIXED_MAGIC;
#if INT_OUT
        av[c] = (ELEM)fh_floor_nonneg(q + 0.5);
#else
        av[c] = (ELEM)q;
#endif
    }
    /* newa = 256 ai (units of 2**-14); below 65535 the buffer becomes floor(newa / 2**14 + 0.5),
     * which for the integer ai is (ai + 32) >> 6, exactly. */
    int64_t a_q = w + (int64_t)*wv * 64;
    if (a_q < 65535 * 64)
        *wv = (uint16_t)((a_q + 32) >> 6);
    else
        *wv = (uint16_t)FH_PLUS_MAXIMUM;
}

/* kernels_plus._linear_span_fixed: trilinear insertion of pixels xa..xb of row y into planes
 * klo..khi; returns the pixels whose first non-degenerate corner plane lies in klo..khi. */
static int64_t FH_FN(fh_linear_span_fixed)(const FH_FN(fh_ctx) *cx, int64_t f, int64_t y, int64_t xa, int64_t xb,
                                           int64_t s0, int64_t s1, double bi, double bj, double bk, double ai,
                                           double aj, double ak, int64_t klo, int64_t khi)
{
    const int64_t nk = cx->nk, nj = cx->nj, ni = cx->ni, nc = cx->nc;
    const int64_t one = 16384, half = 8192, min_w = 2048;
    const int64_t bi_q = (int64_t)(bi * FH_FIXED_SCALE), bj_q = (int64_t)(bj * FH_FIXED_SCALE);
    const int64_t bk_q = (int64_t)(bk * FH_FIXED_SCALE);
    const int64_t ai_q = (int64_t)(ai * FH_FIXED_SCALE), aj_q = (int64_t)(aj * FH_FIXED_SCALE);
    const int64_t ak_q = (int64_t)(ak * FH_FIXED_SCALE);
    const int mode = cx->mode;
    const ELEM *row = cx->frames + (f * cx->n_rows + y) * cx->n_cols * nc;
    int64_t inserted = 0;
    for (int64_t x = xa; x <= xb; x++) {
        if (s0 <= x && x <= s1)
            continue;
        int64_t pk = bk_q + x * ak_q;
        int64_t k0 = pk >> 14;
        if (k0 < 0 || k0 < klo - 1 || k0 > khi)
            continue;
        int64_t pi = bi_q + x * ai_q, pj = bj_q + x * aj_q;
        int64_t i0 = pi >> 14, j0 = pj >> 14;
        int64_t fx = pi & 16383, fy = pj & 16383, fz = pk & 16383;
        if (i0 < 0 || j0 < 0)
            continue;
        if (i0 + (fx != 0) >= ni || j0 + (fy != 0) >= nj || k0 + (fz != 0) >= nk)
            continue;
        const ELEM *px = row + x * nc;
        if (cx->use_reject && FH_FN(fh_rejected)(px, nc, cx->reject))
            continue;
        int64_t first_plane = -1;
        for (int dk = 0; dk < 2; dk++) {
            int64_t wz = dk == 1 ? fz : one - fz;
            if (wz == 0)
                continue;
            int64_t kk = k0 + dk;
            for (int dj = 0; dj < 2; dj++) {
                int64_t wy = dj == 1 ? fy : one - fy;
                if (wy == 0)
                    continue;
                int64_t wyz = (wy * wz + half) >> 14;
                int64_t jj = j0 + dj;
                for (int di = 0; di < 2; di++) {
                    int64_t wx = di == 1 ? fx : one - fx;
                    if (wx == 0)
                        continue;
                    int64_t w = (wx * wyz + half) >> 14;
                    if (w == 0)
                        continue;
                    if (mode != FH_MODE_MEAN_PLUS && w < min_w)
                        continue;
                    if (first_plane < 0)
                        first_plane = kk;
                    if (kk < klo || kk > khi)
                        continue;
                    int64_t v_ix = (kk * nj + jj) * ni + i0 + di;
                    ELEM *av = cx->acc + v_ix * nc;
                    if (mode == FH_MODE_MEAN_PLUS) {
                        FH_FN(fh_linear_mean_plus)(px, av, cx->weight + v_ix, nc, w);
                    } else {
                        double a = (double)cx->weight[v_ix];
                        for (int64_t c = 0; c < nc; c++) {
                            ELEM v = px[c];
                            if (mode == FH_MODE_LATEST || v > av[c]) {
                                av[c] = v;
                                a = (double)((w * 256 + half) >> 14);
                            }
                        }
                        cx->weight[v_ix] = (uint16_t)a;
                    }
                }
            }
        }
        if (klo <= first_plane && first_plane <= khi)
            inserted += 1;
    }
    return inserted;
}

/* kernels_plus._insert_rows: one worker's part of a batch of frames.
 * frame_ids (n,), mats (n, 3, 3), mask_ids (n,); counts (n,) gets the pixels inserted added;
 * spans is scratch of (pieces, 5) int64 (kernels_plus.insert_per_pixel sizes it). */
int FH_FN(fh_plus_insert)(const ELEM *frames, int64_t n_rows, int64_t n_cols, int64_t nc, const int64_t *frame_ids,
                          int64_t n, const double *mats, const int32_t *ranges, const int64_t *mask_ids, int linear,
                          int mode, int use_reject, double reject, ELEM *acc, uint16_t *weight, int64_t nk,
                          int64_t nj, int64_t ni, int64_t *counts, int64_t n_groups, int64_t group, int64_t slab,
                          int64_t *spans)
{
    if (mode != FH_MODE_MEAN_PLUS && mode != FH_MODE_MAX && mode != FH_MODE_LATEST)
        return -1;
    FH_FN(fh_ctx) cx = {frames, n_rows, n_cols, nc, acc, weight, nk, nj, ni, mode, use_reject, reject};
    for (int64_t n_ = 0; n_ < n; n_++) {
        const int64_t f = frame_ids[n_];
        const int32_t *rr = ranges + mask_ids[n_] * n_rows * 4;
        const double *m = mats + n_ * 9;
        int64_t pieces = fh_frame_spans(m, rr, n_rows, nk, linear, n_groups, group, slab, spans);
        int64_t total = 0;
        for (int64_t q = 0; q < pieces; q++) {
            const int64_t *s = spans + q * 5;
            const int64_t y = s[0];
            double bi = m[2] + (double)y * m[1];
            double bj = m[5] + (double)y * m[4];
            double bk = m[8] + (double)y * m[7];
            if (linear)
                total += FH_FN(fh_linear_span_fixed)(&cx, f, y, s[1], s[2], rr[y * 4 + 2], rr[y * 4 + 3], bi, bj, bk,
                                                     m[0], m[3], m[6], s[3], s[4]);
            else
                total += FH_FN(fh_nearest_span_fixed)(&cx, f, y, s[1], s[2], rr[y * 4 + 2], rr[y * 4 + 3], bi, bj,
                                                      bk, m[0], m[3], m[6], s[3], s[4]);
        }
        counts[n_] += total;
    }
    return 0;
}

#undef FH_FN
#undef FH_CAT
#undef FH_CAT_
