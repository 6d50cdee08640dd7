// Steps 1 and 2 of csrc/cpu/topk.h: the score tile's BLAS call, and the float32 scan of a tile row
// compiled once per instruction set (AVX-512, AVX2, baseline x86-64) and chosen once, by the CPU's
// features, at the first call. The build has no -march: only the functions below that carry a target
// attribute use wider instructions, and only when the CPU has them.
#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "left_pack.h"  // LLP_FAST_X86, the AVX2 append
#include "topk.h"

namespace llp_fast {
namespace topk {

// ---------------------------------------------------------------------------------------------
// Step 1. sgemm_ (Fortran BLAS: MKL in torch's x86 wheels, OpenBLAS elsewhere), looked up in
// the library that holds at::mm_out, so that the tile comes from the same BLAS as torch.mm, without
// the dispatcher and a tensor per tile. Not found (a torch without a Fortran-style BLAS): false, and
// the caller uses at::mm_out.
namespace {

using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
// MKL's bf16 x bf16 -> fp32 GEMM (Fortran interface, LP64): products of bf16 values are exact in fp32
// and it sums in fp32, so its scores are the fp32 product of the same values up to summation order.
using gemm_bf16_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                             const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*,
                             const int*);

struct Blas {
  sgemm_t sgemm = nullptr;
  gemm_bf16_t gemm_bf16 = nullptr;
  Blas() {
    if (std::getenv("LLP_FAST_CPU_NO_BLAS") != nullptr) return;  // tests: the at::mm_out path
    Dl_info info;
    using mm_t = at::Tensor& (*)(at::Tensor&, const at::Tensor&, const at::Tensor&);
    const mm_t mm = &at::mm_out;
    if (dladdr(reinterpret_cast<void*>(mm), &info) == 0 || info.dli_fname == nullptr) return;
    void* lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) return;
    sgemm = reinterpret_cast<sgemm_t>(dlsym(lib, "sgemm_"));
    gemm_bf16 = reinterpret_cast<gemm_bf16_t>(dlsym(lib, "gemm_bf16bf16f32_"));
    // the handle stays open: torch's library is never unloaded while we run
  }
};

const Blas& blas() {
  static const Blas b;
  return b;
}

bool fits_int(int64_t x) { return x >= 0 && x <= std::numeric_limits<int>::max(); }

// Column-major BLAS sees row-major S (rows x cols) as S^T (cols x rows) = B (cols x dim) . A^T.
template <typename T, typename C, typename F>
bool gemm(F f, const T* a, int64_t lda, const T* b, int64_t ldb, C* c, int64_t rows, int64_t cols, int64_t dim) {
  if (f == nullptr || !fits_int(lda) || !fits_int(ldb) || !fits_int(rows * cols)) return false;
  const int m = static_cast<int>(cols), n = static_cast<int>(rows), k = static_cast<int>(dim);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(cols);
  const C one = 1, zero = 0;
  f("T", "N", &m, &n, &k, &one, b, &la, a, &lb, &zero, c, &lc);
  return true;
}

// Where bf16 blocks are multiplied as bf16 (bf16_source): MKL's bf16 GEMM on CPUs with bf16 matrix units
// (AMX-BF16; about 750 GFLOP/s a core against 195 for fp32, Intel Xeon); our own tile from the bf16
// dot-product instruction on CPUs with AVX512-BF16 and no AMX (dot_bf16_tile: on an AMD EPYC, Zen 4,
// MKL's bf16 GEMM ran at 94 GFLOP/s against its sgemm's 99, not using that instruction, and a bf16
// propagate at K = 10 took 340 ms through it against 273 ms converted; docs/method.md §4); elsewhere
// the blocks are converted to fp32. LLP_FAST_CPU_BF16_GEMM=0 / =1 / =avx512bf16 forces one (=1: MKL's,
// on any CPU, where it is emulated; tests).
int bf16_source_wanted() {
  if (const char* s = std::getenv("LLP_FAST_CPU_BF16_GEMM")) {
    if (std::strcmp(s, "0") == 0) return kBf16Convert;
    if (std::strcmp(s, "1") == 0) return kBf16Mkl;
    TORCH_CHECK(std::strcmp(s, "avx512bf16") == 0, "LLP_FAST_CPU_BF16_GEMM must be 0, 1 or avx512bf16, got '", s,
                "'");
    TORCH_CHECK(dot_bf16_cpu(), "LLP_FAST_CPU_BF16_GEMM=avx512bf16: this CPU has no AVX512-BF16");
    return kBf16Dot;
  }
#ifdef LLP_FAST_X86
  // AMX: the kernel's own flag, as /proc/cpuinfo reports it (GCC 12 has no name for it).
  if (FILE* f = std::fopen("/proc/cpuinfo", "r")) {
    char line[8192];
    bool amx = false;
    while (!amx && std::fgets(line, sizeof line, f) != nullptr)
      amx = std::strncmp(line, "flags", 5) == 0 && std::strstr(line, " amx_bf16") != nullptr;
    std::fclose(f);
    if (amx) return kBf16Mkl;
  }
#endif
  return dot_bf16_cpu() ? kBf16Dot : kBf16Convert;
}

}  // namespace

