/* PLUS's STICK hole filling (vtkIGSIOFillHolesInVolume) for one channel, compiled ahead of time.
 *
 * The C form of ../holefill.py's STICK element (its straightforward definition,
 * ../reference.py fill_holes_reference): for each hole, along each of the 13 stick directions,
 * the nearest known voxel on both sides (at most limit - 1 steps); a stick is usable when both
 * ends exist and it is at most `limit` voxels long, counting both ends. The best `n_use` sticks
 * (ties included) are averaged with their weights wtab[d][n]; along a stick the value is
 * ftab[f][r] * forward end + (1 - ftab[f][r]) * reverse end (floored first when `floor_values`:
 * PLUS's integer output). Same float64 operations in the same order as the numba kernels, so the
 * volumes are bit-identical (tested). Each hole is written by the call that owns its plane;
 * known voxels are only read, so calls on disjoint plane ranges may run in parallel.
 *
 * Arrays are C-contiguous (nk, nj, ni) volumes; `vals` holds the known voxels' values with
 * `vals_stride` elements between voxels (one channel of an interleaved buffer).
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define FH_STORE_RAW 0
#define FH_STORE_ROUND 1
#define FH_STORE_FLOOR 2

static inline double fh_read(const void *vals, int vals_type, int64_t index)
{
    return vals_type == 0 ? (double)((const uint8_t *)vals)[index] : (double)((const float *)vals)[index];
}

static inline void fh_write(void *out, int out_type, int store, int64_t index, double x)
{
    if (store == FH_STORE_ROUND || store == FH_STORE_FLOOR) {
        double y = store == FH_STORE_ROUND ? floor(x + 0.5) : floor(x);
        y = y < 0.0 ? 0.0 : y;
        y = y > 255.0 ? 255.0 : y;
        x = y;
    }
    if (out_type == 0)
        ((uint8_t *)out)[index] = (uint8_t)x;
    else
        ((float *)out)[index] = (float)x;
}

/* Steps before leaving 0 .. n - 1 from x moving by d (d in -1, 0, 1), at most cap. */
static inline int64_t fh_room(int64_t x, int64_t n, int64_t d, int64_t cap)
{
    int64_t room = d > 0 ? n - 1 - x : (d < 0 ? x : cap);
    return room < cap ? room : cap;
}

/* Steps (1 .. cap) to the nearest known voxel from flat index v along the flat offset `step`,
 * 0 if none within `room` steps (the steps that stay inside the volume). */
static inline int64_t fh_walk(const uint8_t *known, int64_t v, int64_t step, int64_t room)
{
    for (int64_t s = 1; s <= room; s++)
        if (known[v + s * step])
            return s;
    return 0;
}

/* One line of n voxels (stride apart): dst = 1 where src is non-zero within `reach` voxels. */
static void fh_dilate_line(const uint8_t *src, uint8_t *dst, int64_t n, int64_t stride, int64_t reach)
{
    int64_t last = -reach - 1; /* the nearest set voxel before (or at) x */
    for (int64_t x = 0; x < n; x++) {
        if (src[x * stride])
            last = x;
        dst[x * stride] = x - last <= reach;
    }
    int64_t next = n + reach + 1;
    for (int64_t x = n - 1; x >= 0; x--) {
        if (src[x * stride])
            next = x;
        if (next - x <= reach)
            dst[x * stride] = 1;
    }
}

/* near = 1 where a known voxel lies within `reach` voxels along every axis (the cube of half-edge
 * `reach`, by three separable passes; tmp is scratch of the same size). A hole outside it has no
 * usable stick at all (both ends of a stick lie within limit - 1 steps along each axis), so
 * fh_stick_fill skips it without walking: the same holes are filled, far fewer steps. */
