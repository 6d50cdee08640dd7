// The fused CPU top-K: the selection step of llp_fast::topk_scores (csrc/cpu/topk_scores_cpu.cpp), which
// is the only selection in the package (local_density and propagate finish its output in Python,
// docs/method.md §1.1, §1.2).
//
// Per query row i it finds the k largest
//     s_ij = (q_i . key_j) * (1 / tau) + bias_j
// over the key rows j (bias -inf: a masked key, never chosen) without the Q x N score matrix and
// without sorting a row of N scores:
//   1. a (ROWS x COLS) score tile comes from one BLAS call into a per-thread buffer that stays in
//      L2 (always the full tile: the last blocks are padded, so a score never depends on how the
//      caller chunked the keys);
//   2. one pass over each row of the tile scales, adds the bias and asks, 64 columns at a time,
//      whether any score beats the row's running k-th best (its threshold); only a block that has
//      one is read again, to append its candidates to the row's buffer without a branch. Once a
//      row has seen a few hundred keys the threshold rejects almost every block. This pass is
//      compiled for AVX-512, AVX2 and baseline x86-64 and chosen at load time (GCC's
//      target_clones: an ifunc resolver reads the CPU's features; never -march=native);
//   3. a row's buffer holds 2k + 64 candidates; when it is full it is cut back to the best k
//      (nth_element) and the threshold rises to the k-th value;
//   4. at the end the best k are sorted and handed to the caller's finish.
// A float candidate is one 64-bit word: the score's bits mapped so that a larger score is a smaller
// word, above the key's index within the call. Sorting words ascending orders candidates by score
// descending, equal scores by the lower index (the op's tie rule), with the integer compares of
// nth_element and sort, which is what keeps k = 1000 cheap. float64 keeps a (value, index) pair.
// Parallelism: at::parallel_for over blocks of query rows; BLAS runs single-threaded inside each
// task (nested OpenMP), which is what keeps every core busy on its own L2-resident tile.
// Extra memory: O(threads * ROWS * (COLS + 2k + 64)) for the tiles and candidate buffers, plus O(Q)
// for the outputs; a query or key block is converted per task when its dtype is not the compute one.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace llp_fast {
namespace topk {

// Tile shape. ROWS x COLS floats = 512 KB for the tile; with the 256-row query block and the
// 512-row key block (128 KB + 256 KB at D = 128) it fits one core's L2 on current server CPUs
// (1-2 MB). 256 x 512 came out of a sweep over {64..512} x {512..4096}, counted in process CPU
// time so that a shared machine does not skew it: tall blocks amortise each key block over more rows.
// Fewer rows per block when there are too few queries to give every thread a block.
// LLP_FAST_CPU_TILE="rows,cols" overrides both (for tuning on other machines, and tests).
struct Tile {
  int64_t rows = 256;
  int64_t cols = 512;
};

inline Tile tile_for(int64_t nq) {
  Tile t;
  if (const char* s = std::getenv("LLP_FAST_CPU_TILE")) {
    long r = 0, c = 0;
    if (std::sscanf(s, "%ld,%ld", &r, &c) == 2 && r > 0 && c > 0) {
      t.rows = r;
      t.cols = c;
      return t;
    }
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  t.rows = std::max<int64_t>(16, std::min(t.rows, (nq + threads - 1) / threads));
  return t;
}

constexpr int64_t kBlock = 32;  // columns per "any candidate here?" test
constexpr int64_t kMaxKeys = int64_t(1) << 32;  // a float candidate's index has 32 bits

// One candidate. Word<float> packs it into 64 bits (see the top of the file); Word<double> is a pair.
template <typename acc_t>
struct Word;

template <>
struct Word<float> {
  using type = uint64_t;
  static type make(float x, int64_t index) {
    x += 0.0f;  // -0 -> +0: equal scores must give equal bits
    uint32_t u;
    std::memcpy(&u, &x, 4);
    // Ascending with x: a negative float's bits all flipped, a positive one's sign bit set.
    const uint32_t up = u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
    return (static_cast<uint64_t>(~up) << 32) | static_cast<uint32_t>(index);
  }
  static float value(type w) {
    const uint32_t up = ~static_cast<uint32_t>(w >> 32);
    const uint32_t u = (up & 0x80000000u) ? (up & 0x7fffffffu) : ~up;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
  }
  static int64_t index(type w) { return static_cast<int64_t>(w & 0xffffffffu); }
  struct Better {  // a functor, not a function pointer: std::sort and nth_element inline it
    bool operator()(type a, type b) const { return a < b; }
  };
};

template <>
struct Word<double> {
  struct type {
    double v;
    int64_t i;
  };
  static type make(double x, int64_t index) { return {x + 0.0, index}; }
  static double value(const type& w) { return w.v; }
  static int64_t index(const type& w) { return w.i; }
  struct Better {
    bool operator()(const type& a, const type& b) const { return a.v > b.v || (a.v == b.v && a.i < b.i); }
  };
};

// Step 2 for one row: scans x_j = s[j] * inv_tau + bias[j] for j in [j, n), appending every
// x_j > thr to out[*count ...] (as Word<float> with index base + j), and returns where it stopped:
// n, or earlier once fewer than kBlock free slots remain (the caller then shrinks the buffer).
// The multiply and the add round separately (-ffp-contract=off), as the reference's mul_ and add_.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define LLP_FAST_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LLP_FAST_ISA_CLONES
#endif

LLP_FAST_ISA_CLONES int64_t scan_row_f32(const float* s, const float* bias, int64_t j, int64_t n, float inv_tau,
                                         float thr, int64_t base, uint64_t* out, int64_t* count, int64_t cap);
LLP_FAST_ISA_CLONES int64_t scan_row_f64(const double* s, const double* bias, int64_t j, int64_t n, double inv_tau,
                                         double thr, int64_t base, Word<double>::type* out, int64_t* count,
                                         int64_t cap);

inline int64_t scan_row(const float* s, const float* bias, int64_t j, int64_t n, float inv_tau, float thr,
                        int64_t base, uint64_t* out, int64_t* count, int64_t cap) {
  return scan_row_f32(s, bias, j, n, inv_tau, thr, base, out, count, cap);
}
inline int64_t scan_row(const double* s, const double* bias, int64_t j, int64_t n, double inv_tau, double thr,
                        int64_t base, Word<double>::type* out, int64_t* count, int64_t cap) {
  return scan_row_f64(s, bias, j, n, inv_tau, thr, base, out, count, cap);
}

// Radix selection and sort of float candidates (64-bit words, smaller = better): linear passes over
// 8-bit digits of (word - smallest word), no data-dependent branches, where nth_element and sort spend
// their time in mispredicted compares once k is in the hundreds. `tmp` is scratch of n words.
inline int bit_length(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }

// Moves the k smallest of buf[0, n) to buf[0, k), in no particular order (1 <= k < n).
inline void radix_select(uint64_t* buf, int64_t n, int64_t k, uint64_t* tmp) {
  while (k < n) {
    uint64_t lo = buf[0], hi = buf[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = std::min(lo, buf[i]);
      hi = std::max(hi, buf[i]);
    }
    const int shift = std::max(0, bit_length(hi - lo) - 8);
    int64_t count[257] = {0};
    for (int64_t i = 0; i < n; ++i) ++count[((buf[i] - lo) >> shift) + 1];
    int64_t d = 0;  // the digit of the k-th smallest: count[d] < k <= count[d + 1] (cumulative)
    for (int64_t b = 1; b <= 256; ++b) {
      count[b] += count[b - 1];
      if (count[b] < k) d = b;
    }
    const int64_t below = count[d], at = count[d + 1] - below;
    // buf <- [digit < d | digit == d], the rest dropped; then select within the digit-d words.
    int64_t w = 0, e = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t x = buf[i];
      const int64_t dig = static_cast<int64_t>((x - lo) >> shift);
      buf[w] = x;
      w += dig < d;
      tmp[e] = x;
      e += dig == d;
    }
    std::memcpy(buf + below, tmp, static_cast<size_t>(at) * sizeof(uint64_t));
    if (shift == 0 || at == k - below) return;  // the digit-d words are all equal, or all needed
    buf += below;
    k -= below;
    n = at;
  }
}

// Sorts buf[0, n) ascending: least significant digit first, 8 bits a pass, over the bits in which the
// words differ.
inline void radix_sort(uint64_t* buf, int64_t n, uint64_t* tmp) {
  if (n < 64) {
    std::sort(buf, buf + n);
    return;
  }
  uint64_t lo = buf[0], hi = buf[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, buf[i]);
    hi = std::max(hi, buf[i]);
  }
  const int bits = bit_length(hi - lo);
  uint64_t *src = buf, *dst = tmp;
  for (int shift = 0; shift < bits; shift += 8) {
    int64_t count[257] = {0};
    for (int64_t i = 0; i < n; ++i) ++count[(((src[i] - lo) >> shift) & 0xff) + 1];
    for (int b = 1; b <= 256; ++b) count[b] += count[b - 1];
    for (int64_t i = 0; i < n; ++i) dst[count[((src[i] - lo) >> shift) & 0xff]++] = src[i];
    std::swap(src, dst);
  }
  if (src != buf) std::memcpy(buf, src, static_cast<size_t>(n) * sizeof(uint64_t));
}

