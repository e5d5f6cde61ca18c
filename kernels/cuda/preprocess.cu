// Frame to model input in one pass: raw video memory (RGB, RGBx, BGRx, RGBA, BGRA, I420, NV12,
// any stride) to the resized, centre-cropped, normalised channel-first pixels.
//
// The CPU twin is kernels/src/preprocess/cpu.rs; the parameter block mirrors
// kernels/src/preprocess/mod.rs `KernelArgs`. Integer arithmetic only up to the uint8 resized
// pixel (Pillow's bicubic with 22-bit weights, a uint8 intermediate after the horizontal pass),
// then a lookup in the host-computed normalisation table, so the result is bit-identical to the
// twin.
//
// Launch: grid.x = out_height (one block per output row), any block size (multiple of 32
// preferred); each thread produces output columns threadIdx.x, threadIdx.x + blockDim.x, ...
// No shared memory, no inter-thread communication: race free by construction.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define PRECISION_BITS 22
#define YUV_SHIFT 16

enum PixelFormat {
    FMT_RGB = 0,
    FMT_RGBX = 1,
    FMT_BGRX = 2,
    FMT_RGBA = 3,
    FMT_BGRA = 4,
    FMT_I420 = 5,
    FMT_NV12 = 6,
};

struct YuvCoefficients {
    int y_offset, y_gain, r_v, g_u, g_v, b_u;
};

struct PreprocessArgs {
    long long plane_offset[3];
    long long plane_stride[3];
    int format, width, height;
    YuvCoefficients yuv;
    int resized_width, resized_height;
    int crop_left, crop_top;
    int out_width, out_height;
    int h_ksize, v_ksize;
    // Element offsets into the packed taps buffer.
    int h_starts, h_counts, h_weights, v_starts, v_counts, v_weights;
    int reserved;
};

static_assert(sizeof(PreprocessArgs) == 144, "PreprocessArgs must match KernelArgs (144 bytes)");
static_assert(sizeof(YuvCoefficients) == 24, "YuvCoefficients must match (24 bytes)");

__device__ __forceinline__ int clip8(int acc) {
    return min(max(acc >> PRECISION_BITS, 0), 255);
}

__device__ __forceinline__ int clamp255(int v) {
    return min(max(v, 0), 255);
}

// RGB of source pixel (x, y). The host validated that every (x, y) the taps name lies inside
// the planes.
__device__ __forceinline__ void fetch_rgb(const uint8_t *__restrict__ src, const PreprocessArgs &a,
                                          int x, int y, int rgb[3]) {
    const long long row0 = a.plane_offset[0] + (long long)y * a.plane_stride[0];
    switch (a.format) {
    case FMT_RGB: {
        const uint8_t *p = src + row0 + 3LL * x;
        rgb[0] = __ldg(p);
        rgb[1] = __ldg(p + 1);
        rgb[2] = __ldg(p + 2);
        return;
    }
    case FMT_RGBX:
    case FMT_RGBA: {
        const uint8_t *p = src + row0 + 4LL * x;
        rgb[0] = __ldg(p);
        rgb[1] = __ldg(p + 1);
        rgb[2] = __ldg(p + 2);
        return;
    }
    case FMT_BGRX:
    case FMT_BGRA: {
        const uint8_t *p = src + row0 + 4LL * x;
        rgb[0] = __ldg(p + 2);
        rgb[1] = __ldg(p + 1);
        rgb[2] = __ldg(p);
        return;
    }
    default: {
        const int luma = __ldg(src + row0 + x);
        const int cx = x >> 1, cy = y >> 1;
        int cb, cr;
        if (a.format == FMT_I420) {
            cb = __ldg(src + a.plane_offset[1] + (long long)cy * a.plane_stride[1] + cx);
            cr = __ldg(src + a.plane_offset[2] + (long long)cy * a.plane_stride[2] + cx);
        } else {
            const uint8_t *p = src + a.plane_offset[1] + (long long)cy * a.plane_stride[1] + 2LL * cx;
            cb = __ldg(p);
            cr = __ldg(p + 1);
        }
        const int half = 1 << (YUV_SHIFT - 1);
        const int yy = a.yuv.y_gain * (luma - a.yuv.y_offset) + half;
        const int u = cb - 128;
        const int v = cr - 128;
        rgb[0] = clamp255((yy + a.yuv.r_v * v) >> YUV_SHIFT);
        rgb[1] = clamp255((yy - a.yuv.g_u * u - a.yuv.g_v * v) >> YUV_SHIFT);
        rgb[2] = clamp255((yy + a.yuv.b_u * u) >> YUV_SHIFT);
        return;
    }
    }
}

