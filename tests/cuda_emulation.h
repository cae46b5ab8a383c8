// gpudeconv: a CPU emulation of the CUDA C++ that kernels/*.cu use, for tests without a GPU.
//
// The UNCHANGED .cu file is compiled by g++ (C++20) with this header forced in front:
//
//   g++ -std=c++20 -O1 -pthread -include cuda_emulation.h main.cpp     (main.cpp #includes the .cu)
//
// tests/kernel_harness.py generates main.cpp, builds one executable per (source, defines) and runs
// every launch in a child process with a deadline; see its docstring.
//
// Execution model
//   * The blocks of a grid run one after another; the threads of one block run concurrently, one
//     std::thread each (blockDim.x * blockDim.y * blockDim.z <= 1024 OS threads, started once per
//     launch and reused, in the same roles, for every block).
//   * threadIdx and blockIdx are thread_local; blockDim and gridDim are plain globals set per launch.
//   * Each thread gets its own copy of the kernel's arguments (a kernel may modify its parameters).
//   * __syncthreads() is a barrier over the threads of the block. A thread that returns while
//     others wait at a barrier, or a barrier reached after a thread of the block returned, is a
//     divergent barrier (undefined behaviour in CUDA, a hang at best): the process prints which
//     thread did what and exits with status 70 instead of hanging. Any other hang (a spin loop that
//     never ends) is caught by the harness's deadline. The barrier's happens-before edges are
//     exactly a barrier's (atomics; its sleeping is hidden from ThreadSanitizer), so a TSan build
//     reports the shared-memory races of a missing __syncthreads() every time, and none otherwise.
//   * __shared__ is `static`: one object per kernel instantiation, shared by every thread of the
//     block, reused by the next block. RULE: kernels must not rely on __shared__ memory being zero
//     or holding anything at block start (on the GPU it is uninitialised; here it holds whatever
//     the previous block left, and zero only for the first block). Write before you read, with a
//     __syncthreads() in between. `extern __shared__` (dynamic shared memory) is not supported.
//   * Warp-synchronous intrinsics (__syncwarp, __shfl*_sync, __ballot_sync, __any_sync,
//     __all_sync) are emulated with a barrier over the threads of the warp (32 consecutive linear
//     thread ids): every existing lane of the warp must take part, masks are not interpreted.
//   * __constant__ and __device__ globals are ordinary globals: there is no cudaMemcpyToSymbol.
//   * Floating point is the host's IEEE arithmetic (no flush-to-zero, no fused multiply-add at -O1
//     on x86-64 without -march), so results match a NumPy twin of the same formula to the last bit
//     in most kernels; __fdividef, __expf and friends are the exact functions.
//
// In C++, gpudeconv_emu::launch(kernel, grid, block, args...) runs one launch synchronously; the
// command-line runner at the end of this file is what the harness drives.
//
// The macro GPUDECONV_CUDA_EMULATION is defined; __CUDACC__ and __CUDA_ARCH__ are not.

#ifndef GPUDECONV_CUDA_EMULATION_H
#define GPUDECONV_CUDA_EMULATION_H

#include <math.h>  // the float/double overloads in the global namespace, as in CUDA device code

#include <atomic>
#include <barrier>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define GPUDECONV_CUDA_EMULATION 1

// ---------------------------------------------------------------------------- qualifiers
// __restrict__ is already a g++ keyword.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __constant__
#define __managed__
#define __launch_bounds__(...)
#define __grid_constant__

// ---------------------------------------------------------------------------- built-in types
struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
        : x(vx), y(vy), z(vz) {}
};

#define GPUDECONV_EMU_VEC2(T, N)                                                                   \
    struct N##2 {                                                                                  \
        T x, y;                                                                                    \
    };                                                                                             \
    inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define GPUDECONV_EMU_VEC3(T, N)                                                                   \
    struct N##3 {                                                                                  \
        T x, y, z;                                                                                 \
    };                                                                                             \
    inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define GPUDECONV_EMU_VEC4(T, N)                                                                   \
    struct N##4 {                                                                                  \
        T x, y, z, w;                                                                              \
    };                                                                                             \
    inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }

