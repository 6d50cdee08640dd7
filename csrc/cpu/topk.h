// The fused CPU top-K: the selection step of llp_fast::topk_scores (csrc/cpu/topk_scores_cpu.cpp), which
// is the only selection in the package (local_density and propagate finish its output in Python,
// docs/method.md §1.1, §1.2).
//
// Per query row i it finds the k largest
//     s_ij = (q_i . key_j) * (1 / tau) + bias_j
// over the key rows j (bias -inf: a masked key, never chosen) without the Q x N score matrix and
// without sorting a row of N scores:
//   1. a (ROWS x COLS) score tile comes from one BLAS call (sgemm_ of the BLAS torch links, called
//      directly: no dispatcher, no tensor per tile; bf16 queries and keys on a CPU with AMX-BF16: MKL's
//      gemm_bf16bf16f32_, fp32 scores; float64: our own loop, ordered_gemm) into a per-thread buffer
//      that stays in cache (always the full tile: the last blocks are padded, so a score never depends on how the
//      caller chunked the keys);
//   2. one pass over each row of the tile asks, 64 columns at a time, whether any score can beat the
//      row's threshold (from the block's largest product, scaled, plus its largest bias; with AVX-512,
//      of every 16 scores, scaled and biased); only a block (16 scores) that has one appends its
//      candidates to the row's buffer (float32: a vector left-pack of the passing lanes, no
//      per-column branch). Once a row has seen a few
//      hundred keys the threshold rejects almost every block. This pass is compiled for AVX-512, AVX2
//      and baseline x86-64 and chosen once by the CPU's features (csrc/cpu/scan_f32.cpp; never
//      -march=native).
//   1+2. float32 on CPUs with AVX2 and FMA: steps 1 and 2 fused (csrc/cpu/tile_f32.cpp): 6 query
//      rows x 16 keys (AVX2) or 12 x 32 (AVX-512) of scores at a time in registers, from
//      packed blocks (the keys once per call when they take at most 32 MB), compared with their
//      rows' thresholds before they leave the registers (AVX-512, k <= 32: a row's block without a
//      candidate skipped by a branch, on the raw products when the keys share one bias); a score
//      tile is written whole (and scanned as in step 2) only for a first key tile that the
//      threshold's start reads (step 3) and in the rare pass run again for rows whose estimate
//      failed;
//   3. a row's buffer holds 3k + 72 candidates (k + 200 at least), in key order; when it is full
//      it is cut (float32: to the buckets down to the k-th best, scores spread over the buckets by
//      value; an exact radix select when they cluster) and the threshold rises to the smallest score
//      kept. Where the scan runs AVX-512 and k <= 48 a row is cut as soon as it holds 3k (RowsF32::
//      limit), exactly and in registers (at most 128 candidates: each counts the ones above it,
//      csrc/cpu/scan_f32.cpp), so that its threshold rises sooner. For k <= 16 against more than
//      one key tile the threshold starts at an exact lower bound from the first key tile
//      (RowsF32::bound) and the buffer is cut after every tile (RowsF32::cut); for k >= 32
//      against at least 4 key tiles it starts from an estimate, about the m-th best score of the
//      first key tile (RowsF32::estimate), checked at the end: a row that kept fewer than k
//      candidates above it runs again without one;
//   4. at the end the buffer's best k are sorted (float32: a large buffer over about as many value
//      buckets, each bucket's few candidates ordered by insertion, or where the scan runs AVX-512
//      consecutive buckets by a sorting network 16 words at a time; a small one, or one whose scores
//      cluster, by a stable radix sort on the scores' bits, or where the scan runs AVX-512 and it
//      holds at most 128, each candidate placed by the count of those that beat it; equal scores
//      keep key order every way) and handed to the caller's finish.
// On the fused path masked keys (bias -inf) are left out before step 1: the keys that can score are
// packed one after another and a candidate's position maps back to its row at the end, so a mask costs
// nothing and the first key tile always holds keys that can score.
// float32 at k <= 32 on a CPU with a fast bf16 GEMM and the AVX-512 fused tile: approx_topk (below)
// selects from bf16 scores with a rigorous error bound and refines exactly, the same bits at about the
// bf16 GEMM's cost; rows the bound cannot settle run the steps above.
// The order is the op's: score descending, equal scores by the lower key index. float64 keeps
// (value, index) pairs and std::nth_element / std::sort with that order.
// Parallelism: at::parallel_for over blocks of query rows; BLAS runs single-threaded inside each
// task (nested OpenMP), which is what keeps every core busy on its own cache-resident tile.
// Extra memory: O(threads * ROWS * (COLS + 3k + 72)) for the tiles and candidate buffers, plus O(Q)
// for the outputs, plus at most 32 MB of packed keys (fused tile); a query or key block is converted
// per task when its dtype is not the compute one.
#pragma once

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the L2 size
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace llp_fast {
namespace topk {

// Tile shape. ROWS x COLS floats = 504 KB for the tile, with a 252-row query block and a 512-row key
// block (126 KB + 256 KB at D = 128). 256 x 512 came out of a sweep over {64..512} x {512..4096},
// counted in process CPU time so that a shared machine does not skew it: tall blocks amortise each
// key block over more rows (on a 512 KB-L2 AMD EPYC, tiles of 128..512 x 256..512 ran within a few
// percent of it). 252 = 21 pairs of 6-row panels: the fused tile's AVX-512 loop takes 12 rows at a
// time, and 256 rows left a pair with 4 of its 12 rows live (Intel Xeon, one thread, interleaved:
// topk_scores K = 10 and local_density T = 25 2-4% faster).
// Fewer rows per block (a multiple of 12) when there are too few queries to give every thread a block.
// LLP_FAST_CPU_TILE="rows,cols" overrides both (for tuning on other machines, and tests).
// Fused tiles at small k (k <= kSmallK) on a CPU with at least 1 MB of L2: 504 rows. Each query block
// reads every packed key once (2.5 MB at M = 5,000, D = 128: more than such an L2, so from L3); twice
// the rows halve that traffic, and the block (252 KB), a key tile (256 KB) and the rows' few
// candidates still fit (Intel Xeon, 2 MB L2, one thread, interleaved: local_density T = 25 and
// propagate K = 10 about 2% faster, topk_scores K = 10 about 1%; at K = 1000 the larger candidate
// buffers made it 10-15% slower, hence small k only).
// Small k: a row's candidates stay few (where the CPU cuts in registers its buffer is cut at 3k,
// RowsF32::limit), and on the fused tile its query block may be tall.
constexpr int64_t kSmallK = 48;
struct Tile {
  int64_t rows = 252;
  int64_t cols = 512;
};

// The CPU's L2 size in bytes (0 where the system does not say).
inline int64_t l2_bytes() {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t b = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
  return b;
#else
  return 0;
#endif
}

inline Tile tile_for(int64_t nq, int64_t k, bool fused) {
  Tile t;
  if (const char* s = std::getenv("LLP_FAST_CPU_TILE")) {
    long r = 0, c = 0;
    if (std::sscanf(s, "%ld,%ld", &r, &c) == 2 && r > 0 && c > 0) {
      t.rows = r;
      t.cols = c;
      return t;
    }
  }
  if (fused && k <= kSmallK && l2_bytes() >= (int64_t(1) << 20)) t.rows *= 2;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t share = (nq + threads - 1) / threads;
  t.rows = std::min(t.rows, std::max<int64_t>(12, (share + 11) / 12 * 12));
  return t;
}

constexpr int64_t kBlock = 64;  // columns per "any candidate here?" test
constexpr int64_t kRoom = kBlock + 8;  // free slots a scan needs before a block (a left-pack writes 8 lanes)
constexpr int64_t kMaxKeys = int64_t(1) << 32;  // a float32 candidate's index has 32 bits
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Step 1: the score tile. S (rows x cols, row-major) = A (rows x dim, row stride lda) . B^T (B: cols x
// dim, row stride ldb), from the BLAS that torch itself calls (found in torch's library at first use;
// at::mm_out when there is none).
bool blas_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t rows, int64_t cols,
               int64_t dim);
// float64: not the BLAS, whose dgemm (MKL on an AMD EPYC, Zen 4) rounds a key's products differently by
// its column in the tile, so that chunked calls would not merge exactly. Our own loop: each score the
// products summed in order of d from zero, a multiply and an add each, wherever the key falls.
void ordered_gemm(const double* a, int64_t lda, const double* b, int64_t ldb, double* c, int64_t rows, int64_t cols,
                  int64_t dim);
// bf16 A and B (their bits), fp32 S: the same products summed in fp32, from MKL's bf16 GEMM or
// dot_bf16_tile (bf16_source).
bool blas_gemm_bf16(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c, int64_t rows,
                    int64_t cols, int64_t dim);
// How bf16 blocks are multiplied (csrc/cpu/scan_f32.cpp): converted to fp32 first, by MKL's bf16 GEMM
// (a CPU with AMX-BF16), or by dot_bf16_tile (AVX512-BF16 without AMX); LLP_FAST_CPU_BF16_GEMM=0 / 1 /
// avx512bf16 forces one. bf16_gemm(): not converted.
constexpr int kBf16Convert = 0, kBf16Mkl = 1, kBf16Dot = 2;
int bf16_source();
bool bf16_gemm();
// The bf16 tile from the CPU's bf16 dot products (csrc/cpu/tile_f32.cpp's loop): S (rows x cols, row stride
// cols) = A . B^T, each score summed over pairs of components in order; dot_bf16_cpu(): AVX512-BF16.
bool dot_bf16_cpu();
void dot_bf16_tile(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c, int64_t rows,
                   int64_t cols, int64_t dim);

// ---------------------------------------------------------------------------------------------
// Step 2 for one row, float32 (csrc/cpu/scan_f32.cpp): appends every j in [j, n) with
// x_j = s[j] * inv_tau + bias[j] > thr to (vals, idx)[*count ...] (idx = base + j), in order of j, and
// returns where it stopped: n, or a block boundary once fewer than kRoom slots remain before cap (the
// caller then shrinks the buffer). The multiply and the add round separately (-ffp-contract=off), as the
// reference's mul_ and add_. Blocks are 64 columns from s[0] (j starts at a block boundary); bmax[b] is
// the largest bias of block b, and (AVX2 and baseline variants) a whole block whose largest s, scaled,
// plus bmax[b] does not beat thr is passed over (rounding is monotone and inv_tau > 0: none of its
// scores can beat it); the AVX-512 variant compares every score instead, 16 at a time.
using ScanF32 = int64_t (*)(const float* s, const float* bias, const float* bmax, int64_t j, int64_t n,
                            float inv_tau, float thr, uint32_t base, float* vals, uint32_t* idx, int64_t* count,
                            int64_t cap);
ScanF32 scan_f32();  // the variant for this CPU (AVX-512, AVX2, or baseline), chosen once
const char* scan_f32_isa();
// RowsF32::bound's pass: g[l] = max(g[l], s[j] * inv_tau + bias[j]) over the j in [0, n) with
// j mod kGroups = l, rounded as the scan rounds (AVX2 where the scan runs AVX2 or AVX-512).
constexpr int64_t kGroups = 32;
using GroupsF32 = void (*)(const float* s, const float* bias, int64_t n, float inv_tau, float* g);
GroupsF32 groups_f32();
// The k-th largest of n <= kSmallCut values (k <= n, no NaN) and how many are larger (-1: not found),
// where the scan runs AVX-512 (csrc/cpu/scan_f32.cpp); nullptr elsewhere.
constexpr int64_t kSmallCut = 128;
using KthF32 = float (*)(const float* v, int64_t n, int64_t k, int64_t* larger);
KthF32 kth_f32();
// RowsF32::cut for n <= kSmallCut candidates in (v, ix): keeps the k best (ties: the first in key order)
// at the front, in key order, and sets *kth to the k-th best's value; false where it did nothing.
using CutF32 = bool (*)(float* v, uint32_t* ix, int64_t n, int64_t k, float* kth);
CutF32 cut_f32();
// RowsF32::estimate's threshold where the scan runs AVX-512 (nullptr elsewhere): of x_j = s[j] * inv_tau +
// bias[j], j < n, the ones above `floor` (c of them); where c >= m and they are not all equal, a
// value t with at least m of them above it and within (largest - smallest) / 256 of the m-th best,
// by bisection on their count above it; else -inf (nothing said). x: scratch of n + 16 floats.
using EstimateF32 = float (*)(const float* s, const float* bias, int64_t n, float inv_tau, float floor, int64_t m,
                              float* x);
EstimateF32 estimate_f32();
// RowsF32::finish_by_buckets where the scan runs AVX-512 (nullptr elsewhere): the same buckets, steps,
// return and output for the row's n candidates (v, ix; ix ascending, as a row's buffer is), with b, bl and
// wl (n + 16 slots each), h (4096 counts) and w (n words) as scratch.
using FinishBucketsF32 = int64_t (*)(const float* v, const uint32_t* ix, int64_t n, int64_t k, int32_t* b,
                                     int32_t* h, int32_t* bl, uint64_t* wl, uint64_t* w, float* out_v,
                                     int64_t* out_i);
FinishBucketsF32 finish_buckets_f32();
// RowsF32::finish for n <= kSmallCut candidates (v, ix) in key order: all n written to (out_v, out_i)
// in the op's order (score descending, equal scores in key order), where the scan runs AVX-512;
// nullptr elsewhere.
using RankF32 = void (*)(const float* v, const uint32_t* ix, int64_t n, float* out_v, int64_t* out_i);
RankF32 rank_f32();

// Steps 1 and 2 fused, float32, on CPUs with AVX2 and FMA (csrc/cpu/tile_f32.cpp): the tile's scores
// are computed 6 query rows x 16 keys (AVX2) or 12 rows x 32 keys (AVX-512) at a time in registers
// from packed blocks and, in tile_select, compared with the rows' thresholds there, only candidates
// written out. fused_tile() says whether the kernel uses it (the default on such CPUs;
// LLP_FAST_CPU_FUSED=0 turns it off, =avx2 / =avx512 force a width).
constexpr int64_t kPanelRows = 6;
constexpr int64_t kPanelKeys = 16;
// Query rows are packed in pairs of panels (12 rows): the AVX-512 loop takes two panels at a time, and a
// lone last panel compiled to a loop whose accumulators spilled to the stack.
inline int64_t panel_rows(int64_t n) { return (n + 2 * kPanelRows - 1) / (2 * kPanelRows) * (2 * kPanelRows); }
inline int64_t panel_keys(int64_t n) { return (n + kPanelKeys - 1) / kPanelKeys * kPanelKeys; }
bool fused_tile();
// Its vector width: 0 (off), 256 (AVX2) or 512 (AVX-512); ordered_gemm's loop follows it.
int fused_bits();
// n rows of a (row stride lda) into panels of 6 rows, [panel][d][6], zero rows after the last (out:
// panel_rows(n) x dim floats); n keys of b into panels of 16 keys, [panel][d][16], likewise.
void pack_queries(const float* a, int64_t lda, int64_t n, int64_t dim, float* out);
// (rows: the keys are b's rows rows[0, n), in that order; b's first n rows where it is null.)
void pack_keys(const float* b, int64_t ldb, int64_t n, int64_t dim, float* out, const int64_t* rows = nullptr);
// bf16 rows (their bits) packed the same way, a pair of components (2p, 2p + 1; zero past an odd dim)
// a 32-bit word in each float slot: panel_rows(n) x bf16_pairs(dim) slots. The fused tile runs them with
// dot = true and dim = bf16_pairs(dim), each step the CPU's bf16 dot product of a pair (AVX512-BF16)
// in the place of the FMA; fused_dot(): where it does (the AVX-512 tile, bf16_source() == kBf16Dot).
inline int64_t bf16_pairs(int64_t dim) { return (dim + 1) / 2; }
void pack_queries_bf16(const uint16_t* a, int64_t lda, int64_t n, int64_t dim, float* out);
void pack_keys_bf16(const uint16_t* b, int64_t ldb, int64_t n, int64_t dim, float* out,
                    const int64_t* rows = nullptr);
bool fused_dot();
// The raw products of the nr packed queries and nc packed keys into s[0, nr) x [0, nc) (row stride lds),
// in the place of the BLAS tile (each the same FMA sequence over d wherever the key falls: the same
// values tile_select compares).
void tile_store(const float* ap, int64_t nr, const float* bp, int64_t nc, int64_t dim, float* s, int64_t lds,
                bool dot = false);
// The rows' candidate buffers as tile_select appends to them (RowsF32's, row r at r * cap); make_room
// cuts row r's buffer (raising thr[r]) when fewer than kRoom slots are left.
struct TileRows {
  float* vals;
  uint32_t* idx;
  int64_t* count;
  const float* thr;
  int64_t cap;
  void* owner;
  void (*make_room)(void* owner, int64_t r);
  float* pre;  // scratch, one per row: tile_select's threshold on the raw products (see raw_threshold)
  int64_t k;
  int64_t limit;  // make_room(r) before appending to a row holding more than this many
};
// Appends, for each of the nr rows r and nc keys j, x = (q_r . key_j) * inv_tau + bias[j] when
// x > thr[r], as the scan does (index base + j, key order); `bias` has nc entries.
void tile_select(const float* ap, int64_t nr, const float* bp, int64_t nc, int64_t dim, const float* bias,
                 float inv_tau, uint32_t base, const TileRows& rows, bool dot = false);
// The score tile_select gives query q (dim floats) against each of the n <= kRescoreKeys keys
// b + rows[l] * ldb: the same FMA sequence over d from zero, scaled, then biased by bias[rows[l]], each
// rounded, into out[l] (bit for bit tile_select's value). rescore_available(): where the fused tile runs
// AVX-512 (approx_topk's refinement; elsewhere it is not used).
constexpr int64_t kRescoreKeys = 4 * kPanelKeys;
bool rescore_available();
void rescore(const float* q, const float* b, int64_t ldb, const int64_t* rows, int64_t n, int64_t dim,
             const float* bias, float inv_tau, float* out);
// Rows [0, n) of x (row stride ld, dim floats) rounded to bf16 (to nearest even, as c10::BFloat16; a bf16
// denormal to zero, as the bf16 GEMM reads it) into out (row stride dim), and per row, summed in float64,
// |x|^2, |x - bf16(x)|^2 and |bf16(x)|^2 into sq[3 i .. 3 i + 2]; false where some value is not finite or
// rounds to bf16 infinity (the rest then means nothing). Where rescore_available().
bool bf16_split(const float* x, int64_t ld, int64_t n, int64_t dim, uint16_t* out, double* sq);

// Ordered bits of a float: ascending with the value (-0 and +0 equal).
inline uint32_t key_of(float x) {
  x += 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}
inline float value_of(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline int bit_length(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }

// The k-th largest of u[0, n) (1 <= k <= n) and how many are larger: a radix select over the bits in
// which the keys differ, with about 2n buckets a level (8 to 11 bits: a few levels, each a histogram
// pass and a pass that keeps the k-th key's bucket). `tmp` is scratch of n keys.
inline uint32_t kth_largest(const uint32_t* u, int64_t n, int64_t k, uint32_t* tmp, int64_t* larger) {
  int64_t above = 0;  // keys known to be larger than the k-th (in buckets above its bucket)
  const uint32_t* src = u;
  while (true) {
    uint32_t lo = src[0], hi = src[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = std::min(lo, src[i]);
      hi = std::max(hi, src[i]);
    }
    if (lo == hi) {
      *larger = above;
      return lo;
    }
    const int digit = std::min(11, std::max(8, bit_length(static_cast<uint64_t>(n)) + 1));
    const int shift = std::max(0, bit_length(hi - lo) - digit);
    int32_t hist[2048];
    const int64_t top = (hi - lo) >> shift;  // the largest key's bucket
    std::memset(hist, 0, static_cast<size_t>(top + 1) * sizeof(int32_t));
    for (int64_t i = 0; i < n; ++i) ++hist[(src[i] - lo) >> shift];
    int64_t b = top, acc = 0;  // from the largest bucket down to the k-th key's
    while (acc + hist[b] < k) acc += hist[b--];
    above += acc;
    k -= acc;
    if (shift == 0) {  // the bucket holds one value
      *larger = above;
      return lo + static_cast<uint32_t>(b);
    }
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t x = src[i];
      tmp[m] = x;
      m += static_cast<int64_t>((x - lo) >> shift) == b;
    }
    src = tmp;
    n = m;
  }
}

// The smallest and largest of v[0, n) (n >= 1, no NaN).
inline void min_max(const float* v, int64_t n, float* lo, float* hi) {
  int64_t t = 0;
#if defined(__SSE2__)
  if (n >= 8) {
    __m128 l0 = _mm_loadu_ps(v), l1 = _mm_loadu_ps(v + 4), h0 = l0, h1 = l1;
    for (t = 8; t + 8 <= n; t += 8) {
      const __m128 a = _mm_loadu_ps(v + t), b = _mm_loadu_ps(v + t + 4);
      l0 = _mm_min_ps(l0, a);
      l1 = _mm_min_ps(l1, b);
      h0 = _mm_max_ps(h0, a);
      h1 = _mm_max_ps(h1, b);
    }
    alignas(16) float l[4], h[4];
    _mm_store_ps(l, _mm_min_ps(l0, l1));
    _mm_store_ps(h, _mm_max_ps(h0, h1));
    *lo = std::min(std::min(l[0], l[1]), std::min(l[2], l[3]));
    *hi = std::max(std::max(h[0], h[1]), std::max(h[2], h[3]));
  } else
#endif
  {
    *lo = *hi = v[0];
    t = 1;
  }
  for (; t < n; ++t) {
    *lo = std::min(*lo, v[t]);
    *hi = std::max(*hi, v[t]);
  }
}

// w[0, n) sorted ascending by insertion: words that are nearly in order (each value bucket's few, placed
// bucket by bucket) move little.
inline void insertion_sort(uint64_t* w, int64_t n) {
  for (int64_t t = 1; t < n; ++t) {
    const uint64_t x = w[t];
    int64_t u = t;
    for (; u > 0 && w[u - 1] > x; --u) w[u] = w[u - 1];
    w[u] = x;
  }
}

// Buckets of float scores for selection and sorting: bucket(x) = (xmax - x) * scale, which never
// increases with x (a larger score never lands in a later bucket), so every score of an earlier bucket
// beats every score of a later one. Scores are spread over the buckets by value, not by their bits.
struct Buckets {
  float xmax = 0, scale = 0;
  int64_t nb = 0;
  // false when the scores are all equal or their spread does not give a finite scale.
  bool fit(const float* v, int64_t n, int64_t want) {
    float hi, lo;
    min_max(v, n, &lo, &hi);
    return span(lo, hi, want);
  }
  // fit() for scores whose smallest and largest are known (finish_buckets_avx512 finds them 16 at a time).
  bool span(float lo, float hi, int64_t want) {
    nb = 16;
    while (nb < want && nb < 4096) nb *= 2;
    xmax = hi;
    scale = static_cast<float>(nb - 1) / (hi - lo);
    return hi > lo && std::isfinite(scale) && scale > 0;
  }
  int32_t operator()(float x) const {
    return static_cast<int32_t>(std::min(static_cast<float>(nb - 1), (xmax - x) * scale));
  }
};

// RowsF32::estimate's sample rank: about the m-th best of a row's n sample scores (out of `total` keys)
// is its threshold, m well above the share k * n / total that the row's best k would have in a random
// sample (4 standard deviations and 4 more).
inline int64_t estimate_rank(int64_t k, int64_t n, int64_t total) {
  const double e = static_cast<double>(k) * static_cast<double>(n) / static_cast<double>(total);
  return static_cast<int64_t>(std::ceil(e + 4.0 * std::sqrt(e) + 4.0));
}

// How many candidates beyond its best k a row whose threshold starts at that estimate keeps, with room
// to spare: about m * total / n on average, half as many again for the spread of the sample's m-th
// best (its count is about Poisson(m)), so that a row rarely fills its buffer and cuts it (when
// k * n / total is small, m is several times the share and a buffer of 3k would be cut at least once:
// the cut, a pass over the whole buffer, then cost more than its candidates). At most 6k: against
// many keys (k * n / total far below 1, m at its floor of 5) the estimate says little, the expected
// count grows with the keys, and the cuts are what raise the threshold (and the buffers' memory,
// rows x cap a thread, stays O(k)).
inline int64_t estimate_room(int64_t k, int64_t n, int64_t total) {
  const int64_t m = estimate_rank(k, n, total);
  const double room = 1.5 * static_cast<double>(m) * static_cast<double>(total) / static_cast<double>(n);
  return std::min<int64_t>(6 * k, std::max<int64_t>(0, static_cast<int64_t>(room) - k));
}

// The running top-k of the rows of one query block, float32: per row a buffer of (value, key index)
// in key order, its count, and its threshold (a score must be > threshold to matter: a value that at
// least k buffered candidates reach, else the row's floor).
struct RowsF32 {
  int64_t k, cap;
  std::vector<float> vals;
  std::vector<uint32_t> idx;
  std::vector<int64_t> count;
  std::vector<float> floor, thr;
  std::vector<uint32_t> keys, tmp;
  std::vector<int32_t> bid, hist;
  std::vector<float> out_v;
  std::vector<int64_t> out_i;
  std::vector<uint64_t> words, words_tmp;
  std::vector<float> sample;  // estimate()'s scores of the first key tile
  std::vector<float> pre;  // tile_select's per-row scratch
  ScanF32 scan = scan_f32();
  GroupsF32 groups = groups_f32();
  KthF32 kth_small = kth_f32();
  CutF32 cut_small = cut_f32();
  RankF32 rank_small = rank_f32();
  EstimateF32 estimate_fast = estimate_f32();
  FinishBucketsF32 finish_fast = finish_buckets_f32();

  std::vector<char> soft;  // the row's threshold is an estimate (see estimate), checked at the end
  int64_t limit = cap - kRoom;

  // expect: how many candidates a row is expected to keep beyond the first k (estimate_room, where the
  // threshold starts at an estimate; else 0): the buffer holds at least that many before it is cut.
  RowsF32(int64_t rows, int64_t k_, int64_t cols, int64_t expect = 0)
      : k(k_),
        cap(k_ + std::max<int64_t>(std::max<int64_t>(2 * k_, 2 * kBlock), expect) + kRoom),
        vals(static_cast<size_t>(rows * cap)),
        idx(static_cast<size_t>(rows * cap)),
        count(rows),
        floor(rows),
        thr(rows),
        keys(cap),
        tmp(cap + 16),
        bid(cap + 16),
        hist(4096),
        out_v(cap),
        out_i(cap),
        words(cap),
        words_tmp(cap + 16),
        sample(cols + 16),
        pre(rows),
        soft(rows) {
    // Small k where the CPU cuts in registers (cut_small, at most kSmallCut candidates): the rows
    // are cut once they hold 3k (kRoom would let a row collect 2k + 128 first), so that the
    // threshold rises sooner and each cut stays a cut in registers: the row holds at most 3k - 1
    // when it appends its next 32 keys (one block of tile_select).
    if (cut_small != nullptr && k <= kSmallK) limit = std::min<int64_t>(kSmallCut - 32, 3 * k - 1);
  }

  void start(int64_t r, float f) {
    count[r] = 0;
    floor[r] = thr[r] = f;
    soft[r] = 0;
  }

  // Large k: a threshold for row r estimated from its scores s[0, n) against a sample of the keys (the
  // first key tile) out of `total`: about the m-th best sample score, m well above the share k * n /
  // total that the row's best k would have in a random sample (4 standard deviations and 4 more), so
  // that the row keeps only about m * total / n candidates instead of learning its threshold from the
  // first 2k keys. The sample's scores go over about 4m value buckets and the threshold is the lower
  // edge of the bucket where the count from the top reaches m (a bucket's width below the m-th best:
  // one counting pass, where an exact m-th best cost a radix select per row); where the scan runs
  // AVX-512, a bisection on the count above a value, 16 compares at a time, lands as close
  // (estimate_f32, csrc/cpu/scan_f32.cpp). An estimate, not a
  // bound: finish() is exact only if at least k scores beat it, which failed() checks; a row that
  // fails is run again without one (fused_topk).
  void estimate(int64_t r, const float* s, const float* bias, int64_t n, float inv_tau, int64_t total) {
    const int64_t m = estimate_rank(k, n, total);
    float* x = sample.data();
    if (estimate_fast != nullptr) {
      const float t = estimate_fast(s, bias, n, inv_tau, thr[r], m, x);
      if (t > thr[r]) {
        thr[r] = t;
        soft[r] = 1;
      }
      return;
    }
    int64_t c = 0;
    for (int64_t j = 0; j < n; ++j) {
      x[c] = s[j] * inv_tau + bias[j];
      c += x[c] > thr[r];
    }
    if (m > c) return;  // too few sample scores above the floor to say anything
    Buckets bk;
    if (!bk.fit(x, c, 4 * m)) return;  // all equal
    int32_t* h = hist.data();
    std::fill(h, h + bk.nb, 0);
    for (int64_t j = 0; j < c; ++j) ++h[bk(x[j])];
    int64_t b = 0, above = h[0];
    while (above < m) above += h[++b];
    // Every score in the buckets [0, b] is above xmax - (b + 1) / scale (up to rounding: a threshold
    // a little off only changes how many candidates the row keeps, never the answer).
    const float t = bk.xmax - static_cast<float>(b + 1) / bk.scale;
    if (t > thr[r]) {
      thr[r] = t;
      soft[r] = 1;
    }
  }

  bool failed(int64_t r) const { return soft[r] && count[r] < k; }

  // The k-th largest of the kGroups maxima: the g[i] with fewer than k maxima above it and at least k
  // at or above it, by counting (kth_small where the CPU has AVX-512, else branch-free compares the
  // compiler vectorises; std::nth_element on 32 floats cost about 400 ns a row); std::nth_element
  // where a NaN leaves no such g[i].
  float kth_group(float* g) const {
    int64_t larger = -1;
    if (kth_small != nullptr) {
      const float x = kth_small(g, kGroups, k, &larger);
      if (larger >= 0) return x;
    }
    for (int64_t i = 0; i < kGroups; ++i) {
      int32_t above = 0, reach = 0;
      for (int64_t j = 0; j < kGroups; ++j) {
        above += g[j] > g[i];
        reach += g[j] >= g[i];
      }
      if (above < k && reach >= k) return g[i];
    }
    std::nth_element(g, g + (k - 1), g + kGroups, std::greater<float>());
    return g[k - 1];
  }

  // Small k (at most kGroups / 2) against several key tiles: a lower bound on row r's k-th best score,
  // from the first tile's s[0, n). The scores fall into kGroups groups (key j in group j mod kGroups);
  // the k-th largest of the groups' maxima is reached by k different keys, so the row's k-th best is at
  // least that, a score below it never matters, and the threshold starts just below it (a score equal
  // to it still enters: key order decides among equals). Exact, unlike estimate(): no row runs again;
  // and cheap, one vectorised max pass. Without it a row appends its first 2k + 200 keys and cuts them
  // before its threshold leaves the floor. Measured (K = 10 to 31, one thread, AMD EPYC): 32 groups
  // beat 16, 64 and 128 (more groups: a tighter bound that costs more than it saves; an exact k-th
  // best of the tile, more still), and K above 16 gained nothing.
  void bound(int64_t r, const float* s, const float* bias, int64_t n, float inv_tau) {
    float g[kGroups];
    std::fill(g, g + kGroups, -kInf);
    groups(s, bias, n, inv_tau, g);
    float below = std::nextafter(kth_group(g), -kInf);
    // A denormal threshold reads as 0 where denormals are flushed (torch.set_flush_denormal): a score
    // of exactly 0 would then not beat it. Any lower threshold is as exact, so take -FLT_MIN there.
    if (std::fabs(below) < std::numeric_limits<float>::min()) below = -std::numeric_limits<float>::min();
    if (below > thr[r]) thr[r] = below;
  }

  // Keeps exactly the best k of row r (stable: the buffer stays in key order); the threshold becomes
  // the k-th best (scores equal to it lose: they come later in key order), or stays the floor.
  void exact_shrink(int64_t r) {
    const int64_t n = count[r];
    if (n <= k) return;
    float* v = vals.data() + r * cap;
    uint32_t* ix = idx.data() + r * cap;
    uint32_t* u = keys.data();
    for (int64_t t = 0; t < n; ++t) u[t] = key_of(v[t]);
    int64_t larger = 0;
    const uint32_t kth = kth_largest(u, n, k, tmp.data(), &larger);
    int64_t need = k - larger;  // of the scores equal to the k-th, the first `need` in key order stay
    int64_t w = 0;
    for (int64_t t = 0; t < n; ++t) {  // without a branch: about half the buffer stays
      const int64_t eq = u[t] == kth;
      const int64_t keep = static_cast<int64_t>(u[t] > kth) | (eq & static_cast<int64_t>(need > 0));
      need -= eq & keep;
      v[w] = v[t];
      ix[w] = ix[t];
      w += keep;
    }
    count[r] = k;
    thr[r] = std::max(floor[r], value_of(kth));
  }

  // A cut of row r's buffer to its best k: a bounded row's after each tile, and tile_select's when a
  // row holds more than `limit`. Exactly and in registers where the CPU has AVX-512 and the row holds
  // at most kSmallCut (cut_small: the k-th best by counting, the kept candidates compressed to the
  // front), else shrink.
  void cut(int64_t r) {
    const int64_t n = count[r];
    if (n <= k) return;
    float kth = 0.0f;
    if (cut_small == nullptr || n > kSmallCut || !cut_small(vals.data() + r * cap, idx.data() + r * cap, n, k, &kth))
      return shrink(r);
    count[r] = k;
    thr[r] = std::max(floor[r], kth);
  }

  // Row r's candidates spread over value buckets (Buckets::fit over them): each one's bucket in bid,
  // each bucket's count in hist. False, with nothing done, when the scores do not spread.
  bool bucket(int64_t r, Buckets& bk) {
    const int64_t n = count[r];
    const float* v = vals.data() + r * cap;
    if (!bk.fit(v, n, n)) return false;
    int32_t* h = hist.data();
    std::fill(h, h + bk.nb, 0);
    int32_t* b = bid.data();
    for (int64_t t = 0; t < n; ++t) {
      b[t] = bk(v[t]);
      ++h[b[t]];
    }
    return true;
  }

  // Cuts row r's buffer to the candidates of the buckets down to the k-th best's (at least k, in key
  // order); the threshold becomes their smallest score (at least k candidates reach it, and a later
  // key that only ties it loses to them). Falls back to the exact cut when the scores cluster so that
  // too few would go.
  void shrink(int64_t r) {
    const int64_t n = count[r];
    if (n <= k) return;
    float* v = vals.data() + r * cap;
    uint32_t* ix = idx.data() + r * cap;
    Buckets bk;
    if (!bucket(r, bk)) return exact_shrink(r);
    const int32_t* h = hist.data();
    const int32_t* b = bid.data();
    int64_t last = 0, kept = h[0];
    while (kept < k) kept += h[++last];
    if (kept > k + (cap - k) / 2) return exact_shrink(r);
    int64_t w = 0;
    float low[4] = {kInf, kInf, kInf, kInf};  // four running minima: no chain of dependent min's
    for (int64_t t = 0; t < n; ++t) {  // without a branch: about half the buffer stays
      const int64_t keep = b[t] <= last;
      const float x = v[t];
      low[t & 3] = std::min(low[t & 3], keep ? x : kInf);
      v[w] = x;
      ix[w] = ix[t];
      w += keep;
    }
    count[r] = w;
    thr[r] = std::max(thr[r], std::min(std::min(low[0], low[1]), std::min(low[2], low[3])));
  }

  // The buffers as tile_select sees them.
  TileRows tile_rows() {
    return {vals.data(), idx.data(), count.data(), thr.data(), cap, this,
            [](void* self, int64_t r) { static_cast<RowsF32*>(self)->cut(r); }, pre.data(), k, limit};
  }

  void scan_row(int64_t r, const float* s, const float* bias, const float* bmax, int64_t n, float inv_tau,
                uint32_t base) {
    float* v = vals.data() + r * cap;
    uint32_t* ix = idx.data() + r * cap;
    for (int64_t j = 0; j < n;) {
      j = scan(s, bias, bmax, j, n, inv_tau, thr[r], base, v, ix, &count[r], cap);
      if (j < n) shrink(r);
    }
  }

  // finish() for a large buffer whose scores spread: one counting pass over about n value buckets
  // (Buckets: a larger score never lands in a later bucket), the candidates of the buckets down to the
  // k-th best's placed bucket by bucket, then an insertion sort that only has to order each bucket's
  // few candidates (no candidate crosses a bucket boundary). Returns how many it wrote,
  // or -1 (nothing written) when the scores do not spread: all equal, or a bucket too full for an
  // insertion sort, which the radix sort then handles. Where the scan runs AVX-512, the same steps
  // 16 lanes at a time and the buckets' words sorted in runs of 16 by a network (finish_fast,
  // csrc/cpu/scan_f32.cpp): at K = 1000 the finish took about a third of topk_scores' time, the
  // insertion sort's branches and the counts' prefix sums most of it.
  int64_t finish_by_buckets(int64_t r) {
    const int64_t n = count[r];
    const float* v = vals.data() + r * cap;
    const uint32_t* ix = idx.data() + r * cap;
    if (finish_fast != nullptr)
      return finish_fast(v, ix, n, k, bid.data(), hist.data(), reinterpret_cast<int32_t*>(tmp.data()),
                         words_tmp.data(), words.data(), out_v.data(), out_i.data());
    Buckets bk;
    if (!bucket(r, bk)) return -1;
    int32_t* h = hist.data();
    const int32_t* b = bid.data();
    int64_t last = 0, kept = 0, fullest = 0;
    for (; last < bk.nb; ++last) {  // exclusive prefix sums up to the k-th best's bucket
      const int32_t c = h[last];
      fullest = std::max<int64_t>(fullest, c);
      h[last] = static_cast<int32_t>(kept);
      kept += c;
      if (kept >= k) break;
    }
    if (fullest > 32) return -1;
    // The candidates of those buckets listed (without a branch: about half of them), then placed
    // bucket by bucket as words ~key_of(score) << 32 | position, which one integer compare orders:
    // score descending, then position (= key order) ascending.
    uint32_t* list = tmp.data();  // list[c] is written for every t, c <= t < n <= cap
    int64_t c = 0;
    for (int64_t t = 0; t < n; ++t) {
      list[c] = static_cast<uint32_t>(t);
      c += b[t] <= last;
    }
    uint64_t* w = words.data();
    for (int64_t q = 0; q < c; ++q) {
      const uint32_t t = list[q];
      w[h[b[t]]++] = static_cast<uint64_t>(~key_of(v[t])) << 32 | t;
    }
    insertion_sort(w, kept);  // each bucket's few words in order
    const int64_t m = std::min(kept, k);
    for (int64_t t = 0; t < m; ++t) {
      const uint32_t at = static_cast<uint32_t>(w[t]);
      out_v.data()[t] = v[at];
      out_i.data()[t] = ix[at];
    }
    return m;
  }

  // The best min(k, count) of row r sorted (score descending, equal scores in key order) into
  // out_v / out_i; returns how many. Words (hi - key) << 32 | position sorted least significant digit
  // first, 8 bits a pass over the score bits only (stable: equal scores keep key order); the whole
  // buffer (at most 2k + kBlock), which costs less than cutting it to k first.
  int64_t finish(int64_t r) {
    const int64_t n = count[r];
    const float* v = vals.data() + r * cap;
    const uint32_t* ix = idx.data() + r * cap;
    float* ov = out_v.data();
    int64_t* oi = out_i.data();
    if (n == 0) return 0;
    if (rank_small != nullptr && n <= kSmallCut) {
      rank_small(v, ix, n, ov, oi);
      return std::min(n, k);
    }
    if (n >= 64) {
      const int64_t m = finish_by_buckets(r);
      if (m >= 0) return m;
    }
    uint32_t hi = 0, lo = 0xffffffffu;
    uint32_t* u = keys.data();
    for (int64_t t = 0; t < n; ++t) {
      u[t] = key_of(v[t]);
      hi = std::max(hi, u[t]);
      lo = std::min(lo, u[t]);
    }
    uint64_t* w = words.data();
    for (int64_t t = 0; t < n; ++t) w[t] = (static_cast<uint64_t>(hi - u[t]) << 32) | static_cast<uint64_t>(t);
    const int bits = bit_length(hi - lo);
    if (n < 64) {
      std::sort(w, w + n);
    } else if (bits > 0) {
      const int passes = (bits + 7) / 8;  // at most 4: the histograms of all digits in one read
      int32_t c[4][256] = {};
      for (int64_t t = 0; t < n; ++t) {
        const uint32_t d = static_cast<uint32_t>(w[t] >> 32);
        for (int p = 0; p < passes; ++p) ++c[p][(d >> (8 * p)) & 0xff];
      }
      uint64_t *src = w, *dst = words_tmp.data();
      for (int p = 0; p < passes; ++p) {
        int32_t sum = 0;
        for (int b = 0; b < 256; ++b) {
          const int32_t x = c[p][b];
          c[p][b] = sum;
          sum += x;
        }
        const int shift = 32 + 8 * p;
        for (int64_t t = 0; t < n; ++t) dst[c[p][(src[t] >> shift) & 0xff]++] = src[t];
        std::swap(src, dst);
      }
      w = src;
    }
    const int64_t m = std::min(n, k);
    for (int64_t t = 0; t < m; ++t) {
      const uint32_t p = static_cast<uint32_t>(w[t]);
      ov[t] = v[p];
      oi[t] = ix[p];
    }
    return m;
  }
};

// ---------------------------------------------------------------------------------------------
// float64: (value, index) pairs, the generic scan, std::nth_element / std::sort.
struct PairF64 {
  double v;
  int64_t i;
};
struct BetterF64 {
  bool operator()(const PairF64& a, const PairF64& b) const { return a.v > b.v || (a.v == b.v && a.i < b.i); }
};

struct RowsF64 {
  int64_t k, cap;
  std::vector<PairF64> buf;
  std::vector<int64_t> count;
  std::vector<double> floor, thr;
  std::vector<double> out_v;
  std::vector<int64_t> out_i;

  RowsF64(int64_t rows, int64_t k_, int64_t /*cols*/, int64_t /*expect*/ = 0)
      : k(k_), cap(2 * k_ + kRoom), buf(static_cast<size_t>(rows * cap)), count(rows), floor(rows), thr(rows),
        out_v(k_), out_i(k_) {}

  void start(int64_t r, double f) {
    count[r] = 0;
    floor[r] = thr[r] = f;
  }

  void estimate(int64_t, const double*, const double*, int64_t, double, int64_t) {}  // float32 only
  void bound(int64_t, const double*, const double*, int64_t, double) {}
  bool failed(int64_t) const { return false; }
  void cut(int64_t r) { shrink(r); }

  void shrink(int64_t r) {
    if (count[r] <= k) return;
    PairF64* b = buf.data() + r * cap;
    std::nth_element(b, b + (k - 1), b + count[r], BetterF64());
    count[r] = k;
    double worst = b[0].v;
    for (int64_t t = 1; t < k; ++t) worst = std::min(worst, b[t].v);
    thr[r] = std::max(floor[r], worst);
  }

  void scan_row(int64_t r, const double* s, const double* bias, const double* /*bmax*/, int64_t n, double inv_tau,
                uint32_t base) {
    PairF64* b = buf.data() + r * cap;
    for (int64_t j = 0; j < n; ++j) {
      if (cap - count[r] < 1) shrink(r);
      const double x = s[j] * inv_tau + bias[j];
      if (x > thr[r]) b[count[r]++] = {x + 0.0, static_cast<int64_t>(base) + j};
    }
  }

  int64_t finish(int64_t r) {
    shrink(r);
    PairF64* b = buf.data() + r * cap;
    std::sort(b, b + count[r], BetterF64());
    for (int64_t t = 0; t < count[r]; ++t) {
      out_v[t] = b[t].v;
      out_i[t] = b[t].i;
    }
    return count[r];
  }
};

template <typename acc_t>
using Rows = std::conditional_t<std::is_same<acc_t, float>::value, RowsF32, RowsF64>;

// fused_topk's own passes (below; approx_topk's too).
template <typename acc_t, typename Finish>
void exact_topk(const at::Tensor& queries, const at::Tensor& keys, const acc_t* bias, int64_t k, double tau,
                const Finish& finish, const acc_t* floor = nullptr) {
  const at::ScalarType cdt = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t nq = queries.size(0), nk = keys.size(0), dim = queries.size(1);
  TORCH_CHECK(nk < kMaxKeys, "topk_scores_cpu: at most 2**32 - 1 keys a call");
  if (nq == 0) return;
  // bf16 queries and keys where bf16 GEMMs run fast (bf16_gemm()): the blocks stay bf16 and the tile
  // comes from the bf16 GEMM (a bf16 bank at the matrix units' speed); otherwise every block is in the
  // compute dtype.
  bool bf16 = false;
  if constexpr (std::is_same<acc_t, float>::value)
    bf16 = queries.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 && bf16_gemm();
  // float32 tiles from the fused kernel where the CPU runs it (fused_tile()): the first key tile of a
  // pass when the bound or the estimate reads its scores, and every tile of a pass run again, are
  // stored (tile_store: the raw products, rows x nc) and scanned; every other tile is compared in
  // registers (tile_select).
  // bf16 blocks where the CPU's bf16 dot products run (fused_dot(): AVX512-BF16 and the AVX-512 tile):
  // packed a pair of components a word and compared in registers the same way (dot).
  const bool dot = bf16 && dim > 0 && fused_dot();
  const bool fused = std::is_same<acc_t, float>::value && (!bf16 || dot) && dim > 0 && fused_tile();
  const int64_t plen = dot ? bf16_pairs(dim) : dim;  // a packed row's slots
  const Tile tile = tile_for(nq, k, fused);
  // Masked keys (bias -inf: never above a threshold, never chosen) cost nothing: the keys that can
  // score are taken one after another in key order (live[j], int64: the row in `keys` of the j-th of
  // them, with its bias in live_bias[j]), the selection runs over them alone, and a candidate's position
  // is mapped back through `live` before the caller's finish. The fused path packs them (gathered); the
  // BLAS path reads a copy of them (k_live) made once when it takes at most 32 MB, and otherwise runs
  // over every key as before. Key order is kept, so equal scores still go to the lower key index; a
  // key's product is the same wherever its tile starts (the fused kernel's loop; the BLAS's full
  // tiles); and the first key tile, which the threshold's bound or estimate reads, holds keys that
  // can score (a bank whose labeled rows come first masks whole tiles of it in local_density). A NaN
  // bias is not a mask: such keys stay.
  at::Tensor live;  // undefined: every key runs
  std::vector<acc_t> live_bias;
  int64_t n_run = nk;  // the keys the selection runs over
  const acc_t* bias_run = bias;
  at::Tensor k_live;  // the BLAS path's copy of the keys that can score
  {
    int64_t n_live = 0;
    for (int64_t j = 0; j < nk; ++j) n_live += !(bias[j] == -std::numeric_limits<acc_t>::infinity());
    if (n_live < nk) {
      live = at::empty({n_live}, at::kLong);
      int64_t* rows_of = live.data_ptr<int64_t>();
      live_bias.resize(static_cast<size_t>(n_live));
      for (int64_t j = 0, w = 0; j < nk; ++j) {
        if (bias[j] == -std::numeric_limits<acc_t>::infinity()) continue;
        rows_of[w] = j;
        live_bias[w++] = bias[j];
      }
      n_run = n_live;
      bias_run = live_bias.data();
    }
  }
  const int64_t* live_rows = live.defined() ? live.const_data_ptr<int64_t>() : nullptr;
  const at::ScalarType bdt = bf16 ? at::kBFloat16 : cdt;  // the blocks' dtype, as BLAS reads them
  // Every product is a full (rows x cols) tile, the last query and key blocks padded with zero
  // rows: BLAS then computes each score with the same instructions wherever a key falls, so a
  // key's score does not depend on how the caller chunked the keys (topk_scores merges chunked
  // calls exactly; MKL's small-matrix paths round differently from its tiled ones).
  const int64_t rows = tile.rows;
  const int64_t cols = tile.cols;
  // The reference multiplies by the Python float 1/tau rounded to the compute type; so do we, so
  // that both see the same scores up to the matmul's summation order.
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  // Blocks already in that dtype with unit column stride are read in place; others are converted (or
  // padded) one block at a time inside the task, so a bf16 bank is never copied whole (only the keys
  // that can score, below, where some are masked and the copy takes at most 32 MB).
  auto in_place = [&](const at::Tensor& t) {
    return t.scalar_type() == bdt && (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= dim;
  };
  const bool q_direct = in_place(queries);
  const at::Tensor q_det = queries.detach(), k_det = keys.detach();  // see aggregation_loss_cpu.cpp
  if (!fused && live_rows != nullptr) {
    if (n_run * dim * static_cast<int64_t>(c10::elementSize(bdt)) <= (int64_t(32) << 20)) {
      k_live = k_det.index_select(0, live).to(bdt);
    } else {  // too large to copy: every key, masked ones included
      live_rows = nullptr;
      n_run = nk;
      bias_run = bias;
    }
  }
  const at::Tensor& k_src = k_live.defined() ? k_live : k_det;  // the BLAS path's keys
  const bool k_direct = in_place(k_src);
  // A block of `full` rows of `src` from row `start` (n of them there) as BLAS reads it: (pointer, row
  // stride). In place when `direct` and the block is whole; else copied into `buf` (full x dim, the
  // blocks' dtype) with zero rows after the last.
  auto stage = [dim](const at::Tensor& src, bool direct, at::Tensor& buf, int64_t start, int64_t n,
                     int64_t full) -> std::pair<const void*, int64_t> {
    if (direct && n == full)
      return {static_cast<const char*>(src.const_data_ptr()) + start * src.stride(0) * src.element_size(),
              src.stride(0)};
    buf.narrow(0, 0, n).copy_(src.narrow(0, start, n));
    buf.narrow(0, n, full - n).zero_();
    return {buf.const_data_ptr(), dim};
  };
  // The (rows x cols) score tile of a staged query block and key block.
  auto tile_gemm = [&](const void* a, int64_t lda, const void* b, int64_t ldb, acc_t* out) {
    if constexpr (std::is_same<acc_t, float>::value) {
      if (bf16)
        return blas_gemm_bf16(static_cast<const uint16_t*>(a), lda, static_cast<const uint16_t*>(b), ldb, out, rows,
                              cols, dim);
    }
    if constexpr (std::is_same<acc_t, double>::value) {
      ordered_gemm(static_cast<const double*>(a), lda, static_cast<const double*>(b), ldb, out, rows, cols, dim);
      return true;
    } else {
      return blas_gemm(static_cast<const acc_t*>(a), lda, static_cast<const acc_t*>(b), ldb, out, rows, cols, dim);
    }
  };
  const int64_t blocks = (nq + rows - 1) / rows;
  // Large k against many keys: each row's threshold is first estimated from the first key tile
  // (RowsF32::estimate); LLP_FAST_CPU_NO_ESTIMATE=1 turns it off (tests, comparisons).
  static const bool no_estimate = std::getenv("LLP_FAST_CPU_NO_ESTIMATE") != nullptr;
  const bool sampled = std::is_same<acc_t, float>::value && !no_estimate && k >= 32 && n_run >= 4 * cols;
  // Small k against more than one key tile: each row's threshold starts at a lower bound taken from its
  // first tile (RowsF32::bound).
  static const bool no_bound = std::getenv("LLP_FAST_CPU_NO_BOUND") != nullptr;
  const bool bounded = std::is_same<acc_t, float>::value && !no_bound && !sampled && n_run > cols && 2 * k <= kGroups;
  // The fused kernel's key tiles packed once for all query blocks when they take at most 32 MB (else
  // each task packs a tile when it needs it, once per query block).
  const int64_t per_tile = fused ? panel_keys(cols) * plen : 0;
  const int64_t key_tiles = (n_run + cols - 1) / cols;
  // Key tile [c0, c0 + nc) of the keys the selection runs over, packed into out (buf: its staging).
  auto pack_rows = [&](const void* src, int64_t ld, int64_t n, float* out, const int64_t* rows_of) {
    if (dot)
      pack_keys_bf16(static_cast<const uint16_t*>(src), ld, n, dim, out, rows_of);
    else
      pack_keys(static_cast<const float*>(src), ld, n, dim, out, rows_of);
  };
  auto pack_key_tile = [&](at::Tensor& buf, int64_t c0, int64_t nc, float* out) {
    if (live_rows == nullptr) {
      const auto [ka, ldb] = stage(k_det, k_direct, buf, c0, nc, cols);
      pack_rows(ka, ldb, nc, out, nullptr);
    } else if (k_direct) {
      pack_rows(k_det.const_data_ptr(), k_det.stride(0), nc, out, live_rows + c0);
    } else {  // keys in another dtype or layout: the tile's rows gathered and converted first
      buf.narrow(0, 0, nc).copy_(k_det.index_select(0, live.narrow(0, c0, nc)));
      buf.narrow(0, nc, cols - nc).zero_();
      pack_rows(buf.const_data_ptr(), dim, nc, out, nullptr);
    }
  };
  std::vector<float> keys_packed;
  if (fused && key_tiles * per_tile <= (int64_t(32) << 20) / int64_t(sizeof(float)) && nq > rows) {
    keys_packed.resize(static_cast<size_t>(key_tiles * per_tile));
    at::parallel_for(0, key_tiles, 1, [&](int64_t t0, int64_t t1) {
      at::Tensor buf = at::zeros({cols, dim}, queries.options().dtype(bdt));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * cols, nc = std::min(cols, n_run - c0);
        pack_key_tile(buf, c0, nc, keys_packed.data() + t * per_tile);
      }
    });
  }

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const auto opts = queries.options().dtype(cdt);
    at::Tensor scores = at::empty({rows, cols}, opts);
    at::Tensor q_buf = at::zeros({rows, dim}, opts.dtype(bdt));
    at::Tensor k_buf = at::zeros({cols, dim}, opts.dtype(bdt));
    acc_t* s = scores.data_ptr<acc_t>();
    Rows<acc_t> top(rows, k, cols, sampled ? estimate_room(k, std::min(cols, n_run), n_run) : 0);
    std::vector<acc_t> bmax(static_cast<size_t>((cols + kBlock - 1) / kBlock));
    std::vector<int64_t> redo;
    // The fused kernel's packed query block and key tile.
    std::vector<float> q_pack(fused ? static_cast<size_t>(panel_rows(rows) * plen) : 0);
    std::vector<float> k_pack(fused && keys_packed.empty() ? static_cast<size_t>(panel_keys(cols) * plen) : 0);

    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rows;
      const int64_t nr = std::min(rows, nq - r0);
      const auto [qa, lda] = stage(q_det, q_direct, q_buf, r0, nr, rows);
      if (fused && dot)
        pack_queries_bf16(static_cast<const uint16_t*>(qa), lda, nr, dim, q_pack.data());
      else if (fused)
        pack_queries(static_cast<const float*>(qa), lda, nr, dim, q_pack.data());
      // One pass over the keys for the rows [0, nr) (all) or the rows in `redo`.
      auto pass = [&](bool all) {
        const int64_t n_rows = all ? nr : static_cast<int64_t>(redo.size());
        for (int64_t i = 0; i < n_rows; ++i) {
          const int64_t r = all ? i : redo[i];
          top.start(r, floor != nullptr ? floor[r0 + r] : -std::numeric_limits<acc_t>::infinity());
        }
        for (int64_t c0 = 0; c0 < n_run; c0 += cols) {
          const int64_t nc = std::min(cols, n_run - c0);
          // The tile: compared in registers (fused, and no bound or estimate reads its scores), or a
          // score tile, from the fused kernel or the BLAS, scanned row by row.
          bool in_registers = false;
          if constexpr (std::is_same<acc_t, float>::value) {
            if (fused) {
              const float* kp = keys_packed.empty() ? nullptr : keys_packed.data() + (c0 / cols) * per_tile;
              if (kp == nullptr) {
                pack_key_tile(k_buf, c0, nc, k_pack.data());
                kp = k_pack.data();
              }
              in_registers = all && (c0 > 0 || (!sampled && !bounded));
              if (in_registers)
                tile_select(q_pack.data(), nr, kp, nc, plen, bias_run + c0, inv_tau, static_cast<uint32_t>(c0),
                            top.tile_rows(), dot);
              else
                tile_store(q_pack.data(), nr, kp, nc, plen, s, cols, dot);
            }
          }
          if (!fused) {
            const auto [ka, ldb] = stage(k_src, k_direct, k_buf, c0, nc, cols);
            if (dim == 0) {
              std::fill(s, s + rows * cols, acc_t(0));
            } else if (!tile_gemm(qa, lda, ka, ldb, s)) {
              at::Tensor a = at::from_blob(const_cast<void*>(qa), {rows, dim}, {lda, 1}, opts.dtype(bdt));
              at::Tensor b = at::from_blob(const_cast<void*>(ka), {cols, dim}, {ldb, 1}, opts.dtype(bdt));
              at::mm_out(scores, a.to(cdt), b.to(cdt).t());
            }
          }
          if (!in_registers) {
            // Each 64-key block's largest bias: the scan rejects a block from its largest product alone
            // (rounding is monotone, inv_tau > 0: no score of the block exceeds max(s) * inv_tau +
            // max(bias)). A NaN bias never enters (the running value first in std::max).
            if constexpr (std::is_same<acc_t, float>::value)
              for (int64_t b = 0, j = 0; j < nc; ++b, j += kBlock) {
                acc_t hi = -kInf;
                for (int64_t i = j; i < std::min(nc, j + kBlock); ++i) hi = std::max(hi, bias_run[c0 + i]);
                bmax[b] = hi;
              }
            for (int64_t i = 0; i < n_rows; ++i) {
              const int64_t r = all ? i : redo[i];
              if (c0 == 0 && all && sampled) top.estimate(r, s + r * cols, bias_run, nc, inv_tau, n_run);
              if (c0 == 0 && all && bounded) top.bound(r, s + r * cols, bias_run, nc, inv_tau);
              top.scan_row(r, s + r * cols, bias_run + c0, bmax.data(), nc, inv_tau, static_cast<uint32_t>(c0));
            }
          }
          // A bounded row cuts its few candidates after each tile, so that its threshold keeps rising
          // (its buffer would take many tiles to fill and cut itself).
          if (bounded)
            for (int64_t i = 0; i < n_rows; ++i) {
              const int64_t r = all ? i : redo[i];
              if (top.count[r] >= 2 * k) top.cut(r);
            }
        }
      };
      pass(true);
      redo.clear();
      for (int64_t r = 0; r < nr; ++r)
        if (top.failed(r)) redo.push_back(r);
      if (!redo.empty()) pass(false);  // rows whose estimated threshold kept fewer than k: exactly, again

      for (int64_t r = 0; r < nr; ++r) {
        const int64_t n = top.finish(r);
        if (live_rows != nullptr)  // positions among the keys that can score -> rows of `keys`
          for (int64_t t = 0; t < n; ++t) top.out_i[t] = live_rows[top.out_i[t]];
        finish(r0 + r, top.out_v.data(), top.out_i.data(), n);
      }
    }
  });
}

