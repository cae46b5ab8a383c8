// gpudeconv: spatially-varying convolution as a direct sum, forward and adjoint.
//
// The PSF at source pixel j is the bilinear mix of the PSFs h_n at the nodes of a regular
// ny x nx grid, h_j = sum_n w_n(j) h_n, with separable weights w_(a,b)(j) = wy_a(row j) wx_b(col j)
// (at most 2 x 2 of them non-zero). Convolution is linear, zero outside the array:
//
//   forward   y[i] = sum_j x[j] h_j[i - j]   = sum_n (h_n * (w_n . x))[i]
//   adjoint   x[j] = sum_i y[i] h_j[i - j]   = sum_n w_n[j] (h_n (*) y)[j]     ((*): correlation)
//
// PSF index K/2 is offset 0; i - j runs over [-K/2, K/2]^2. The weights come as tables made once
// on the host (gpudeconv/operators.py): for every row y of the array, row_node[y] is the lower of
// the two node rows that mix there and row_frac[y] the weight of the upper one (node row_node + 1);
// row_node[y] has weight 1 - row_frac[y]. The same for columns. Tables are non-decreasing in y, so
// the nodes that matter to a tile are a contiguous range, read from its first and last row.
//
// Work split: a block of 32 x 8 threads computes an output tile of TILE_W = 32 columns and
// TILE_H = 8 * ROWS rows (each thread ROWS consecutive rows of one column: every input value read
// from shared memory serves up to ROWS multiply-adds). For each node whose weights touch the tile
// (usually 1 to 4), the block stages the input tile plus a halo of K/2 in shared memory (the
// weighted input w_n . x for the forward, the plain y for the adjoint, staged once) and the node's
// PSF (flipped for the forward, so that both directions run the same correlation loop), then
// accumulates. Shared memory per block: ((TILE_H + K - 1) * (TILE_W + K - 1) + K * K) elements:
// 27 KB at K = 31 in float32 (ROWS = 8), 38 KB in float64 (ROWS = 4): under the 48 KB of static
// shared memory, which bounds K at 31 (the operator sums larger PSFs through FFTs).
//
// Defines put in front by the loader: KSIZE (the odd PSF side, a compile-time constant so that
// the inner loops unroll) and IDX (the type of flat pixel offsets, "long long" for arrays of
// 2**31 pixels and more). No warp intrinsics, no dynamic shared memory; barriers are reached by
// every thread of the block (no early return), as the CPU emulation in tests/ requires.

#ifndef KSIZE
#define KSIZE 15
#endif
#ifndef IDX
#define IDX int
#endif

#if KSIZE % 2 != 1 || KSIZE > 31
#error "KSIZE must be odd and at most 31"
#endif

#define GPUDECONV_SV_BLOCK_X 32
#define GPUDECONV_SV_BLOCK_Y 8

/// Threads of a block compute ROWS rows each: 8 in float32, 4 in float64 (shared memory budget).
template <typename T>
struct SvRows {
    static constexpr int value = sizeof(T) == 4 ? 8 : 4;
};

/// Weight of node `node` (along one axis) at a pixel whose table entry is (lower, frac).
template <typename T>
__device__ inline T sv_axis_weight(int node, int lower, T frac) {
    return node == lower ? T(1) - frac : (node == lower + 1 ? frac : T(0));
}

/// First and last node (along one axis) with a non-zero weight somewhere in pixels [lo, hi].
template <typename T>
__device__ inline void sv_node_range(const int* table, const T* frac, int lo, int hi, int* first,
                                     int* last) {
    *first = table[lo] + (frac[lo] >= T(1) ? 1 : 0);
    *last = table[hi] + (frac[hi] > T(0) ? 1 : 0);
}