GPUDECONV_EMU_VEC2(float, float)
GPUDECONV_EMU_VEC3(float, float)
GPUDECONV_EMU_VEC4(float, float)
GPUDECONV_EMU_VEC2(double, double)
GPUDECONV_EMU_VEC3(double, double)
GPUDECONV_EMU_VEC4(double, double)
GPUDECONV_EMU_VEC2(int, int)
GPUDECONV_EMU_VEC3(int, int)
GPUDECONV_EMU_VEC4(int, int)
GPUDECONV_EMU_VEC2(long long, longlong)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }

#undef GPUDECONV_EMU_VEC2
#undef GPUDECONV_EMU_VEC3
#undef GPUDECONV_EMU_VEC4

// ---------------------------------------------------------------------------- built-in variables
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------- the block's state
namespace gpudeconv_emu {

[[noreturn]] inline void fail(const char* format, ...) {
    std::va_list args;
    va_start(args, format);
    std::fputs("cuda_emulation: ", stderr);
    std::vfprintf(stderr, format, args);
    std::fputc('\n', stderr);
    va_end(args);
    std::fflush(stderr);
    std::_Exit(70);
}

// Waiting itself must not look like synchronisation to ThreadSanitizer: with a mutex, threads that
// happen to take it one after another would be ordered, and the races that a missing
// __syncthreads leaves would go unreported. The barrier's real happens-before edges are made
// with atomics; the mutex and condition variable only put waiting threads to sleep, with TSan
// told to ignore them.
#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
struct IgnoreSync {
    IgnoreSync() { AnnotateIgnoreSyncBegin(__FILE__, __LINE__); }
    ~IgnoreSync() { AnnotateIgnoreSyncEnd(__FILE__, __LINE__); }
};
#else
struct IgnoreSync {};
#endif

/// A reusable barrier for a fixed set of threads that reports divergence instead of hanging.
/// arrive() also counts the threads whose predicate is non-zero (__syncthreads_count and friends).
/// Happens-before: every arrival releases into `arrived_`, the last one publishes the next
/// generation, the waiters acquire it; nothing else (see IgnoreSync).
class Barrier {
  public:
    Barrier(unsigned int expected, const char* what) : expected_(expected), what_(what) {}

    int arrive(int predicate) {
        // seq_cst with exit_thread: of an arrival and an exit that overlap, one sees the other.
        if (const unsigned int exited = exited_.load(std::memory_order_seq_cst); exited != 0) {
            fail("thread (%u,%u,%u) of block (%u,%u,%u) reached %s after %u thread(s) that must "
                 "take part had returned: divergent barrier (would hang on the GPU)",
                 threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                 what_, exited);
        }
        const unsigned long long generation = generation_.load(std::memory_order_relaxed);
        if (predicate != 0) count_.fetch_add(1, std::memory_order_relaxed);
        if (arrived_.fetch_add(1, std::memory_order_seq_cst) + 1 == expected_) {
            result_ = count_.exchange(0, std::memory_order_relaxed);
            arrived_.store(0, std::memory_order_relaxed);
            generation_.store(generation + 1, std::memory_order_release);
            const int result = result_;
            {
                [[maybe_unused]] IgnoreSync ignore;
                { std::lock_guard<std::mutex> lock(mutex_); }  // no waiter between check and wait
                woken_.notify_all();
            }
            return result;
        }
        {
            [[maybe_unused]] IgnoreSync ignore;
            std::unique_lock<std::mutex> lock(mutex_);
            woken_.wait(lock, [&] {
                return generation_.load(std::memory_order_relaxed) != generation;
            });
        }
        (void)generation_.load(std::memory_order_acquire);  // the barrier's happens-before edge
        return result_;  // a later generation cannot complete before this thread arrives again
    }