bool blas_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t rows, int64_t cols,
               int64_t dim) {
  return gemm(blas().sgemm, a, lda, b, ldb, c, rows, cols, dim);
}

// float64: 8 keys at a time, transposed into kt (dim x 8), each row's 8 sums accumulated in order of d, a
// multiply and an add each (-ffp-contract=off; the same bits at any vector width).
namespace {
constexpr int64_t kOrderedKeys = 8;

constexpr int64_t kOrderedRows = 4;  // rows a pass: each load of kt serves four of them

template <int64_t R>
__attribute__((always_inline)) inline void ordered_block(const double* a, int64_t lda, const double* kt, double* c,
                                                         int64_t ldc, int64_t w, int64_t dim) {
  double acc[R][kOrderedKeys] = {};
  for (int64_t d = 0; d < dim; ++d)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t l = 0; l < kOrderedKeys; ++l) acc[r][l] += a[r * lda + d] * kt[d * kOrderedKeys + l];
  for (int64_t r = 0; r < R; ++r) std::copy(acc[r], acc[r] + w, c + r * ldc);
}

__attribute__((always_inline)) inline void ordered_rows(const double* a, int64_t lda, const double* kt, double* c,
                                                        int64_t ldc, int64_t rows, int64_t w, int64_t dim) {
  int64_t i = 0;
  for (; i + kOrderedRows <= rows; i += kOrderedRows)
    ordered_block<kOrderedRows>(a + i * lda, lda, kt, c + i * ldc, ldc, w, dim);
  for (; i < rows; ++i) ordered_block<1>(a + i * lda, lda, kt, c + i * ldc, ldc, w, dim);
}

#ifdef LLP_FAST_X86
// R rows x 8 keys in registers (the same multiply and add per lane as ordered_block).
template <int R>
__attribute__((target("avx512f"), always_inline)) inline void block512(const double* a, int64_t lda, const double* kt,
                                                                       double* c, int64_t ldc, int64_t w, int64_t dim) {
  __m512d acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_pd();
  for (int64_t d = 0; d < dim; ++d) {
    const __m512d k = _mm512_loadu_pd(kt + d * kOrderedKeys);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_add_pd(acc[r], _mm512_mul_pd(_mm512_set1_pd(a[r * lda + d]), k));
  }
  const __mmask8 m = static_cast<__mmask8>((1u << w) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_pd(c + r * ldc, m, acc[r]);
}

__attribute__((target("avx512f"))) void ordered_rows_avx512(const double* a, int64_t lda, const double* kt, double* c,
                                                            int64_t ldc, int64_t rows, int64_t w, int64_t dim) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) block512<8>(a + i * lda, lda, kt, c + i * ldc, ldc, w, dim);
  for (; i < rows; ++i) block512<1>(a + i * lda, lda, kt, c + i * ldc, ldc, w, dim);
}

