// llp_fast::propagate on the CPU (docs/method.md §1.2): the fused top-K of csrc/cpu/topk.h ranks the
// labeled points by v . m_i / tau - log_rho_i, and the K best vote.
#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../llp_fast.h"
#include "topk.h"

namespace llp_fast {
namespace {

using topk::Candidate;

// docs/method.md §1.2's vote over the k best (sorted descending): w = exp(score - best), summed per class;
// the label is the class with the largest sum, ties to the lowest class id; the confidence is its
// share. Classes are collected by a stable sort so each class's weights are added in score order,
// as the reference's scatter_add does; no num_classes-sized buffer is needed.
template <typename acc_t>
void vote(const Candidate<acc_t>* c, int64_t n, const int64_t* classes, std::vector<std::pair<int64_t, acc_t>>& cw,
          int64_t* label, acc_t* conf) {
  if (n == 0) {  // no key at all: cannot happen through the public API (k >= 1, M >= 1)
    *label = 0;
    *conf = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  cw.resize(n);
  const acc_t top = c[0].value;
  for (int64_t i = 0; i < n; ++i) cw[i] = {classes[c[i].index], std::exp(c[i].value - top)};
  std::stable_sort(cw.begin(), cw.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  acc_t total = 0, best = -1;
  int64_t best_class = 0;
  for (int64_t i = 0; i < n;) {
    const int64_t cls = cw[i].first;
    acc_t w = 0;
    for (; i < n && cw[i].first == cls; ++i) w += cw[i].second;
    total += w;
    if (w > best) {  // strict: an equal later (higher) class does not replace the lower one
      best = w;
      best_class = cls;
    }
  }
  *label = best_class;
  *conf = best / total;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> propagate_cpu(const at::Tensor& queries, const at::Tensor& labeled,
                                                 const at::Tensor& labeled_classes,
                                                 const std::optional<at::Tensor>& log_rho, int64_t k,
                                                 double tau, int64_t num_classes) {
  topk::check_pair("propagate_cpu", queries, "queries", labeled, "labeled");
  const int64_t nq = queries.size(0), m = labeled.size(0);
  TORCH_CHECK(labeled_classes.dim() == 1 && labeled_classes.size(0) == m,
              "propagate_cpu: labeled_classes must be (M,)");
  TORCH_CHECK(k >= 1 && k <= m, "propagate_cpu: k must lie in [1, M]");
  TORCH_CHECK(tau > 0, "propagate_cpu: tau must be > 0");
  TORCH_CHECK(num_classes >= 1, "propagate_cpu: num_classes must be >= 1");
  const at::ScalarType cdt = topk::compute_type(queries, labeled);
  const at::Tensor classes = labeled_classes.to(at::kLong).contiguous();
  at::Tensor bias;
  if (log_rho.has_value() && log_rho->defined()) {
    TORCH_CHECK(log_rho->dim() == 1 && log_rho->size(0) == m, "propagate_cpu: log_rho must be (M,)");
    bias = log_rho->detach().to(cdt).contiguous();
  } else {
    bias = at::zeros({m}, queries.options().dtype(cdt));  // NoDW: no density term
  }
  at::Tensor labels = at::empty({nq}, queries.options().dtype(at::kLong));
  at::Tensor conf = at::empty({nq}, queries.options().dtype(cdt));

  AT_DISPATCH_FLOATING_TYPES(cdt, "propagate_cpu", [&] {
    const int64_t* cls = classes.const_data_ptr<int64_t>();
    int64_t* lab = labels.data_ptr<int64_t>();
    scalar_t* cf = conf.data_ptr<scalar_t>();
    topk::fused_topk<scalar_t>(queries, labeled, bias.const_data_ptr<scalar_t>(), k, tau,
                         [&](int64_t row, const Candidate<scalar_t>* c, int64_t n) {
                           // Scratch per thread, reused across rows (a thread runs one task at a time).
                           thread_local std::vector<std::pair<int64_t, scalar_t>> cw;
                           vote<scalar_t>(c, n, cls, cw, lab + row, cf + row);
                         });
  });
  return {labels, conf};
}

}  // namespace llp_fast
