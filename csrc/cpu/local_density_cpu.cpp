// llp_fast::local_density on the CPU (docs/method.md §1.1): the log-sum-exp of each labeled point's T
// best similarities to the pool, from the fused top-K of csrc/cpu/topk.h.
#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../llp_fast.h"
#include "topk.h"

namespace llp_fast {

using topk::Candidate;

at::Tensor local_density_cpu(const at::Tensor& labeled, const at::Tensor& bank, int64_t t, double tau,
                             const std::optional<at::Tensor>& pool_mask) {
  topk::check_pair("local_density_cpu", labeled, "labeled", bank, "bank");
  const int64_t m = labeled.size(0), n = bank.size(0);
  TORCH_CHECK(t >= 1 && t <= n, "local_density_cpu: t must lie in [1, N]");
  TORCH_CHECK(tau > 0, "local_density_cpu: tau must be > 0");
  const at::ScalarType cdt = topk::compute_type(labeled, bank);
  at::Tensor bias = at::zeros({n}, labeled.options().dtype(cdt));
  if (pool_mask.has_value() && pool_mask->defined()) {
    TORCH_CHECK(pool_mask->dim() == 1 && pool_mask->size(0) == n && pool_mask->scalar_type() == at::kBool,
                "local_density_cpu: pool_mask must be (N,) bool");
    // Keys outside the pool get bias +inf, i.e. score -inf: never above a threshold, never chosen,
    // exactly like the reference's masked_fill(-inf). The bank itself is not copied.
    bias.masked_fill_(pool_mask->logical_not(), std::numeric_limits<double>::infinity());
  }
  at::Tensor out = at::empty({m}, labeled.options().dtype(cdt));

  AT_DISPATCH_FLOATING_TYPES(cdt, "local_density_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    topk::fused_topk<scalar_t>(labeled, bank, bias.const_data_ptr<scalar_t>(), t, tau,
                         [&](int64_t row, const Candidate<scalar_t>* c, int64_t cnt) {
                           // log-sum-exp of the t best, max first (torch.logsumexp's formula).
                           if (cnt == 0) {
                             o[row] = -std::numeric_limits<scalar_t>::infinity();
                             return;
                           }
                           const scalar_t top = c[0].value;
                           scalar_t sum = 0;
                           for (int64_t i = 0; i < cnt; ++i) sum += std::exp(c[i].value - top);
                           o[row] = top + std::log(sum);
                         });
  });
  return out;
}

}  // namespace llp_fast