template <int R>
__attribute__((target("avx2"), always_inline)) inline void block256(const double* a, int64_t lda, const double* kt,
                                                                     double* c, int64_t ldc, int64_t w, int64_t dim) {
  __m256d acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_pd();
  for (int64_t d = 0; d < dim; ++d) {
    const __m256d k0 = _mm256_loadu_pd(kt + d * kOrderedKeys), k1 = _mm256_loadu_pd(kt + d * kOrderedKeys + 4);
    for (int r = 0; r < R; ++r) {
      const __m256d x = _mm256_set1_pd(a[r * lda + d]);
      acc[r][0] = _mm256_add_pd(acc[r][0], _mm256_mul_pd(x, k0));
      acc[r][1] = _mm256_add_pd(acc[r][1], _mm256_mul_pd(x, k1));
    }
  }
  alignas(32) double out[kOrderedKeys];
  for (int r = 0; r < R; ++r) {
    _mm256_store_pd(out, acc[r][0]);
    _mm256_store_pd(out + 4, acc[r][1]);
    std::copy(out, out + w, c + r * ldc);
  }
}

__attribute__((target("avx2"))) void ordered_rows_avx2(const double* a, int64_t lda, const double* kt, double* c,
                                                       int64_t ldc, int64_t rows, int64_t w, int64_t dim) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) block256<4>(a + i * lda, lda, kt, c + i * ldc, ldc, w, dim);
  for (; i < rows; ++i) block256<1>(a + i * lda, lda, kt, c + i * ldc, ldc, w, dim);
}
#endif

void ordered_rows_base(const double* a, int64_t lda, const double* kt, double* c, int64_t ldc, int64_t rows,
                       int64_t w, int64_t dim) {
  ordered_rows(a, lda, kt, c, ldc, rows, w, dim);
}
}  // namespace

void ordered_gemm(const double* a, int64_t lda, const double* b, int64_t ldb, double* c, int64_t rows, int64_t cols,
                  int64_t dim) {
#ifdef LLP_FAST_X86
  // The fused tile's width (LLP_FAST_CPU_FUSED chooses it; tests compare the three loops' bits).
  static const auto run = fused_bits() == 512   ? ordered_rows_avx512
                          : fused_bits() == 256 ? ordered_rows_avx2
                                                : ordered_rows_base;
#else
  const auto run = ordered_rows_base;
#endif
  std::vector<double> kt(static_cast<size_t>(dim * kOrderedKeys));
  for (int64_t j0 = 0; j0 < cols; j0 += kOrderedKeys) {
    const int64_t w = std::min(kOrderedKeys, cols - j0);
    std::fill(kt.begin(), kt.end(), 0.0);
    for (int64_t l = 0; l < w; ++l)
      for (int64_t d = 0; d < dim; ++d) kt[d * kOrderedKeys + l] = b[(j0 + l) * ldb + d];
    run(a, lda, kt.data(), c + j0, cols, rows, w, dim);
  }
}

bool blas_gemm_bf16(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c, int64_t rows,
                    int64_t cols, int64_t dim) {
  if (bf16_source() == kBf16Dot) {
    dot_bf16_tile(a, lda, b, ldb, c, rows, cols, dim);
    return true;
  }
  return gemm(blas().gemm_bf16, a, lda, b, ldb, c, rows, cols, dim);
}

int bf16_source() {
  static const int source = [] {
    const int s = bf16_source_wanted();
    return s == kBf16Mkl && blas().gemm_bf16 == nullptr ? kBf16Convert : s;  // no MKL bf16 GEMM in this torch
  }();
  return source;
}

bool bf16_gemm() { return bf16_source() != kBf16Convert; }

