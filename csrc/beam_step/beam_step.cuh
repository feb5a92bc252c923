// Fused trie-constrained beam step (torch-free): log-softmax ("full" over the vocabulary or "valid" over
// each parent's children), candidate scores, and the exact top-`beam` per batch row, in one launch.
// Semantics: docs/TRIE_FORMAT.md (the oracle is onerec_fast.ops.beam_step.beam_step_ref).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace onerec_fast {
namespace beam_step {

enum class LogitsDtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest beam the kernel takes (its sorted candidate lists live in shared memory).
constexpr int kMaxBeam = 1024;

struct BeamStepArgs {
  // logits: [R = batch * beam, width] with row stride `row_stride` elements (last dim contiguous).
  //   dense mode (by_child = false): column = token, width = V of the level.
  //   candidate mode (by_child = true): column j = child j of the row's node (entry child_start[node] + j),
  //   width = the padded child count (the level's max fan-out); children at j >= width are ignored.
  const void* logits = nullptr;
  int64_t row_stride = 0;
  LogitsDtype dtype = LogitsDtype::kFloat32;
  int32_t width = 0;
  bool by_child = false;
  // Normalizer: row_lse [R] (float32) when given, so logp = logit - row_lse[r]; otherwise log-sum-exp over
  // the row's `width` columns (normalize_valid = false, dense mode only) or over the parent's valid children.
  const float* row_lse = nullptr;
  bool normalize_valid = false;
  // Beam state: nodes int32 [R] (trie node at the current depth), scores float32 [R] (-inf: dead beam).
  const int32_t* nodes = nullptr;
  const float* scores = nullptr;
  // One level of the trie CSR: child_start int32 [num_nodes + 1], child_tokens int32 [num_children].
  const int32_t* child_start = nullptr;
  int32_t num_nodes = 0;
  const int32_t* child_tokens = nullptr;
  int32_t num_children = 0;
  int32_t batch = 0;
  int32_t beam = 0;
  // Outputs [batch, beam], best first: token, parent beam (0..beam-1 within the batch row), depth+1 node,
  // score; slots without a candidate get -1, -1, -1, -inf.
  int64_t* out_tokens = nullptr;
  int64_t* out_parents = nullptr;
  int32_t* out_nodes = nullptr;
  float* out_scores = nullptr;
};

// Enqueues the one kernel on `stream`: no host sync, no allocation, CUDA-graph capturable, deterministic.
// Returns cudaErrorInvalidValue on arguments it cannot take (beam outside [1, kMaxBeam], beam * width >= 2^31,
// candidate mode without a normalizer of the full vocabulary, shared memory beyond the device's limit).
cudaError_t launch_beam_step(const BeamStepArgs& args, cudaStream_t stream);

}  // namespace beam_step
}  // namespace onerec_fast
