// Fused CPU forward and backward of llp_fast::aggregation_loss (docs/method.md §1.3):
//   lse_all_b = logsumexp_j (v_b . m_j / tau)
//   lse_pos_b = logsumexp_{j : l_j = target_b} (v_b . m_j / tau)
//   loss_b    = lse_all_b - lse_pos_b
//   grad_b    = (1/tau) sum_j (a_b exp(s_bj - lse_all_b) + [l_j = t_b] c_b exp(s_bj - lse_pos_b)) m_j
// (aggregation_loss_backward: a = coef_all, c = coef_pos, as reference.aggregation_loss_backward_ref).
//
// The reference streams (B x N) tiles too, but spends most of its time outside the matmul: a
// logsumexp over the full tile, a B x N label mask, a masked_fill and a second logsumexp. Here each
// thread owns a range of bank columns and streams it through one L2-sized tile:
//   - scores from at::mm, scaled by 1/tau as the reference does;
//   - all rows: an online log-sum-exp per row, the exp done by ATen's vectorised kernel on the tile;
//   - positives: found by comparing labels (no mask tensor), each with its own online log-sum-exp,
//     so a positive far below the row maximum is still exact;
//   - backward: the weight tile replaces the scores in place and one at::addmm_ adds W @ M_chunk.
// Per-thread partial results (O(B) forward, O(B x D) backward) are merged in a fixed order.
// Extra memory: O(threads * (B * COLS + B * D)), never O(B * N).
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../llp_fast.h"

namespace llp_fast {
namespace {

constexpr int64_t kCols = 512;  // bank rows per tile: B x 512 floats = 512 KB at B = 256
constexpr int64_t kRows = 256;  // batch rows per tile (B is usually <= 256: one row block)

at::ScalarType compute_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& v, const at::Tensor& bank, const at::Tensor& bank_labels,
                  const at::Tensor& targets) {
  TORCH_CHECK(v.device().is_cpu() && bank.device().is_cpu(), "aggregation_loss_cpu: tensors must be on the CPU");
  TORCH_CHECK(v.dim() == 2 && bank.dim() == 2 && v.size(1) == bank.size(1),
              "aggregation_loss_cpu: v (B, D) and bank (N, D) must share D");
  TORCH_CHECK(bank_labels.dim() == 1 && bank_labels.size(0) == bank.size(0), "aggregation_loss_cpu: bank_labels (N,)");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == v.size(0), "aggregation_loss_cpu: targets (B,)");
}

// Streams the bank in column ranges over threads. For each (row block, column chunk) it calls
// tile_fn(part, r0, nr, c0, nc, scores) with the scaled scores (nr x nc, contiguous) in a per-thread
// buffer; `part` is the calling task's partial-result slot (one per task, merged by the caller).
template <typename acc_t, typename Part, typename TileFn>
std::vector<Part> stream_tiles(const at::Tensor& v, const at::Tensor& bank, double tau, const Part& init,
                               const TileFn& tile_fn) {
  const at::ScalarType cdt = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t nb = v.size(0), n = bank.size(0), d = v.size(1);
  // detach(): at::parallel_for workers do not inherit the below-autograd dispatch state, and
  // mm_out refuses inputs that require grad there (the op's autograd is registered in Python).
  const at::Tensor vc = v.detach().to(cdt).contiguous();
  const bool k_direct = bank.scalar_type() == cdt;
  const acc_t inv_tau = static_cast<acc_t>(1.0 / tau);
  const int64_t chunks = (n + kCols - 1) / kCols;
  const int64_t rows = std::min(kRows, nb);
  std::vector<Part> parts(static_cast<size_t>(chunks));
  std::vector<char> used(static_cast<size_t>(chunks), 0);

  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    Part& part = parts[k0];
    part = init;
    used[k0] = 1;
    const auto opts = v.options().dtype(cdt);
    at::Tensor scores = at::empty({rows, kCols}, opts);
    at::Tensor k_buf = k_direct ? at::Tensor() : at::empty({kCols, d}, opts);
    for (int64_t kc = k0; kc < k1; ++kc) {
      const int64_t c0 = kc * kCols, nc = std::min(kCols, n - c0);
      at::Tensor m = bank.detach().narrow(0, c0, nc);
      if (!k_direct) m = k_buf.narrow(0, 0, nc).copy_(m);
      for (int64_t r0 = 0; r0 < nb; r0 += rows) {
        const int64_t nr = std::min(rows, nb - r0);
        at::Tensor s = scores.view({-1}).narrow(0, 0, nr * nc).view({nr, nc});
        at::mm_out(s, vc.narrow(0, r0, nr), m.t());
        s.mul_(inv_tau);  // (v . m) * (1/tau), rounded as the reference's mul_(inv_tau)
        tile_fn(part, r0, nr, c0, nc, s, m);
      }
    }
  });
  std::vector<Part> out;
  for (int64_t i = 0; i < chunks; ++i) {
    if (used[i]) out.push_back(std::move(parts[i]));
  }
  return out;
}

