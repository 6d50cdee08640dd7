// Step 1 and step 2 of csrc/cpu/topk.h fused, float32, on x86-64 CPUs with AVX2 and FMA: the score
// tile computed in registers, 6 query rows x 16 keys at a time (AVX2) or 12 rows x 32 keys (AVX-512:
// two query panels by two key panels, 24 of its 32 registers accumulating), and each such block compared
// with its rows' thresholds before it leaves them. A block none of whose scores beats its row's
// threshold (once a row has seen a few hundred keys, almost all of them) is never written to memory:
// no score tile is stored and read back, which is what the BLAS tile plus a scan over it cost beyond
// the GEMM itself.
//
// Layout (the classic packed GEMM): a query block is packed into panels of 6 rows, [panel][d][6], a key
// tile into panels of 16 keys, [panel][d][16] (zero rows and keys pad the last panels); the loop runs
// over key panels (AVX-512: pairs), and for each over the query panels (AVX-512: pairs), so that the
// key panels (16 or 32 x D floats) stay in L1 while the query block streams from L2. Every score is one
// sequence of FMAs over d = 0..D-1 from zero, whatever the tile, the block, the position of the key or
// the vector width: a key's score does not depend on how the caller chunked the keys (topk_scores
// merges chunked calls exactly), and both widths give the same bits. The scale and the bias are then
// applied as the scan applies them (a multiply and an add, each rounded).
//
// bf16 queries and keys on a CPU with AVX512-BF16 (fused_dot()) run the AVX-512 loop too, packed a pair of
// components to a 32-bit word (pack_*_bf16) and each FMA replaced by the bf16 dot product of a pair
// (kDot, VDPBF16PS: each lane adds the products of one pair of bf16 values a step, exact products,
// sums rounded to nearest, bf16 denormals read as zero and denormal results flushed, as AMX does):
// the same epilogue, the same compares. Where the kernel stores the tile and scans it instead
// (LLP_FAST_CPU_FUSED=0), dot_bf16_tile runs the same loop's store: the same bits.
//
// Only functions with a target attribute use AVX2/FMA or AVX-512, and fused_tile() says whether the
// kernel runs the fused tile at all. The default: AVX-512 where the CPU has it (its GEMM loop then
// runs on the 512-bit units, as the BLAS does), AVX2 where that is the widest unit. LLP_FAST_CPU_FUSED=0
// turns it off (the BLAS tile and the scan), =avx2 / =avx512 force one width (an error where the CPU
// lacks it), =1 the widest; LLP_FAST_CPU_ISA (tests of one scan variant) turns it off unless
// LLP_FAST_CPU_FUSED is set.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "left_pack.h"  // LLP_FAST_X86, the AVX2 append
#include "topk.h"