// ---------------------------------------------------------------------------------------------
// Step 2. Every variant appends the same candidates in the same order (ScanF32 in topk.h).
namespace {

// The columns [j, e) one at a time, without a branch per column (early in a row most of them pass).
inline int64_t scan_scalar(const float* s, const float* bias, int64_t j, int64_t e, float inv_tau, float thr,
                           uint32_t base, float* vals, uint32_t* idx, int64_t c) {
  for (; j < e; ++j) {
    const float x = s[j] * inv_tau + bias[j];
    vals[c] = x;
    idx[c] = base + static_cast<uint32_t>(j);
    c += x > thr;
  }
  return c;
}

// Baseline x86-64 (or any CPU): a fixed-trip "any candidate?" loop the compiler vectorises, then the
// scalar append for a block that has one.
int64_t scan_generic(const float* s, const float* bias, const float* bmax, int64_t j, int64_t n, float inv_tau,
                     float thr, uint32_t base, float* vals, uint32_t* idx, int64_t* count, int64_t cap) {
  int64_t c = *count;
  for (; j < n; j += kBlock) {
    if (cap - c < kRoom) break;
    const int64_t e = std::min(n, j + kBlock);
    if (e - j == kBlock) {
      float top = -kInf;  // the running value second: a NaN score never enters (nor hides another)
      for (int64_t i = 0; i < kBlock; ++i) top = std::max(top, s[j + i]);
      if (!(top * inv_tau + bmax[j / kBlock] > thr)) continue;
    }
    c = scan_scalar(s, bias, j, e, inv_tau, thr, base, vals, idx, c);
  }
  *count = c;
  return std::min(j, n);
}

// RowsF32::bound's group maxima: g[l] = max over j = l mod 32 of s[j] * inv_tau + bias[j] (g starts
// at -inf; a NaN score never enters, as with std::max(g, x)).
void groups_generic(const float* s, const float* bias, int64_t n, float inv_tau, float* g) {
  int64_t j = 0;
  for (; j + kGroups <= n; j += kGroups)
    for (int64_t l = 0; l < kGroups; ++l) g[l] = std::max(g[l], s[j + l] * inv_tau + bias[j + l]);
  for (int64_t l = 0; j + l < n; ++l) g[l] = std::max(g[l], s[j + l] * inv_tau + bias[j + l]);
}

#ifdef LLP_FAST_X86

__attribute__((target("avx2"))) void groups_avx2(const float* s, const float* bias, int64_t n, float inv_tau,
                                                 float* g) {
  static_assert(kGroups == 32, "four vectors of 8 lanes");
  const __m256 vt = _mm256_set1_ps(inv_tau);
  __m256 m[4];
  for (int v = 0; v < 4; ++v) m[v] = _mm256_loadu_ps(g + 8 * v);
  int64_t j = 0;
  for (; j + kGroups <= n; j += kGroups)
    for (int v = 0; v < 4; ++v) {
      const __m256 x = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j + 8 * v), vt), _mm256_loadu_ps(bias + j + 8 * v));
      m[v] = _mm256_max_ps(x, m[v]);  // m[v] where x is NaN (MAXPS returns its second operand then)
    }
  for (int v = 0; v < 4; ++v) _mm256_storeu_ps(g + 8 * v, m[v]);
  for (int64_t l = 0; j + l < n; ++l) g[l] = std::max(g[l], s[j + l] * inv_tau + bias[j + l]);
}