    void exit_thread() {
        exited_.fetch_add(1, std::memory_order_seq_cst);
        if (const unsigned int waiting = arrived_.load(std::memory_order_seq_cst); waiting != 0) {
            fail("thread (%u,%u,%u) of block (%u,%u,%u) returned while %u thread(s) wait at %s: "
                 "divergent barrier (would hang on the GPU)",
                 threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                 waiting, what_);
        }
    }

  private:
    const unsigned int expected_;
    const char* const what_;
    std::mutex mutex_;
    std::condition_variable woken_;
    std::atomic<unsigned int> arrived_{0};
    std::atomic<unsigned int> exited_{0};
    std::atomic<unsigned long long> generation_{0};
    std::atomic<int> count_{0};
    int result_ = 0;  // written by the last arrival before it publishes the generation
};

/// One block in flight: its barrier, one barrier per warp, and the warps' exchange slots.
struct BlockState {
    explicit BlockState(unsigned int threads)
        : threads(threads), block(threads, "__syncthreads()"), slots(threads, 0) {
        for (unsigned int first = 0; first < threads; first += warpSize) {
            const unsigned int lanes = threads - first < 32u ? threads - first : 32u;
            warps.push_back(std::make_unique<Barrier>(lanes, "a warp-synchronous intrinsic"));
        }
    }
    const unsigned int threads;
    Barrier block;
    std::vector<std::unique_ptr<Barrier>> warps;
    std::vector<std::uint64_t> slots;  // one per thread, for shuffles and votes
};

inline thread_local BlockState* current_block = nullptr;
inline thread_local unsigned int linear_thread = 0;

inline BlockState& block_state() {
    if (current_block == nullptr) {
        fail("a CUDA intrinsic was called outside an emulated kernel launch");
    }
    return *current_block;
}

inline unsigned int lane_id() { return linear_thread % 32u; }

inline unsigned int lanes_in_warp() {
    const unsigned int first = linear_thread - lane_id();
    const unsigned int left = block_state().threads - first;
    return left < 32u ? left : 32u;
}

inline Barrier& warp_barrier() { return *block_state().warps[linear_thread / 32u]; }

template <typename T>
std::uint64_t to_bits(T value) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t) && std::is_trivially_copyable_v<T>,
                  "the emulated warp shuffles move values of at most 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}

template <typename T>
T from_bits(std::uint64_t bits) {
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}

/// Every lane publishes `value`, then reads the value of lane `source` of its warp (its own value
/// when `source` is negative or not a lane of this warp).
template <typename T>
T exchange(T value, int source) {
    BlockState& block = block_state();
    Barrier& barrier = warp_barrier();
    const unsigned int first = linear_thread - lane_id();
    block.slots[linear_thread] = to_bits(value);
    barrier.arrive(0);
    T result = value;
    if (source >= 0 && static_cast<unsigned int>(source) < lanes_in_warp()) {
        result = from_bits<T>(block.slots[first + static_cast<unsigned int>(source)]);
    }
    barrier.arrive(0);  // nobody overwrites a slot before every lane has read
    return result;
}

/// The bit mask of the lanes of this warp whose predicate is non-zero.
inline unsigned int vote(int predicate) {
    BlockState& block = block_state();
    Barrier& barrier = warp_barrier();
    const unsigned int first = linear_thread - lane_id();
    block.slots[linear_thread] = predicate != 0;
    barrier.arrive(0);
    unsigned int mask = 0;
    for (unsigned int lane = 0; lane < lanes_in_warp(); ++lane) {
        mask |= block.slots[first + lane] != 0 ? 1u << lane : 0u;
    }
    barrier.arrive(0);
    return mask;
}

}  // namespace gpudeconv_emu