/// Stage rows [row0, row0 + SH) x cols [col0, col0 + SW) of `src` (zero outside the array),
/// multiplied by the weights of node (a, b) when `weighted`, into the shared tile `tile`.
template <typename T, int SH, int SW>
__device__ inline void sv_stage_input(T (*tile)[SW], const T* src, int height, int width, int row0,
                                      int col0, bool weighted, int a, int b, const int* row_node,
                                      const T* row_frac, const int* col_node, const T* col_frac) {
    const int thread = threadIdx.y * GPUDECONV_SV_BLOCK_X + threadIdx.x;
    const int threads = GPUDECONV_SV_BLOCK_X * GPUDECONV_SV_BLOCK_Y;
    for (int e = thread; e < SH * SW; e += threads) {
        const int u = e / SW;
        const int v = e - u * SW;
        const int row = row0 + u;
        const int col = col0 + v;
        T value = T(0);
        if (row >= 0 && row < height && col >= 0 && col < width) {
            value = src[(IDX)row * (IDX)width + (IDX)col];
            if (weighted) {
                value = value * sv_axis_weight<T>(a, row_node[row], row_frac[row]) *
                        sv_axis_weight<T>(b, col_node[col], col_frac[col]);
            }
        }
        tile[u][v] = value;
    }
}

/// Stage node n's PSF, flipped (h[K-1-p][K-1-q]) when `flip`.
template <typename T>
__device__ inline void sv_stage_psf(T (*psf)[KSIZE], const T* psfs, IDX node, bool flip) {
    const int thread = threadIdx.y * GPUDECONV_SV_BLOCK_X + threadIdx.x;
    const int threads = GPUDECONV_SV_BLOCK_X * GPUDECONV_SV_BLOCK_Y;
    const T* h = psfs + node * (IDX)(KSIZE * KSIZE);
    for (int e = thread; e < KSIZE * KSIZE; e += threads) {
        const int p = e / KSIZE;
        const int q = e - p * KSIZE;
        psf[p][q] = flip ? h[KSIZE * KSIZE - 1 - e] : h[e];
    }
}

/// acc[r] += sum_{p,q} psf[p][q] * tile[ly + r + p][lx + q] for r < ROWS: the correlation of the
/// staged tile with the staged PSF at this thread's ROWS outputs. For a fixed column q, input row
/// m = r + p of the tile serves every r with 0 <= m - r < K.
template <typename T, int ROWS, int SW>
__device__ inline void sv_accumulate(T* acc, T (*tile)[SW], T (*psf)[KSIZE], int ly, int lx) {
    for (int q = 0; q < KSIZE; ++q) {
#pragma unroll
        for (int m = 0; m < KSIZE + ROWS - 1; ++m) {
            const T value = tile[ly + m][lx + q];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                if (m - r >= 0 && m - r < KSIZE) acc[r] += psf[m - r][q] * value;
            }
        }
    }
}

