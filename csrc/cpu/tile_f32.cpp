// Step 1 and step 2 of csrc/cpu/topk.h fused, float32, on x86-64 CPUs with AVX2 and FMA: the score
// tile computed 6 query rows x 16 keys at a time in registers, and each such block compared with its
// rows' thresholds before it leaves them. A block none of whose scores beats its row's threshold (once
// a row has seen a few hundred keys, almost all of them) is never written to memory: no score tile is
// stored and read back, which is what the BLAS tile plus a scan over it cost beyond the GEMM itself.
//
// Layout (the classic packed GEMM): a query block is packed into panels of 6 rows, [panel][d][6], a key
// tile into panels of 16 keys, [panel][d][16] (zero rows and keys pad the last panels); the loop runs
// over key panels, and for each over the query panels, so that the key panel (16 x D floats) stays in
// L1 while the query block streams from L2. Every score is one sequence of FMAs over d = 0..D-1 from
// zero, whatever the tile, the block or the position of the key: a key's score does not depend on how
// the caller chunked the keys (topk_scores merges chunked calls exactly), as with the BLAS tile. The
// scale and the bias are then applied as the scan applies them (a multiply and an add, each rounded).
//
// Only functions with a target attribute use AVX2/FMA, and fused_tile() says whether the CPU has them.
// It is the default where AVX2 is the widest vector unit (there it outruns the BLAS tile plus the scan);
// on CPUs with AVX-512 the BLAS tile (whose GEMM runs on 512-bit units) stays the default.
// LLP_FAST_CPU_FUSED=1 / =0 forces it on (where the CPU has AVX2 and FMA) or off; LLP_FAST_CPU_ISA (tests
// of one scan variant) turns it off unless LLP_FAST_CPU_FUSED=1.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "left_pack.h"  // LLP_FAST_X86, the AVX2 append
#include "topk.h"

