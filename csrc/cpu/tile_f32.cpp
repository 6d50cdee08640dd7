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

#include "topk.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define LLP_FAST_X86 1
#include <immintrin.h>
#endif

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

void pack_queries(const float* a, int64_t lda, int64_t n, int64_t dim, float* out) {
  const int64_t panels = (n + kPanelRows - 1) / kPanelRows;
  for (int64_t p = 0; p < panels; ++p) {
    float* o = out + p * kPanelRows * dim;
    for (int64_t l = 0; l < kPanelRows; ++l) {
      const int64_t r = p * kPanelRows + l;
      if (r < n) {
        const float* src = a + r * lda;
        for (int64_t d = 0; d < dim; ++d) o[d * kPanelRows + l] = src[d];
      } else {
        for (int64_t d = 0; d < dim; ++d) o[d * kPanelRows + l] = 0.0f;
      }
    }
  }
}

void pack_keys(const float* b, int64_t ldb, int64_t n, int64_t dim, float* out) {
  const int64_t panels = (n + kPanelKeys - 1) / kPanelKeys;
  for (int64_t p = 0; p < panels; ++p) {
    float* o = out + p * kPanelKeys * dim;
    for (int64_t l = 0; l < kPanelKeys; ++l) {
      const int64_t j = p * kPanelKeys + l;
      if (j < n) {
        const float* src = b + j * ldb;
        for (int64_t d = 0; d < dim; ++d) o[d * kPanelKeys + l] = src[d];
      } else {
        for (int64_t d = 0; d < dim; ++d) o[d * kPanelKeys + l] = 0.0f;
      }
    }
  }
}

#ifdef LLP_FAST_X86
namespace {

// Left-pack table: for each 8-bit mask, the lanes whose bit is set, first (then the rest).
struct PackLanes {
  alignas(32) int32_t lanes[256][8];
  PackLanes() {
    for (int m = 0; m < 256; ++m) {
      int w = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) lanes[m][w++] = l;
      for (int l = 0; l < 8; ++l)
        if (!(m >> l & 1)) lanes[m][w++] = l;
    }
  }
};
const PackLanes kLanes;

// The 6 x 16 dot products of a query panel and a key panel, into c[2 * row + half].
__attribute__((target("avx2,fma"), always_inline)) inline void micro(const float* a, const float* b, int64_t dim,
                                                                      __m256* c) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t d = 0; d < dim; ++d) {
    const __m256 b0 = _mm256_loadu_ps(b + kPanelKeys * d), b1 = _mm256_loadu_ps(b + kPanelKeys * d + 8);
    const float* ad = a + kPanelRows * d;
    __m256 x = _mm256_broadcast_ss(ad);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(ad + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10);
    c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(ad + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(ad + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30);
    c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(ad + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40);
    c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(ad + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50);
    c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  c[0] = c00, c[1] = c01, c[2] = c10, c[3] = c11, c[4] = c20, c[5] = c21;
  c[6] = c30, c[7] = c31, c[8] = c40, c[9] = c41, c[10] = c50, c[11] = c51;
}

__attribute__((target("avx2,fma"))) void store_avx2(const float* ap, int64_t nr, const float* bp, int64_t nc,
                                                    int64_t dim, float* s, int64_t lds) {
  const int64_t row_panels = (nr + kPanelRows - 1) / kPanelRows;
  const int64_t key_panels = (nc + kPanelKeys - 1) / kPanelKeys;
  __m256 c[12];
  alignas(32) float part[kPanelKeys];
  for (int64_t kp = 0; kp < key_panels; ++kp) {
    const float* b = bp + kp * kPanelKeys * dim;
    const int64_t j0 = kp * kPanelKeys, w = std::min(kPanelKeys, nc - j0);
    for (int64_t rp = 0; rp < row_panels; ++rp) {
      micro(ap + rp * kPanelRows * dim, b, dim, c);
      const int64_t r0 = rp * kPanelRows, h = std::min(kPanelRows, nr - r0);
      for (int64_t i = 0; i < h; ++i) {
        float* o = s + (r0 + i) * lds + j0;
        if (w == kPanelKeys) {
          _mm256_storeu_ps(o, c[2 * i]);
          _mm256_storeu_ps(o + 8, c[2 * i + 1]);
        } else {
          _mm256_store_ps(part, c[2 * i]);
          _mm256_store_ps(part + 8, c[2 * i + 1]);
          std::memcpy(o, part, static_cast<size_t>(w) * sizeof(float));
        }
      }
    }
  }
}

// Appends the lanes of x set in `bits` (8 of them) at vals/idx + *count, in lane order.
__attribute__((target("avx2,popcnt"), always_inline)) inline void append8(__m256 x, int bits, uint32_t first,
                                                                           float* vals, uint32_t* idx,
                                                                           int64_t* count) {
  if (bits == 0) return;
  const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLanes.lanes[bits]));
  const __m256i id = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_storeu_ps(vals + *count, _mm256_permutevar8x32_ps(x, lanes));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + *count), _mm256_permutevar8x32_epi32(id, lanes));
  *count += __builtin_popcount(static_cast<unsigned>(bits));
}