template <typename word_t>
inline void select_best(word_t* buf, int64_t n, int64_t k, word_t* tmp, typename Word<double>::Better better) {
  (void)tmp;
  std::nth_element(buf, buf + (k - 1), buf + n, better);
}
inline void select_best(uint64_t* buf, int64_t n, int64_t k, uint64_t* tmp, Word<float>::Better better) {
  if (n < 256) {
    std::nth_element(buf, buf + (k - 1), buf + n, better);
  } else {
    radix_select(buf, n, k, tmp);
  }
}
template <typename word_t>
inline void sort_best(word_t* buf, int64_t n, word_t* tmp, typename Word<double>::Better better) {
  (void)tmp;
  std::sort(buf, buf + n, better);
}
inline void sort_best(uint64_t* buf, int64_t n, uint64_t* tmp, Word<float>::Better) { radix_sort(buf, n, tmp); }

// The running top-k of one query row.
template <typename acc_t>
struct RowTopK {
  using W = Word<acc_t>;
  typename W::type* buf;  // capacity 2k + kBlock
  int64_t count;
  acc_t floor;      // scores <= floor never matter (known from elsewhere: -inf, or see fused_topk)
  acc_t threshold;  // a score must be > threshold to matter (the k-th best once known, else the floor)

  // Keep the best k; the threshold becomes the k-th best (scores equal to it lose: they come later
  // in index order, and the tie rule prefers the earlier index), or stays the floor.
  void shrink(int64_t k, typename W::type* tmp) {
    if (count <= k) return;
    select_best(buf, count, k, tmp, typename W::Better());
    count = k;
    typename W::type worst = buf[0];
    for (int64_t i = 1; i < k; ++i) worst = typename W::Better()(worst, buf[i]) ? buf[i] : worst;
    threshold = std::max(floor, W::value(worst));
  }
};