void fh_near_known(const uint8_t *known, uint8_t *near, uint8_t *tmp, int64_t nk, int64_t nj, int64_t ni,
                   int64_t reach)
{
    for (int64_t k = 0; k < nk; k++)
        for (int64_t j = 0; j < nj; j++)
            fh_dilate_line(known + (k * nj + j) * ni, tmp + (k * nj + j) * ni, ni, 1, reach);
    for (int64_t k = 0; k < nk; k++)
        for (int64_t i = 0; i < ni; i++)
            fh_dilate_line(tmp + k * nj * ni + i, near + k * nj * ni + i, nj, ni, reach);
    for (int64_t j = 0; j < nj; j++)
        for (int64_t i = 0; i < ni; i++)
            fh_dilate_line(near + j * ni + i, tmp + j * ni + i, nk, nj * ni, reach);
    for (int64_t v = 0; v < nk * nj * ni; v++)
        near[v] = tmp[v];
}

/* Fill the holes of planes k0 .. k1 - 1 (not known, not yet `done`); returns how many.
 * dirs (13, 3) int64 (di, dj, dk); wtab (13, limit + 1); ftab (limit + 1, limit + 1).
 * `done` (may be NULL) is set where a hole is filled (for a following element); `near`
 * (fh_near_known with reach limit - 1, or NULL) marks the holes that can have a stick. */
int64_t fh_stick_fill(const void *vals, int vals_type, int64_t vals_stride, const uint8_t *known, const uint8_t *near,
                      uint8_t *done,
                      void *out, int out_type, int store, int64_t nk, int64_t nj, int64_t ni, int64_t k0, int64_t k1,
                      const int64_t *dirs, int64_t limit, int64_t n_use, const double *wtab, const double *ftab,
                      int floor_values)
{
    enum { ND = 13 };
    int64_t cap = limit - 1, filled = 0;
    int64_t longest = nk > nj ? (nk > ni ? nk : ni) : (nj > ni ? nj : ni);
    if (cap > longest)
        cap = longest;
    double stick_w[ND], stick_v[ND];
    for (int64_t k = k0; k < k1; k++) {
        for (int64_t j = 0; j < nj; j++) {
            for (int64_t i = 0; i < ni; i++) {
                int64_t v = (k * nj + j) * ni + i;
                if (known[v] || (near != NULL && !near[v]) || (done != NULL && done[v]))
                    continue;
                int any = 0;
                for (int d = 0; d < ND; d++) {
                    int64_t di = dirs[d * 3], dj = dirs[d * 3 + 1], dk = dirs[d * 3 + 2];
                    int64_t step = (dk * nj + dj) * ni + di;
                    stick_w[d] = 0.0;
                    int64_t room_f = fh_room(i, ni, di, fh_room(j, nj, dj, fh_room(k, nk, dk, cap)));
                    int64_t f = fh_walk(known, v, step, room_f);
                    if (f == 0)
                        continue;
                    int64_t room_r = fh_room(i, ni, -di, fh_room(j, nj, -dj, fh_room(k, nk, -dk, cap)));
                    int64_t r = fh_walk(known, v, -step, room_r);
                    int64_t n = f + r + 1;
                    if (r == 0 || n > limit)
                        continue;
                    stick_w[d] = wtab[d * (limit + 1) + n];
                    double a = ftab[f * (limit + 1) + r];
                    int64_t pf = ((k + f * dk) * nj + (j + f * dj)) * ni + (i + f * di);
                    int64_t pr = ((k - r * dk) * nj + (j - r * dj)) * ni + (i - r * di);
                    double x = a * fh_read(vals, vals_type, pf * vals_stride) +
                               (1.0 - a) * fh_read(vals, vals_type, pr * vals_stride);
                    stick_v[d] = floor_values ? floor(x) : x;
                    any = 1;
                }
                if (!any)
                    continue;
                double sw = 0.0, sum = 0.0;
                int64_t used = 0;
                while (used < n_use) {
                    double top = 0.0;
                    for (int d = 0; d < ND; d++)
                        if (stick_w[d] > top)
                            top = stick_w[d];
                    if (top == 0.0)
                        break;
                    for (int d = 0; d < ND; d++) {
                        if (stick_w[d] == top) {
                            sw += top;
                            sum += top * stick_v[d];
                            used++;
                            stick_w[d] = 0.0;
                        }
                    }
                }
                fh_write(out, out_type, store, v, sum / sw);
                if (done != NULL)
                    done[v] = 1;
                filled++;
            }
        }
    }
    return filled;
}
