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

// finish_buckets_avx512's sort (below). A compare-exchange of each lane with its
// partner in the permuted vector: the lanes in `hi` keep the larger word, the others the smaller.
__attribute__((target("avx512f"), always_inline)) inline __m512i exchange(__m512i z, __m512i partner, __mmask8 hi) {
  const __m512i p = _mm512_permutexvar_epi64(partner, z);
  return _mm512_mask_mov_epi64(_mm512_min_epu64(z, p), hi, _mm512_max_epu64(z, p));
}

// The bitonic network: 8 words in a register sorted ascending (sort8); a register whose lanes rise then
// fall (or fall then rise) sorted (merge8).
struct Network {
  __m512i x1, x2, x4, rev;  // lane i's partner: i ^ 1, i ^ 2, i ^ 4, 7 - i
  __attribute__((target("avx512f"), always_inline)) Network()
      : x1(_mm512_set_epi64(6, 7, 4, 5, 2, 3, 0, 1)),
        x2(_mm512_set_epi64(5, 4, 7, 6, 1, 0, 3, 2)),
        x4(_mm512_set_epi64(3, 2, 1, 0, 7, 6, 5, 4)),
        rev(_mm512_set_epi64(0, 1, 2, 3, 4, 5, 6, 7)) {}
  __attribute__((target("avx512f"), always_inline)) __m512i merge8(__m512i z) const {
    z = exchange(z, x4, 0xF0);
    z = exchange(z, x2, 0xCC);
    return exchange(z, x1, 0xAA);
  }
  __attribute__((target("avx512f"), always_inline)) __m512i sort8(__m512i z) const {
    z = exchange(z, x1, 0xAA);  // sorted pairs
    z = exchange(z, _mm512_set_epi64(4, 5, 6, 7, 0, 1, 2, 3), 0xCC);  // pairs merged: sorted fours
    z = exchange(z, x1, 0xAA);
    z = exchange(z, rev, 0xF0);  // fours merged
    z = exchange(z, x2, 0xCC);
    return exchange(z, x1, 0xAA);
  }
};

// w[0, n), n <= 16, sorted ascending in registers (absent lanes read as the largest word, never stored).
__attribute__((target("avx512f"), always_inline)) inline void sort16(const Network& net, uint64_t* w, int64_t n) {
  const __m512i top = _mm512_set1_epi64(-1);
  if (n <= 8) {
    const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
    _mm512_mask_storeu_epi64(w, m, net.sort8(_mm512_mask_loadu_epi64(top, m, w)));
    return;
  }
  const __mmask8 m = static_cast<__mmask8>((1u << (n - 8)) - 1u);
  const __m512i a = net.sort8(_mm512_loadu_si512(w));
  // the second sorted, then reversed: a rising then falling 16 whose halves' min and max split it
  const __m512i b = _mm512_permutexvar_epi64(net.rev, net.sort8(_mm512_mask_loadu_epi64(top, m, w + 8)));
  _mm512_storeu_si512(w, net.merge8(_mm512_min_epu64(a, b)));
  _mm512_mask_storeu_epi64(w + 8, m, net.merge8(_mm512_max_epu64(a, b)));
}

// Consecutive buckets gathered into runs of at most 16 words, each run sorted by the network; a bucket
// of more than 16 (RowsF32 takes at most 32) by insertion. No word crosses a bucket's boundary, so no
// word crosses a run's.
__attribute__((target("avx512f"))) void sort_runs_avx512(uint64_t* w, const int32_t* ends, int64_t nb) {
  const Network net;
  int64_t start = 0, end = 0;  // the open run [start, end): whole buckets
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t e = ends[b];
    if (e - start > 16) {  // bucket b does not fit the open run: the run is sorted, b opens the next
      if (end - start > 1) sort16(net, w + start, end - start);
      start = end;
      if (e - start > 16) {  // a bucket too large for one run
        insertion_sort(w + start, e - start);
        start = e;
      }
    }
    end = e;
  }
  if (end - start > 1) sort16(net, w + start, end - start);
}

