// Two-token compression of LLaMA-VID, fused into two launches per batch of frames:
//
//   llamavid_compress_attention_T  grid (Q, B), BLOCK threads: one block per (query, frame).
//       S[n] = scale * <text_q[b,q,:], K[b,n,:]>, A = softmax_n(S) -> attn[b,q,:] (f32 scratch)
//   llamavid_compress_pool_T       grid (ceil(W / BLOCK), B), BLOCK threads: one thread per
//       feature column w. abar[n] = mean_q attn[b,q,n] (shared), then
//       context[b,w] = sum_n abar[n] * V[b,n,w], content[b,w] = mean_n V[b,n,w].
//
// T is float, __half or __nv_bfloat16; all arithmetic is f32. The summation orders are those of
// the CPU twin, kernels/src/compress/cpu.rs (documented in kernels/src/compress/mod.rs).
// BLOCK must equal compress::BLOCK (256) for the twin's softmax sum order; the launcher always
// uses it.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define BLOCK 256
#define WARP 32
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float load(const float *p) { return __ldg(p); }
__device__ __forceinline__ float load(const __half *p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load(const __nv_bfloat16 *p) {
    return __bfloat162float(__ldg(p));
}

__device__ __forceinline__ void store(float *p, float v) { *p = v; }
__device__ __forceinline__ void store(__half *p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

// Dynamic shared memory: query[W] | scores[N] | reduce[BLOCK]   (floats)
template <typename T>
__device__ __forceinline__ void attention(const T *__restrict__ text_queries,
                                          const T *__restrict__ keys, float *__restrict__ attn,
                                          int Q, int N, int W, float scale) {
    extern __shared__ float smem[];
    float *query = smem;
    float *scores = smem + W;
    float *reduce = scores + N;

    const int q = blockIdx.x;
    const int b = blockIdx.y;
    if (q >= Q) {
        return; // uniform across the block: no barrier is skipped by part of it
    }
    const int tid = threadIdx.x;
    const int lane = tid % WARP;
    const int warp = tid / WARP;
    const int warps = blockDim.x / WARP;

    const T *qrow = text_queries + ((long long)b * Q + q) * W;
    for (int w = tid; w < W; w += blockDim.x) {
        query[w] = load(qrow + w);
    }
    __syncthreads();

    // Scores: one warp per patch; lanes take w = lane, lane + 32, ...; xor butterfly.
    const T *kb = keys + (long long)b * N * W;
    for (int n = warp; n < N; n += warps) {
        const T *krow = kb + (long long)n * W;
        float acc = 0.0f;
        for (int w = lane; w < W; w += WARP) {
            acc = fmaf(query[w], load(krow + w), acc);
        }
        for (int offset = WARP / 2; offset > 0; offset /= 2) {
            acc += __shfl_xor_sync(FULL_MASK, acc, offset);
        }
        if (lane == 0) {
            scores[n] = acc * scale;
        }
    }
    __syncthreads();

    // Max over patches (order-independent).
    float m = -INFINITY;
    for (int n = tid; n < N; n += blockDim.x) {
        m = fmaxf(m, scores[n]);
    }
    reduce[tid] = m;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (tid < stride) {
            reduce[tid] = fmaxf(reduce[tid], reduce[tid + stride]);
        }
        __syncthreads();
    }
    m = reduce[0];
    __syncthreads(); // everyone has read reduce[0] before it is reused

    // exp and the sum: strided partial sums, then the halving tree.
    float partial = 0.0f;
    for (int n = tid; n < N; n += blockDim.x) {
        const float e = expf(scores[n] - m);
        scores[n] = e;
        partial += e;
    }
    reduce[tid] = partial;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (tid < stride) {
            reduce[tid] += reduce[tid + stride];
        }
        __syncthreads();
    }
    const float sum = reduce[0];

    float *arow = attn + ((long long)b * Q + q) * N;
    for (int n = tid; n < N; n += blockDim.x) {
        arow[n] = scores[n] / sum;
    }
}

// Dynamic shared memory: abar[N] (floats)
template <typename T>
__device__ __forceinline__ void pool(const float *__restrict__ attn, const T *__restrict__ patches,
                                     T *__restrict__ context, T *__restrict__ content, int Q,
                                     int N, int W) {
    extern __shared__ float abar[];
    const int b = blockIdx.y;
    const int tid = threadIdx.x;

    const float *ab = attn + (long long)b * Q * N;
    for (int n = tid; n < N; n += blockDim.x) {
        float s = 0.0f;
        for (int q = 0; q < Q; ++q) {
            s += ab[(long long)q * N + n];
        }
        abar[n] = s / (float)Q;
    }
    __syncthreads();

    const int w = blockIdx.x * blockDim.x + tid;
    if (w >= W) {
        return; // after the only barrier
    }
    const T *vb = patches + (long long)b * N * W + w;
    float ctx = 0.0f;
    float sum = 0.0f;
    for (int n = 0; n < N; ++n) {
        const float x = load(vb + (long long)n * W);
        ctx = fmaf(abar[n], x, ctx);
        sum += x;
    }
    store(context + (long long)b * W + w, ctx);
    store(content + (long long)b * W + w, sum / (float)N);
}

#define COMPRESS_KERNELS(SUFFIX, T)                                                              \
    extern "C" __global__ void __launch_bounds__(BLOCK) llamavid_compress_attention_##SUFFIX(   \
        const T *__restrict__ text_queries, const T *__restrict__ keys,                          \
        float *__restrict__ attn, int Q, int N, int W, float scale) {                            \
        attention<T>(text_queries, keys, attn, Q, N, W, scale);                                  \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(BLOCK) llamavid_compress_pool_##SUFFIX(        \
        const float *__restrict__ attn, const T *__restrict__ patches, T *__restrict__ context,  \
        T *__restrict__ content, int Q, int N, int W) {                                          \
        pool<T>(attn, patches, context, content, Q, N, W);                                       \
    }

COMPRESS_KERNELS(f32, float)
COMPRESS_KERNELS(f16, __half)
COMPRESS_KERNELS(bf16, __nv_bfloat16)