// ---------------------------------------------------------------------------- synchronisation
inline void __syncthreads() { gpudeconv_emu::block_state().block.arrive(0); }
inline int __syncthreads_count(int predicate) {
    return gpudeconv_emu::block_state().block.arrive(predicate);
}
inline int __syncthreads_and(int predicate) {
    return __syncthreads_count(predicate) == static_cast<int>(gpudeconv_emu::block_state().threads);
}
inline int __syncthreads_or(int predicate) { return __syncthreads_count(predicate) != 0; }
inline void __syncwarp(unsigned int /*mask*/ = 0xffffffffu) {
    gpudeconv_emu::warp_barrier().arrive(0);
}
[[noreturn]] inline void __trap() {
    gpudeconv_emu::fail("__trap() in thread (%u,%u,%u) of block (%u,%u,%u)", threadIdx.x,
                        threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z);
}
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---------------------------------------------------------------------------- warp intrinsics
inline unsigned int __activemask() {
    const unsigned int lanes = gpudeconv_emu::lanes_in_warp();
    return lanes == 32u ? 0xffffffffu : (1u << lanes) - 1u;
}

template <typename T>
T __shfl_sync(unsigned int /*mask*/, T var, int src_lane, int width = warpSize) {
    const int lane = static_cast<int>(gpudeconv_emu::lane_id());
    return gpudeconv_emu::exchange(var, (lane / width) * width + ((src_lane % width) + width) % width);
}

template <typename T>
T __shfl_up_sync(unsigned int /*mask*/, T var, unsigned int delta, int width = warpSize) {
    const int lane = static_cast<int>(gpudeconv_emu::lane_id());
    const int d = static_cast<int>(delta);
    return gpudeconv_emu::exchange(var, lane % width >= d ? lane - d : -1);
}

template <typename T>
T __shfl_down_sync(unsigned int /*mask*/, T var, unsigned int delta, int width = warpSize) {
    const int lane = static_cast<int>(gpudeconv_emu::lane_id());
    const int d = static_cast<int>(delta);
    return gpudeconv_emu::exchange(var, lane % width + d < width ? lane + d : -1);
}

template <typename T>
T __shfl_xor_sync(unsigned int /*mask*/, T var, int lane_mask, int width = warpSize) {
    const int lane = static_cast<int>(gpudeconv_emu::lane_id());
    const int source = lane ^ lane_mask;
    return gpudeconv_emu::exchange(var, source / width <= lane / width ? source : -1);
}

inline unsigned int __ballot_sync(unsigned int /*mask*/, int predicate) {
    return gpudeconv_emu::vote(predicate);
}
inline int __any_sync(unsigned int /*mask*/, int predicate) {
    return gpudeconv_emu::vote(predicate) != 0;
}
inline int __all_sync(unsigned int /*mask*/, int predicate) {
    return gpudeconv_emu::vote(predicate) == __activemask();
}

// ---------------------------------------------------------------------------- arithmetic
template <typename A, typename B>
    requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) {
        return std::fmin(static_cast<C>(a), static_cast<C>(b));
    } else {
        return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
    }
}

template <typename A, typename B>
    requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) {
        return std::fmax(static_cast<C>(a), static_cast<C>(b));
    } else {
        return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
    }
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline double rcbrt(double x) { return 1.0 / std::cbrt(x); }
inline float fdividef(float x, float y) { return x / y; }
inline float __fdividef(float x, float y) { return x / y; }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) {
    *s = std::sin(x);
    *c = std::cos(x);
}
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dsub_rn(double x, double y) { return x - y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __ddiv_rn(double x, double y) { return x / y; }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline int __double2int_rn(double x) { return static_cast<int>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) {
    return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    unsigned int r = 0;
    for (int i = 0; i < 32; ++i, x >>= 1) r = (r << 1) | (x & 1u);
    return r;
}

// ---------------------------------------------------------------------------- memory
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
    return *p;
}
template <typename T>
inline void __stcs(T* p, T value) {
    *p = value;
}