__attribute__((target("avx2,fma,popcnt"))) void select_avx2(const float* ap, int64_t nr, const float* bp,
                                                            int64_t nc, int64_t dim, const float* bias,
                                                            float inv_tau, uint32_t base, const TileRows& rows) {
  const int64_t row_panels = (nr + kPanelRows - 1) / kPanelRows;
  const int64_t key_panels = (nc + kPanelKeys - 1) / kPanelKeys;
  const __m256 vt = _mm256_set1_ps(inv_tau);
  __m256 c[12];
  for (int64_t kp = 0; kp < key_panels; ++kp) {
    const float* b = bp + kp * kPanelKeys * dim;
    const int64_t j0 = kp * kPanelKeys;
    const __m256 bias0 = _mm256_loadu_ps(bias + j0), bias1 = _mm256_loadu_ps(bias + j0 + 8);
    for (int64_t rp = 0; rp < row_panels; ++rp) {
      micro(ap + rp * kPanelRows * dim, b, dim, c);
      const int64_t r0 = rp * kPanelRows, h = std::min(kPanelRows, nr - r0);
      for (int64_t i = 0; i < h; ++i) {
        const int64_t r = r0 + i;
        // The scan's scores: the product scaled, then the bias added, each rounded (no FMA here).
        const __m256 x0 = _mm256_add_ps(_mm256_mul_ps(c[2 * i], vt), bias0);
        const __m256 x1 = _mm256_add_ps(_mm256_mul_ps(c[2 * i + 1], vt), bias1);
        __m256 t = _mm256_set1_ps(rows.thr[r]);
        int m0 = _mm256_movemask_ps(_mm256_cmp_ps(x0, t, _CMP_GT_OQ));
        int m1 = _mm256_movemask_ps(_mm256_cmp_ps(x1, t, _CMP_GT_OQ));
        if ((m0 | m1) == 0) continue;
        if (rows.cap - rows.count[r] < kRoom) {  // cut the row's buffer; its threshold rises
          rows.make_room(rows.owner, r);
          t = _mm256_set1_ps(rows.thr[r]);
          m0 = _mm256_movemask_ps(_mm256_cmp_ps(x0, t, _CMP_GT_OQ));
          m1 = _mm256_movemask_ps(_mm256_cmp_ps(x1, t, _CMP_GT_OQ));
        }
        float* v = rows.vals + r * rows.cap;
        uint32_t* ix = rows.idx + r * rows.cap;
        append8(x0, m0, base + static_cast<uint32_t>(j0), v, ix, &rows.count[r]);
        append8(x1, m1, base + static_cast<uint32_t>(j0 + 8), v, ix, &rows.count[r]);
      }
    }
  }
}

}  // namespace
#endif  // LLP_FAST_X86

void tile_store(const float* ap, int64_t nr, const float* bp, int64_t nc, int64_t dim, float* s, int64_t lds) {
#ifdef LLP_FAST_X86
  TORCH_CHECK(fused_tile(), "tile_store: this CPU has no AVX2 and FMA");
  store_avx2(ap, nr, bp, nc, dim, s, lds);
#else
  (void)ap, (void)nr, (void)bp, (void)nc, (void)dim, (void)s, (void)lds;
  TORCH_CHECK(false, "tile_store: not an x86-64 build");
#endif
}

void tile_select(const float* ap, int64_t nr, const float* bp, int64_t nc, int64_t dim, const float* bias,
                 float inv_tau, uint32_t base, const TileRows& rows) {
#ifdef LLP_FAST_X86
  TORCH_CHECK(fused_tile(), "tile_select: this CPU has no AVX2 and FMA");
  select_avx2(ap, nr, bp, nc, dim, bias, inv_tau, base, rows);
#else
  (void)ap, (void)nr, (void)bp, (void)nc, (void)dim, (void)bias, (void)inv_tau, (void)base, (void)rows;
  TORCH_CHECK(false, "tile_select: not an x86-64 build");
#endif
}

}  // namespace topk
}  // namespace llp_fast
