// The vector left-pack of the float32 candidate appends: csrc/cpu/scan_f32.cpp's AVX2 scan and
// csrc/cpu/tile_f32.cpp's fused tile write the lanes of 8 scores that beat a row's threshold to the
// row's buffer, in lane order, without a branch per lane. Only the function with the target attribute
// uses AVX2; callers run it only on CPUs that have it.
#pragma once

// LLP_FAST_X86: a GCC/Clang x86-64 build, where the per-ISA functions (target attributes) of both files
// compile.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define LLP_FAST_X86 1
#include <immintrin.h>

#include <cstdint>

namespace llp_fast {
namespace topk {

// For each 8-bit mask, the lanes whose bit is set, first (then the rest).
struct LeftPack {
  alignas(32) int32_t lanes[256][8];
  LeftPack() {
    for (int m = 0; m < 256; ++m) {
      int w = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) lanes[m][w++] = l;
      for (int l = 0; l < 8; ++l)
        if (!(m >> l & 1)) lanes[m][w++] = l;
    }
  }
};
inline const LeftPack kLeftPack;

// Writes the lanes of x set in `bits` and their key indices (first + lane) at vals/idx + c (8 slots
// are written, so at least 8 must be free) and returns the new count.
__attribute__((target("avx2,popcnt"), always_inline)) inline int64_t append8(__m256 x, int bits, uint32_t first,
                                                                              float* vals, uint32_t* idx, int64_t c) {
  if (bits == 0) return c;
  const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLeftPack.lanes[bits]));
  const __m256i id =
      _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_storeu_ps(vals + c, _mm256_permutevar8x32_ps(x, lanes));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + c), _mm256_permutevar8x32_epi32(id, lanes));
  return c + __builtin_popcount(static_cast<unsigned>(bits));
}

}  // namespace topk
}  // namespace llp_fast
#endif
