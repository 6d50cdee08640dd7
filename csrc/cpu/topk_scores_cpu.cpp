// llp_fast::topk_scores on the CPU: the k best q . key_j / tau + bias_j of each query over the keys
// with key_mask set, from the fused top-K of csrc/cpu/topk.h, merged with the running top-k of an
// earlier call (init) and written sorted by value descending, ties to the lower index; rows with
// fewer than k candidates are padded with -inf and index -1.
#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../llp_fast.h"
#include "topk.h"

namespace llp_fast {

using topk::Candidate;

std::tuple<at::Tensor, at::Tensor> topk_scores_cpu(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                                   double tau, const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& key_mask,
                                                   const std::optional<at::Tensor>& init_values,
                                                   const std::optional<at::Tensor>& init_indices,
                                                   int64_t index_offset) {
  topk::check_pair("topk_scores_cpu", queries, "queries", keys, "keys");
  const int64_t nq = queries.size(0), n = keys.size(0);
  TORCH_CHECK(k >= 1, "topk_scores_cpu: k must be >= 1");
  TORCH_CHECK(tau > 0, "topk_scores_cpu: tau must be > 0");
  TORCH_CHECK(index_offset >= 0, "topk_scores_cpu: index_offset must be >= 0");
  const at::ScalarType cdt = topk::compute_type(queries, keys);
  // fused_topk subtracts its bias: pass -bias, and +inf (score -inf, never chosen) off the mask.
  at::Tensor minus_bias = at::zeros({n}, queries.options().dtype(cdt));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "topk_scores_cpu: bias must be (N,)");
    minus_bias.sub_(bias->detach().to(cdt));
  }
  if (key_mask.has_value() && key_mask->defined()) {
    TORCH_CHECK(key_mask->dim() == 1 && key_mask->size(0) == n && key_mask->scalar_type() == at::kBool,
                "topk_scores_cpu: key_mask must be (N,) bool");
    minus_bias.masked_fill_(key_mask->logical_not(), std::numeric_limits<double>::infinity());
  }
  const bool has_init = init_values.has_value() && init_values->defined();
  at::Tensor init_v, init_i;
  if (has_init) {
    TORCH_CHECK(init_indices.has_value() && init_indices->defined(),
                "topk_scores_cpu: init_values and init_indices go together");
    TORCH_CHECK(init_values->dim() == 2 && init_values->size(0) == nq && init_values->size(1) == k &&
                    init_indices->sizes() == init_values->sizes(),
                "topk_scores_cpu: init_values and init_indices must be (Q, k)");
    init_v = init_values->detach().to(cdt).contiguous();
    init_i = init_indices->detach().to(at::kLong).contiguous();
  }
  // Each row's floor: just below the earlier call's k-th best (when it has k), so that only scores
  // that can still enter the top k (or tie its k-th, which the index may decide) are kept.
  at::Tensor floor;
  if (has_init) {
    const at::Tensor kth = std::get<0>(init_v.min(1));
    const at::Tensor full = std::get<0>(init_i.min(1)).ge(0);
    floor = at::where(full, at::nextafter(kth, at::full_like(kth, -std::numeric_limits<double>::infinity())),
                      at::full_like(kth, -std::numeric_limits<double>::infinity()))
                .contiguous();
  }
  at::Tensor values = at::empty({nq, k}, queries.options().dtype(cdt));
  at::Tensor indices = at::empty({nq, k}, queries.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(cdt, "topk_scores_cpu", [&] {
    scalar_t* out_v = values.data_ptr<scalar_t>();
    int64_t* out_i = indices.data_ptr<int64_t>();
    const scalar_t* in_v = has_init ? init_v.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* in_i = has_init ? init_i.const_data_ptr<int64_t>() : nullptr;
    topk::fused_topk<scalar_t>(
        queries, keys, minus_bias.const_data_ptr<scalar_t>(), k, tau,
        [&](int64_t row, const Candidate<scalar_t>* c, int64_t cnt) {
          // This call's candidates (global indices) and the earlier call's, best k of the two.
          thread_local std::vector<Candidate<scalar_t>> merged;
          merged.clear();
          for (int64_t i = 0; i < cnt; ++i) merged.push_back({c[i].value, c[i].index + index_offset});
          if (has_init) {
            for (int64_t i = 0; i < k; ++i) {
              const int64_t j = in_i[row * k + i];
              if (j >= 0) merged.push_back({in_v[row * k + i], j});  // -1: padding
            }
          }
          const int64_t keep = std::min<int64_t>(k, static_cast<int64_t>(merged.size()));
          std::partial_sort(merged.begin(), merged.begin() + keep, merged.end(), topk::better<scalar_t>);
          for (int64_t i = 0; i < k; ++i) {
            const bool real = i < keep;
            out_v[row * k + i] = real ? merged[i].value : -std::numeric_limits<scalar_t>::infinity();
            out_i[row * k + i] = real ? merged[i].index : -1;
          }
        },
        has_init ? floor.const_data_ptr<scalar_t>() : nullptr);
  });
  return {values, indices};
}

}  // namespace llp_fast