__attribute__((target("avx2,popcnt"))) int64_t scan_avx2(const float* s, const float* bias, const float* bmax,
                                                         int64_t j, int64_t n, float inv_tau, float thr,
                                                         uint32_t base, float* vals, uint32_t* idx, int64_t* count,
                                                         int64_t cap) {
  const __m256 vt = _mm256_set1_ps(inv_tau), vthr = _mm256_set1_ps(thr);
  int64_t c = *count;
  for (; j < n; j += kBlock) {
    if (cap - c < kRoom) break;
    if (n - j < kBlock) {
      c = scan_scalar(s, bias, j, n, inv_tau, thr, base, vals, idx, c);
      continue;
    }
    __m256 x[8];
    for (int v = 0; v < 8; ++v) x[v] = _mm256_loadu_ps(s + j + 8 * v);
    // Two chains from -inf, the new value first: MAXPS returns its second operand when either is NaN,
    // so a NaN score never enters a chain (nor hides a candidate in its lane).
    __m256 m0 = _mm256_set1_ps(-kInf), m1 = m0;
    for (int v = 0; v < 8; v += 2) {
      m0 = _mm256_max_ps(x[v], m0);
      m1 = _mm256_max_ps(x[v + 1], m1);
    }
    const __m256 m = _mm256_max_ps(m0, m1);
    const __m256 top = _mm256_add_ps(_mm256_mul_ps(m, vt), _mm256_broadcast_ss(bmax + j / kBlock));
    if (_mm256_movemask_ps(_mm256_cmp_ps(top, vthr, _CMP_GT_OQ)) == 0) continue;
    for (int v = 0; v < 8; ++v) x[v] = _mm256_add_ps(_mm256_mul_ps(x[v], vt), _mm256_loadu_ps(bias + j + 8 * v));
    for (int v = 0; v < 8; ++v)
      c = append8(x[v], _mm256_movemask_ps(_mm256_cmp_ps(x[v], vthr, _CMP_GT_OQ)),
                  base + static_cast<uint32_t>(j + 8 * v), vals, idx, c);
  }
  *count = c;
  return std::min(j, n);
}

__attribute__((target("avx512f,popcnt"))) int64_t scan_avx512(const float* s, const float* bias,
                                                              const float* bmax, int64_t j, int64_t n, float inv_tau,
                                                              float thr, uint32_t base, float* vals, uint32_t* idx,
                                                              int64_t* count, int64_t cap) {
  const __m512 vt = _mm512_set1_ps(inv_tau), vthr = _mm512_set1_ps(thr);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = *count;
  for (; j < n; j += kBlock) {
    if (cap - c < kRoom) break;
    if (n - j < kBlock) {
      c = scan_scalar(s, bias, j, n, inv_tau, thr, base, vals, idx, c);
      continue;
    }
    // Every score of the block compared, 16 at a time, with no test of the block's largest first:
    // at small k against a few key tiles (a bf16 bank's, or the bf16 pass of approx_topk) about a
    // third of the blocks hold a candidate, scattered, and that branch mispredicted; the branch on
    // 16 scores is rarely taken (Intel Xeon, one thread, interleaved: a bf16 propagate at K = 10 about
    // 12% faster, float32 propagate and topk_scores at K = 10, through the bf16 pass, about 5%).
    (void)bmax;
    __m512 x[4];
    for (int v = 0; v < 4; ++v)
      x[v] = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j + 16 * v), vt), _mm512_loadu_ps(bias + j + 16 * v));
    for (int v = 0; v < 4; ++v) {
      const __mmask16 bits = _mm512_cmp_ps_mask(x[v], vthr, _CMP_GT_OQ);
      if (bits == 0) continue;
      const __m512i id = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base + j + 16 * v)), iota);
      // Packed in a register and written whole (16 slots; kRoom covers the overhang): a compress
      // straight to memory is microcoded on AMD Zen 4, and this scan took twice as long with it
      // (bf16 topk_scores K = 200 24 -> 4 ms of the scan; K = 10 about 8% faster in all).
      _mm512_storeu_ps(vals + c, _mm512_maskz_compress_ps(bits, x[v]));
      _mm512_storeu_si512(idx + c, _mm512_maskz_compress_epi32(bits, id));
      c += __builtin_popcount(static_cast<unsigned>(bits));
    }
  }
  *count = c;
  return std::min(j, n);
}

// The lanes of register q (values 16q .. 16q + 15) that hold one of n values: the masked loads of
// the small-buffer functions below.
inline __mmask16 live_lanes(int64_t n, int q) {
  const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, n - 16 * q));
  return static_cast<__mmask16>((1u << left) - 1u);
}

constexpr int kSmallRegs = static_cast<int>(kSmallCut / 16);