/// One output tile of the forward (adjoint == false) or adjoint convolution; see the file header.
template <typename T>
__device__ void sv_convolve(const T* src, T* dst, const T* psfs, const int* row_node,
                            const T* row_frac, const int* col_node, const T* col_frac, int height,
                            int width, int grid_nx, bool adjoint) {
    constexpr int ROWS = SvRows<T>::value;
    constexpr int TILE_W = GPUDECONV_SV_BLOCK_X;
    constexpr int TILE_H = GPUDECONV_SV_BLOCK_Y * ROWS;
    constexpr int R = KSIZE / 2;
    constexpr int SH = TILE_H + KSIZE - 1;
    constexpr int SW = TILE_W + KSIZE - 1;
    __shared__ T tile[SH][SW];
    __shared__ T psf[KSIZE][KSIZE];

    const int row0 = blockIdx.y * TILE_H;  // first output row and column of the tile
    const int col0 = blockIdx.x * TILE_W;
    const int lx = threadIdx.x;
    const int ly = threadIdx.y * ROWS;
    const int col = col0 + lx;

    // Nodes that matter: those weighting the sources of the tile (the tile plus its halo, inside
    // the array) for the forward, those weighting the tile's own pixels for the adjoint.
    const int reach = adjoint ? 0 : R;
    const int first_row = max(row0 - reach, 0);
    const int last_row = min(row0 + TILE_H - 1 + reach, height - 1);
    const int first_col = max(col0 - reach, 0);
    const int last_col = min(col0 + TILE_W - 1 + reach, width - 1);
    int a0, a1, b0, b1;
    sv_node_range<T>(row_node, row_frac, first_row, last_row, &a0, &a1);
    sv_node_range<T>(col_node, col_frac, first_col, last_col, &b0, &b1);

    T out[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) out[r] = T(0);

    if (adjoint) {  // y is the same for every node: stage it once
        sv_stage_input<T, SH, SW>(tile, src, height, width, row0 - R, col0 - R, false, 0, 0,
                                  row_node, row_frac, col_node, col_frac);
    }
    for (int a = a0; a <= a1; ++a) {
        for (int b = b0; b <= b1; ++b) {
            __syncthreads();  // the previous node's tiles have been read by every thread
            if (!adjoint) {
                sv_stage_input<T, SH, SW>(tile, src, height, width, row0 - R, col0 - R, true, a,
                                          b, row_node, row_frac, col_node, col_frac);
            }
            sv_stage_psf<T>(psf, psfs, (IDX)a * (IDX)grid_nx + (IDX)b, !adjoint);
            __syncthreads();
            T acc[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r] = T(0);
            sv_accumulate<T, ROWS, SW>(acc, tile, psf, ly, lx);
            if (adjoint) {  // x[j] += w_n[j] (h_n (*) y)[j]
                const T wx = col < width ? sv_axis_weight<T>(b, col_node[col], col_frac[col]) : T(0);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const int row = row0 + ly + r;
                    if (row < height) {
                        out[r] += sv_axis_weight<T>(a, row_node[row], row_frac[row]) * wx * acc[r];
                    }
                }
            } else {
#pragma unroll
                for (int r = 0; r < ROWS; ++r) out[r] += acc[r];
            }
        }
    }
    if (col < width) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = row0 + ly + r;
            if (row < height) dst[(IDX)row * (IDX)width + (IDX)col] = out[r];
        }
    }
}

// Entry points: src is x (forward) or y (adjoint), dst the result; dst must not alias src.
extern "C" __global__ void __launch_bounds__(256)
gpudeconv_sv_forward_float32(const float* src, float* dst, const float* psfs, const int* row_node,
                       const float* row_frac, const int* col_node, const float* col_frac, int height,
                       int width, int grid_nx) {
    sv_convolve<float>(src, dst, psfs, row_node, row_frac, col_node, col_frac, height, width, grid_nx,
                    false);
}

extern "C" __global__ void __launch_bounds__(256)
gpudeconv_sv_adjoint_float32(const float* src, float* dst, const float* psfs, const int* row_node,
                       const float* row_frac, const int* col_node, const float* col_frac, int height,
                       int width, int grid_nx) {
    sv_convolve<float>(src, dst, psfs, row_node, row_frac, col_node, col_frac, height, width, grid_nx,
                    true);
}

extern "C" __global__ void __launch_bounds__(256)
gpudeconv_sv_forward_float64(const double* src, double* dst, const double* psfs, const int* row_node,
                       const double* row_frac, const int* col_node, const double* col_frac, int height,
                       int width, int grid_nx) {
    sv_convolve<double>(src, dst, psfs, row_node, row_frac, col_node, col_frac, height, width, grid_nx,
                    false);
}

extern "C" __global__ void __launch_bounds__(256)
gpudeconv_sv_adjoint_float64(const double* src, double* dst, const double* psfs, const int* row_node,
                       const double* row_frac, const int* col_node, const double* col_frac, int height,
                       int width, int grid_nx) {
    sv_convolve<double>(src, dst, psfs, row_node, row_frac, col_node, col_frac, height, width, grid_nx,
                    true);
}
