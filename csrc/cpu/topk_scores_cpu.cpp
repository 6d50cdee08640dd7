// llp_fast::topk_scores on the CPU: the k best q . key_j / tau + bias_j of each query over the keys
// with key_mask set, from the fused top-K of csrc/cpu/topk.h, merged with the running top-k of an
// earlier call (init) and written sorted by value descending, ties to the lower index; rows with
// fewer than k candidates are padded with -inf and index -1.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "../llp_fast.h"
#include "topk.h"

namespace llp_fast {
namespace {

// A finished candidate: its score and its global index.
template <typename acc_t>
struct Entry {
  acc_t value;
  int64_t index;
};

// The op's order: score descending, equal scores by the lower index.
template <typename acc_t>
inline bool before(const Entry<acc_t>& a, const Entry<acc_t>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

}  // namespace

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
  // The bias is added to each score; keys off the mask get -inf (never above a threshold, never chosen).
  at::Tensor key_bias = at::zeros({n}, queries.options().dtype(cdt));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "topk_scores_cpu: bias must be (N,)");
    key_bias.copy_(bias->detach());
  }
  if (key_mask.has_value() && key_mask->defined()) {
    TORCH_CHECK(key_mask->dim() == 1 && key_mask->size(0) == n && key_mask->scalar_type() == at::kBool,
                "topk_scores_cpu: key_mask must be (N,) bool");
    key_bias.masked_fill_(key_mask->logical_not(), -std::numeric_limits<double>::infinity());
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
                      at::full_like(kth, -std::numeric_limits<double>::infinity()));
    // A k-th best of 0 (or a denormal) puts the floor at a denormal, which reads as 0 where denormals
    // are flushed (torch.set_flush_denormal): a score of exactly 0 would not beat it. Any lower floor is
    // as exact, so take minus the smallest normal number there (as RowsF32::bound does).
    const double tiny = cdt == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
    floor = at::where(floor.abs().lt(tiny), at::full_like(floor, -tiny), floor).contiguous();
  }
  at::Tensor values = at::empty({nq, k}, queries.options().dtype(cdt));
  at::Tensor indices = at::empty({nq, k}, queries.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(cdt, "topk_scores_cpu", [&] {
    scalar_t* out_v = values.data_ptr<scalar_t>();
    int64_t* out_i = indices.data_ptr<int64_t>();
    const scalar_t* in_v = has_init ? init_v.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* in_i = has_init ? init_i.const_data_ptr<int64_t>() : nullptr;
    topk::fused_topk<scalar_t>(
        queries, keys, key_bias.const_data_ptr<scalar_t>(), k, tau,
        [&](int64_t row, const scalar_t* cv, const int64_t* ci, int64_t cnt) {
          scalar_t* ov = out_v + row * k;
          int64_t* oi = out_i + row * k;
          int64_t n = 0;
          if (!has_init) {  // this call's candidates are the answer
            for (; n < cnt; ++n) {
              ov[n] = cv[n];
              oi[n] = ci[n] + index_offset;
            }
            for (; n < k; ++n) {
              ov[n] = -std::numeric_limits<scalar_t>::infinity();
              oi[n] = -1;
            }
            return;
          }
          // The earlier call's candidates, in the op's order (an earlier call's output already is;
          // anything else is sorted first), then merged with this call's: the best k of the two.
          thread_local std::vector<Entry<scalar_t>> prev;
          prev.clear();
          for (int64_t i = 0; i < k; ++i) {
            const int64_t j = in_i[row * k + i];
            if (j >= 0) prev.push_back({in_v[row * k + i], j});  // -1: padding
          }
          if (!std::is_sorted(prev.begin(), prev.end(), before<scalar_t>))
            std::sort(prev.begin(), prev.end(), before<scalar_t>);
          int64_t a = 0, b = 0;
          const int64_t np = static_cast<int64_t>(prev.size());
          for (; n < k && (a < cnt || b < np); ++n) {
            Entry<scalar_t> e;
            if (a < cnt) e = {cv[a], ci[a] + index_offset};
            if (a < cnt && (b >= np || before<scalar_t>(e, prev[b]))) {
              ++a;
            } else {
              e = prev[b++];
            }
            ov[n] = e.value;
            oi[n] = e.index;
          }
          for (; n < k; ++n) {
            ov[n] = -std::numeric_limits<scalar_t>::infinity();
            oi[n] = -1;
          }
        },
        has_init ? floor.const_data_ptr<scalar_t>() : nullptr);
  });
  return {values, indices};
}

std::string cpu_paths() {
  std::string out = std::string("scan ") + topk::scan_f32_isa();
  out += topk::rescore_available() ? "; fused float32 tile avx512"
         : topk::fused_tile()        ? "; fused float32 tile avx2"
                                     : "; float32 tile from BLAS";
  const int bf16 = topk::bf16_source();
  out += bf16 == topk::kBf16Mkl   ? "; bf16 tiles from a bf16 GEMM"
         : bf16 == topk::kBf16Dot ? "; bf16 tiles from avx512bf16 dot products"
                                  : "; bf16 converted to float32";
  if (topk::approx_available())
    out += "; float32 k <= " + std::to_string(topk::kApproxSmallK) + " (<= " + std::to_string(topk::kApproxMaxK) +
           " against " + std::to_string(topk::kApproxKeysPerK) + " k keys) from a bf16 pass, refined exactly";
  return out;
}

}  // namespace llp_fast