template <typename acc_t>
struct LsePart {
  std::vector<acc_t> all_max, all_sum, pos_max, pos_sum;
};

// a <- logaddexp-merge of the online states (m1, s1) and (m2, s2), where value = m + log(s).
template <typename acc_t>
inline void merge_lse(acc_t& m1, acc_t& s1, acc_t m2, acc_t s2) {
  if (s2 == 0) return;
  if (s1 == 0) {
    m1 = m2;
    s1 = s2;
  } else if (m2 > m1) {
    s1 = s1 * std::exp(m1 - m2) + s2;
    m1 = m2;
  } else {
    s1 += s2 * std::exp(m2 - m1);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregation_loss_cpu(const at::Tensor& v, const at::Tensor& bank,
                                                                    const at::Tensor& bank_labels,
                                                                    const at::Tensor& targets, double tau) {
  check_inputs(v, bank, bank_labels, targets);
  TORCH_CHECK(tau > 0, "aggregation_loss_cpu: tau must be > 0");
  const at::ScalarType cdt = compute_type(v, bank);
  const int64_t nb = v.size(0);
  const at::Tensor labels = bank_labels.to(at::kLong).contiguous();
  const at::Tensor tgt = targets.to(at::kLong).contiguous();
  at::Tensor lse_all = at::empty({nb}, v.options().dtype(cdt));
  at::Tensor lse_pos = at::empty({nb}, v.options().dtype(cdt));

  AT_DISPATCH_FLOATING_TYPES(cdt, "aggregation_loss_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const int64_t* tg = tgt.const_data_ptr<int64_t>();
    LsePart<acc_t> init{std::vector<acc_t>(nb, ninf), std::vector<acc_t>(nb, 0), std::vector<acc_t>(nb, ninf),
                        std::vector<acc_t>(nb, 0)};
    auto parts = stream_tiles<acc_t>(
        v, bank, tau, init,
        [&](LsePart<acc_t>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, at::Tensor& s, const at::Tensor&) {
          acc_t* sp = s.data_ptr<acc_t>();
          // Positives first, on the raw scores: an online log-sum-exp per row with its own max.
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t t = tg[r0 + r];
            const acc_t* row = sp + r * nc;
            acc_t& pm = p.pos_max[r0 + r];
            acc_t& ps = p.pos_sum[r0 + r];
            for (int64_t j = 0; j < nc; ++j) {
              if (lab[c0 + j] != t) continue;
              const acc_t x = row[j];
              if (x > pm) {
                ps = ps * std::exp(pm - x) + 1;  // exp(-inf) = 0 on the first positive
                pm = x;
              } else {
                ps += std::exp(x - pm);
              }
            }
          }
          // All rows: tile max per row, then exp(s - running max) by ATen's vectorised kernel.
          at::Tensor tile_max = std::get<0>(s.max(1, /*keepdim=*/true));
          acc_t* tm = tile_max.data_ptr<acc_t>();
          for (int64_t r = 0; r < nr; ++r) {
            acc_t& am = p.all_max[r0 + r];
            acc_t& as = p.all_sum[r0 + r];
            if (tm[r] > am) {
              as = as * std::exp(am - tm[r]);
              am = tm[r];
            }
            tm[r] = am;
          }
          s.sub_(tile_max).exp_();
          at::Tensor sums = s.sum(1);
          const acc_t* su = sums.const_data_ptr<acc_t>();
          for (int64_t r = 0; r < nr; ++r) p.all_sum[r0 + r] += su[r];
        });
    // Merge the threads' states in a fixed (column) order.
    LsePart<acc_t> total = init;
    for (const auto& p : parts) {
      for (int64_t b = 0; b < nb; ++b) {
        merge_lse(total.all_max[b], total.all_sum[b], p.all_max[b], p.all_sum[b]);
        merge_lse(total.pos_max[b], total.pos_sum[b], p.pos_max[b], p.pos_sum[b]);
      }
    }
    acc_t* la = lse_all.data_ptr<acc_t>();
    acc_t* lp = lse_pos.data_ptr<acc_t>();
    for (int64_t b = 0; b < nb; ++b) {
      la[b] = total.all_sum[b] > 0 ? total.all_max[b] + std::log(total.all_sum[b]) : ninf;
      lp[b] = total.pos_sum[b] > 0 ? total.pos_max[b] + std::log(total.pos_sum[b]) : ninf;  // no positive
    }
  });
  return {at::sub(lse_all, lse_pos), lse_all, lse_pos};
}