// The small-buffer functions hold n <= kSmallCut values in NQ = ceil(n / 16) registers; each is
// compiled for every NQ (the registers stay registers) and called through small_regs().
template <template <int> class F, typename... A>
auto small_regs(int64_t n, A... a) {
  switch ((n + 15) / 16) {
    case 1: return F<1>::run(n, a...);
    case 2: return F<2>::run(n, a...);
    case 3: return F<3>::run(n, a...);
    case 4: return F<4>::run(n, a...);
    case 5: return F<5>::run(n, a...);
    case 6: return F<6>::run(n, a...);
    case 7: return F<7>::run(n, a...);
    default: return F<8>::run(n, a...);
  }
}
static_assert(kSmallRegs == 8, "small_regs covers 8 registers");

// The k-th largest of a small buffer (n <= kSmallCut, k <= n, no NaN) without a branch on the data:
// the values in registers, each lane counts the values above its own (one compare and one masked add
// per value); the k-th largest is the smallest value with fewer than k above it. *larger: how many are
// above that one (-1: none found, which needs a NaN).
template <int NQ>
struct Kth {
  __attribute__((target("avx512f,popcnt"))) static float run(int64_t n, const float* v, int64_t k, int64_t* larger) {
    const __m512 ninf = _mm512_set1_ps(-kInf);
    const __m512i one = _mm512_set1_epi32(1);
    __m512 x[NQ];
    __m512i above[NQ];
    __mmask16 live[NQ];
    for (int q = 0; q < NQ; ++q) {
      live[q] = live_lanes(n, q);
      x[q] = _mm512_mask_loadu_ps(ninf, live[q], v + 16 * q);
      above[q] = _mm512_setzero_si512();
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m512 b = _mm512_set1_ps(v[j]);
      for (int q = 0; q < NQ; ++q)  // lanes whose value v[j] exceeds
        above[q] = _mm512_mask_add_epi32(above[q], _mm512_cmp_ps_mask(b, x[q], _CMP_GT_OQ), above[q], one);
    }
    const __m512i vk = _mm512_set1_epi32(static_cast<int>(k));
    __m512 best = _mm512_set1_ps(kInf);
    for (int q = 0; q < NQ; ++q) {
      const __mmask16 top = _mm512_mask_cmplt_epi32_mask(live[q], above[q], vk);
      best = _mm512_mask_min_ps(best, top, best, x[q]);
    }
    const float kth = _mm512_reduce_min_ps(best);
    int64_t more = 0;
    const __m512 vkth = _mm512_set1_ps(kth);
    for (int q = 0; q < NQ; ++q)
      more += __builtin_popcount(static_cast<unsigned>(_mm512_cmp_ps_mask(x[q], vkth, _CMP_GT_OQ)));
    *larger = kth == kInf ? -1 : more;
    return kth;
  }
};

float kth_avx512(const float* v, int64_t n, int64_t k, int64_t* larger) {
  return small_regs<Kth>(n, v, k, larger);
}