// ---------------------------------------------------------------------------- atomics
template <typename T>
inline T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
inline T atomicSub(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_sub(value);
}
template <typename T>
inline T atomicExch(T* address, T value) {
    return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
    std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
    return compare;  // the old value, whether or not it was replaced
}
template <typename T>
inline T atomicMin(T* address, T value) {
    std::atomic_ref<T> ref(*address);
    T old = ref.load();
    while (value < old && !ref.compare_exchange_weak(old, value)) {
    }
    return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
    std::atomic_ref<T> ref(*address);
    T old = ref.load();
    while (old < value && !ref.compare_exchange_weak(old, value)) {
    }
    return old;
}
template <typename T>
inline T atomicAnd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_and(value);
}
template <typename T>
inline T atomicOr(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_or(value);
}
template <typename T>
inline T atomicXor(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_xor(value);
}

// ---------------------------------------------------------------------------- launching
namespace gpudeconv_emu {

/// Run `body(context)` as every thread of `grid` x `block`: blocks one after another, the threads
/// of a block as std::threads (the same OS threads for every block). Not a template, so that it
/// is compiled once per build.
inline void run_grid(dim3 grid, dim3 block, void (*body)(const void*), const void* context) {
    const unsigned long long threads =
        static_cast<unsigned long long>(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
        fail("invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u) (CUDA allows at "
             "most 1024 threads a block, block.z <= 64, grid.y and grid.z <= 65535)",
             grid.x, grid.y, grid.z, block.x, block.y, block.z);
    }
    gridDim = grid;
    blockDim = block;
    // One team of `threads` workers plays the threads of every block in turn; between blocks the
    // workers meet at `next`, whose completion step gives the next block a fresh state.
    const unsigned long long blocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
    auto state = std::make_unique<BlockState>(static_cast<unsigned int>(threads));
    std::barrier next(static_cast<std::ptrdiff_t>(threads), [&state, threads]() noexcept {
        state = std::make_unique<BlockState>(static_cast<unsigned int>(threads));
    });
    std::vector<std::thread> team;
    team.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t) {
        team.emplace_back([&state, &next, body, context, t, blocks, grid, block] {
            linear_thread = t;
            threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            for (unsigned long long b = 0; b < blocks; ++b) {
                current_block = state.get();
                blockIdx = uint3{static_cast<unsigned int>(b % grid.x),
                                 static_cast<unsigned int>((b / grid.x) % grid.y),
                                 static_cast<unsigned int>(b / (grid.x * grid.y))};
                body(context);
                current_block->block.exit_thread();
                warp_barrier().exit_thread();
                current_block = nullptr;
                next.arrive_and_wait();
            }
        });
    }
    for (std::thread& thread : team) thread.join();
}

/// Run `kernel<<<grid, block>>>(args...)` synchronously; see run_grid.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
    struct Context {
        void (*kernel)(P...);
        std::tuple<std::decay_t<P>...> arguments;
    };
    const Context context{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_grid(grid, block, [](const void* opaque) {
        const Context& c = *static_cast<const Context*>(opaque);
        auto own = c.arguments;  // kernel parameters are per-thread copies
        std::apply(c.kernel, own);
    }, &context);
}

// ---------------------------------------------------------------------------- command-line runner
// Used by tests/kernel_harness.py; a generated main.cpp lists the entry points:
//
//   static const gpudeconv_emu::Entry entries[] = {GPUDECONV_EMU_ENTRY(name), ...};
//   int main(int argc, char** argv) { return gpudeconv_emu::run_main(entries, argc, argv); }
//
//   exe --describe                            one line per entry: name TAB parameter codes
//   exe NAME gx gy gz bx by bz ARG...         run one launch
//
// Parameter codes: [*[c]]KIND SIZE, e.g. "*cf4" const float*, "*f8" double*, "i4" int, "f4" float;
// KIND is f (floating), i (signed), u (unsigned), b (bool), v (anything else, pointers only).
// Arguments: "@FILE" for a pointer (the file's bytes are the array; non-const arrays are written
// back after the launch; the same FILE twice is the same buffer, so aliasing is kept), "null",
// decimal integers, C99 hexadecimal floats (exact).

