// llp_fast::vote on CPU: propagate's finish (docs/method.md §1.2; llp_fast/_topk.py `vote`, whose
// PyTorch body `vote_torch` is the op's default and the reference for this kernel).
//
// Where the vote sums the weights in a (rows, num_classes) table (few classes: num_classes <= 4k + 64,
// `_topk._dense`, the calls `_topk.vote` sends here) the PyTorch body reads each neighbour's class from
// the table into a (rows, k) int64 tensor and adds the weights with scatter_add_; here one loop reads
// each class and adds each weight straight into the row's votes, in score order as scatter_add_ does.
// The weights (exp(score - best)) and the total (sum) are the same ATen calls as the PyTorch body's on
// the same tensors, and the winner is the one its max picks (exact: the first largest vote, the
// lowest class id among equals), so both give the same bits. Everything else (bf16 / fp16 weights, many classes) runs the PyTorch body's own ATen calls.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../llp_fast.h"

namespace llp_fast {

namespace {

// Rows per chunk: the chunk's weights and votes (a few MB at most) stay in cache and are reused, as
// the PyTorch body's chunks of 2**18 entries (llp_fast/_topk.py _TABLE).
constexpr int64_t kEntries = int64_t(1) << 18;

// A position outside the table: IndexError, as index_select raises in the PyTorch body.
[[noreturn]] __attribute__((noinline, cold)) void bad_position(int64_t c, int64_t table_size) {
  TORCH_CHECK_INDEX(false, "vote: a neighbour's position ", c, " is outside the class table (", table_size,
                    " entries)");
}

[[noreturn]] __attribute__((noinline, cold)) void bad_class(int64_t c, int64_t num_classes) {
  TORCH_CHECK(false, "vote: class id ", c, " is not in [0, ", num_classes, ")");
}

// Row by row, each weight added to its class's vote in score order. class_t: the table's entries
// (void: no table, pos holds the class ids). padded: the chunk holds padding (-inf scores at position
// -1), whose positions read the table's first entry with weight 0 (the PyTorch body clamps them only
// in such a chunk; elsewhere a negative position is an error there and here).
template <typename scalar_t, typename class_t>
void add_votes(const scalar_t* w, int64_t rows, int64_t k, const int64_t* pos, int64_t pos_row, int64_t pos_col,
               const class_t* table, int64_t table_size, bool padded, int64_t num_classes, scalar_t* votes) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* row_votes = votes + i * num_classes;
    const scalar_t* row_w = w + i * k;
    const int64_t* row_pos = pos + i * pos_row;
    for (int64_t j = 0; j < k; ++j) {
      int64_t c = row_pos[j * pos_col];
      if constexpr (!std::is_void<class_t>::value) {
        // Padding's position -1 reads position 0: its weight is 0 (or NaN in a row with no
        // neighbour at all, which the PyTorch body adds to that class too).
        if (padded) c = std::max<int64_t>(c, 0);
        if (static_cast<uint64_t>(c) >= static_cast<uint64_t>(table_size)) bad_position(c, table_size);
        c = static_cast<int64_t>(table[c]);
      }
      if (static_cast<uint64_t>(c) >= static_cast<uint64_t>(num_classes)) bad_class(c, num_classes);
      row_votes[c] += row_w[j];
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vote_cpu(const at::Tensor& values, const at::Tensor& classes,
                                            const std::optional<at::Tensor>& table, int64_t num_classes) {
  TORCH_CHECK(values.dim() == 2 && classes.sizes() == values.sizes(), "vote: values and classes must be (r, k)");
  TORCH_CHECK(values.is_floating_point(), "vote: values must be floating point");
  TORCH_CHECK(num_classes >= 1, "vote: num_classes must be >= 1");
  const int64_t r = values.size(0), k = values.size(1);
  at::Tensor label = at::empty({r}, values.options().dtype(at::kLong));
  at::Tensor conf = at::empty({r}, values.options());
  if (r == 0) return {label, conf};
  const at::Tensor pos = classes.to(at::kLong);  // a no-op for the selection's int64 indices
  const bool has_table = table.has_value() && table->defined();
  at::Tensor tab;
  if (has_table) {
    TORCH_CHECK(table->dim() == 1, "vote: table must be 1-D");
    // int32 / int64 tables are read as they are; any other dtype is read as int64, as the PyTorch
    // body's .long() reads it.
    const at::ScalarType t = table->scalar_type();
    tab = (t == at::kInt || t == at::kLong ? *table : table->to(at::kLong)).contiguous();
  }
  const bool dense = num_classes <= 4 * k + 64;  // _topk._dense
  const int64_t step = std::max<int64_t>(1, kEntries / std::max<int64_t>(std::max(dense ? num_classes : k, k), 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "vote_cpu", [&] {
    using value_t = scalar_t;
    constexpr bool kLoop = std::is_same<value_t, float>::value || std::is_same<value_t, double>::value;
    for (int64_t r0 = 0; r0 < r; r0 += step) {
      const int64_t n = std::min(step, r - r0);
      const at::Tensor v = values.narrow(0, r0, n);
      // k = 0: no neighbour, every vote 0 (0 / 0: NaN confidence, class 0), as the PyTorch body.
      const at::Tensor w = k > 0 ? at::sub(v, v.narrow(1, 0, 1)).exp_().contiguous() : at::empty({n, 0}, v.options());
      const at::Tensor p = pos.narrow(0, r0, n);
      // Padding (-inf, position -1) sorts last: a chunk whose last column has no -inf has none.
      const bool padded = k > 0 && v.select(1, k - 1).isinf().any().item<bool>();
      if (kLoop && dense) {
        at::Tensor votes = at::zeros({n, num_classes}, v.options());
        const int64_t* pp = p.const_data_ptr<int64_t>();
        const value_t* wp = w.const_data_ptr<value_t>();
        value_t* out = votes.data_ptr<value_t>();
        if (!has_table)
          add_votes<value_t, void>(wp, n, k, pp, p.stride(0), p.stride(1), nullptr, 0, padded, num_classes, out);
        else if (tab.scalar_type() == at::kInt)
          add_votes(wp, n, k, pp, p.stride(0), p.stride(1), tab.const_data_ptr<int32_t>(), tab.size(0), padded,
                    num_classes, out);
        else
          add_votes(wp, n, k, pp, p.stride(0), p.stride(1), tab.const_data_ptr<int64_t>(), tab.size(0), padded,
                    num_classes, out);
        // The winner as max(dim=1) gives it (exact: no rounding): the first largest vote, or the
        // first NaN (a row without any neighbour); the total from ATen's sum, as the PyTorch body.
        at::Tensor top = at::empty({n}, v.options());
        value_t* tp = top.data_ptr<value_t>();
        int64_t* lp = label.data_ptr<int64_t>() + r0;
        for (int64_t i = 0; i < n; ++i) {
          const value_t* row = out + i * num_classes;
          value_t best = row[0];
          int64_t at = 0;
          for (int64_t c = 1; c < num_classes && !std::isnan(static_cast<double>(best)); ++c)
            if (std::isnan(static_cast<double>(row[c])) || row[c] > best) {
              best = row[c];
              at = c;
            }
          tp[i] = best;
          lp[i] = at;
        }
        conf.narrow(0, r0, n).copy_(top / votes.sum(1));
        continue;
      }
      // The PyTorch body's own calls (bf16 / fp16 weights: scatter_add_'s rounding of each sum; many
      // classes: each row sorted by class, each weight added into its class's first slot).
      at::Tensor c = p;
      if (has_table) {
        const at::Tensor at_pos = padded ? p.clamp_min(0) : p;
        c = tab.index_select(0, at_pos.reshape(-1)).view(p.sizes()).to(at::kLong);
      }
      if (dense) {
        at::Tensor votes = at::zeros({n, num_classes}, w.options()).scatter_add_(1, c, w);
        auto [top, best] = votes.max(1, true);
        label.narrow(0, r0, n).copy_(best.squeeze(1));
        conf.narrow(0, r0, n).copy_(top.squeeze(1) / votes.sum(1));
      } else {
        TORCH_CHECK(k > 0, "vote: no neighbour to vote (k = 0) with ", num_classes, " classes");
        auto [cls, order] = at::sort(c, /*stable=*/true, /*dim=*/1, /*descending=*/false);
        at::Tensor first = at::ones_like(cls, cls.options().dtype(at::kBool));
        first.narrow(1, 1, k - 1).copy_(cls.narrow(1, 1, k - 1).ne(cls.narrow(1, 0, k - 1)));
        const at::Tensor at_k = at::arange(k, cls.options()).expand_as(cls);
        const at::Tensor slot = std::get<0>(at::where(first, at_k, at::zeros_like(at_k)).cummax(1));
        at::Tensor votes = at::zeros_like(w).scatter_add_(1, slot, w.gather(1, order));
        auto [top, best] = votes.max(1, true);
        label.narrow(0, r0, n).copy_(cls.gather(1, best).squeeze(1));
        conf.narrow(0, r0, n).copy_(top.squeeze(1) / votes.sum(1));
      }
    }
  });
  return {label, conf};
}

}  // namespace llp_fast