// float32 queries and keys, small k, on a CPU whose bf16 scores come fast (bf16_gemm(): MKL's bf16 GEMM on
// AMX-BF16, or the fused tile's AVX512-BF16 dot products) and whose fused tile runs AVX-512: the same answer, bit for bit, from a bf16 pass and an
// exact refinement, at about the bf16 GEMM's cost instead of the float32 one (docs/method.md §3).
//   1. Every score is first computed from the queries and keys rounded to bf16 (the bf16 path of
//      fused_topk), and each row keeps its best k' = approx_k(k) of those approximate scores s~.
//   2. A rigorous bound e_r on |s - s~| for row r (score units): the inputs' rounding
//      |q . k - q~ . k~| <= |q - q~| |k| + |q~| |k - k~| (Cauchy-Schwarz, with the largest |k| and
//      |k - k~| over the keys that can score), both GEMMs' float32 sums (at most 1.01 D u times the sum of the
//      products' magnitudes each, u = 2^-24), the scale's and the bias's roundings in both scores, and a margin for the norms'
//      own float32 rounding.
//   3. Every key whose exact score ties or beats the row's exact k-th best has s~ >= s~_k - 2 e_r (the k
//      keys of the approximate top k have s >= s~_k - e_r). So when the row's k'-th kept s~ is
//      below s~_k - 2 e_r, every key that can be in the exact top k was kept, and of those only the
//      band s~ >= s~_k - 2 e_r can be: the band's exact scores (rescore: the fused tile's own FMA
//      sequence, so the same bits) are ranked in the op's order and the best k are the answer. A row
//      where that does not hold (its scores crowd within 2 e_r) gets a second bf16 pass keeping 2k' (at
//      k = 10 about a tenth of the rows on unit rows in 128-d at tau = 0.07; run again exactly, that
//      tenth cost a fifth of the whole), and a row that one does not settle either (keys that repeat),
//      or whose query is not finite, runs the exact path.
// Not taken (false): k > kApproxMaxK, k > 32 with fewer than 36 k keys that can score, a bias of NaN or
// +inf, a query or key that is not finite, keys whose bf16 copy would take over 64 MB, fewer than
// approx_k(k) + 1 keys that can score, under 512 query rows or 2^22 products, non-unit column strides,
// or LLP_FAST_CPU_APPROX=0 (=2: calls of any size, for tests; LLP_FAST_CPU_APPROX_REPORT prints each
// call's rows, how many ran the exact path and how many took the second pass).
// The bf16 passes' k for the op's k: the first keeps 16 (the largest k with the first-tile bound, 2k <=
// kGroups) for k <= 12, 48 for k <= 32, else k + max(32, k / 2) (on unit rows in 128-d at k = 50-128 and
// tau = 0.07 the band then holds about k + 12 to k + 24 keys, and under 0.2% of the rows need the
// second pass; k + k / 4 sent 8-27% there); the second, for the rows the first did not settle, twice
// that. Above k = 32 the refinement (each band key's 512-byte row read and transposed: about 120 ms a
// call at k = 200 for Q = 20,000, M = 5,000, D = 128, one thread, of which 41 ms with the rows already
// in cache, README) grows with k while what the pass saves grows with the keys that can score, so it is
// taken where k <= n_live / 36 and k <= 200 (=2 leaves the first out).
// Measured (Q x M rows, one thread, Zen 4, the pass's time over the exact path's, medians of 5):
// M = 5,000, k = 50 / 100 / 128 / 150 / 200: 0.73 / 0.80 / 0.87 / 0.96 / about 1.1; 3,333 keys that
// can score, k = 50 / 64 / 80 / 100 / 128: 0.77 / 0.81 / 0.88 / 0.98 / 1.11; 20,000, k = 100 / 200 /
// 256: 0.83 / 0.86 / 1.05.
constexpr int64_t kApproxMaxK = 200;       // the largest k it serves
constexpr int64_t kApproxSmallK = 32;      // up to here any number of keys will do
constexpr int64_t kApproxKeysPerK = 36;    // above it, at least this many keys that can score per k
inline int64_t approx_k(int64_t k) {
  return k <= 12 ? 16 : k <= kApproxSmallK ? 48 : k + std::max<int64_t>(32, k / 2);
}

