// gpudeconv: the fused elementwise steps of Richardson-Lucy.
//
//   ratio   r = w d / max(b + bg, eps)       b = H u (the blurred estimate), d the observed image,
//                                            w the data weight (0 on no-data pixels, else 1),
//                                            bg a constant background (sky, bias) of the model
//                                            d ~ Poisson(H u + bg); bg = 0 is the plain RL ratio
//   damped  r = w (1 + U^(N-1) (N - (N-1) U) (d - m) / m)   where U < 1 (White 1994),
//           r = w d / m                                     elsewhere, with m = max(b + bg, eps),
//           U = s (p D(d, m) + (1 - p) (d - m)^2 / m), D the Poisson deviance
//           2 (d log(d / m) - d + m) (2 m where d <= 0), (d - m)^2 / m Pearson's chi-square, s the
//           damping scale and N >= 1 its power: pixels fitted within the noise stop moving.
//           p = max(m - a, 0) / m is the share of the model's variance that is Poisson (skewed,
//           as the deviance's asymmetry is), a the noise model's offset alpha in the working
//           units of d and m: the data is (observed + alpha) / scale, its variance m / c (c the
//           counts per working unit), alpha / scale / c of which is read or subtracted sky
//           noise (Gaussian), so a = alpha / scale. a = 0 (raw frames) is White's U = s D
//           exactly; on the sky of sky-subtracted data (m ~ a) U is Pearson's, unbiased there
//   update  u <- u c / n   where n > floor   c = H^T r (the correction), n = H^T w; pixels with
//                                            n <= floor have (almost) no data behind them and
//                                            keep their value
//           u <- u c                         without weights
//   clamp   u <- min(max(u, lo), hi)         optional, on every pixel after the update; written
//                                            with comparisons, so a NaN pixel stays NaN; an
//                                            unbounded side is -inf or +inf
//   floor   u <- max(u, f)                   optional per-pixel floor after the clamp, compared
//                                            the same way
//   change  c <- u_new - u_old               optional, the step this update made
//   TV      n' = max(n - lambda div(g / |g|), n / 2) where n > floor, n' = n elsewhere
//                                            (Dey et al. 2006): g = (u[i,j+1] - u[i,j],
//                                            u[i+1,j] - u[i,j]) the forward differences, 0 across
//                                            the last column and row, |g| = sqrt(gx^2 + gy^2 +
//                                            e^2), div the backward differences (the exact
//                                            negative adjoint of g), outside the image 0, and
//                                            e = max(eps, 8 lambda u[i,j]) at g's own pixel: the
//                                            step is an explicit diffusion of coefficient
//                                            lambda u / e where |g| < e, which damps every
//                                            pattern, a checkerboard too, without overshoot only
//                                            while lambda u / e <= 1/8 (flat, noise-free areas:
//                                            clipped cores, smooth high-SNR planetary detail)
//   extrapolate  u <- max(u + a (u - p), f u), p <- u   Biggs & Andrews (1997)
//   deviance  S_k = sum over the pixels i of block k of w D(d, m), m = max(b + bg, eps), D as
//                                            in the damped ratio; summed in double whatever the
//                                            element type, one partial sum per block (the data
//                                            term is sum_k S_k, added up by the caller)
//
// Each step is one pass over memory. Arrays are C-contiguous and flat: element i of every
// argument belongs to the same pixel (the TV step reads the neighbours i - 1, i + 1, i - width,
// i + width, i - width + 1, i + width - 1 of a row-major image as well). The index type IDX is
// put in front of this source by the Python loader ("long long" once an array reaches 2**31
// elements); the default below lets nvcc compile the file on its own. Every thread handles the
// pixels i = start, start + stride, ... of a grid-stride loop. No warp intrinsics, no dynamic
// shared memory; only the deviance uses shared memory and barriers (a block's tree reduction),
// and every thread of its block reaches every barrier (no early return), as the CPU emulation
// in tests/ requires.

#ifndef IDX
#define IDX int
#endif