// RowsF32::finish_by_buckets (topk.h FinishBucketsF32), 16 lanes at a time where the scalar loops go
// one by one: the value buckets as Buckets::fit spreads them (the smallest and largest score, each
// score's bucket; the counts scalar, each a counter's increment); the prefix sums of the counts (a scan
// in registers, stopping at the 16 that reach k); the words of the candidates in those buckets,
// ~key_of(score) << 32 | key index (the buffer is in key order, so the index orders equal scores as
// the position does), compressed in key order with their buckets; placed bucket by bucket (scalar);
// the runs sorted (sort_runs_avx512); and the best k read out of the words themselves, the score from
// its key (value_of), the index from the low half. key_of reads -0 as +0 (and a denormal as 0 where
// denormals read as zero), so a row holding a score whose key does not give back its bits has its
// zeros' values read from the buffer again, found by index (rare: a bias of -0 on a product of -0).
__attribute__((target("avx512f,popcnt"))) int64_t finish_buckets_avx512(const float* v, const uint32_t* ix,
                                                                       int64_t n, int64_t k, int32_t* b, int32_t* h,
                                                                       int32_t* bl, uint64_t* wl, uint64_t* w,
                                                                       float* out_v, int64_t* out_i) {
  // Buckets::fit(v, n, n) and RowsF32::bucket
  __m512 vlo = _mm512_set1_ps(kInf), vhi = _mm512_set1_ps(-kInf);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 live = static_cast<__mmask16>(n - t >= 16 ? 0xFFFF : (1u << (n - t)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(live, v + t);
    vlo = _mm512_mask_min_ps(vlo, live, vlo, x);
    vhi = _mm512_mask_max_ps(vhi, live, vhi, x);
  }
  Buckets bk;
  if (!bk.span(_mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi), n)) return -1;  // the scores do not spread
  const int64_t nb = bk.nb;
  const __m512 vmax = _mm512_set1_ps(bk.xmax), vscale = _mm512_set1_ps(bk.scale),
               vtop = _mm512_set1_ps(static_cast<float>(nb - 1));
  for (int64_t t = 0; t < n; t += 16) {  // b: n + 16 slots
    const __mmask16 live = static_cast<__mmask16>(n - t >= 16 ? 0xFFFF : (1u << (n - t)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(live, v + t);
    // (min(product, top): a NaN product gives the top bucket, as the scalar std::min does)
    _mm512_storeu_si512(b + t, _mm512_cvttps_epi32(_mm512_min_ps(_mm512_mul_ps(_mm512_sub_ps(vmax, x), vscale), vtop)));
  }
  std::fill(h, h + nb, 0);
  for (int64_t t = 0; t < n; ++t) ++h[b[t]];
  const __m512i zero = _mm512_setzero_si512();
  __m512i most = zero;  // the fullest bucket so far, per lane
  int64_t kept = 0, last = nb;
  for (int64_t j = 0; j < nb; j += 16) {  // nb: a multiple of 16 (Buckets::fit)
    const __m512i c = _mm512_loadu_si512(h + j);
    __m512i x = _mm512_add_epi32(c, _mm512_alignr_epi32(c, zero, 15));  // inclusive sums within the 16
    x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 14));
    x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 12));
    x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 8));
    const __m512i base = _mm512_set1_epi32(static_cast<int>(kept));
    const __m512i upto = _mm512_add_epi32(x, base);  // the count of buckets 0 .. j + i
    _mm512_storeu_si512(h + j, _mm512_sub_epi32(upto, c));  // exclusive: bucket j + i's first slot
    const __mmask16 reach = _mm512_cmpge_epi32_mask(upto, _mm512_set1_epi32(static_cast<int>(k)));
    if (reach != 0) {
      const int l = __builtin_ctz(static_cast<unsigned>(reach));
      most = _mm512_mask_max_epi32(most, static_cast<__mmask16>((2u << l) - 1u), most, c);
      alignas(64) int32_t u[16];
      _mm512_store_si512(u, upto);
      kept = u[l];
      last = j + l;
      break;
    }
    most = _mm512_max_epi32(most, c);
    kept += _mm512_cvtsi512_si32(_mm512_permutexvar_epi32(_mm512_set1_epi32(15), x));
  }
  if (_mm512_reduce_max_epi32(most) > 32) return -1;  // a bucket too full for the runs' sort
  const int64_t nbu = std::min<int64_t>(last + 1, nb);
  // The candidates of buckets [0, last] in key order: words in wl, buckets in bl (n + 16 slots each: 16
  // written at each step).
  const __m512i lim = _mm512_set1_epi32(static_cast<int>(std::min<int64_t>(last, nb - 1)));
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  __mmask16 reread = 0;  // kept scores whose key does not give back their bits
  int64_t c = 0;
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 live = static_cast<__mmask16>(n - t >= 16 ? 0xFFFF : (1u << (n - t)) - 1u);
    const __m512i bt = _mm512_maskz_loadu_epi32(live, b + t);
    const __mmask16 in = _mm512_mask_cmple_epi32_mask(live, bt, lim);
    const __m512 x = _mm512_maskz_loadu_ps(live, v + t);
    // ~key_of(x): key_of's bits (x + 0 turns -0 into +0), inverted
    const __m512i u = _mm512_castps_si512(_mm512_add_ps(x, _mm512_setzero_ps()));
    reread |= _mm512_mask_cmpneq_epi32_mask(in, _mm512_castps_si512(x), u);
    const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
    const __m512i hi = _mm512_ternarylogic_epi32(key, key, key, 0x55);  // ~key
    const __m512i id = _mm512_maskz_loadu_epi32(live, ix + t);
    const __m512i w0 = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(hi)), 32),
                                       _mm512_cvtepu32_epi64(_mm512_castsi512_si256(id)));
    const __m512i w1 = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(hi, 1)), 32),
                                       _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(id, 1)));
    const __mmask8 in0 = static_cast<__mmask8>(in & 0xFF), in1 = static_cast<__mmask8>(in >> 8);
    _mm512_storeu_si512(bl + c, _mm512_maskz_compress_epi32(in, bt));
    _mm512_storeu_si512(wl + c, _mm512_maskz_compress_epi64(in0, w0));
    const int64_t c0 = __builtin_popcount(static_cast<unsigned>(in0));
    _mm512_storeu_si512(wl + c + c0, _mm512_maskz_compress_epi64(in1, w1));
    c += c0 + __builtin_popcount(static_cast<unsigned>(in1));
  }
  for (int64_t q = 0; q < c; ++q) w[h[bl[q]]++] = wl[q];
  sort_runs_avx512(w, h, nbu);  // h[i]: bucket i's end now
  const int64_t m = std::min(kept, k);
  const __m512i low = _mm512_set1_epi64(0xFFFFFFFFll), ones = _mm512_set1_epi32(0x7FFFFFFF);
  for (int64_t t = 0; t < m; t += 16) {
    const int64_t left = m - t;
    const __mmask8 lo = static_cast<__mmask8>(left >= 8 ? 0xFF : (1u << left) - 1u);
    const __mmask8 hi = static_cast<__mmask8>(left >= 16 ? 0xFF : left <= 8 ? 0 : (1u << (left - 8)) - 1u);
    const __m512i x0 = _mm512_maskz_loadu_epi64(lo, w + t), x1 = _mm512_maskz_loadu_epi64(hi, w + t + 8);
    _mm512_mask_storeu_epi64(out_i + t, lo, _mm512_and_si512(x0, low));
    _mm512_mask_storeu_epi64(out_i + t + 8, hi, _mm512_and_si512(x1, low));
    // value_of(~top) for each word's top half: a key with its top bit set (top's clear) is a score >= 0,
    // whose bits are the key less that bit; else a negative score, whose bits are ~key = top
    const __m512i top = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_srli_epi64(x0, 32))),
                                           _mm512_cvtepi64_epi32(_mm512_srli_epi64(x1, 32)), 1);
    const __mmask16 up = _mm512_cmpge_epi32_mask(top, _mm512_setzero_si512());
    const __m512i bits = _mm512_mask_blend_epi32(up, top, _mm512_andnot_si512(top, ones));
    _mm512_mask_storeu_ps(out_v + t, static_cast<__mmask16>(lo | (static_cast<unsigned>(hi) << 8)),
                          _mm512_castsi512_ps(bits));
  }
  if (reread != 0)  // the zeros' own bits, by index in the key-ordered buffer
    for (int64_t t = 0; t < m; ++t)
      if (out_v[t] == 0.0f) {
        const uint32_t* at = std::lower_bound(ix, ix + n, static_cast<uint32_t>(out_i[t]));
        if (at != ix + n && *at == static_cast<uint32_t>(out_i[t])) out_v[t] = v[at - ix];
      }
  return m;
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
  FinishBucketsF32 finish_buckets = nullptr;
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
      finish_buckets = finish_buckets_avx512;
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
FinishBucketsF32 finish_buckets_f32() { return choice().finish_buckets; }
const char* scan_f32_isa() { return choice().isa; }

}  // namespace topk
}  // namespace llp_fast
