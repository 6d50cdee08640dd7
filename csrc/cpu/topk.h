// Fused CPU top-K shared by csrc/cpu/propagate_cpu.cpp (docs/method.md §1.2) and
// csrc/cpu/local_density_cpu.cpp (docs/method.md §1.1).
//
// Both ops need, per query row i, the k largest of
//     s_ij = (q_i . m_j) * (1 / tau) - bias_j
// over the key rows j (propagate: bias = log_rho or 0; local_density: bias = 0, or +inf outside the
// pool so that those keys score -inf and are never selected). The naive path materialises a score
// tile, adds the bias in another pass and calls topk (a partial sort of every row); here:
//   1. a (ROWS x COLS) score tile comes from at::mm (BLAS) into a per-thread buffer that stays in L2
//      (always the full tile: the last blocks are padded, so a score never depends on the chunking);
//   2. one pass over the tile scales, subtracts the bias, and compares each score with the row's
//      running k-th best (its threshold). Once a row has seen a few hundred keys the threshold
//      rejects almost every score, so the pass is a vectorised compare with a rare scalar branch;
//   3. candidates that beat the threshold go to a small per-row buffer of 2k+64 entries; when it is
//      full it is cut back to the best k (nth_element) and the threshold rises to the k-th value;
//   4. at the end the best k are sorted and handed to the op's finisher (the vote or the
//      log-sum-exp), so neither the Q x M score matrix nor a per-row sort of M keys ever exists.
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
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <utility>
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

template <typename acc_t>
struct Candidate {
  acc_t value;
  int64_t index;
};

// Best first; among equal scores the lower key index first, so that the selection is
// deterministic. (The reference's topk leaves ties unspecified; tests compare scores and votes.)
template <typename acc_t>
inline bool better(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// The running top-k of one query row.
template <typename acc_t>
struct RowTopK {
  Candidate<acc_t>* buf;  // capacity `cap`
  int64_t count;
  acc_t floor;      // scores <= floor never matter (known from elsewhere: -inf, or see fused_topk)
  acc_t threshold;  // a score must be > threshold to matter (the k-th best once known, else the floor)

  // Keep the best k; the threshold becomes the k-th best (scores equal to it lose: they would be
  // later in index order, and the tie rule above prefers the earlier index), or stays the floor.
  void shrink(int64_t k) {
    if (count <= k) return;
    std::nth_element(buf, buf + (k - 1), buf + count, better<acc_t>);
    count = k;
    threshold = std::max(floor, buf[k - 1].value);
  }
};

// Run the fused top-k of queries x keys and call finish(row, sorted candidates, n) for each query
// row, where n = min(k, number of keys with a score above the row's floor). `bias` has one acc_t
// entry per key. `floor` (optional, one per query row) starts each row's threshold: a score at or
// below it is known not to matter (topk_scores passes just below the k-th best of an earlier call,
// so that a stream of chunks does not learn the threshold again in every chunk).
template <typename acc_t, typename Finish>
void fused_topk(const at::Tensor& queries, const at::Tensor& keys, const acc_t* bias, int64_t k, double tau,
                const Finish& finish, const acc_t* floor = nullptr) {
  const at::ScalarType cdt = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t nq = queries.size(0), nk = keys.size(0), dim = queries.size(1);
  if (nq == 0) return;
  const Tile tile = tile_for(nq);
  // Every product is a full (rows x cols) tile, the last query and key blocks padded with zero
  // rows: BLAS then computes each score with the same instructions wherever a key falls, so a
  // key's score does not depend on how the caller chunked the keys (topk_scores merges chunked
  // calls exactly; MKL's small-matrix paths round differently from its tiled ones).
  const int64_t rows = tile.rows;
  const int64_t cols = tile.cols;
  const int64_t cap = 2 * k + 64;
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
    std::vector<Candidate<acc_t>> cand(static_cast<size_t>(rows * cap));
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
        const acc_t* bias_c = bias + c0;

        for (int64_t r = 0; r < nr; ++r) {
          const acc_t* srow = s + r * cols;
          RowTopK<acc_t>& t = top[r];
          // Blocks of 32 columns: a branch-free (vectorisable) pass that scales, biases and asks
          // "does any score beat the threshold?" without storing anything, then a scalar pass,
          // recomputing the same scores, only for the rare block that has a candidate.
          constexpr int64_t kStep = 32;
          for (int64_t j0 = 0; j0 < nc; j0 += kStep) {
            const int64_t j1 = std::min(nc, j0 + kStep);
            const acc_t thr = t.threshold;
            int hit = 0;
            for (int64_t j = j0; j < j1; ++j) hit |= (srow[j] * inv_tau - bias_c[j]) > thr;
            if (!hit) continue;
            for (int64_t j = j0; j < j1; ++j) {
              const acc_t x = srow[j] * inv_tau - bias_c[j];
              if (x > t.threshold) {
                t.buf[t.count++] = Candidate<acc_t>{x, c0 + j};
                if (t.count == cap) t.shrink(k);
              }
            }
          }
        }
      }

      for (int64_t r = 0; r < nr; ++r) {
        RowTopK<acc_t>& t = top[r];
        t.shrink(k);
        std::sort(t.buf, t.buf + t.count, better<acc_t>);
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