/// First pixel of this thread and the grid-wide stride, computed in IDX to avoid overflow.
__device__ inline IDX gpudeconv_first_index() {
    return (IDX)blockIdx.x * (IDX)blockDim.x + (IDX)threadIdx.x;
}

__device__ inline IDX gpudeconv_grid_stride() {
    return (IDX)gridDim.x * (IDX)blockDim.x;
}

/// log, pow and sqrt of the element type: the float versions for float, so that nothing is
/// promoted to double on the way (and the NumPy twins, which compute in the array's dtype,
/// round alike).
__device__ inline float gpudeconv_log(float x) { return logf(x); }
__device__ inline double gpudeconv_log(double x) { return log(x); }
__device__ inline float gpudeconv_pow(float x, float y) { return powf(x, y); }
__device__ inline double gpudeconv_pow(double x, double y) { return pow(x, y); }
__device__ inline float gpudeconv_sqrt(float x) { return sqrtf(x); }
__device__ inline double gpudeconv_sqrt(double x) { return sqrt(x); }

/// The Poisson deviance 2 (d log(d / m) - d + m) of one pixel, 2 m where d <= 0, for a model
/// m >= eps > 0. Rounding can make the bracket slightly negative where d is close to m: it is
/// raised to 0, the deviance's true lower bound (pow of a negative base is NaN for a
/// non-integer power); a NaN stays NaN.
template <typename T>
__device__ inline T poisson_deviance(T d, T m) {
    T dev = d > (T)0 ? (T)2 * (d * gpudeconv_log(d / m) - d + m) : (T)2 * m;
    return dev < (T)0 ? (T)0 : dev;
}

/// ratio[i] = weight[i] * observed[i] / max(blurred[i] + background, eps); weight is read only
/// if has_weight. background = 0 gives the plain ratio bit for bit (x + 0 == x; only -0 becomes
/// +0, which the guard maps to eps either way). ratio may alias blurred (the step runs in place
/// on the blurred buffer).
template <typename T>
__device__ void rl_ratio(const T* observed, const T* blurred, const T* weight, T* ratio,
                         IDX n, T eps, T background, int has_weight) {
    for (IDX i = gpudeconv_first_index(); i < n; i += gpudeconv_grid_stride()) {
        T b = blurred[i] + background;
        T r = observed[i] / (b > eps ? b : eps);
        ratio[i] = has_weight ? weight[i] * r : r;
    }
}

/// The damping statistic U / s of one pixel (the header's p D + (1 - p) (d - m)^2 / m) for a
/// model m >= eps > 0 and an offset a >= 0. Where p rounds to 1 (always where a = 0) it is the
/// deviance itself, bit for bit, without Pearson's term.
template <typename T>
__device__ inline T damping_misfit(T d, T m, T offset) {
    const T dev = poisson_deviance(d, m);
    const T share = m > offset ? (m - offset) / m : (T)0;  // p: the Poisson share
    if (share < (T)1) {
        const T diff = d - m;
        const T pearson = diff * diff / m;
        return share * dev + ((T)1 - share) * pearson;
    }
    return dev;
}

/// White's damped ratio (the header's formula) times weight[i] if has_weight, for scale > 0,
/// power >= 1 and offset >= 0; an entry point of its own, so that the plain ratio keeps its code
/// and speed. The weight matters on every pixel: the damped ratio is not 0 where observed is.
/// ratio may alias blurred.
template <typename T>
__device__ void rl_damped_ratio(const T* observed, const T* blurred, const T* weight, T* ratio,
                                IDX n, T eps, T background, T scale, T power, T offset,
                                int has_weight) {
    const T order = power - (T)1;
    for (IDX i = gpudeconv_first_index(); i < n; i += gpudeconv_grid_stride()) {
        T m = blurred[i] + background;
        m = m > eps ? m : eps;
        const T d = observed[i];
        const T misfit = scale * damping_misfit(d, m, offset);  // White's U
        T r;
        if (misfit < (T)1) {
            // U^(N-1) may underflow to 0 in float: the ratio is then 1, as it should be
            r = (T)1 + gpudeconv_pow(misfit, order) * (power - order * misfit) * ((d - m) / m);
        } else {
            r = d / m;
        }
        ratio[i] = has_weight ? weight[i] * r : r;
    }
}