// RowsF32::cut in registers for n <= kSmallCut candidates: the k-th best's value t by Kth, then those
// above it and the first (k - larger) equal to it, in key order, compressed to the front of the buffer.
// Returns t in *kth and true, or false (nothing done).
template <int NQ>
struct Cut {
  __attribute__((target("avx512f,popcnt"))) static bool run(int64_t n, float* v, uint32_t* ix, int64_t k,
                                                            float* kth) {
    int64_t larger = -1;
    const float t = Kth<NQ>::run(n, v, k, &larger);
    if (larger < 0) return false;
    const __m512 vt = _mm512_set1_ps(t);
    __m512 x[NQ];
    __m512i id[NQ];
    __mmask16 keep[NQ], eq[NQ];
    for (int q = 0; q < NQ; ++q) {
      const __mmask16 live = live_lanes(n, q);
      x[q] = _mm512_maskz_loadu_ps(live, v + 16 * q);
      id[q] = _mm512_maskz_loadu_epi32(live, ix + 16 * q);
      keep[q] = _mm512_mask_cmp_ps_mask(live, x[q], vt, _CMP_GT_OQ);
      eq[q] = _mm512_mask_cmp_ps_mask(live, x[q], vt, _CMP_EQ_OQ);
    }
    int64_t need = k - larger;  // the first equal ones, in key order
    for (int q = 0; q < NQ && need > 0; ++q) {
      unsigned e = eq[q];
      while (need > 0 && e != 0) {
        keep[q] = static_cast<__mmask16>(keep[q] | (e & (~e + 1u)));
        e &= e - 1;
        --need;
      }
    }
    int64_t w = 0;
    for (int q = 0; q < NQ; ++q) {  // in place: the write position never passes the vector read
      // (written whole from a register, as scan_avx512 writes: the 16 slots from w lie within the
      // 16 * NQ <= kSmallCut already read, and a row's buffer holds more than kSmallCut)
      _mm512_storeu_ps(v + w, _mm512_maskz_compress_ps(keep[q], x[q]));
      _mm512_storeu_si512(ix + w, _mm512_maskz_compress_epi32(keep[q], id[q]));
      w += __builtin_popcount(static_cast<unsigned>(keep[q]));
    }
    *kth = t;
    return true;
  }
};

bool cut_avx512(float* v, uint32_t* ix, int64_t n, int64_t k, float* kth) {
  return small_regs<Cut>(n, v, ix, k, kth);
}

// RowsF32::finish for n <= kSmallCut candidates in (v, ix), in key order: each one's place in the
// op's order is the number of candidates that beat it (a larger score, or an equal one earlier in key
// order), counted in registers as Kth counts (no comparison sort, no branch on the data); each is
// written to its place in (out_v, out_i). The places are 0..n-1, each once.
template <int NQ>
struct Rank {
  __attribute__((target("avx512f,popcnt"))) static void run(int64_t n, const float* v, const uint32_t* ix,
                                                            float* out_v, int64_t* out_i) {
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 x[NQ];
    __m512i place[NQ], pos[NQ];
    for (int q = 0; q < NQ; ++q) {
      x[q] = _mm512_maskz_loadu_ps(live_lanes(n, q), v + 16 * q);
      place[q] = _mm512_setzero_si512();
      pos[q] = _mm512_add_epi32(_mm512_set1_epi32(16 * q), iota);
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m512 b = _mm512_set1_ps(v[j]);
      const __m512i at = _mm512_set1_epi32(static_cast<int>(j));
      for (int q = 0; q < NQ; ++q) {  // lanes that candidate j beats
        const __mmask16 beats = _mm512_cmp_ps_mask(b, x[q], _CMP_GT_OQ) |
                                _mm512_mask_cmp_ps_mask(_mm512_cmpgt_epi32_mask(pos[q], at), b, x[q], _CMP_EQ_OQ);
        place[q] = _mm512_mask_add_epi32(place[q], beats, place[q], one);
      }
    }
    alignas(64) int32_t at[16 * NQ];
    for (int q = 0; q < NQ; ++q) _mm512_store_si512(at + 16 * q, place[q]);
    for (int64_t t = 0; t < n; ++t) {
      out_v[at[t]] = v[t];
      out_i[at[t]] = ix[t];
    }
  }
};

void rank_avx512(const float* v, const uint32_t* ix, int64_t n, float* out_v, int64_t* out_i) {
  small_regs<Rank>(n, v, ix, out_v, out_i);
}

