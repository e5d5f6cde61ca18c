// Host emulation of the CUDA features kernels/cuda/*.cu use, so the kernels' own source can be
// compiled with g++ and run on the CPU against their Rust twins (kernels/tests/emulated.rs).
// Blocks run one after another; the threads of a block run as real threads (std::thread) with
// std::barrier for __syncthreads and for warp shuffles, so barrier placement and shared-memory
// use are exercised, not just the arithmetic.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(n)

struct EmuDim3 {
    unsigned x = 0, y = 0, z = 0;
};

inline thread_local EmuDim3 threadIdx;
inline thread_local EmuDim3 blockIdx;
inline EmuDim3 blockDim;
inline EmuDim3 gridDim;

using std::max;
using std::min;

template <typename T> inline T __ldg(const T *p) { return *p; }

// Barriers of the block being run (set up by the launcher).
inline std::barrier<> *emu_block_barrier = nullptr;
inline std::barrier<> *emu_warp_barriers[32] = {};
inline float emu_warp_exchange[32][32];

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int offset) {
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    emu_warp_exchange[warp][lane] = v;
    emu_warp_barriers[warp]->arrive_and_wait();
    const float other = emu_warp_exchange[warp][lane ^ (unsigned)offset];
    emu_warp_barriers[warp]->arrive_and_wait();
    return other;
}

// Dynamic shared memory (`extern __shared__ float name[]` in the kernels): one buffer per name,
// reused by the blocks, which run one at a time.
inline float smem[1 << 16];
inline float abar[1 << 16];