/// estimate[i] *= correction[i] / norm[i] where norm[i] > norm_floor (pixels with no data behind
/// them keep their value); estimate[i] *= correction[i] everywhere when has_norm is 0. With
/// has_clamp, every pixel's new value is then clamped to [lower, upper] (lower <= upper, no NaN
/// bound; -inf / +inf leave a side open) by comparisons, not fmin/fmax: a NaN stays NaN. Without
/// has_clamp lower and upper are not read and the step is the plain update. With has_floor the
/// value is then raised to at least pixel_floor[i], compared the same way; with has_change,
/// change[i] receives the new value minus the old one. Arrays behind a flag that is 0 are not
/// read or written.
template <typename T>
__device__ void rl_update(T* estimate, const T* correction, const T* norm, const T* pixel_floor,
                          T* change, IDX n, T norm_floor, T lower, T upper, int has_norm,
                          int has_clamp, int has_floor, int has_change) {
    for (IDX i = gpudeconv_first_index(); i < n; i += gpudeconv_grid_stride()) {
        const T old = estimate[i];
        T u = old;
        if (has_norm) {
            T w = norm[i];
            if (w > norm_floor) {
                u = u * (correction[i] / w);
            }
        } else {
            u = u * correction[i];
        }
        if (has_clamp) {
            if (u < lower) u = lower;
            if (u > upper) u = upper;
        }
        if (has_floor) {
            const T f = pixel_floor[i];
            if (u < f) u = f;
        }
        if (has_change) {
            change[i] = u - old;
        }
        estimate[i] = u;
    }
}

/// TV_STABILITY lambda u: the explicit TV step's diffusion coefficient lambda u / e stays at or
/// under 1/8 (no overshoot on the finest pattern) when e is at least this.
#define GPUDECONV_TV_STABILITY 8

/// sqrt(gx^2 + gy^2 + e^2), e = max(epsilon, reach u) (reach = 8 lambda): the length of the
/// forward gradient at a pixel of value u, never below e. Compared so that a NaN u gives epsilon.
template <typename T>
__device__ inline T tv_length(T gx, T gy, T u, T reach, T epsilon) {
    T e = reach * u;
    e = e > epsilon ? e : epsilon;
    return gpudeconv_sqrt(gx * gx + gy * gy + e * e);
}

/// out[i] = the TV normalization of the header for the row-major image estimate of n pixels
/// and `width` columns: norm[i] where norm[i] <= norm_floor, else
/// max(norm[i] - strength * div[i], norm[i] / 2), with div[i] = nx(i) - nx(left) + ny(i) -
/// ny(above) and (nx, ny) = g / |g|. Each thread recomputes the unit gradients of its left and
/// upper neighbours from global memory (their inputs are cached reads shared with the
/// neighbouring threads): no second pass, no scratch array. out must not alias estimate or norm.
template <typename T>
__device__ void rl_tv_norm(const T* estimate, const T* norm, T* out, IDX n, IDX width,
                           T norm_floor, T strength, T epsilon) {
    const T reach = (T)GPUDECONV_TV_STABILITY * strength;
    for (IDX i = gpudeconv_first_index(); i < n; i += gpudeconv_grid_stride()) {
        const T w = norm[i];
        if (w <= norm_floor) {
            out[i] = w;
            continue;
        }
        const IDX col = i % width;
        const bool right = col + 1 < width;  // not the last column: gx is a difference
        const bool below = i + width < n;    // not the last row: gy is a difference
        const T u = estimate[i];
        const T gx = right ? estimate[i + 1] - u : (T)0;
        const T gy = below ? estimate[i + width] - u : (T)0;
        const T length = tv_length(gx, gy, u, reach, epsilon);
        T div = gx / length;
        if (col > 0) {  // minus nx of the left neighbour, whose gx is u - left
            const T left = estimate[i - 1];
            const T lgx = u - left;
            const T lgy = below ? estimate[i - 1 + width] - left : (T)0;
            div = div - lgx / tv_length(lgx, lgy, left, reach, epsilon);
        }
        div = div + gy / length;
        if (i >= width) {  // minus ny of the neighbour above, whose gy is u - above
            const T above = estimate[i - width];
            const T agy = u - above;
            const T agx = right ? estimate[i - width + 1] - above : (T)0;
            div = div - agy / tv_length(agx, agy, above, reach, epsilon);
        }
        const T regularized = w - strength * div;
        const T half = (T)0.5 * w;
        out[i] = regularized < half ? half : regularized;  // a NaN stays NaN
    }
}