// The uint8 resized pixel under output pixel (x, y); 0 outside the resized image.
__device__ __forceinline__ void output_pixel(const uint8_t *__restrict__ src,
                                             const int *__restrict__ taps,
                                             const PreprocessArgs &a, int x, int y, int out[3]) {
    const int rx = a.crop_left + x;
    const int ry = a.crop_top + y;
    if (rx < 0 || ry < 0 || rx >= a.resized_width || ry >= a.resized_height) {
        out[0] = out[1] = out[2] = 0;
        return;
    }
    const int half = 1 << (PRECISION_BITS - 1);
    const int hstart = __ldg(taps + a.h_starts + rx);
    const int hcount = __ldg(taps + a.h_counts + rx);
    const int *hw = taps + a.h_weights + (long long)rx * a.h_ksize;
    const int vstart = __ldg(taps + a.v_starts + ry);
    const int vcount = __ldg(taps + a.v_counts + ry);
    const int *vw = taps + a.v_weights + (long long)ry * a.v_ksize;

    int acc0 = half, acc1 = half, acc2 = half;
    for (int j = 0; j < vcount; ++j) {
        const int sy = vstart + j;
        // Pass 1: horizontal value of source row sy at column rx, rounded to uint8.
        int h0 = half, h1 = half, h2 = half;
        for (int i = 0; i < hcount; ++i) {
            int px[3];
            fetch_rgb(src, a, hstart + i, sy, px);
            const int k = __ldg(hw + i);
            h0 += px[0] * k;
            h1 += px[1] * k;
            h2 += px[2] * k;
        }
        // Pass 2: vertical accumulation over the uint8 intermediate.
        const int k = __ldg(vw + j);
        acc0 += clip8(h0) * k;
        acc1 += clip8(h1) * k;
        acc2 += clip8(h2) * k;
    }
    out[0] = clip8(acc0);
    out[1] = clip8(acc1);
    out[2] = clip8(acc2);
}

__device__ __forceinline__ void store(uint8_t *out, long long i, int v, const float *) {
    out[i] = (uint8_t)v;
}
__device__ __forceinline__ void store(float *out, long long i, int v, const float *table) {
    out[i] = __ldg(table + v);
}
__device__ __forceinline__ void store(__half *out, long long i, int v, const float *table) {
    out[i] = __float2half_rn(__ldg(table + v));
}
__device__ __forceinline__ void store(__nv_bfloat16 *out, long long i, int v, const float *table) {
    out[i] = __float2bfloat16_rn(__ldg(table + v));
}

// table: 3 x 256 normalised values (channel-major); out: (3, out_height, out_width).
template <typename T>
__device__ __forceinline__ void preprocess(const uint8_t *__restrict__ src,
                                           const int *__restrict__ taps,
                                           const float *__restrict__ table, T *__restrict__ out,
                                           const PreprocessArgs &a) {
    const int y = blockIdx.x;
    if (y >= a.out_height) {
        return;
    }
    const long long plane = (long long)a.out_height * a.out_width;
    for (int x = threadIdx.x; x < a.out_width; x += blockDim.x) {
        int px[3];
        output_pixel(src, taps, a, x, y, px);
        const long long i = (long long)y * a.out_width + x;
        store(out, i, px[0], table);
        store(out, plane + i, px[1], table + 256);
        store(out, 2 * plane + i, px[2], table + 512);
    }
}

extern "C" __global__ void llamavid_preprocess_u8(const uint8_t *__restrict__ src,
                                                  const int *__restrict__ taps,
                                                  const float *__restrict__ table,
                                                  uint8_t *__restrict__ out, PreprocessArgs a) {
    preprocess(src, taps, table, out, a);
}

extern "C" __global__ void llamavid_preprocess_f32(const uint8_t *__restrict__ src,
                                                   const int *__restrict__ taps,
                                                   const float *__restrict__ table,
                                                   float *__restrict__ out, PreprocessArgs a) {
    preprocess(src, taps, table, out, a);
}

extern "C" __global__ void llamavid_preprocess_f16(const uint8_t *__restrict__ src,
                                                   const int *__restrict__ taps,
                                                   const float *__restrict__ table,
                                                   __half *__restrict__ out, PreprocessArgs a) {
    preprocess(src, taps, table, out, a);
}

extern "C" __global__ void llamavid_preprocess_bf16(const uint8_t *__restrict__ src,
                                                    const int *__restrict__ taps,
                                                    const float *__restrict__ table,
                                                    __nv_bfloat16 *__restrict__ out,
                                                    PreprocessArgs a) {
    preprocess(src, taps, table, out, a);
}