namespace llp_fast {
namespace topk {

namespace {

bool fused_wanted() {
#ifdef LLP_FAST_X86
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("popcnt"))
    return false;
  if (const char* s = std::getenv("LLP_FAST_CPU_FUSED")) return std::strcmp(s, "0") != 0;
  if (std::getenv("LLP_FAST_CPU_ISA") != nullptr) return false;  // tests of one scan variant: the scan runs
  return !__builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

}  // namespace

bool fused_tile() {
  static const bool on = fused_wanted();
  return on;
}

namespace {

// n rows of src (row stride ld) into panels of `width` rows, [panel][d][width], zero rows after the last.
void pack(const float* src, int64_t ld, int64_t n, int64_t dim, int64_t width, float* out) {
  for (int64_t p = 0; p * width < n; ++p) {
    float* o = out + p * width * dim;
    for (int64_t l = 0; l < width; ++l) {
      const int64_t r = p * width + l;
      for (int64_t d = 0; d < dim; ++d) o[d * width + l] = r < n ? src[r * ld + d] : 0.0f;
    }
  }
}

}  // namespace

void pack_queries(const float* a, int64_t lda, int64_t n, int64_t dim, float* out) {
  pack(a, lda, n, dim, kPanelRows, out);
}

void pack_keys(const float* b, int64_t ldb, int64_t n, int64_t dim, float* out) {
  pack(b, ldb, n, dim, kPanelKeys, out);
}

#ifdef LLP_FAST_X86
namespace {

// The 6 x 16 dot products of a query panel and a key panel, into c[2 * row + half].
__attribute__((target("avx2,fma"), always_inline)) inline void micro(const float* a, const float* b, int64_t dim,
                                                                      __m256* c) {
  __m256 acc[2 * kPanelRows];  // unrolled: the 12 accumulators, the two key vectors and a query lane fill
  for (auto& v : acc) v = _mm256_setzero_ps();  // 15 of AVX2's 16 registers
  for (int64_t d = 0; d < dim; ++d) {
    const __m256 b0 = _mm256_loadu_ps(b + kPanelKeys * d), b1 = _mm256_loadu_ps(b + kPanelKeys * d + 8);
#pragma GCC unroll 6
    for (int i = 0; i < kPanelRows; ++i) {
      const __m256 x = _mm256_broadcast_ss(a + kPanelRows * d + i);
      acc[2 * i] = _mm256_fmadd_ps(x, b0, acc[2 * i]);
      acc[2 * i + 1] = _mm256_fmadd_ps(x, b1, acc[2 * i + 1]);
    }
  }
  for (int i = 0; i < 2 * kPanelRows; ++i) c[i] = acc[i];
}

// Every (6-row panel, 16-key panel) block of the tile: with kStore, its raw products written to
// s[0, nr) x [0, nc) (row stride lds); otherwise scaled, biased and compared with the rows' thresholds,
// only candidates appended to `rows` (tile_select).
template <bool kStore>
__attribute__((target("avx2,fma,popcnt"))) void blocks_avx2(const float* ap, int64_t nr, const float* bp,
                                                            int64_t nc, int64_t dim, float* s, int64_t lds,
                                                            const float* bias, float inv_tau, uint32_t base,
                                                            const TileRows* rows) {
  const __m256 vt = _mm256_set1_ps(inv_tau);
  __m256 c[2 * kPanelRows];
  alignas(32) float part[kPanelKeys];
  for (int64_t j0 = 0; j0 < nc; j0 += kPanelKeys) {
    const float* b = bp + j0 * dim;
    const int64_t w = std::min(kPanelKeys, nc - j0);  // keys of this panel (the last may have fewer)
    __m256 bias0, bias1;
    if constexpr (!kStore) {
      if (w < kPanelKeys) {  // the missing keys' bias -inf: never a candidate
        std::fill(part, part + kPanelKeys, -kInf);
        std::copy(bias + j0, bias + nc, part);
      }
      const float* pb = w < kPanelKeys ? part : bias + j0;
      bias0 = _mm256_loadu_ps(pb);
      bias1 = _mm256_loadu_ps(pb + 8);
    }
    for (int64_t r0 = 0; r0 < nr; r0 += kPanelRows) {
      micro(ap + r0 * dim, b, dim, c);
      const int64_t h = std::min(kPanelRows, nr - r0);
      for (int64_t i = 0; i < h; ++i) {
        if constexpr (kStore) {
          float* o = s + (r0 + i) * lds + j0;
          if (w == kPanelKeys) {
            _mm256_storeu_ps(o, c[2 * i]);
            _mm256_storeu_ps(o + 8, c[2 * i + 1]);
          } else {
            _mm256_store_ps(part, c[2 * i]);
            _mm256_store_ps(part + 8, c[2 * i + 1]);
            std::memcpy(o, part, static_cast<size_t>(w) * sizeof(float));
          }
        } else {
          const int64_t r = r0 + i;
          // The scan's scores: the product scaled, then the bias added, each rounded (no FMA here).
          const __m256 x0 = _mm256_add_ps(_mm256_mul_ps(c[2 * i], vt), bias0);
          const __m256 x1 = _mm256_add_ps(_mm256_mul_ps(c[2 * i + 1], vt), bias1);
          __m256 t = _mm256_set1_ps(rows->thr[r]);
          int m0 = _mm256_movemask_ps(_mm256_cmp_ps(x0, t, _CMP_GT_OQ));
          int m1 = _mm256_movemask_ps(_mm256_cmp_ps(x1, t, _CMP_GT_OQ));
          if ((m0 | m1) == 0) continue;
          if (rows->cap - rows->count[r] < kRoom) {  // cut the row's buffer; its threshold rises
            rows->make_room(rows->owner, r);
            t = _mm256_set1_ps(rows->thr[r]);
            m0 = _mm256_movemask_ps(_mm256_cmp_ps(x0, t, _CMP_GT_OQ));
            m1 = _mm256_movemask_ps(_mm256_cmp_ps(x1, t, _CMP_GT_OQ));
          }
          float* v = rows->vals + r * rows->cap;
          uint32_t* ix = rows->idx + r * rows->cap;
          int64_t n = rows->count[r];
          n = append8(x0, m0, base + static_cast<uint32_t>(j0), v, ix, n);
          rows->count[r] = append8(x1, m1, base + static_cast<uint32_t>(j0 + 8), v, ix, n);
        }
      }
    }
  }
}

}  // namespace
#endif  // LLP_FAST_X86

void tile_store(const float* ap, int64_t nr, const float* bp, int64_t nc, int64_t dim, float* s, int64_t lds) {
#ifdef LLP_FAST_X86
  TORCH_CHECK(fused_tile(), "tile_store: this CPU has no AVX2 and FMA");
  blocks_avx2<true>(ap, nr, bp, nc, dim, s, lds, nullptr, 1.0f, 0, nullptr);
#else
  (void)ap, (void)nr, (void)bp, (void)nc, (void)dim, (void)s, (void)lds;
  TORCH_CHECK(false, "tile_store: not an x86-64 build");
#endif
}

void tile_select(const float* ap, int64_t nr, const float* bp, int64_t nc, int64_t dim, const float* bias,
                 float inv_tau, uint32_t base, const TileRows& rows) {
#ifdef LLP_FAST_X86
  TORCH_CHECK(fused_tile(), "tile_select: this CPU has no AVX2 and FMA");
  blocks_avx2<false>(ap, nr, bp, nc, dim, nullptr, 0, bias, inv_tau, base, &rows);
#else
  (void)ap, (void)nr, (void)bp, (void)nc, (void)dim, (void)bias, (void)inv_tau, (void)base, (void)rows;
  TORCH_CHECK(false, "tile_select: not an x86-64 build");
#endif
}

}  // namespace topk
}  // namespace llp_fast
