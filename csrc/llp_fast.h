// Kernels of the compiled extension llp_fast._C. The ops themselves (schemas, fake kernels,
// autograd) are declared in Python (llp_fast/ops/*.py, torch.library.custom_op); this library only
// registers implementations for the CPU and CUDA dispatch keys (csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace llp_fast {

// llp_fast::bank_update_(Tensor(a!) bank, Tensor indices, Tensor values, float momentum) -> ()
// bank[i] <- normalize(momentum * bank[i] + (1 - momentum) * v), repeated indices applied in
// order of appearance (docs/method.md §1.6, reference.bank_update_ref_).
void bank_update_cpu(const at::Tensor& bank, const at::Tensor& indices, const at::Tensor& values,
                     double momentum);
#ifdef LLP_FAST_WITH_CUDA
void bank_update_cuda(const at::Tensor& bank, const at::Tensor& indices, const at::Tensor& values,
                      double momentum);
#endif

// llp_fast::topk_scores(...) -> (values (Q, k), indices int64 (Q, k)): the k best q . key / tau + bias,
// merged with an earlier call's (init_values, init_indices); ties to the lower index, -inf / -1 padding.
std::tuple<at::Tensor, at::Tensor> topk_scores_cpu(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                                   double tau, const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& key_mask,
                                                   const std::optional<at::Tensor>& init_values,
                                                   const std::optional<at::Tensor>& init_indices,
                                                   int64_t index_offset);

// llp_fast::aggregation_loss(...) -> (loss, lse_all, lse_pos), each (B,) (docs/method.md §1.3).
std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregation_loss_cpu(const at::Tensor& v, const at::Tensor& bank,
                                                                    const at::Tensor& bank_labels,
                                                                    const at::Tensor& targets, double tau);

// llp_fast::aggregation_loss_backward(...) -> grad_v (B, D) in v's dtype.
at::Tensor aggregation_loss_backward_cpu(const at::Tensor& v, const at::Tensor& bank, const at::Tensor& bank_labels,
                                         const at::Tensor& targets, const at::Tensor& lse_all,
                                         const at::Tensor& lse_pos, const at::Tensor& coef_all,
                                         const at::Tensor& coef_pos, double tau);

// llp_fast::vote(values, classes, table, num_classes) -> (label int64 (r,), confidence (r,)): propagate's
// density-weighted vote of the top-K (docs/method.md §1.2) where it sums in a (rows, classes) table.
std::tuple<at::Tensor, at::Tensor> vote_cpu(const at::Tensor& values, const at::Tensor& classes,
                                            const std::optional<at::Tensor>& table, int64_t num_classes);

// Which CPU paths the kernels take on this machine, in one line for a run's log and bug reports
// (llp_fast._C.cpu_paths(), shown by llp_fast.backends() and `python -m llp_fast`): the scan's
// instruction set, the fused float32 tile's width, whether bf16 blocks go to a bf16 GEMM, and whether
// float32 selections at small k start from a bf16 pass (csrc/cpu/topk.h, approx_topk). Reads the same
// settings the kernels read (LLP_FAST_CPU_*); a setting that names nothing throws, as the kernels do.
std::string cpu_paths();

}  // namespace llp_fast