class Buffers {
  public:
    void* get(const char* argument, bool writable) {
        if (std::strcmp(argument, "null") == 0) return nullptr;
        if (argument[0] != '@') fail("pointer argument %s is neither @FILE nor null", argument);
        const std::string path(argument + 1);
        for (Buffer& buffer : buffers_) {
            if (buffer.path == path) {
                buffer.writable = buffer.writable || writable;
                return buffer.data.get();
            }
        }
        std::FILE* file = std::fopen(path.c_str(), "rb");
        if (file == nullptr) fail("cannot open %s: %s", path.c_str(), std::strerror(errno));
        std::fseek(file, 0, SEEK_END);
        const long size = std::ftell(file);
        std::fseek(file, 0, SEEK_SET);
        // An exact-size heap block, so that AddressSanitizer sees reads past the end.
        Buffer buffer{path, std::unique_ptr<unsigned char[]>(new unsigned char[size > 0 ? size : 1]),
                      static_cast<std::size_t>(size), writable};
        if (size > 0 && std::fread(buffer.data.get(), 1, buffer.size, file) != buffer.size) {
            fail("cannot read %s", path.c_str());
        }
        std::fclose(file);
        buffers_.push_back(std::move(buffer));
        return buffers_.back().data.get();
    }

    void write_back() {
        for (const Buffer& buffer : buffers_) {
            if (!buffer.writable) continue;
            std::FILE* file = std::fopen(buffer.path.c_str(), "wb");
            if (file == nullptr ||
                std::fwrite(buffer.data.get(), 1, buffer.size, file) != buffer.size ||
                std::fclose(file) != 0) {
                fail("cannot write %s", buffer.path.c_str());
            }
        }
    }

  private:
    struct Buffer {
        std::string path;
        std::unique_ptr<unsigned char[]> data;
        std::size_t size;
        bool writable;
    };
    std::vector<Buffer> buffers_;
};

template <typename T>
inline constexpr bool unsupported_parameter = false;

template <typename T>
std::string scalar_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, bool>) return "b1";
    else if constexpr (std::is_floating_point_v<U>) return "f" + std::to_string(sizeof(U));
    else if constexpr (std::is_integral_v<U> && std::is_signed_v<U>)
        return "i" + std::to_string(sizeof(U));
    else if constexpr (std::is_integral_v<U>) return "u" + std::to_string(sizeof(U));
    else if constexpr (std::is_void_v<U>) return "v0";
    else return "v" + std::to_string(sizeof(U));
}

template <typename T>
std::string parameter_code() {
    if constexpr (std::is_pointer_v<T>) {
        using E = std::remove_pointer_t<T>;
        return std::string("*") + (std::is_const_v<E> ? "c" : "") + scalar_code<E>();
    } else if constexpr (std::is_arithmetic_v<T>) {
        return scalar_code<T>();
    } else {
        static_assert(unsupported_parameter<T>,
                      "the emulation runner passes pointers and arithmetic scalars only");
        return {};
    }
}