// Runs the fused top-k of queries x keys and calls finish(row, sorted words, n) for each query row,
// where n = min(k, number of keys scoring above the row's floor) and a word's index is the key's
// row in `keys`. `bias` has one acc_t per key (added). `floor` (optional, one per query row) starts
// each row's threshold: a score at or below it is known not to matter (topk_scores passes just
// below the k-th best of an earlier call, so that a stream of chunks does not learn the threshold
// again in every chunk).
template <typename acc_t, typename Finish>
void fused_topk(const at::Tensor& queries, const at::Tensor& keys, const acc_t* bias, int64_t k, double tau,
                const Finish& finish, const acc_t* floor = nullptr) {
  using W = Word<acc_t>;
  const at::ScalarType cdt = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t nq = queries.size(0), nk = keys.size(0), dim = queries.size(1);
  constexpr bool packed = std::is_same<acc_t, float>::value;
  TORCH_CHECK(!packed || nk < kMaxKeys, "topk_scores_cpu: at most 2**32 - 1 keys a call");
  if (nq == 0) return;
  const Tile tile = tile_for(nq);
  // Every product is a full (rows x cols) tile, the last query and key blocks padded with zero
  // rows: BLAS then computes each score with the same instructions wherever a key falls, so a
  // key's score does not depend on how the caller chunked the keys (topk_scores merges chunked
  // calls exactly; MKL's small-matrix paths round differently from its tiled ones).
  const int64_t rows = tile.rows;
  const int64_t cols = tile.cols;
  const int64_t cap = 2 * k + kBlock;
  // The reference multiplies by the Python float 1/tau rounded to the compute type; so do we, so
  // that both see the same scores up to the matmul's summation order.
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  // Full blocks already in the compute dtype are used in place (views, no copy); others are
  // converted (or padded) one block at a time inside the task, so a bf16 bank is never copied whole.
  const bool q_direct = queries.scalar_type() == cdt;
  const bool k_direct = keys.scalar_type() == cdt;
  const int64_t blocks = (nq + rows - 1) / rows;

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const auto opts = queries.options().dtype(cdt);
    at::Tensor scores = at::empty({rows, cols}, opts);
    std::vector<typename W::type> cand(static_cast<size_t>(rows * cap));
    std::vector<typename W::type> scratch(static_cast<size_t>(cap));
    std::vector<RowTopK<acc_t>> top(rows);
    at::Tensor q_buf = at::zeros({rows, dim}, opts);
    at::Tensor k_buf = at::zeros({cols, dim}, opts);

    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rows;
      const int64_t nr = std::min(rows, nq - r0);
      at::Tensor q = queries.detach().narrow(0, r0, nr);  // see aggregation_loss_cpu.cpp on detach()
      if (!q_direct || nr < rows) {
        q_buf.narrow(0, 0, nr).copy_(q);
        q_buf.narrow(0, nr, rows - nr).zero_();
        q = q_buf;
      }
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t f = floor != nullptr ? floor[r0 + r] : -std::numeric_limits<acc_t>::infinity();
        top[r] = RowTopK<acc_t>{cand.data() + r * cap, 0, f, f};
      }

      for (int64_t c0 = 0; c0 < nk; c0 += cols) {
        const int64_t nc = std::min(cols, nk - c0);
        at::Tensor kc = keys.detach().narrow(0, c0, nc);
        if (!k_direct || nc < cols) {
          k_buf.narrow(0, 0, nc).copy_(kc);
          k_buf.narrow(0, nc, cols - nc).zero_();
          kc = k_buf;
        }
        at::mm_out(scores, q, kc.t());
        const acc_t* s = scores.const_data_ptr<acc_t>();
        for (int64_t r = 0; r < nr; ++r) {
          RowTopK<acc_t>& t = top[r];
          for (int64_t j = 0; j < nc;) {
            j = scan_row(s + r * cols, bias + c0, j, nc, inv_tau, t.threshold, c0, t.buf, &t.count, cap);
            if (j < nc) t.shrink(k, scratch.data());
          }
        }
      }

      for (int64_t r = 0; r < nr; ++r) {
        RowTopK<acc_t>& t = top[r];
        t.shrink(k, scratch.data());
        sort_best(t.buf, t.count, scratch.data(), typename W::Better());
        finish(r0 + r, t.buf, t.count);
      }
    }
  });
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
