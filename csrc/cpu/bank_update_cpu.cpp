// CPU kernel of llp_fast::bank_update_ (docs/method.md §1.6):
//   bank[i] <- normalize(mu * bank[i] + (1 - mu) * v)     for (i, v) in zip(indices, values)
// applied in order of appearance, exactly like the sequential loop that bank_update_ref_ spells out.
//
// Work is split over *distinct* rows: the batch is grouped by index (stable, so a group keeps the
// order of appearance) and each group is one task. Different groups write different rows, so the
// tasks never race, and within a group the occurrences run in order: the result is deterministic
// and independent of the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../llp_fast.h"

namespace llp_fast {
namespace {

// One occurrence: row <- normalize(mu * row + (1 - mu) * v), through `mixed` (acc_t, D entries).
// The arithmetic follows the reference op by op, so that float32 results are bit-identical or 1-2
// ulps off where ATen's vectorised norm sums in another order:
//   mixed = fma(v, 1 - mu, row * mu)      bank.mul_(mu).add_(v, alpha=1 - mu) is an FMA in ATen
//   row   = mixed / max(||mixed||, eps)   F.normalize(eps=1e-12): a division, not a reciprocal
// The squared norm is summed in a wider type (double for float, long double for double), so it is
// (nearly) correctly rounded whatever order ATen's vectorised reduction used.
#define LLP_FAST_BLEND_ROW_BODY                                                                          \
  using wide_t = std::conditional_t<std::is_same_v<acc_t, double>, long double, double>;                \
  /* Four partial sums: one running sum is a chain of dependent adds, the op's bottleneck. */         \
  wide_t part[4] = {0, 0, 0, 0};                                                                         \
  for (int64_t j = 0; j < d; ++j) {                                                                      \
    const acc_t x = std::fma(static_cast<acc_t>(v[j]), one_minus_mu, static_cast<acc_t>(row[j]) * mu); \
    mixed[j] = x;                                                                                        \
    part[j & 3] += static_cast<wide_t>(x) * static_cast<wide_t>(x);                                      \
  }                                                                                                      \
  const wide_t ss = (part[0] + part[1]) + (part[2] + part[3]);                                           \
  const acc_t norm = std::max(static_cast<acc_t>(std::sqrt(ss)), static_cast<acc_t>(1e-12));            \
  /* Written in the bank's dtype after every occurrence, as the reference does: a later occurrence */    \
  /* of the same index blends with the *rounded* row. */                                                 \
  for (int64_t j = 0; j < d; ++j) row[j] = static_cast<scalar_t>(mixed[j] / norm);

template <typename scalar_t, typename acc_t>
void blend_row(scalar_t* row, const scalar_t* v, int64_t d, acc_t mu, acc_t one_minus_mu, acc_t* mixed) {
  LLP_FAST_BLEND_ROW_BODY
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__FMA__)
// The extension is built for the baseline x86-64 ISA, where std::fma is a libm call emulating the
// fused multiply-add in software (~0.5 ns -> ~15 ns per element: 3/4 of the op's time at B = 256).
// The same body compiled for FMA hardware, chosen at run time, gives the identical result.
#define LLP_FAST_RUNTIME_FMA 1
template <typename scalar_t, typename acc_t>
__attribute__((target("fma"))) void blend_row_fma(scalar_t* row, const scalar_t* v, int64_t d, acc_t mu,
                                                  acc_t one_minus_mu, acc_t* mixed) {
  LLP_FAST_BLEND_ROW_BODY
}
#endif

}  // namespace

void bank_update_cpu(const at::Tensor& bank, const at::Tensor& indices, const at::Tensor& values,
                     double momentum) {
  TORCH_CHECK(bank.device().is_cpu() && indices.device().is_cpu() && values.device().is_cpu(),
              "bank_update_cpu: tensors must be on the CPU");
  TORCH_CHECK(bank.dim() == 2 && bank.is_contiguous(), "bank_update_cpu: bank must be a contiguous (N, D) tensor");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong, "bank_update_cpu: indices must be (B,) int64");
  TORCH_CHECK(values.dim() == 2 && values.size(0) == indices.size(0) && values.size(1) == bank.size(1),
              "bank_update_cpu: values must be (B, D) with B = len(indices) and D = bank.size(1)");
  TORCH_CHECK(values.scalar_type() == bank.scalar_type(), "bank_update_cpu: values must have the bank's dtype");

  const int64_t n = bank.size(0), d = bank.size(1), b = indices.size(0);
  if (b == 0 || d == 0) return;
  const at::Tensor idx_t = indices.contiguous();
  const at::Tensor val_t = values.contiguous();
  const int64_t* idx = idx_t.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < b; ++e) {
    TORCH_CHECK(idx[e] >= 0 && idx[e] < n, "bank_update_cpu: index ", idx[e], " out of range for a bank of ", n,
                " rows");
  }

  // Group the batch by row: a stable sort keeps each row's occurrences in order of appearance.
  std::vector<int64_t> order(b);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [idx](int64_t x, int64_t y) { return idx[x] < idx[y]; });
  std::vector<int64_t> group_start;
  group_start.reserve(b + 1);
  for (int64_t i = 0; i < b; ++i) {
    if (i == 0 || idx[order[i]] != idx[order[i - 1]]) group_start.push_back(i);
  }
  const int64_t groups = static_cast<int64_t>(group_start.size());
  group_start.push_back(b);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bank.scalar_type(), "bank_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for float/bf16/half, double for double
    scalar_t* bank_p = bank.data_ptr<scalar_t>();
    const scalar_t* val_p = val_t.const_data_ptr<scalar_t>();
    // Same scalars as the reference: mul_(momentum) and add_(alpha=1 - momentum) round the
    // Python floats to the tensor's compute type.
    const acc_t mu = static_cast<acc_t>(momentum);
    const acc_t one_minus_mu = static_cast<acc_t>(1.0 - momentum);
    // A group costs O(D) and the trainer's batch (256 x 128) is less work on one core than waking
    // a thread team, let alone on a loaded machine. Only batches of more than ~256K
    // elements are split over threads.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(d, 1));
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      std::vector<acc_t> mixed(d);
      auto blend = &blend_row<scalar_t, acc_t>;
#ifdef LLP_FAST_RUNTIME_FMA
      if (__builtin_cpu_supports("fma")) blend = &blend_row_fma<scalar_t, acc_t>;
#endif
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t i = group_start[g]; i < group_start[g + 1]; ++i) {
          const int64_t e = order[i];
          blend(bank_p + idx[e] * d, val_p + e * d, d, mu, one_minus_mu, mixed.data());
        }
      }
    });
  });
}

}  // namespace llp_fast