at::Tensor aggregation_loss_backward_cpu(const at::Tensor& v, const at::Tensor& bank, const at::Tensor& bank_labels,
                                         const at::Tensor& targets, const at::Tensor& lse_all,
                                         const at::Tensor& lse_pos, const at::Tensor& coef_all,
                                         const at::Tensor& coef_pos, double tau) {
  check_inputs(v, bank, bank_labels, targets);
  TORCH_CHECK(tau > 0, "aggregation_loss_backward_cpu: tau must be > 0");
  const at::ScalarType cdt = compute_type(v, bank);
  const int64_t nb = v.size(0), d = v.size(1);
  // one value per row of v each: the tiles read nb of them (a (1,) coef_pos was read past its end)
  TORCH_CHECK(lse_all.numel() == nb && lse_pos.numel() == nb && coef_all.numel() == nb && coef_pos.numel() == nb,
              "aggregation_loss_backward_cpu: lse_all, lse_pos, coef_all and coef_pos must each hold one value per "
              "row of v (", nb, ")");
  const at::Tensor labels = bank_labels.to(at::kLong).contiguous();
  const at::Tensor tgt = targets.to(at::kLong).contiguous();
  const at::Tensor la = lse_all.detach().to(cdt).contiguous().view({nb, 1});
  const at::Tensor lp = lse_pos.detach().to(cdt).contiguous();
  const at::Tensor ca = coef_all.detach().to(cdt).contiguous().view({nb, 1});
  const at::Tensor cp = coef_pos.detach().to(cdt).contiguous();
  at::Tensor grad;

  AT_DISPATCH_FLOATING_TYPES(cdt, "aggregation_loss_backward_cpu", [&] {
    using acc_t = scalar_t;
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    const int64_t* tg = tgt.const_data_ptr<int64_t>();
    const acc_t* lpp = lp.const_data_ptr<acc_t>();
    const acc_t* cpp = cp.const_data_ptr<acc_t>();
    // Positive terms are computed from the raw scores, before the tile is turned into weights.
    struct Pos {
      int64_t at;
      acc_t w;
    };
    auto parts = stream_tiles<acc_t>(
        v, bank, tau, at::Tensor(),
        [&](at::Tensor& g, int64_t r0, int64_t nr, int64_t c0, int64_t nc, at::Tensor& s, const at::Tensor& m) {
          if (!g.defined()) g = at::zeros({nb, d}, v.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
          thread_local std::vector<Pos> pos;
          pos.clear();
          acc_t* sp = s.data_ptr<acc_t>();
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t t = tg[r0 + r];
            const acc_t c = cpp[r0 + r], l = lpp[r0 + r];
            for (int64_t j = 0; j < nc; ++j) {
              if (lab[c0 + j] == t) pos.push_back({r * nc + j, c * std::exp(sp[r * nc + j] - l)});
            }
          }
          // w = coef_all * exp(s - lse_all) + [positive] coef_pos * exp(s - lse_pos), as the reference.
          s.sub_(la.narrow(0, r0, nr)).exp_().mul_(ca.narrow(0, r0, nr));
          for (const Pos& q : pos) sp[q.at] += q.w;
          g.narrow(0, r0, nr).addmm_(s, m);
        });
    grad = at::zeros({nb, d}, v.options().dtype(cdt));
    for (const auto& g : parts) {
      if (g.defined()) grad.add_(g);
    }
    grad.div_(tau);
  });
  return grad.to(v.scalar_type());
}

}  // namespace llp_fast