// LLP_FAST_CPU_APPROX: 0 (off), 1 (the default: calls large enough) or 2 (calls of any size, for tests).
inline int approx_mode() {
  const char* s = std::getenv("LLP_FAST_CPU_APPROX");
  if (s == nullptr) return 1;
  TORCH_CHECK(std::strcmp(s, "0") == 0 || std::strcmp(s, "1") == 0 || std::strcmp(s, "2") == 0,
              "LLP_FAST_CPU_APPROX must be 0, 1 or 2, got '", s, "'");
  return s[0] - '0';
}

// Whether this CPU and these settings give approx_topk its bf16 pass at all (the call's own gates aside).
inline bool approx_available() { return approx_mode() != 0 && rescore_available() && bf16_gemm(); }

template <typename Finish>
bool approx_topk(const at::Tensor& queries, const at::Tensor& keys, const float* bias, int64_t k, double tau,
                 const Finish& finish) {
  const int64_t nq = queries.size(0), nk = keys.size(0), dim = queries.size(1);
  if (!approx_available()) return false;  // LLP_FAST_CPU_APPROX=0, or this CPU lacks what the pass needs
  const bool any_size = approx_mode() == 2;  // LLP_FAST_CPU_APPROX=2 (tests): calls of any size
  if (k > kApproxMaxK || dim == 0 || dim > 65536 || queries.scalar_type() != at::kFloat ||
      keys.scalar_type() != at::kFloat)
    return false;
  if ((dim > 1 && (queries.stride(1) != 1 || keys.stride(1) != 1)) || nk * dim * 2 > (int64_t(64) << 20))
    return false;
  // Each call rounds every key to bf16 (about what 256 query rows save on them: 100,000 keys, one thread,
  // K = 10, 64 rows 19 -> 22 ms, 256 rows 45 -> 46 ms, 1,024 rows 174 -> 104 ms), so it takes 512 rows
  // (checked before the pass over the biases: small calls, a training step's, leave at once).
  if (!any_size && nq < 512) return false;
  int64_t n_live = 0;
  double babs = 0.0;  // the largest |bias| of a key that can score
  for (int64_t j = 0; j < nk; ++j) {
    if (bias[j] == -kInf) continue;
    if (!std::isfinite(bias[j])) return false;  // NaN or +inf: the exact path's rules
    ++n_live;
    babs = std::max(babs, std::fabs(static_cast<double>(bias[j])));
  }
  if (n_live <= approx_k(k) || (!any_size && k > kApproxSmallK && n_live < kApproxKeysPerK * k) ||
      (!any_size && static_cast<double>(nq) * static_cast<double>(n_live) < double(int64_t(1) << 22)))
    return false;
  const at::Tensor q = queries.detach(), kd = keys.detach();
  const float* qp = q.const_data_ptr<float>();
  const float* kp_keys = kd.const_data_ptr<float>();
  const int64_t ldq = q.stride(0), ldk = kd.stride(0);

  // The keys' bf16 copy, and over the keys that can score the largest |k| and |k - bf16(k)| (float64
  // sums, inflated by grow all the same). A key that can score and is not finite: the exact path.
  at::Tensor k16 = at::empty({nk, dim}, q.options().dtype(at::kBFloat16));
  uint16_t* k16p = reinterpret_cast<uint16_t*>(k16.data_ptr<at::BFloat16>());
  double kmax = 0.0, dkmax = 0.0;
  {
    double sq[3];
    for (int64_t j = 0; j < nk; ++j) {
      const bool ok = bf16_split(kp_keys + j * ldk, ldk, 1, dim, k16p + j * dim, sq);
      if (bias[j] == -kInf) continue;
      if (!ok) return false;
      kmax = std::max(kmax, std::sqrt(sq[0]));
      dkmax = std::max(dkmax, std::sqrt(sq[1]));
    }
  }
  const double u = std::ldexp(1.0, -24);
  const double grow = 1.0 + 4.0 * static_cast<double>(dim) * u;  // more than the float64 sums' rounding
  kmax *= grow;
  dkmax *= grow;
  const float inv_tau = static_cast<float>(1.0 / tau);
  const double vt = static_cast<double>(inv_tau);
  const double gamma = 1.01 * static_cast<double>(dim) * u;  // a float32 sum of dim products, any order

  // Query blocks, so that the bf16 copy and the candidates take O(block), not O(Q).
  // (at most 2^21 kept candidates, 24 MB of scores and indices, at large k)
  const int64_t approx_rows = std::clamp<int64_t>((int64_t(1) << 21) / approx_k(k), 1024, 16384);
  int64_t n_again = 0;  // rows of the second bf16 pass (the report)
  std::vector<int64_t> redo;  // rows for the exact path: not finite, or scores crowded within the bound
  at::Tensor q16 = at::empty({std::min(nq, approx_rows), dim}, q.options().dtype(at::kBFloat16));
  std::vector<double> qsq;
  std::vector<float> cv;
  std::vector<int64_t> ci, cn, open, next;
  std::vector<char> failed;
  // One pass of bf16 scores for the block's rows `rows` (their bf16 copies in qs), each keeping its best
  // kp; the rows the bound settles are finished, the others left in `next`.
  auto stage = [&](int64_t b0, const at::Tensor& qs, const std::vector<int64_t>& rows, int64_t kp,
                   std::vector<int64_t>& left) {
    const int64_t n_rows = static_cast<int64_t>(rows.size());
    cv.assign(static_cast<size_t>(n_rows * kp), 0.0f);
    ci.assign(static_cast<size_t>(n_rows * kp), 0);
    cn.assign(static_cast<size_t>(n_rows), 0);
    exact_topk<float>(qs, k16, bias, kp, tau, [&](int64_t i, const float* v, const int64_t* ix, int64_t n) {
      std::copy(v, v + n, cv.data() + i * kp);
      std::copy(ix, ix + n, ci.data() + i * kp);
      cn[i] = n;
    });
    at::parallel_for(0, n_rows, 64, [&](int64_t i0, int64_t i1) {
      std::vector<float> x(static_cast<size_t>(kp));
      std::vector<int64_t> jx(static_cast<size_t>(kp));
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = rows[i];
        const int64_t n = cn[i];
        const float* v = cv.data() + i * kp;
        const double qn = std::sqrt(qsq[3 * r]) * grow;      // |q|
        const double dq = std::sqrt(qsq[3 * r + 1]) * grow;  // |q - q~|
        const double qt = std::sqrt(qsq[3 * r + 2]) * grow;  // |q~|
        // |c - c~| for any key that can score (c: the fused tile's float32 product; c~: the bf16 GEMM's):
        // the inputs' rounding; both float32 sums; denormal products and sums flushed (the bf16 GEMM
        // always, the float32 chain under torch.set_flush_denormal) and denormal float32 inputs read as
        // zero there. Then the scale's and the bias's roundings in both scores, and their underflow.
        const double tiny = std::ldexp(1.0, -126);
        const double dc = gamma * (qn * kmax + qt * (kmax + dkmax)) + dq * kmax + qt * dkmax +
                          4.0 * static_cast<double>(dim) * tiny +
                          1.01 * tiny * std::sqrt(static_cast<double>(dim)) * (qn + kmax);
        const double c_max = 1.01 * (qn * kmax + qt * (kmax + dkmax));
        const double e = 1.01 * (vt * dc + 2.01 * u * vt * c_max + 2.0 * u * babs + 8.0 * tiny);
        // No product sum nor score may overflow (c_max bounds every partial sum of both chains; with a
        // large tau the sum can overflow while the scaled score would not), and a row has kept either
        // k' keys, the k'-th below its k-th by 2e, or every key that can score (a key whose bf16 score
        // is NaN or -inf is never kept).
        const bool settled = c_max < 1e30 && c_max * vt < 1e30 &&
                             (n == kp ? static_cast<double>(v[kp - 1]) < static_cast<double>(v[k - 1]) - 2.0 * e
                                      : n == n_live);
        if (!settled) {
          failed[r] = 1;
          continue;
        }
        // Only the band, the keys within 2e of the k-th bf16 score, can be in the exact top k (step 3
        // above): their exact scores (up to kRescoreKeys keys a call), ranked in the op's order (score
        // down, index up). They come in the bf16 scores' order, which only pairs within 2e of each
        // other can break, so an insertion sort moves few of them.
        const int64_t m = std::min(k, n);
        const double cut = static_cast<double>(v[m - 1]) - 2.0 * e;
        int64_t n_in = m;
        while (n_in < n && static_cast<double>(v[n_in]) >= cut) ++n_in;
        const int64_t* ix = ci.data() + i * kp;
        const float* qr = qp + (b0 + r) * ldq;
        for (int64_t l0 = 0; l0 < n_in; l0 += kRescoreKeys)
          rescore(qr, kp_keys, ldk, ix + l0, std::min(kRescoreKeys, n_in - l0), dim, bias, inv_tau,
                  x.data() + l0);
        for (int64_t t = 0; t < n_in; ++t) {
          const float xv = x[t];
          const int64_t xi = ix[t];
          int64_t s = t;
          for (; s > 0 && (x[s - 1] < xv || (x[s - 1] == xv && jx[s - 1] > xi)); --s) {
            x[s] = x[s - 1];
            jx[s] = jx[s - 1];
          }
          x[s] = xv;
          jx[s] = xi;
        }
        finish(b0 + r, x.data(), jx.data(), m);
      }
    });
    left.clear();
    for (int64_t i = 0; i < n_rows; ++i)
      if (failed[rows[i]]) left.push_back(rows[i]);
  };
  for (int64_t b0 = 0; b0 < nq; b0 += approx_rows) {
    const int64_t nb = std::min(approx_rows, nq - b0);
    uint16_t* q16p = reinterpret_cast<uint16_t*>(q16.data_ptr<at::BFloat16>());
    qsq.assign(static_cast<size_t>(3 * nb), 0.0);
    failed.assign(static_cast<size_t>(nb), 0);
    at::parallel_for(0, nb, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        failed[r] = !bf16_split(qp + (b0 + r) * ldq, ldq, 1, dim, q16p + r * dim, qsq.data() + 3 * r);
    });
    open.clear();
    for (int64_t r = 0; r < nb; ++r) {
      if (failed[r])
        redo.push_back(b0 + r);  // not finite: the exact path
      else
        open.push_back(r);
    }
    if (open.empty()) continue;
    const at::Tensor block = q16.narrow(0, 0, nb);
    const at::Tensor open_rows = at::from_blob(open.data(), {static_cast<int64_t>(open.size())}, at::kLong);
    // 1. The best approx_k(k) by bf16 scores; 2. the rows it did not settle, again keeping twice that.
    stage(b0, static_cast<int64_t>(open.size()) == nb ? block : block.index_select(0, open_rows), open,
          approx_k(k), next);
    if (next.empty()) continue;
    std::swap(open, next);
    for (int64_t r : open) failed[r] = 0;
    n_again += static_cast<int64_t>(open.size());
    const at::Tensor again = at::from_blob(open.data(), {static_cast<int64_t>(open.size())}, at::kLong);
    stage(b0, block.index_select(0, again), open, 2 * approx_k(k), next);
    for (int64_t r : next) redo.push_back(b0 + r);
  }
  std::sort(redo.begin(), redo.end());
  for (size_t a = 0; a < redo.size(); a += static_cast<size_t>(approx_rows)) {
    const int64_t n = std::min<int64_t>(approx_rows, static_cast<int64_t>(redo.size() - a));
    const at::Tensor rows = at::from_blob(redo.data() + a, {n}, at::kLong);
    exact_topk<float>(q.index_select(0, rows), kd, bias, k, tau,
                      [&](int64_t r, const float* v, const int64_t* i, int64_t c) { finish(redo[a + r], v, i, c); });
  }
  if (std::getenv("LLP_FAST_CPU_APPROX_REPORT") != nullptr)  // tests: which path each row took
    std::fprintf(stderr, "llp_fast approx_topk: %lld rows, %lld exact, %lld again\n", static_cast<long long>(nq),
                 static_cast<long long>(redo.size()), static_cast<long long>(n_again));
  return true;
}