template <typename T>
T parse_argument(const char* text, Buffers& buffers) {
    if constexpr (std::is_pointer_v<T>) {
        using E = std::remove_pointer_t<T>;
        return static_cast<T>(buffers.get(text, !std::is_const_v<E>));
    } else {
        char* end = nullptr;
        errno = 0;
        T value{};
        if constexpr (std::is_same_v<T, float>) value = std::strtof(text, &end);
        else if constexpr (std::is_same_v<T, double>) value = std::strtod(text, &end);
        else if constexpr (std::is_floating_point_v<T>) value = std::strtold(text, &end);
        else if constexpr (std::is_signed_v<T>) {
            const long long wide = std::strtoll(text, &end, 10);
            if (wide < static_cast<long long>(std::numeric_limits<T>::min()) ||
                wide > static_cast<long long>(std::numeric_limits<T>::max())) {
                errno = ERANGE;
            }
            value = static_cast<T>(wide);
        } else {
            const unsigned long long wide = std::strtoull(text, &end, 10);
            if (wide > static_cast<unsigned long long>(std::numeric_limits<T>::max())) errno = ERANGE;
            value = static_cast<T>(wide);
        }
        if (end == text || *end != '\0' || (errno == ERANGE && !std::is_floating_point_v<T>)) {
            fail("argument %s is not a valid %s", text, scalar_code<T>().c_str());
        }
        return value;
    }
}

template <typename... P, std::size_t... I>
void run_with(void (*kernel)(P...), dim3 grid, dim3 block, char** argv,
              std::index_sequence<I...>) {
    Buffers buffers;
    // Braced initialisation evaluates the arguments left to right.
    std::tuple<std::decay_t<P>...> arguments{parse_argument<std::decay_t<P>>(argv[I], buffers)...};
    std::apply([&](auto... values) { launch(kernel, grid, block, values...); }, arguments);
    buffers.write_back();
}

struct Entry {
    const char* name;
    std::size_t arity;
    std::string (*describe)();
    void (*run)(dim3, dim3, char**);
};

template <auto Kernel>
struct EntryFor;

template <typename... P, void (*Kernel)(P...)>
struct EntryFor<Kernel> {
    static std::string describe() {
        std::string codes;
        ((codes += (codes.empty() ? "" : " ") + parameter_code<std::decay_t<P>>()), ...);
        return codes;
    }
    static void run(dim3 grid, dim3 block, char** argv) {
        run_with(Kernel, grid, block, argv, std::index_sequence_for<P...>{});
    }
    static constexpr std::size_t arity = sizeof...(P);
};

#define GPUDECONV_EMU_ENTRY(kernel)                                                                \
    gpudeconv_emu::Entry {                                                                         \
        #kernel, gpudeconv_emu::EntryFor<&kernel>::arity, &gpudeconv_emu::EntryFor<&kernel>::describe, \
            &gpudeconv_emu::EntryFor<&kernel>::run                                                 \
    }

inline unsigned int parse_dimension(const char* text) {
    char* end = nullptr;
    const unsigned long value = std::strtoul(text, &end, 10);
    if (end == text || *end != '\0' || value == 0 || value > 0x7fffffffUL) {
        fail("launch dimension %s is not a positive integer", text);
    }
    return static_cast<unsigned int>(value);
}

template <std::size_t N>
int run_main(const Entry (&entries)[N], int argc, char** argv) {
    if (argc == 2 && std::strcmp(argv[1], "--describe") == 0) {
        for (const Entry& entry : entries) std::printf("%s\t%s\n", entry.name, entry.describe().c_str());
        return 0;
    }
    if (argc < 8) fail("usage: %s --describe | NAME gx gy gz bx by bz ARG...", argv[0]);
    for (const Entry& entry : entries) {
        if (std::strcmp(entry.name, argv[1]) != 0) continue;
        if (static_cast<std::size_t>(argc - 8) != entry.arity) {
            fail("%s takes %zu arguments, got %d", entry.name, entry.arity, argc - 8);
        }
        const dim3 grid(parse_dimension(argv[2]), parse_dimension(argv[3]), parse_dimension(argv[4]));
        const dim3 block(parse_dimension(argv[5]), parse_dimension(argv[6]), parse_dimension(argv[7]));
        entry.run(grid, block, argv + 8);
        return 0;
    }
    fail("no entry point named %s", argv[1]);
}

}  // namespace gpudeconv_emu

#endif  // GPUDECONV_CUDA_EMULATION_H
