// Host stand-in for <cuda_fp16.h>, just enough for kernels/cuda/*.cu to compile under the
// emulator (kernels/emu/emulate.cpp). Conversions round to nearest even, like the device's.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

struct __half {
    uint16_t bits;
};

inline float __half2float(__half h) {
    const uint32_t sign = (h.bits & 0x8000u) << 16;
    uint32_t exp = (h.bits >> 10) & 0x1f;
    uint32_t man = h.bits & 0x3ffu;
    uint32_t out;
    if (exp == 0x1f) {
        out = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            out = sign;
        } else {
            float f = std::ldexp((float)man, -24);
            std::memcpy(&out, &f, 4);
            out |= sign;
        }
    } else {
        out = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &out, 4);
    return f;
}

inline __half __float2half_rn(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    __half h;
    if (ax >= 0x7f800000u) { // inf, nan
        h.bits = sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0);
        return h;
    }
    if (ax >= 0x477ff000u) { // rounds to >= 65520: inf
        h.bits = sign | 0x7c00u;
        return h;
    }
    if (ax < 0x38800000u) { // subnormal half
        float a;
        std::memcpy(&a, &ax, 4);
        const float scaled = std::nearbyint(a * 16777216.0f); // 2^24, exact; ties to even
        h.bits = sign | (uint16_t)scaled;
        return h;
    }
    uint32_t mant = ax + 0xc8000000u; // rebias exponent 127 -> 15
    mant += 0xfffu + ((mant >> 13) & 1u);
    h.bits = sign | (uint16_t)(mant >> 13);
    return h;
}

inline __half __ldg(const __half *p) { return *p; }