// Runs the fused top-k of queries x keys and calls finish(row, values, indices, n) for each query row
// with its best n = min(k, number of keys scoring above the row's floor) sorted, a key's index being its
// row in `keys`. `bias` has one acc_t per key (added). `floor` (optional, one per query row) starts each
// row's threshold: a score at or below it is known not to matter (topk_scores passes just below the
// k-th best of an earlier call, so that a stream of chunks does not learn the threshold again in every
// chunk). approx_topk where it applies, else exact_topk. (approx_topk leaves the floor out: it hands
// every row its exact best min(k, keys that can score), a superset of what the floor keeps, which
// topk_scores' merge with the earlier call reduces to the same best k.)
template <typename acc_t, typename Finish>
void fused_topk(const at::Tensor& queries, const at::Tensor& keys, const acc_t* bias, int64_t k, double tau,
                const Finish& finish, const acc_t* floor = nullptr) {
  if constexpr (std::is_same<acc_t, float>::value) {
    if (queries.size(0) > 0 && approx_topk(queries, keys, bias, k, tau, finish)) return;
  }
  exact_topk<acc_t>(queries, keys, bias, k, tau, finish, floor);
}

inline at::ScalarType compute_type(const at::Tensor& a, const at::Tensor& b) {
  // As reference.compute_dtype: float64 if an input is float64, else float32.
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

inline void check_pair(const char* op, const at::Tensor& q, const char* qn, const at::Tensor& m, const char* mn) {
  TORCH_CHECK(q.device().is_cpu() && m.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 2 && m.dim() == 2, op, ": ", qn, " and ", mn, " must be 2-D");
  TORCH_CHECK(q.size(1) == m.size(1), op, ": ", qn, " and ", mn, " must have the same D");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()) && at::isFloatingType(m.scalar_type()), op,
              ": embeddings must be floating point");
}

}  // namespace topk
}  // namespace llp_fast
