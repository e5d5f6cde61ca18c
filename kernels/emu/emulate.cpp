// Runs the CUDA kernels of kernels/cuda/ on the CPU (see include/cuda_emu.h), reading inputs
// from stdin and writing outputs to stdout, for kernels/tests/emulated.rs:
//
//   'P' u32 kind(0 = u8, 1 = f32) | PreprocessArgs (144 bytes) | u32 ntaps | i32 taps[ntaps]
//       | f32 table[768] | u64 srclen | u8 src[srclen]     ->  out[3*oh*ow] (u8 or f32)
//   'C' i32 B, Q, N, W | f32 scale | f32 tq[B*Q*W] | keys[B*N*W] | patches[B*N*W]
//       ->  f32 attn[B*Q*N] | context[B*W] | content[B*W]
//
// Build: g++ -std=c++20 -O1 -pthread -I kernels/emu/include kernels/emu/emulate.cpp
#include "cuda_emu.h"

#include "../cuda/preprocess.cu"
#include "../cuda/compress.cu"

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

static void read_exact(void *dst, size_t n) {
    if (n && std::fread(dst, 1, n, stdin) != n) {
        std::fprintf(stderr, "emulate: short input\n");
        std::exit(2);
    }
}

template <typename T> static T read_value() {
    T v;
    read_exact(&v, sizeof v);
    return v;
}

template <typename T> static std::vector<T> read_vec(size_t n) {
    std::vector<T> v(n);
    read_exact(v.data(), n * sizeof(T));
    return v;
}

template <typename T> static void write_vec(const std::vector<T> &v) {
    std::fwrite(v.data(), sizeof(T), v.size(), stdout);
}

// Runs one block of `threads` threads, each calling `body`, with block and warp barriers.
static void run_block(unsigned bx, unsigned by, unsigned threads,
                      const std::function<void()> &body) {
    std::barrier<> block(threads);
    std::vector<std::barrier<> *> warps;
    for (unsigned w = 0; w < threads / 32; ++w) {
        warps.push_back(new std::barrier<>(32));
        emu_warp_barriers[w] = warps.back();
    }
    emu_block_barrier = &block;
    blockDim = {threads, 1, 1};
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([=, &body] {
            threadIdx = {t, 0, 0};
            blockIdx = {bx, by, 0};
            body();
        });
    }
    for (auto &t : pool) {
        t.join();
    }
    for (auto *w : warps) {
        delete w;
    }
}

static void preprocess_cmd() {
    const uint32_t kind = read_value<uint32_t>();
    const PreprocessArgs a = read_value<PreprocessArgs>();
    const uint32_t ntaps = read_value<uint32_t>();
    const std::vector<int> taps = read_vec<int>(ntaps);
    const std::vector<float> table = read_vec<float>(768);
    const uint64_t srclen = read_value<uint64_t>();
    const std::vector<uint8_t> src = read_vec<uint8_t>(srclen);
    const size_t len = 3ull * a.out_height * a.out_width;
    // Same block size rule as the Rust launcher; no barriers in this kernel, so the threads of
    // a block can run one after another.
    const unsigned threads = std::clamp((a.out_width + 31) / 32 * 32, 32, 256);
    blockDim = {threads, 1, 1};
    gridDim = {(unsigned)a.out_height, 1, 1};
    std::vector<uint8_t> out8(kind == 0 ? len : 0);
    std::vector<float> out32(kind == 1 ? len : 0);
    for (unsigned by = 0; by < gridDim.x; ++by) {
        for (unsigned t = 0; t < threads; ++t) {
            blockIdx = {by, 0, 0};
            threadIdx = {t, 0, 0};
            if (kind == 0) {
                llamavid_preprocess_u8(src.data(), taps.data(), table.data(), out8.data(), a);
            } else {
                llamavid_preprocess_f32(src.data(), taps.data(), table.data(), out32.data(), a);
            }
        }
    }
    if (kind == 0) {
        write_vec(out8);
    } else {
        write_vec(out32);
    }
}

static void compress_cmd() {
    const int B = read_value<int>(), Q = read_value<int>(), N = read_value<int>(),
              W = read_value<int>();
    const float scale = read_value<float>();
    const std::vector<float> tq = read_vec<float>((size_t)B * Q * W);
    const std::vector<float> keys = read_vec<float>((size_t)B * N * W);
    const std::vector<float> patches = read_vec<float>((size_t)B * N * W);
    if ((size_t)W + N + BLOCK > sizeof smem / sizeof(float) || (size_t)N > sizeof abar / sizeof(float)) {
        std::fprintf(stderr, "emulate: shapes too large for the emulated shared memory\n");
        std::exit(2);
    }
    std::vector<float> attn((size_t)B * Q * N, NAN);
    std::vector<float> context((size_t)B * W, NAN), content((size_t)B * W, NAN);
    gridDim = {(unsigned)Q, (unsigned)B, 1};
    for (int b = 0; b < B; ++b) {
        for (int q = 0; q < Q; ++q) {
            run_block(q, b, BLOCK, [&] {
                llamavid_compress_attention_f32(tq.data(), keys.data(), attn.data(), Q, N, W, scale);
            });
        }
    }
    const unsigned wblocks = (W + BLOCK - 1) / BLOCK;
    gridDim = {wblocks, (unsigned)B, 1};
    for (int b = 0; b < B; ++b) {
        for (unsigned x = 0; x < wblocks; ++x) {
            run_block(x, b, BLOCK, [&] {
                llamavid_compress_pool_f32(attn.data(), patches.data(), context.data(),
                                           content.data(), Q, N, W);
            });
        }
    }
    write_vec(attn);
    write_vec(context);
    write_vec(content);
}

int main() {
    int cmd;
    while ((cmd = std::fgetc(stdin)) != EOF) {
        if (cmd == 'P') {
            preprocess_cmd();
        } else if (cmd == 'C') {
            compress_cmd();
        } else {
            std::fprintf(stderr, "emulate: unknown command %d\n", cmd);
            return 2;
        }
        std::fflush(stdout);
    }
    return 0;
}
