// gpudeconv: the fused elementwise steps of Richardson-Lucy.
//
//   ratio   r = w * d / max(b, eps)          b = H u (the blurred estimate), d the observed image,
//                                            w the data weight (0 on no-data pixels, else 1)
//   update  u <- u * c / n   where n > floor  c = H^T r (the correction), n = H^T w; pixels with
//                                            n <= floor have (almost) no data behind them
//           u <- u * c       without weights
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

/// ratio[i] = weight[i] * observed[i] / max(blurred[i], eps); weight is read only if has_weight.
/// ratio may alias blurred (the step runs in place on the blurred buffer).
template <typename T>
__device__ void rl_ratio(const T* observed, const T* blurred, const T* weight, T* ratio,
                         IDX n, T eps, int has_weight) {
    for (IDX i = gpudeconv_first_index(); i < n; i += gpudeconv_grid_stride()) {
        T b = blurred[i];
        T r = observed[i] / (b > eps ? b : eps);
        ratio[i] = has_weight ? weight[i] * r : r;
    }
}

/// estimate[i] *= correction[i] / norm[i] where norm[i] > norm_floor (pixels with no data behind them
/// keep their value); estimate[i] *= correction[i] everywhere when has_norm is 0.
template <typename T>
__device__ void rl_update(T* estimate, const T* correction, const T* norm, IDX n, T norm_floor,
                          int has_norm) {
    for (IDX i = gpudeconv_first_index(); i < n; i += gpudeconv_grid_stride()) {
        if (has_norm) {
            T w = norm[i];
            if (w > norm_floor) {
                estimate[i] = estimate[i] * (correction[i] / w);
            }
        } else {
            estimate[i] = estimate[i] * correction[i];
        }
    }
}

extern "C" __global__ void gpudeconv_rl_ratio_float32(const float* observed, const float* blurred,
                                                      const float* weight, float* ratio, IDX n,
                                                      float eps, int has_weight) {
    rl_ratio<float>(observed, blurred, weight, ratio, n, eps, has_weight);
}

extern "C" __global__ void gpudeconv_rl_ratio_float64(const double* observed,
                                                      const double* blurred, const double* weight,
                                                      double* ratio, IDX n, double eps,
                                                      int has_weight) {
    rl_ratio<double>(observed, blurred, weight, ratio, n, eps, has_weight);
}

extern "C" __global__ void gpudeconv_rl_update_float32(float* estimate, const float* correction,
                                                       const float* norm, IDX n, float norm_floor,
                                                       int has_norm) {
    rl_update<float>(estimate, correction, norm, n, norm_floor, has_norm);
}

extern "C" __global__ void gpudeconv_rl_update_float64(double* estimate, const double* correction,
                                                       const double* norm, IDX n, double norm_floor,
                                                       int has_norm) {
    rl_update<double>(estimate, correction, norm, n, norm_floor, has_norm);
}
