// Step 1 of csrc/cpu/topk.h for bf16 queries and keys on CPUs with AVX512-BF16 and no bf16 matrix
// units (an AMD EPYC, Zen 4; docs/method.md §4), where the kernel stores the score tile and scans it
// (LLP_FAST_CPU_FUSED=0; by default csrc/cpu/tile_f32.cpp's fused tile runs the same dot products and
// compares them in registers): the (rows x cols) float32 tile from the CPU's bf16 dot-product
// instruction (VDPBF16PS: 16 lanes, each adding the products of one pair of bf16 values a step), 12
// query rows x 32 keys at a time in registers, in the place of MKL's bf16 GEMM (which does not use that
// instruction there: it ran at its sgemm's rate).
//
// Layout: a key tile is packed into panels of 16 keys, [panel][pair][16] 32-bit words, each word the
// key's components 2p (low half) and 2p + 1 (high half; zero past an odd dim), zero keys after the last;
// a query row is read in place, a pair at a time (the same two components, as one word). Every score is
// one sequence over the pairs p = 0, 1, ... from zero, whatever the tile, the row block or the key's
// place in it, as in the fused tile: the same bits (tested), and a key's score does not depend on how
// the caller chunked the keys (topk_scores merges chunked calls exactly). Products of bf16 values are
// exact in float32 and the instruction rounds its sums to nearest, reading bf16 denormals as zero and
// flushing denormal results (as the bf16 GEMM on AMX does), so the scores equal the float32 products of
// the same values up to summation order, within the bound approx_topk takes for a bf16 GEMM.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "left_pack.h"  // LLP_FAST_X86, <immintrin.h>
#include "topk.h"

namespace llp_fast {
namespace topk {

bool dot_bf16_cpu() {
#ifdef LLP_FAST_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

#ifdef LLP_FAST_X86
namespace {

constexpr int64_t kLanes = 16;  // keys a panel
constexpr int kRowsAtOnce = 12;  // query rows a block: 12 x 2 accumulators, 2 key vectors, a query word

// The pair p of row x (dim components): components 2p and 2p + 1 as one word (the second zero past dim).
inline uint32_t pair_word(const uint16_t* x, int64_t p, int64_t dim) {
  const uint32_t lo = x[2 * p];
  const uint32_t hi = 2 * p + 1 < dim ? x[2 * p + 1] : 0u;
  return lo | (hi << 16);
}

void pack_pairs(const uint16_t* b, int64_t ldb, int64_t n, int64_t dim, int64_t pairs, int64_t panels, uint32_t* out) {
  for (int64_t q = 0; q < panels; ++q) {
    uint32_t* o = out + q * pairs * kLanes;
    const int64_t live = std::max<int64_t>(0, std::min(kLanes, n - q * kLanes));
    if (live < kLanes) std::fill(o, o + pairs * kLanes, 0u);
    for (int64_t l = 0; l < live; ++l) {
      const uint16_t* row = b + (q * kLanes + l) * ldb;
      const int64_t whole = dim / 2;  // the pairs read as words, without a test per component
      for (int64_t p = 0; p < whole; ++p) std::memcpy(o + p * kLanes + l, row + 2 * p, sizeof(uint32_t));
      if (whole < pairs) o[whole * kLanes + l] = pair_word(row, whole, dim);
    }
  }
}

// Rows [0, R) of a (row stride lda) against KP panels starting at bp, into c (row stride ldc): the
// first w keys of the panels written.
template <int R, int KP>
__attribute__((target("avx512f,avx512bf16"), always_inline)) inline void block(const uint16_t* a, int64_t lda,
                                                                               const uint32_t* bp, int64_t pairs,
                                                                               int64_t dim, float* c, int64_t ldc,
                                                                               int64_t w) {
  __m512 acc[R][KP];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < KP; ++q) acc[r][q] = _mm512_setzero_ps();
  const int64_t whole = dim / 2;  // pairs with both components
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i bv[KP];
#pragma GCC unroll 2
    for (int q = 0; q < KP; ++q) bv[q] = _mm512_loadu_si512(bp + (q * pairs + p) * kLanes);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      uint32_t word;
      if (p < whole)
        std::memcpy(&word, a + r * lda + 2 * p, sizeof word);
      else
        word = a[r * lda + 2 * p];  // an odd dim's last component, alone
      const __m512i x = _mm512_set1_epi32(static_cast<int>(word));
#pragma GCC unroll 2
      for (int q = 0; q < KP; ++q)
        acc[r][q] = _mm512_dpbf16_ps(acc[r][q], reinterpret_cast<__m512bh>(x), reinterpret_cast<__m512bh>(bv[q]));
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < KP; ++q) {
      const int64_t n = std::min<int64_t>(kLanes, w - q * kLanes);
      if (n <= 0) break;
      const __mmask16 m = static_cast<__mmask16>(n == kLanes ? 0xFFFF : (1u << n) - 1);
      _mm512_mask_storeu_ps(c + r * ldc + q * kLanes, m, acc[r][q]);
    }
}

template <int KP>
__attribute__((target("avx512f,avx512bf16"))) void rows_against(const uint16_t* a, int64_t lda, int64_t rows,
                                                                const uint32_t* bp, int64_t pairs, int64_t dim,
                                                                float* c, int64_t ldc, int64_t w) {
  int64_t r = 0;
  for (; r + kRowsAtOnce <= rows; r += kRowsAtOnce)
    block<kRowsAtOnce, KP>(a + r * lda, lda, bp, pairs, dim, c + r * ldc, ldc, w);
  for (; r < rows; ++r) block<1, KP>(a + r * lda, lda, bp, pairs, dim, c + r * ldc, ldc, w);
}

}  // namespace
#endif

void dot_bf16_tile(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c, int64_t rows,
                   int64_t cols, int64_t dim) {
#ifdef LLP_FAST_X86
  TORCH_CHECK(dot_bf16_cpu(), "dot_bf16_tile: this CPU has no AVX512-BF16");
  const int64_t pairs = (dim + 1) / 2;
  const int64_t panels = (cols + kLanes - 1) / kLanes;
  thread_local std::vector<uint32_t> packed;
  packed.resize(static_cast<size_t>(std::max<int64_t>(1, panels * pairs * kLanes)));
  pack_pairs(b, ldb, cols, dim, pairs, panels, packed.data());
  for (int64_t q = 0; q < panels; q += 2) {
    const uint32_t* bp = packed.data() + q * pairs * kLanes;
    const int64_t w = std::min<int64_t>(2 * kLanes, cols - q * kLanes);
    if (w > kLanes)
      rows_against<2>(a, lda, rows, bp, pairs, dim, c + q * kLanes, cols, w);
    else
      rows_against<1>(a, lda, rows, bp, pairs, dim, c + q * kLanes, cols, w);
  }
#else
  (void)a, (void)lda, (void)b, (void)ldb, (void)c, (void)rows, (void)cols, (void)dim;
  TORCH_CHECK(false, "dot_bf16_tile: not an x86-64 build");
#endif
}

}  // namespace topk
}  // namespace llp_fast
