// Launcher of the one-launch MoE routing kernel (torch-free): picks the launch shape, instantiates the
// kernel per logits dtype and top-k bucket, and launches it cooperatively. API: moe_routing.h.
#include <algorithm>

#include "moe_routing/moe_routing.cuh"

namespace onerec_fast {
namespace moe_routing {
namespace {

struct LaunchShape {
  int group_log2;
  int tile_tokens;
  int tile_stride;
  int num_tiles;
  int blocks;
  size_t smem_bytes;
};

int pow2_floor_log2(int64_t x) {
  int l = 0;
  while ((int64_t{2} << l) <= x) ++l;
  return l;  // log2 of the largest power of two <= x (x >= 1)
}

int pow2_ceil_log2(int64_t x) {
  int l = 0;
  while ((int64_t{1} << l) < x) ++l;
  return l;
}

// Floats per token row of the shared tile. Lanes of a warp read x[row * stride + lane_g + G * i] for
// 32 / G rows at once; with stride = G * odd those 32 addresses fall in 32 different banks.
int tile_stride(int E, int G) {
  if (G == 32) return E;  // one row per warp: consecutive lanes, consecutive words
  const int per_lane = (E + G - 1) / G;
  return G * (per_lane | 1);
}

// G (lanes per token) is the largest power of two with T * G <= #SMs * 256: the tokens fill a grid of
// one block per SM, and at small T each token gets more lanes (lower latency). It is capped so that each
// lane keeps about two experts or more, and raised until the fp32 tile fits the shared-memory budget.
LaunchShape launch_shape(int64_t T, int E, int num_sms) {
  const int cap_log2 = std::min(5, pow2_ceil_log2((E + 1) / 2));
  const int par_log2 = pow2_floor_log2(std::max<int64_t>(1, int64_t{num_sms} * kThreads / std::max<int64_t>(T, 1)));
  int g = std::min(cap_log2, par_log2);
  const auto bytes = [&](int gl) { return size_t{4} * (kThreads >> gl) * tile_stride(E, 1 << gl); };
  while (g < 5 && bytes(g) > size_t{kTileBytesBudget}) ++g;
  LaunchShape s;
  s.group_log2 = g;
  s.tile_tokens = kThreads >> g;
  s.tile_stride = tile_stride(E, 1 << g);
  s.num_tiles = static_cast<int>((T + s.tile_tokens - 1) / s.tile_tokens);
  s.blocks = std::max(1, std::min(num_sms, s.num_tiles));
  s.smem_bytes = bytes(g);
  return s;
}

template <typename T>
cudaError_t launch_dtype(const RouteParams& p, const LaunchShape& s, cudaStream_t stream) {
  void (*kernel)(RouteParams);
  if (p.top_k <= 2) {
    kernel = moe_route_fwd_kernel<T, 2>;
  } else if (p.top_k <= 4) {
    kernel = moe_route_fwd_kernel<T, 4>;
  } else {
    kernel = moe_route_fwd_kernel<T, 8>;
  }
  RouteParams params = p;
  void* args[] = {&params};
  // A cooperative launch (co-residency of all blocks for the grid barrier), expressed as a launch
  // attribute: the runtime documents it as valid for graph kernel nodes, so stream capture keeps it.
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(s.blocks);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = s.smem_bytes;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelExC(&config, reinterpret_cast<const void*>(kernel), args);
}

}  // namespace

size_t moe_route_workspace_bytes(int num_experts, int num_sms) {
  return sizeof(int32_t) * (size_t{2} * num_experts + 1) * static_cast<size_t>(num_sms > 0 ? num_sms : 1);
}

cudaError_t moe_route_fwd(const void* logits, LogitsDType dtype, const float* expert_bias, int64_t num_tokens,
                          int num_experts, int top_k, bool sigmoid, bool norm_topk, int32_t* topk_ids,
                          float* topk_weights, int32_t* expert_counts, int32_t* expert_offsets,
                          int32_t* sorted_pair_idx, float* prob_sum, float* lse_sq_sum, void* workspace,
                          size_t workspace_bytes, int num_sms, cudaStream_t stream) {
  const int64_t T = num_tokens, E = num_experts;
  if (T < 0 || E < 1 || E > kMaxExperts || top_k < 1 || top_k > kMaxTopK || top_k > E || num_sms < 1 ||
      T * top_k > INT_MAX)
    return cudaErrorInvalidValue;
  if (T > 0 && (logits == nullptr || topk_ids == nullptr || topk_weights == nullptr || sorted_pair_idx == nullptr))
    return cudaErrorInvalidValue;
  if (expert_counts == nullptr || expert_offsets == nullptr || prob_sum == nullptr || lse_sq_sum == nullptr ||
      (sigmoid && expert_bias == nullptr) || workspace == nullptr ||
      workspace_bytes < moe_route_workspace_bytes(num_experts, num_sms) ||
      (reinterpret_cast<uintptr_t>(workspace) & 3u) != 0)
    return cudaErrorInvalidValue;

  const LaunchShape s = launch_shape(T, num_experts, num_sms);
  if (s.smem_bytes > size_t{kTileBytesBudget}) return cudaErrorInvalidValue;  // TileRegs relies on it
  RouteParams p;
  p.logits = logits;
  p.expert_bias = expert_bias;
  p.num_tokens = static_cast<int>(T);
  p.num_experts = num_experts;
  p.top_k = top_k;
  p.sigmoid = sigmoid ? 1 : 0;
  p.norm_topk = norm_topk ? 1 : 0;
  p.group_log2 = s.group_log2;
  p.tile_tokens = s.tile_tokens;
  p.tile_stride = s.tile_stride;
  p.num_tiles = s.num_tiles;
  p.e_magic = num_experts == 1 ? 0u : static_cast<unsigned>(((uint64_t{1} << 32) + E - 1) / E);
  p.topk_ids = topk_ids;
  p.topk_weights = topk_weights;
  p.expert_counts = expert_counts;
  p.expert_offsets = expert_offsets;
  p.sorted_pair_idx = sorted_pair_idx;
  p.prob_sum = prob_sum;
  p.lse_sq_sum = lse_sq_sum;
  // Workspace layout for the actual grid: counts [B, E], prob [E, B], lse [B].
  p.ws_counts = static_cast<int32_t*>(workspace);
  p.ws_prob = reinterpret_cast<float*>(p.ws_counts + E * s.blocks);
  p.ws_lse = p.ws_prob + E * s.blocks;

  switch (dtype) {
    case LogitsDType::kFloat32:
      return launch_dtype<float>(p, s, stream);
    case LogitsDType::kFloat16:
      return launch_dtype<__half>(p, s, stream);
    case LogitsDType::kBFloat16:
      return launch_dtype<__nv_bfloat16>(p, s, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moe_routing
}  // namespace onerec_fast
