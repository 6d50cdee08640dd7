// CUDA kernel of llp_fast::bank_update_ (docs/method.md §1.6), in ONE launch:
//   bank[i] <- normalize(mu * bank[i] + (1 - mu) * v)     for (i, v) in zip(indices, values)
// with repeated indices applied in order of appearance (reference.bank_update_ref_).
//
// One block per batch entry. A block whose index already appeared earlier in the batch exits at
// once; the block of the *first* occurrence applies every occurrence of its row, in order. Rows of
// different blocks are distinct, so no two blocks write the same row and the result does not depend
// on scheduling. Finding the occurrences is an O(B) scan of the indices per block (O(B^2) in all),
// which for the trainer's B ~ 256 is a few hundred cached loads: cheaper than a sort and a second
// launch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "../llp_fast.h"

namespace llp_fast {
namespace {

constexpr int kWarp = 32;

// Sum of `x` over the block; every thread gets the result. `shared` holds one value per warp.
template <typename acc_t>
__device__ acc_t block_sum(acc_t x, acc_t* shared) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < warps; ++w) total += shared[w];  // same order in every thread: same result
  __syncthreads();  // `shared` is reused by the next call
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void bank_update_kernel(scalar_t* __restrict__ bank, const int64_t* __restrict__ indices,
                                   const scalar_t* __restrict__ values, int64_t batch, int64_t dim, acc_t mu,
                                   acc_t one_minus_mu) {
  __shared__ acc_t shared[kWarp];
  const int64_t entry = blockIdx.x;
  const int64_t row = indices[entry];

  // Not the first occurrence of its row: the first occurrence's block applies this entry.
  int seen = 0;
  for (int64_t j = threadIdx.x; j < entry; j += blockDim.x) seen |= indices[j] == row;
  if (__syncthreads_or(seen)) return;

  scalar_t* m = bank + row * dim;
  for (int64_t e = entry; e < batch; ++e) {
    if (indices[e] != row) continue;  // uniform over the block: every thread reads the same index
    const scalar_t* v = values + e * dim;
    // Same arithmetic as the reference (and the CPU kernel): mixed = fma(v, 1 - mu, m * mu),
    // then mixed / max(||mixed||, 1e-12). Each thread owns the same columns in every pass, so the
    // row it rewrites below is the one it reads next time: no barrier is needed between passes
    // beyond the ones inside block_sum.
    acc_t ss = 0;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const acc_t x = fma(static_cast<acc_t>(v[j]), one_minus_mu, static_cast<acc_t>(m[j]) * mu);
      ss += x * x;
    }
    const acc_t norm = fmax(sqrt(block_sum(ss, shared)), static_cast<acc_t>(1e-12));
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const acc_t x = fma(static_cast<acc_t>(v[j]), one_minus_mu, static_cast<acc_t>(m[j]) * mu);
      m[j] = static_cast<scalar_t>(x / norm);  // rounded to the bank dtype, as the reference stores it
    }
  }
}

}  // namespace

void bank_update_cuda(const at::Tensor& bank, const at::Tensor& indices, const at::Tensor& values,
                      double momentum) {
  TORCH_CHECK(bank.is_cuda() && indices.is_cuda() && values.is_cuda(), "bank_update_cuda: tensors must be on CUDA");
  TORCH_CHECK(bank.device() == indices.device() && bank.device() == values.device(),
              "bank_update_cuda: tensors must be on the same device");
  TORCH_CHECK(bank.dim() == 2 && bank.is_contiguous(), "bank_update_cuda: bank must be a contiguous (N, D) tensor");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong, "bank_update_cuda: indices must be (B,) int64");
  TORCH_CHECK(values.dim() == 2 && values.size(0) == indices.size(0) && values.size(1) == bank.size(1),
              "bank_update_cuda: values must be (B, D) with B = len(indices) and D = bank.size(1)");
  TORCH_CHECK(values.scalar_type() == bank.scalar_type(), "bank_update_cuda: values must have the bank's dtype");
  // Index range is checked by the Python wrapper (a device-side check would need a sync).

  const int64_t batch = indices.size(0), dim = bank.size(1);
  if (batch == 0 || dim == 0) return;
  TORCH_CHECK(batch <= 0x7fffffff, "bank_update_cuda: batch too large for one grid");
  const c10::cuda::CUDAGuard guard(bank.device());
  const at::Tensor idx = indices.contiguous();
  const at::Tensor val = values.contiguous();
  // One thread per column up to 256 (D = 128 in LLP: four warps); a whole number of warps.
  const int threads = static_cast<int>(std::min<int64_t>(256, (dim + kWarp - 1) / kWarp * kWarp));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bank.scalar_type(), "bank_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bank_update_kernel<scalar_t, acc_t><<<static_cast<unsigned>(batch), threads, 0, stream>>>(
        bank.data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), val.const_data_ptr<scalar_t>(), batch, dim,
        static_cast<acc_t>(momentum), static_cast<acc_t>(1.0 - momentum));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace llp_fast