namespace llp_fast {
namespace topk {

namespace {

// 0 (off), 256 (AVX2) or 512 (AVX-512): the fused tile's vector width on this CPU. A width asked for
// by name that the CPU lacks, or a value that names none, is an error (a benchmark or test that asks
// for avx512 must not silently measure the BLAS tile).
int fused_width() {
#ifdef LLP_FAST_X86
  __builtin_cpu_init();
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  // AVX-512 with its byte and word instructions (AVX512BW): the loop is compiled with AVX512-BF16 for
  // its bf16 instantiation, which lets the compiler use them (every AVX-512 CPU since Skylake-SP has it).
  const int widest = !avx2                                                                        ? 0
                     : __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? 512
                                                                                                 : 256;
  if (const char* s = std::getenv("LLP_FAST_CPU_FUSED")) {
    if (std::strcmp(s, "0") == 0) return 0;
    if (std::strcmp(s, "1") == 0) return widest;
    if (std::strcmp(s, "avx2") == 0) {
      TORCH_CHECK(avx2, "LLP_FAST_CPU_FUSED=avx2: this CPU has no AVX2 and FMA");
      return 256;
    }
    if (std::strcmp(s, "avx512") == 0) {
      TORCH_CHECK(widest == 512, "LLP_FAST_CPU_FUSED=avx512: this CPU has no AVX-512 with AVX512BW");
      return 512;
    }
    TORCH_CHECK(false, "LLP_FAST_CPU_FUSED must be 0, 1, avx2 or avx512, got '", s, "'");
  }
  if (std::getenv("LLP_FAST_CPU_ISA") != nullptr) return 0;  // tests of one scan variant: the scan runs
  return widest;
#else
  if (const char* s = std::getenv("LLP_FAST_CPU_FUSED"))
    TORCH_CHECK(std::strcmp(s, "0") == 0 || std::strcmp(s, "1") == 0,
                "LLP_FAST_CPU_FUSED=", s, ": not an x86-64 build (0 or 1 only)");
  return 0;
#endif
}

int width() {
  static const int w = fused_width();
  return w;
}

}  // namespace

bool fused_tile() { return width() != 0; }

bool fused_dot() { return width() == 512 && bf16_source() == kBf16Dot; }

int fused_bits() { return width(); }

namespace {

// How tile_select's AVX-512 loop passes over a row's block of 32 scores that holds no candidate. At
// small k (most of a row's blocks hold none once its threshold is known: at K = 10 about 1 in 5 over
// the whole pass, fewer as the keys go on) a branch skips the block, on the raw products where every
// key that can score has one bias (kRawFilter: one compare a key panel), else on the scores
// (kScoreFilter). At larger k the rows with a candidate are close to random and that branch
// mispredicted: every row appends its (possibly empty) compressed panels (kNoFilter). Measured on an
// Intel Xeon (one thread, interleaved runs): the branch gained at K = 10 and T = 25 (local_density's
// default), lost at K = 64 and 200.
constexpr int kNoFilter = 0, kRawFilter = 1, kScoreFilter = 2;
constexpr int64_t kFilterK = 32;

// kRawFilter's threshold on the raw products for a row whose threshold is thr, against keys whose
// largest bias is bmax: a float t such that no product c <= t scores above thr, (c * inv_tau) + b
// rounded as the kernel rounds, for any b <= bmax (rounding is monotone and inv_tau > 0, so checking
// c = t suffices). -inf where nothing can be said (every product is then scored).
float raw_threshold(float thr, float bmax, float inv_tau) {
  if (std::isnan(thr) || std::isnan(bmax) || thr == -kInf || bmax == kInf) return -kInf;
  if (bmax == -kInf) return kInf;  // every score is -inf, and thr > -inf
  float t = static_cast<float>((static_cast<double>(thr) - static_cast<double>(bmax)) / static_cast<double>(inv_tau));
  for (int i = 0; i < 8 && !std::isnan(t); ++i) {
    const float x = t * inv_tau;  // -ffp-contract=off: two roundings, as the kernel's
    if (!(x + bmax > thr)) return t;
    t = std::nextafter(t, -kInf);
  }
  return -kInf;
}

// n rows of src (row stride ld; the rows src_rows[0, n) of it where src_rows is given) into `panels`
// panels of `width` rows, [panel][slot][width] with `slots` float slots a row, zero rows after the
// last; put(row, o) writes one row's slots to o[0], o[width], o[2 * width], ...
template <typename T, typename Put>
void pack_panels(const T* src, int64_t ld, int64_t n, int64_t slots, int64_t width, int64_t panels, float* out,
                 const int64_t* src_rows, const Put& put) {
  for (int64_t p = 0; p < panels; ++p) {
    float* o = out + p * width * slots;
    const int64_t live = std::max<int64_t>(0, std::min(width, n - p * width));
    if (live < width) std::fill(o, o + width * slots, 0.0f);  // zero bits: float and bf16 zeros
    for (int64_t l = 0; l < live; ++l) {  // a row at a time: each read sequential, the writes in L1
      const int64_t at = p * width + l;
      put(src + (src_rows != nullptr ? src_rows[at] : at) * ld, o + l);
    }
  }
}

// float rows, a component a slot ([panel][d][width]).
void pack(const float* src, int64_t ld, int64_t n, int64_t dim, int64_t width, int64_t panels, float* out,
          const int64_t* src_rows = nullptr) {
  pack_panels(src, ld, n, dim, width, panels, out, src_rows, [&](const float* row, float* o) {
    for (int64_t d = 0; d < dim; ++d) o[d * width] = row[d];
  });
}

// pack()'s layout for bf16 rows, a pair of components a word ([panel][pair][width], each word the
// components 2p (low half) and 2p + 1 (high; zero past an odd dim), in float-sized slots).
void pack_pairs(const uint16_t* src, int64_t ld, int64_t n, int64_t dim, int64_t width, int64_t panels, float* out,
                const int64_t* src_rows = nullptr) {
  const int64_t pairs = bf16_pairs(dim), whole = dim / 2;
  pack_panels(src, ld, n, pairs, width, panels, out, src_rows, [&](const uint16_t* row, float* o) {
    for (int64_t q = 0; q < whole; ++q) std::memcpy(o + q * width, row + 2 * q, sizeof(float));
    if (whole < pairs) {
      const uint32_t last = row[dim - 1];
      std::memcpy(o + whole * width, &last, sizeof(float));
    }
  });
}

}  // namespace

void pack_queries_bf16(const uint16_t* a, int64_t lda, int64_t n, int64_t dim, float* out) {
  pack_pairs(a, lda, n, dim, kPanelRows, panel_rows(n) / kPanelRows, out);
}

void pack_keys_bf16(const uint16_t* b, int64_t ldb, int64_t n, int64_t dim, float* out, const int64_t* rows) {
  pack_pairs(b, ldb, n, dim, kPanelKeys, panel_keys(n) / kPanelKeys, out, rows);
}

void pack_queries(const float* a, int64_t lda, int64_t n, int64_t dim, float* out) {
  pack(a, lda, n, dim, kPanelRows, panel_rows(n) / kPanelRows, out);
}

void pack_keys(const float* b, int64_t ldb, int64_t n, int64_t dim, float* out, const int64_t* rows) {
  pack(b, ldb, n, dim, kPanelKeys, panel_keys(n) / kPanelKeys, out, rows);
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
          if (rows->count[r] > rows->limit) {  // cut the row's buffer; its threshold rises
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


// The (6 * QP) x (16 * KP) dot products of QP adjacent query panels (6 * dim floats apart) and KP
// adjacent key panels (16 * dim floats apart), into acc[KP * row + panel]; each lane the same FMA
// sequence as micro()'s. The caller's epilogue is unrolled over the rows too, so that acc stays in
// registers (no copy through the stack).
// kDot: a and b hold bf16 pairs (pack_*_bf16: one 32-bit word a pair, dim = the pairs), each step the
// CPU's bf16 dot product of a pair (VDPBF16PS) in the place of the FMA.
template <int QP, int KP, bool kDot>
__attribute__((target("avx512f,avx512bf16"), always_inline)) inline void micro512(const float* a, const float* b,
                                                                                   int64_t dim,
                                                                                   __m512 (&acc)[kPanelRows * QP * KP]) {
#pragma GCC unroll 24
  for (int i = 0; i < kPanelRows * QP * KP; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {  // QP = KP = 2: 24 accumulators, 2 key vectors, a query lane
    __m512 bv[KP];
#pragma GCC unroll 4
    for (int p = 0; p < KP; ++p) bv[p] = _mm512_loadu_ps(b + p * kPanelKeys * dim + kPanelKeys * d);
#pragma GCC unroll 12
    for (int i = 0; i < kPanelRows * QP; ++i) {
      const __m512 x = _mm512_set1_ps(a[(i / kPanelRows) * kPanelRows * dim + kPanelRows * d + i % kPanelRows]);
#pragma GCC unroll 4
      for (int p = 0; p < KP; ++p) {
        if constexpr (kDot)
          acc[KP * i + p] = _mm512_dpbf16_ps(acc[KP * i + p], (__m512bh)x, (__m512bh)bv[p]);
        else
          acc[KP * i + p] = _mm512_fmadd_ps(x, bv[p], acc[KP * i + p]);
      }
    }
  }
}

// One group of KP key panels (keys j0 .. j0 + w) against the query rows [r0, r0 + h), h <= 6 * QP:
// blocks_avx2's work for them.
template <int QP, int KP, bool kStore, int kFilter, bool kDot>
__attribute__((target("avx512f,avx512bf16,avx2,popcnt"), always_inline)) inline void block512(
    const float* ap, int64_t r0, int64_t h, const float* b, int64_t j0, int64_t w, int64_t dim, float* s,
    int64_t lds, const __m512 (&bv)[KP], __m512 vt, uint32_t base, const TileRows* rows) {
  constexpr int64_t kKeys = kPanelKeys * KP;
  __m512 c[kPanelRows * QP * KP];
  micro512<QP, KP, kDot>(ap + r0 * dim, b, dim, c);
#pragma GCC unroll 12
  for (int i = 0; i < kPanelRows * QP; ++i) {
    if (i >= h) break;
    if constexpr (kStore) {
      float* o = s + (r0 + i) * lds + j0;
      if (w == kKeys) {
#pragma GCC unroll 4
        for (int p = 0; p < KP; ++p) _mm512_storeu_ps(o + kPanelKeys * p, c[KP * i + p]);
      } else {
        alignas(64) float part[kKeys];
#pragma GCC unroll 4
        for (int p = 0; p < KP; ++p) _mm512_store_ps(part + kPanelKeys * p, c[KP * i + p]);
        std::memcpy(o, part, static_cast<size_t>(w) * sizeof(float));
      }
    } else {
      const int64_t r = r0 + i;
      if constexpr (kFilter == kRawFilter) {
        const __m512 tp = _mm512_set1_ps(rows->pre[r]);
        __mmask16 any = 0;
#pragma GCC unroll 4
        for (int p = 0; p < KP; ++p) any |= _mm512_cmp_ps_mask(c[KP * i + p], tp, _CMP_GT_OQ);
        if (any == 0) continue;
      }
      __m512 x[KP];
      __mmask16 m[KP];
      __m512 t = _mm512_set1_ps(rows->thr[r]);
#pragma GCC unroll 4
      for (int p = 0; p < KP; ++p) {  // the scan's scores: scaled, then biased, each rounded (no FMA)
        x[p] = _mm512_add_ps(_mm512_mul_ps(c[KP * i + p], vt), bv[p]);
        m[p] = _mm512_cmp_ps_mask(x[p], t, _CMP_GT_OQ);
      }
      if constexpr (kFilter == kScoreFilter) {
        __mmask16 any = 0;
#pragma GCC unroll 4
        for (int p = 0; p < KP; ++p) any |= m[p];
        if (any == 0) continue;
      }
      // kNoFilter (larger k) appends without a test for "any candidate here": which rows have one is
      // close to random (over half of a row's blocks at K >= 100), so that branch mispredicted; the
      // compress and the two stores of an empty panel cost less (topk_scores at K = 25..1000 faster
      // by 2-8%, one thread).
      if (rows->count[r] > rows->limit) {  // cut the row's buffer; its threshold rises
        rows->make_room(rows->owner, r);
        t = _mm512_set1_ps(rows->thr[r]);
#pragma GCC unroll 4
        for (int p = 0; p < KP; ++p) m[p] = _mm512_cmp_ps_mask(x[p], t, _CMP_GT_OQ);
      }
      float* v = rows->vals + r * rows->cap;
      uint32_t* ix = rows->idx + r * rows->cap;
      int64_t n = rows->count[r];
      // Each panel's passing lanes packed to the front and written whole (16 slots: kRoom covers the
      // 16 * KP appended plus the last write's overhang), in key order.
      const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma GCC unroll 4
      for (int p = 0; p < KP; ++p) {
        const __m512i id = _mm512_add_epi32(
            _mm512_set1_epi32(static_cast<int>(base + static_cast<uint32_t>(j0 + kPanelKeys * p))), lane);
        _mm512_storeu_ps(v + n, _mm512_maskz_compress_ps(m[p], x[p]));
        _mm512_storeu_si512(ix + n, _mm512_maskz_compress_epi32(m[p], id));
        n += __builtin_popcount(static_cast<unsigned>(m[p]));
      }
      rows->count[r] = n;
    }
  }
}

// Keys j0 .. j0 + w (KP panels) against every query row, two query panels at a time.
template <int KP, bool kStore, int kFilter, bool kDot>
__attribute__((target("avx512f,avx512bf16,avx2,popcnt"))) void group512(const float* ap, int64_t nr, const float* b,
                                                            int64_t j0, int64_t w, int64_t dim, float* s,
                                                            int64_t lds, const float* bias, float inv_tau,
                                                            uint32_t base, const TileRows* rows) {
  constexpr int64_t kKeys = kPanelKeys * KP;
  __m512 bv[KP] = {};
  if constexpr (!kStore) {
    alignas(64) float part[kKeys];
    const float* pb = bias + j0;
    if (w < kKeys) {  // the missing keys' bias -inf: never a candidate
      std::fill(part, part + kKeys, -kInf);
      std::copy(bias + j0, bias + j0 + w, part);
      pb = part;
    }
    for (int p = 0; p < KP; ++p) bv[p] = _mm512_loadu_ps(pb + kPanelKeys * p);
  }
  const __m512 vt = _mm512_set1_ps(inv_tau);
  for (int64_t r0 = 0; r0 < nr; r0 += 2 * kPanelRows)  // pairs of panels (panel_rows: zero rows pad the last)
    block512<2, KP, kStore, kFilter, kDot>(ap, r0, std::min(2 * kPanelRows, nr - r0), b, j0, w, dim, s, lds, bv, vt, base, rows);
}

template <bool kStore, int kFilter, bool kDot>
void blocks_avx512(const float* ap, int64_t nr, const float* bp, int64_t nc, int64_t dim, float* s, int64_t lds,
                   const float* bias, float inv_tau, uint32_t base, const TileRows* rows) {
  constexpr int64_t kGroup = 2 * kPanelKeys;
  static_assert(kGroup <= kRoom, "a group's appends (the last written 16 lanes whole) overrun kRoom");
  for (int64_t j0 = 0; j0 < nc; j0 += kGroup) {
    const int64_t w = std::min(kGroup, nc - j0);
    const float* b = bp + j0 * dim;
    if (w > kPanelKeys)
      group512<2, kStore, kFilter, kDot>(ap, nr, b, j0, w, dim, s, lds, bias, inv_tau, base, rows);
    else
      group512<1, kStore, kFilter, kDot>(ap, nr, b, j0, w, dim, s, lds, bias, inv_tau, base, rows);
  }
}

}  // namespace
#endif  // LLP_FAST_X86

#ifdef LLP_FAST_X86
namespace {
template <bool kDot>
void select512(const float* ap, int64_t nr, const float* bp, int64_t nc, int64_t dim, const float* bias,
               float inv_tau, uint32_t base, const TileRows& rows) {
  float bmax = -kInf, bmin = kInf;  // over the keys that can score (a masked key's bias is -inf)
  for (int64_t j = 0; j < nc; ++j) {  // no branch on the mask (random masks mispredicted it)
    bmax = std::max(bmax, bias[j]);
    bmin = std::min(bmin, bias[j] > -kInf ? bias[j] : kInf);
  }
  if (bmax == -kInf || (rows.k <= kFilterK && bmin == bmax)) {
    // Every key masked (no row passes: at any k), or one bias for every key that can score.
    for (int64_t r = 0; r < nr; ++r) rows.pre[r] = raw_threshold(rows.thr[r], bmax, inv_tau);
    blocks_avx512<false, kRawFilter, kDot>(ap, nr, bp, nc, dim, nullptr, 0, bias, inv_tau, base, &rows);
  } else if (rows.k <= kFilterK) {
    blocks_avx512<false, kScoreFilter, kDot>(ap, nr, bp, nc, dim, nullptr, 0, bias, inv_tau, base, &rows);
  } else {
    blocks_avx512<false, kNoFilter, kDot>(ap, nr, bp, nc, dim, nullptr, 0, bias, inv_tau, base, &rows);
  }
}
}  // namespace
#endif

void tile_store(const float* ap, int64_t nr, const float* bp, int64_t nc, int64_t dim, float* s, int64_t lds,
                bool dot) {
#ifdef LLP_FAST_X86
  TORCH_CHECK(fused_tile(), "tile_store: this CPU has no AVX2 and FMA");
  TORCH_CHECK(!dot || fused_dot(), "tile_store: bf16 pairs need the AVX-512 tile and AVX512-BF16");
  if (dot)
    blocks_avx512<true, kNoFilter, true>(ap, nr, bp, nc, dim, s, lds, nullptr, 1.0f, 0, nullptr);
  else if (width() == 512)
    blocks_avx512<true, kNoFilter, false>(ap, nr, bp, nc, dim, s, lds, nullptr, 1.0f, 0, nullptr);
  else
    blocks_avx2<true>(ap, nr, bp, nc, dim, s, lds, nullptr, 1.0f, 0, nullptr);
#else
  (void)ap, (void)nr, (void)bp, (void)nc, (void)dim, (void)s, (void)lds, (void)dot;
  TORCH_CHECK(false, "tile_store: not an x86-64 build");
#endif
}

void tile_select(const float* ap, int64_t nr, const float* bp, int64_t nc, int64_t dim, const float* bias,
                 float inv_tau, uint32_t base, const TileRows& rows, bool dot) {
#ifdef LLP_FAST_X86
  TORCH_CHECK(fused_tile(), "tile_select: this CPU has no AVX2 and FMA");
  TORCH_CHECK(!dot || fused_dot(), "tile_select: bf16 pairs need the AVX-512 tile and AVX512-BF16");
  if (dot)
    select512<true>(ap, nr, bp, nc, dim, bias, inv_tau, base, rows);
  else if (width() == 512)
    select512<false>(ap, nr, bp, nc, dim, bias, inv_tau, base, rows);
  else
    blocks_avx2<false>(ap, nr, bp, nc, dim, nullptr, 0, bias, inv_tau, base, &rows);
#else
  (void)ap, (void)nr, (void)bp, (void)nc, (void)dim, (void)bias, (void)inv_tau, (void)base, (void)rows, (void)dot;
  TORCH_CHECK(false, "tile_select: not an x86-64 build");
#endif
}

bool dot_bf16_cpu() {
#ifdef LLP_FAST_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

void dot_bf16_tile(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c, int64_t rows,
                   int64_t cols, int64_t dim) {
#ifdef LLP_FAST_X86
  TORCH_CHECK(dot_bf16_cpu(), "dot_bf16_tile: this CPU has no AVX512-BF16");
  // The fused loop's own store (kDot), on both blocks packed here: the same bits as the fused tile's.
  const int64_t pairs = bf16_pairs(dim);
  thread_local std::vector<float> ap, bp;
  ap.resize(static_cast<size_t>(panel_rows(rows) * pairs));
  bp.resize(static_cast<size_t>(panel_keys(cols) * pairs));
  pack_queries_bf16(a, lda, rows, dim, ap.data());
  pack_keys_bf16(b, ldb, cols, dim, bp.data());
  blocks_avx512<true, kNoFilter, true>(ap.data(), rows, bp.data(), cols, pairs, c, cols, nullptr, 1.0f, 0, nullptr);
#else
  (void)a, (void)lda, (void)b, (void)ldb, (void)c, (void)rows, (void)cols, (void)dim;
  TORCH_CHECK(false, "dot_bf16_tile: not an x86-64 build");
#endif
}

bool rescore_available() { return width() == 512; }

#ifdef LLP_FAST_X86
namespace {

// The 16 x 16 floats r[i][j] -> r[j][i], in registers.
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
}

__attribute__((target("avx512f"))) void rescore512(const float* q, const float* b, int64_t ldb, const int64_t* rows,
                                                   int64_t n, int64_t dim, const float* bias, float inv_tau,
                                                   float* out) {
  // Lane l of panel p is key 16 p + l (zero lanes after the last): 16 dims of a panel's keys at a time,
  // transposed in registers and kept in t, then one FMA per d, in order of d: each lane the fused tile's
  // sequence for its key. The panels' chains are independent, so up to four FMAs wait on each other's
  // latency at once instead of one.
  constexpr int kP = kRescoreKeys / kPanelKeys;
  const int np = static_cast<int>((n + kPanelKeys - 1) / kPanelKeys);
  alignas(64) float t[kP][16][16];
  __m512 acc[kP];
#pragma GCC unroll 4
  for (int p = 0; p < kP; ++p) acc[p] = _mm512_setzero_ps();
  for (int64_t d0 = 0; d0 < dim; d0 += 16) {
    const int64_t w = std::min<int64_t>(16, dim - d0);
    const __mmask16 m = static_cast<__mmask16>(w == 16 ? 0xFFFF : (1u << w) - 1);
    for (int p = 0; p < np; ++p) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int l = 0; l < 16; ++l) {
        const int64_t key = 16 * p + l;
        r[l] = key < n ? _mm512_maskz_loadu_ps(m, b + rows[key] * ldb + d0) : _mm512_setzero_ps();
      }
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) _mm512_store_ps(t[p][i], r[i]);
    }
    const float* qd = q + d0;
    if (np == kP && w == 16) {
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        const __m512 x = _mm512_set1_ps(qd[i]);
#pragma GCC unroll 4
        for (int p = 0; p < kP; ++p) acc[p] = _mm512_fmadd_ps(x, _mm512_load_ps(t[p][i]), acc[p]);
      }
    } else {
      for (int i = 0; i < w; ++i) {
        const __m512 x = _mm512_set1_ps(qd[i]);
        for (int p = 0; p < np; ++p) acc[p] = _mm512_fmadd_ps(x, _mm512_load_ps(t[p][i]), acc[p]);
      }
    }
  }
  for (int p = 0; p < np; ++p) {
    const int64_t c = std::min<int64_t>(kPanelKeys, n - 16 * p);
    alignas(64) float bl[kPanelKeys] = {};
    for (int64_t l = 0; l < c; ++l) bl[l] = bias[rows[16 * p + l]];
    const __m512 x = _mm512_add_ps(_mm512_mul_ps(acc[p], _mm512_set1_ps(inv_tau)), _mm512_load_ps(bl));
    alignas(64) float o[kPanelKeys];
    _mm512_store_ps(o, x);
    std::copy(o, o + c, out + 16 * p);
  }
}

// One row of bf16_split.
__attribute__((target("avx512f"))) bool split_row512(const float* x, int64_t dim, uint16_t* out, double* sq) {
  // float64 sums: squares of float32 values neither overflow nor underflow there.
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd(), s2 = _mm512_setzero_pd();
  const __m512i exp_mask = _mm512_set1_epi32(0x7F800000), half = _mm512_set1_epi32(0x7FFF),
                one = _mm512_set1_epi32(1), top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)),
                zero = _mm512_setzero_si512();
  __mmask16 bad = 0;
  for (int64_t d0 = 0; d0 < dim; d0 += 16) {
    const int64_t w = std::min<int64_t>(16, dim - d0);
    const __mmask16 m = static_cast<__mmask16>(w == 16 ? 0xFFFF : (1u << w) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + d0);
    const __m512i bits = _mm512_castps_si512(v);
    bad |= _mm512_mask_cmpeq_epi32_mask(m, _mm512_and_si512(bits, exp_mask), exp_mask);
    // round to nearest even at bit 16 (finite values; c10::BFloat16's rounding)
    const __m512i rb = _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(bits, 16), one));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(bits, rb), top);
    // A value that rounds to bf16 infinity: the exact path. A bf16 denormal: zero, as the bf16 GEMM
    // reads it, so that |x - bf16(x)| counts what the GEMM loses.
    const __m512i r_exp = _mm512_and_si512(r, exp_mask);
    bad |= _mm512_mask_cmpeq_epi32_mask(m, r_exp, exp_mask);
    r = _mm512_mask_mov_epi32(r, _mm512_cmpeq_epi32_mask(r_exp, zero), zero);
    const __m512 v16 = _mm512_castsi512_ps(r);
    const __m512 dv = _mm512_sub_ps(v, v16);  // exact: v and v16 share the leading bits, or v16 is 0
    for (int h = 0; h < 2; ++h) {
      const __m256 vh = h == 0 ? _mm512_castps512_ps256(v) : _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
      const __m256 dh = h == 0 ? _mm512_castps512_ps256(dv) : _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dv), 1));
      const __m256 th = h == 0 ? _mm512_castps512_ps256(v16) : _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v16), 1));
      const __m512d a = _mm512_cvtps_pd(vh), b = _mm512_cvtps_pd(dh), c = _mm512_cvtps_pd(th);
      s0 = _mm512_fmadd_pd(a, a, s0);
      s1 = _mm512_fmadd_pd(b, b, s1);
      s2 = _mm512_fmadd_pd(c, c, s2);
    }
    alignas(32) uint16_t hb[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(hb), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    std::memcpy(out + d0, hb, static_cast<size_t>(w) * sizeof(uint16_t));
  }
  sq[0] = _mm512_reduce_add_pd(s0);
  sq[1] = _mm512_reduce_add_pd(s1);
  sq[2] = _mm512_reduce_add_pd(s2);
  return bad == 0;
}

}  // namespace
#endif