// RowsF32::estimate's threshold (topk.h EstimateF32): one pass scales and biases the scores, stores them
// (those at or below the floor as -inf) and finds the smallest and largest above the floor; then eight
// halvings of [smallest, largest] by the count above the midpoint, each 16 compares at a time (256
// steps, as fine as the scalar histogram's 4m buckets: about 170 at K = 200). That histogram took
// about 0.8 us a row at 512 sample keys (a fifteenth of local_density's time at T = 25 through the bf16
// pass, AMD EPYC Zen 4).
__attribute__((target("avx512f,popcnt"))) float estimate_avx512(const float* s, const float* bias, int64_t n,
                                                                float inv_tau, float floor, int64_t m, float* x) {
  const __m512 vt = _mm512_set1_ps(inv_tau), vf = _mm512_set1_ps(floor), none = _mm512_set1_ps(-kInf);
  __m512 lo = _mm512_set1_ps(kInf), hi = none;
  int64_t c = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = static_cast<__mmask16>(n - j >= 16 ? 0xFFFF : (1u << (n - j)) - 1u);
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, s + j), vt),
                                   _mm512_maskz_loadu_ps(live, bias + j));
    const __mmask16 in = _mm512_mask_cmp_ps_mask(live, v, vf, _CMP_GT_OQ);  // NaN: never
    lo = _mm512_mask_min_ps(lo, in, lo, v);
    hi = _mm512_mask_max_ps(hi, in, hi, v);
    c += __builtin_popcount(static_cast<unsigned>(in));
    _mm512_storeu_ps(x + j, _mm512_mask_blend_ps(in, none, v));
  }
  if (c < m) return -kInf;
  float a = _mm512_reduce_min_ps(lo);
  float b = _mm512_reduce_max_ps(hi);
  if (!(b > a)) return -kInf;  // all equal
  a = std::nextafter(a, -kInf);  // every one of the c is above a; none above b
  // (A denormal reads as 0 where denormals are flushed, torch.set_flush_denormal: a smallest score of
  // 0 would then not be above it. -FLT_MIN is below every one of them either way, as in bound().)
  if (std::fabs(a) < std::numeric_limits<float>::min()) a = -std::numeric_limits<float>::min();
  if (!std::isfinite(a) || !std::isfinite(b)) return -kInf;
  const __m512i one = _mm512_set1_epi32(1);
  for (int it = 0; it < 8; ++it) {
    const float mid = 0.5f * a + 0.5f * b;
    if (!(mid > a && mid < b)) break;
    const __m512 vm = _mm512_set1_ps(mid);
    __m512i count = _mm512_setzero_si512();  // per lane: no mask leaves the vector unit
    for (int64_t j = 0; j < n; j += 16)
      count = _mm512_mask_add_epi32(count, _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), vm, _CMP_GT_OQ), count, one);
    if (_mm512_reduce_add_epi32(count) >= m)
      a = mid;
    else
      b = mid;
  }
  return a;
}

#endif  // LLP_FAST_X86

struct Choice {
  ScanF32 fn = scan_generic;
  GroupsF32 groups = groups_generic;
  KthF32 kth = nullptr;
  CutF32 cut = nullptr;
  RankF32 rank = nullptr;
  EstimateF32 estimate = nullptr;
  const char* isa = "baseline";
  Choice() {
    const char* want = std::getenv("LLP_FAST_CPU_ISA");  // tests: force a variant this CPU has
    const auto allowed = [&](const char* name) { return want == nullptr || std::strcmp(want, name) == 0; };
#ifdef LLP_FAST_X86
    __builtin_cpu_init();
    if (allowed("avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2")) {
      fn = scan_avx512;
      groups = groups_avx2;
      isa = "avx512";
      kth = kth_avx512;
      cut = cut_avx512;
      rank = rank_avx512;
      estimate = estimate_avx512;
    } else if (allowed("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) {
      fn = scan_avx2;
      groups = groups_avx2;
      isa = "avx2";
    }
#else
    (void)allowed;
#endif
  }
};

const Choice& choice() {
  static const Choice c;
  return c;
}

}  // namespace

ScanF32 scan_f32() { return choice().fn; }
GroupsF32 groups_f32() { return choice().groups; }
KthF32 kth_f32() { return choice().kth; }
CutF32 cut_f32() { return choice().cut; }
RankF32 rank_f32() { return choice().rank; }
EstimateF32 estimate_f32() { return choice().estimate; }
const char* scan_f32_isa() { return choice().isa; }

}  // namespace topk
}  // namespace llp_fast