/// previous[i] <- u and estimate[i] <- max(u + alpha (u - previous[i]), floor_fraction u) with
/// u = estimate[i] (Biggs & Andrews' extrapolation, kept positive where u is), compared as the
/// clamp is: a NaN stays NaN.
template <typename T>
__device__ void ba_extrapolate(T* estimate, T* previous, IDX n, T alpha, T floor_fraction) {
    for (IDX i = gpudeconv_first_index(); i < n; i += gpudeconv_grid_stride()) {
        const T u = estimate[i];
        const T lowest = floor_fraction * u;
        const T y = u + alpha * (u - previous[i]);
        previous[i] = u;
        estimate[i] = y < lowest ? lowest : y;
    }
}

/// The type of the deviance's partial sums: double for either element type, so that a sum over
/// hundreds of millions of float32 pixels keeps the precision of its terms.
typedef double gpudeconv_sum;

/// Threads a block of the deviance may have: CUDA's limit, so that any launch fits its
/// shared-memory tree (8 KB).
#define GPUDECONV_MAX_THREADS 1024

/// partial[blockIdx.x] = the sum, in gpudeconv_sum, of weight[i] * D(observed[i], m) over the
/// pixels i of this block's threads, m = max(blurred[i] + background, eps) (a NaN model stays
/// NaN, as NumPy's maximum keeps it) and D = poisson_deviance; weight is read only if
/// has_weight. Each thread sums its grid-stride pixels, then the block adds its threads' sums
/// in a tree in shared memory (blockDim.x <= GPUDECONV_MAX_THREADS, any count). The operations
/// of a pixel are those of the damped ratio, in its order; the caller adds the gridDim.x
/// partial sums.
template <typename T>
__device__ void rl_deviance(const T* observed, const T* blurred, const T* weight,
                            gpudeconv_sum* partial, IDX n, T eps, T background, int has_weight) {
    __shared__ gpudeconv_sum sums[GPUDECONV_MAX_THREADS];
    gpudeconv_sum sum = 0;
    for (IDX i = gpudeconv_first_index(); i < n; i += gpudeconv_grid_stride()) {
        T m = blurred[i] + background;
        m = m < eps ? eps : m;
        const T dev = poisson_deviance(observed[i], m);
        sum += (gpudeconv_sum)(has_weight ? weight[i] * dev : dev);
    }
    const unsigned int t = threadIdx.x;
    sums[t] = sum;
    __syncthreads();
    unsigned int width = 1;  // the least power of two >= blockDim.x
    while (width < blockDim.x) width *= 2;
    for (unsigned int half = width / 2; half > 0; half /= 2) {
        if (t < half && t + half < blockDim.x) sums[t] += sums[t + half];
        __syncthreads();
    }
    if (t == 0) partial[blockIdx.x] = sums[0];
}

extern "C" __global__ void gpudeconv_rl_ratio_float32(const float* observed, const float* blurred,
                                                      const float* weight, float* ratio, IDX n,
                                                      float eps, float background,
                                                      int has_weight) {
    rl_ratio<float>(observed, blurred, weight, ratio, n, eps, background, has_weight);
}