void rescore(const float* q, const float* b, int64_t ldb, const int64_t* rows, int64_t n, int64_t dim,
             const float* bias, float inv_tau, float* out) {
  TORCH_CHECK(n >= 0 && n <= kRescoreKeys, "rescore: at most ", kRescoreKeys, " keys");
#ifdef LLP_FAST_X86
  TORCH_CHECK(rescore_available(), "rescore: the fused tile does not run AVX-512 here");
  rescore512(q, b, ldb, rows, n, dim, bias, inv_tau, out);
#else
  (void)q, (void)b, (void)ldb, (void)rows, (void)dim, (void)bias, (void)inv_tau, (void)out;
  TORCH_CHECK(false, "rescore: not an x86-64 build");
#endif
}

bool bf16_split(const float* x, int64_t ld, int64_t n, int64_t dim, uint16_t* out, double* sq) {
#ifdef LLP_FAST_X86
  TORCH_CHECK(rescore_available(), "bf16_split: the fused tile does not run AVX-512 here");
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= split_row512(x + i * ld, dim, out + i * dim, sq + 3 * i);
  return finite;
#else
  (void)x, (void)ld, (void)n, (void)dim, (void)out, (void)sq;
  TORCH_CHECK(false, "bf16_split: not an x86-64 build");
#endif
}

}  // namespace topk
}  // namespace llp_fast
