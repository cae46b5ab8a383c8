// gpudeconv: the fused elementwise steps of Richardson-Lucy.
//
//   ratio   r = w d / max(b + bg, eps)       b = H u (the blurred estimate), d the observed image,
//                                            w the data weight (0 on no-data pixels, else 1),
//                                            bg a constant background (sky, bias) of the model
//                                            d ~ Poisson(H u + bg); bg = 0 is the plain RL ratio
//   update  u <- u c / n   where n > floor   c = H^T r (the correction), n = H^T w; pixels with
//                                            n <= floor have (almost) no data behind them and
//                                            keep their value
//           u <- u c                         without weights
//   clamp   u <- min(max(u, lo), hi)         optional, on every pixel after the update; written
//                                            with comparisons, so a NaN pixel stays NaN; an
//                                            unbounded side is -inf or +inf
//
// Each step is one pass over memory. Arrays are C-contiguous and flat: element i of every
// argument belongs to the same pixel. The index type IDX is put in front of this source by the
// Python loader ("long long" once an array reaches 2**31 elements); the default below lets nvcc
// compile the file on its own. No shared memory, no barriers, no warp intrinsics: every thread
// handles the pixels i = start, start + stride, ... of a grid-stride loop.

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

/// estimate[i] *= correction[i] / norm[i] where norm[i] > norm_floor (pixels with no data behind
/// them keep their value); estimate[i] *= correction[i] everywhere when has_norm is 0. With
/// has_clamp, every pixel's new value is then clamped to [lower, upper] (lower <= upper, no NaN
/// bound; -inf / +inf leave a side open) by comparisons, not fmin/fmax: a NaN stays NaN. Without
/// has_clamp lower and upper are not read and the step is the plain update.
template <typename T>
__device__ void rl_update(T* estimate, const T* correction, const T* norm, IDX n, T norm_floor,
                          T lower, T upper, int has_norm, int has_clamp) {
    for (IDX i = gpudeconv_first_index(); i < n; i += gpudeconv_grid_stride()) {
        T u = estimate[i];
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
        estimate[i] = u;
    }
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

extern "C" __global__ void gpudeconv_rl_update_float32(float* estimate, const float* correction,
                                                       const float* norm, IDX n, float norm_floor,
                                                       float lower, float upper, int has_norm,
                                                       int has_clamp) {
    rl_update<float>(estimate, correction, norm, n, norm_floor, lower, upper, has_norm, has_clamp);
}

extern "C" __global__ void gpudeconv_rl_update_float64(double* estimate, const double* correction,
                                                       const double* norm, IDX n,
                                                       double norm_floor, double lower,
                                                       double upper, int has_norm,
                                                       int has_clamp) {
    rl_update<double>(estimate, correction, norm, n, norm_floor, lower, upper, has_norm,
                      has_clamp);
}
