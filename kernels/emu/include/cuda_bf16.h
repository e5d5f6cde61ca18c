// Host stand-in for <cuda_bf16.h> (see cuda_fp16.h).
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t x = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    __nv_bfloat16 h;
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        h.bits = (uint16_t)((x >> 16) | 0x40u);
        return h;
    }
    x += 0x7fffu + ((x >> 16) & 1u);
    h.bits = (uint16_t)(x >> 16);
    return h;
}

inline __nv_bfloat16 __ldg(const __nv_bfloat16 *p) { return *p; }
