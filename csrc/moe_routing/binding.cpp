// Thin torch binding of the one-launch MoE routing kernel: argument checks, workspace, stream, call.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "moe_routing/moe_routing.h"

namespace {

namespace mr = onerec_fast::moe_routing;

// Checks that `t` is a contiguous CUDA tensor of `dtype` and `shape` on `device`, naming it on failure.
void check_arg(const char* name, const at::Tensor& t, at::ScalarType dtype, const std::vector<int64_t>& shape,
               const at::Device& device) {
  TORCH_CHECK_VALUE(t.is_cuda(), "moe_route_fwd: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == device, "moe_route_fwd: ", name, " must be on ", device, " (the device of logits), got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "moe_route_fwd: ", name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes().equals(shape), "moe_route_fwd: ", name, " must have shape ",
                    at::IntArrayRef(shape), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "moe_route_fwd: ", name, " must be contiguous");
}

// logits [T, E] fp32/fp16/bf16; expert_bias [E] fp32 (sigmoid only; may be empty otherwise); the seven
// outputs are preallocated and filled on the current stream (see csrc/moe_routing/moe_routing.h).
void moe_route_fwd(const at::Tensor& logits, const at::Tensor& expert_bias, int64_t top_k, bool sigmoid,
                   bool norm_topk, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                   const at::Tensor& expert_counts, const at::Tensor& expert_offsets, const at::Tensor& sorted_pair_idx,
                   const at::Tensor& prob_sum, const at::Tensor& lse_sq_sum) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "moe_route_fwd: logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2, "moe_route_fwd: logits must be 2-D [T, E], got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.is_contiguous(), "moe_route_fwd: logits must be contiguous");
  mr::LogitsDType dtype = mr::LogitsDType::kFloat32;
  switch (logits.scalar_type()) {
    case at::kFloat:
      dtype = mr::LogitsDType::kFloat32;
      break;
    case at::kHalf:
      dtype = mr::LogitsDType::kFloat16;
      break;
    case at::kBFloat16:
      dtype = mr::LogitsDType::kBFloat16;
      break;
    default:
      TORCH_CHECK_TYPE(false, "moe_route_fwd: logits must have dtype float32, float16 or bfloat16, got ",
                       logits.scalar_type());
  }
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1 && E <= mr::kMaxExperts, "moe_route_fwd: logits must have 1..", mr::kMaxExperts,
                    " experts in dimension 1, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= mr::kMaxTopK && top_k <= E, "moe_route_fwd: top_k must be in 1..min(E=", E,
                    ", ", mr::kMaxTopK, "), got ", top_k);
  TORCH_CHECK_VALUE(T * top_k <= INT32_MAX, "moe_route_fwd: T * top_k must fit in int32, got T=", T, ", top_k=",
                    top_k);
  const at::Device device = logits.device();
  if (sigmoid) check_arg("expert_bias", expert_bias, at::kFloat, {E}, device);
  check_arg("topk_ids", topk_ids, at::kInt, {T, top_k}, device);
  check_arg("topk_weights", topk_weights, at::kFloat, {T, top_k}, device);
  check_arg("expert_counts", expert_counts, at::kInt, {E}, device);
  check_arg("expert_offsets", expert_offsets, at::kInt, {E + 1}, device);
  check_arg("sorted_pair_idx", sorted_pair_idx, at::kInt, {T * top_k}, device);
  check_arg("prob_sum", prob_sum, at::kFloat, {E}, device);
  check_arg("lse_sq_sum", lse_sq_sum, at::kFloat, {1}, device);

  const c10::cuda::CUDAGuard guard(device);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const size_t ws_bytes = mr::moe_route_workspace_bytes(static_cast<int>(E), num_sms);
  // Stream-ordered from torch's caching allocator (a graph's private pool under capture).
  const at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  const cudaError_t err = mr::moe_route_fwd(
      logits.data_ptr(), dtype, sigmoid ? expert_bias.data_ptr<float>() : nullptr, T, static_cast<int>(E),
      static_cast<int>(top_k), sigmoid, norm_topk, topk_ids.data_ptr<int32_t>(), topk_weights.data_ptr<float>(),
      expert_counts.data_ptr<int32_t>(), expert_offsets.data_ptr<int32_t>(), sorted_pair_idx.data_ptr<int32_t>(),
      prob_sum.data_ptr<float>(), lse_sq_sum.data_ptr<float>(), workspace.data_ptr(), ws_bytes, num_sms,
      at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "moe_route_fwd: CUDA error: ", cudaGetErrorString(err));
}

}  // namespace

// Registered with the dispatcher (torch.ops.onerec_fast_C.moe_route_fwd): errors thrown by the checks then
// reach Python through torch's own translation, as for every built-in op. (Bound through pybind11 instead, the
// first TORCH_CHECK failure segfaulted the process on the H200 with torch 2.11.) The CPU registration exists
// only so that a CPU `logits` gets the argument error below rather than a missing-kernel error.
TORCH_LIBRARY_FRAGMENT(onerec_fast_C, m) {
  m.def(
      "moe_route_fwd(Tensor logits, Tensor expert_bias, int top_k, bool sigmoid, bool norm_topk, "
      "Tensor(a!) topk_ids, Tensor(b!) topk_weights, Tensor(c!) expert_counts, Tensor(d!) expert_offsets, "
      "Tensor(e!) sorted_pair_idx, Tensor(f!) prob_sum, Tensor(g!) lse_sq_sum) -> ()");
}
TORCH_LIBRARY_IMPL(onerec_fast_C, CUDA, m) { m.impl("moe_route_fwd", &moe_route_fwd); }
TORCH_LIBRARY_IMPL(onerec_fast_C, CPU, m) { m.impl("moe_route_fwd", &moe_route_fwd); }
