// Host API of the one-launch MoE top-k routing kernel (torch-free; implemented in moe_routing.cu).
//
// logits [T, E] (row-major, contiguous) -> per token the top-k experts and their gate weights, the
// per-expert counts and offsets, the pairs p = t * k + j sorted by expert (stable), and the sums the
// Switch aux loss and the z-loss need. See moe_routing.cuh for how the single launch is organised.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace onerec_fast {
namespace moe_routing {

constexpr int kMaxExperts = 256;
constexpr int kMaxTopK = 8;

enum class LogitsDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Bytes of device workspace moe_route_fwd needs for `num_experts` experts on a device with `num_sms`
// multiprocessors (the grid never exceeds one block per SM). Needs no zeroing: the kernel writes all of
// it before reading it.
size_t moe_route_workspace_bytes(int num_experts, int num_sms);

// Routes `num_tokens` tokens; one cooperative kernel launch on `stream`, no host synchronisation,
// CUDA-graph capturable, bitwise reproducible for a given device.
//   logits          [T, E]  fp32 / fp16 / bf16 as `dtype`
//   expert_bias     [E]     fp32, read only when `sigmoid` (may be null otherwise)
//   topk_ids        [T, k]  int32 out: descending selection score, ties to the lower expert id
//   topk_weights    [T, k]  fp32 out: softmax p (or sigmoid s, unbiased) at the selected experts,
//                           divided by their sum over the k when `norm_topk`
//   expert_counts   [E]     int32 out: pairs routed to each expert
//   expert_offsets  [E+1]   int32 out: exclusive cumsum of expert_counts, [E] == T * k
//   sorted_pair_idx [T*k]   int32 out: pairs grouped by ascending expert, ascending p within one
//   prob_sum        [E]     fp32 out: sum over tokens of p (sigmoid: s / sum_e s)
//   lse_sq_sum      [1]     fp32 out: sum over tokens of logsumexp(logits[t])^2
//   workspace       moe_route_workspace_bytes(E, num_sms) bytes of device memory, 4-byte aligned
// Requires 0 <= T, T * k < 2^31, 1 <= E <= 256, 1 <= k <= min(E, 8); returns cudaErrorInvalidValue
// otherwise, or the launch error.
cudaError_t moe_route_fwd(const void* logits, LogitsDType dtype, const float* expert_bias, int64_t num_tokens,
                          int num_experts, int top_k, bool sigmoid, bool norm_topk, int32_t* topk_ids,
                          float* topk_weights, int32_t* expert_counts, int32_t* expert_offsets,
                          int32_t* sorted_pair_idx, float* prob_sum, float* lse_sq_sum, void* workspace,
                          size_t workspace_bytes, int num_sms, cudaStream_t stream);

}  // namespace moe_routing
}  // namespace onerec_fast