extern "C" __global__ void gpudeconv_rl_ratio_float64(const double* observed,
                                                      const double* blurred, const double* weight,
                                                      double* ratio, IDX n, double eps,
                                                      double background, int has_weight) {
    rl_ratio<double>(observed, blurred, weight, ratio, n, eps, background, has_weight);
}

extern "C" __global__ void gpudeconv_rl_damped_ratio_float32(
    const float* observed, const float* blurred, const float* weight, float* ratio, IDX n,
    float eps, float background, float scale, float power, float offset, int has_weight) {
    rl_damped_ratio<float>(observed, blurred, weight, ratio, n, eps, background, scale, power,
                           offset, has_weight);
}

extern "C" __global__ void gpudeconv_rl_damped_ratio_float64(
    const double* observed, const double* blurred, const double* weight, double* ratio, IDX n,
    double eps, double background, double scale, double power, double offset, int has_weight) {
    rl_damped_ratio<double>(observed, blurred, weight, ratio, n, eps, background, scale, power,
                            offset, has_weight);
}

extern "C" __global__ void gpudeconv_rl_update_float32(float* estimate, const float* correction,
                                                       const float* norm, const float* pixel_floor,
                                                       float* change, IDX n, float norm_floor,
                                                       float lower, float upper, int has_norm,
                                                       int has_clamp, int has_floor,
                                                       int has_change) {
    rl_update<float>(estimate, correction, norm, pixel_floor, change, n, norm_floor, lower, upper,
                     has_norm, has_clamp, has_floor, has_change);
}

extern "C" __global__ void gpudeconv_rl_update_float64(double* estimate, const double* correction,
                                                       const double* norm,
                                                       const double* pixel_floor, double* change,
                                                       IDX n, double norm_floor, double lower,
                                                       double upper, int has_norm, int has_clamp,
                                                       int has_floor, int has_change) {
    rl_update<double>(estimate, correction, norm, pixel_floor, change, n, norm_floor, lower,
                      upper, has_norm, has_clamp, has_floor, has_change);
}

extern "C" __global__ void gpudeconv_rl_tv_norm_float32(const float* estimate, const float* norm,
                                                        float* out, IDX n, IDX width,
                                                        float norm_floor, float strength,
                                                        float epsilon) {
    rl_tv_norm<float>(estimate, norm, out, n, width, norm_floor, strength, epsilon);
}

extern "C" __global__ void gpudeconv_rl_tv_norm_float64(const double* estimate,
                                                        const double* norm, double* out, IDX n,
                                                        IDX width, double norm_floor,
                                                        double strength, double epsilon) {
    rl_tv_norm<double>(estimate, norm, out, n, width, norm_floor, strength, epsilon);
}

extern "C" __global__ void gpudeconv_ba_extrapolate_float32(float* estimate, float* previous,
                                                            IDX n, float alpha,
                                                            float floor_fraction) {
    ba_extrapolate<float>(estimate, previous, n, alpha, floor_fraction);
}

extern "C" __global__ void gpudeconv_ba_extrapolate_float64(double* estimate, double* previous,
                                                            IDX n, double alpha,
                                                            double floor_fraction) {
    ba_extrapolate<double>(estimate, previous, n, alpha, floor_fraction);
}

extern "C" __global__ void gpudeconv_rl_deviance_float32(const float* observed,
                                                         const float* blurred,
                                                         const float* weight,
                                                         gpudeconv_sum* partial, IDX n, float eps,
                                                         float background, int has_weight) {
    rl_deviance<float>(observed, blurred, weight, partial, n, eps, background, has_weight);
}

extern "C" __global__ void gpudeconv_rl_deviance_float64(const double* observed,
                                                         const double* blurred,
                                                         const double* weight,
                                                         gpudeconv_sum* partial, IDX n,
                                                         double eps, double background,
                                                         int has_weight) {
    rl_deviance<double>(observed, blurred, weight, partial, n, eps, background, has_weight);
}
