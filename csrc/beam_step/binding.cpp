// Thin torch binding of the fused beam step (csrc/beam_step/beam_step.cu): checks, output allocation on the
// current stream's device, and one launch. Python callers: onerec_fast/ops/beam_step.py (dense logits) and
// onerec_fast/ops/lm_head.py (compact child logits of the constrained LM head).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "beam_step/beam_step.cuh"

namespace onerec_fast {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

beam_step::LogitsDtype logits_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return beam_step::LogitsDtype::kFloat32;
    case at::kHalf: return beam_step::LogitsDtype::kFloat16;
    case at::kBFloat16: return beam_step::LogitsDtype::kBFloat16;
    default: TORCH_CHECK(false, "beam_step: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return beam_step::LogitsDtype::kFloat32;
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "beam_step: ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "beam_step: ", name, " must be a contiguous 1-D tensor, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "beam_step: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// Shared by both entry points: `logits` [R, width] is token-indexed (by_child = false) or child-indexed.
Outputs run(const at::Tensor& logits, const std::optional<at::Tensor>& row_lse, bool by_child, const at::Tensor& nodes,
            const at::Tensor& scores, const at::Tensor& child_start, const at::Tensor& child_tokens, int64_t beam,
            bool normalize_valid) {
  TORCH_CHECK(logits.is_cuda(), "beam_step: logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "beam_step: logits must be 2-D [R, V] with a contiguous "
              "last dimension (any row stride), got shape ", logits.sizes(), " strides ", logits.strides());
  const int64_t rows = logits.size(0), width = logits.size(1);
  TORCH_CHECK(beam >= 1 && beam <= beam_step::kMaxBeam, "beam_step: beam must be in [1, ", beam_step::kMaxBeam,
              "], got ", beam);
  TORCH_CHECK(rows > 0 && rows % beam == 0, "beam_step: logits must have a positive multiple of beam (", beam,
              ") rows, got ", rows);
  TORCH_CHECK(width >= 1 && beam * width < (int64_t{1} << 31), "beam_step: beam * logits.shape[1] must be in "
              "[1, 2^31), got ", beam, " * ", width);
  TORCH_CHECK(rows / beam <= (int64_t{1} << 31) / 8, "beam_step: too many batch rows: ", rows / beam);
  const auto dtype = logits_dtype(logits, "logits");
  check_vector(nodes, "nodes", at::kInt, logits);
  check_vector(scores, "scores", at::kFloat, logits);
  check_vector(child_start, "child_start", at::kInt, logits);
  check_vector(child_tokens, "child_tokens", at::kInt, logits);
  TORCH_CHECK(nodes.size(0) == rows && scores.size(0) == rows, "beam_step: nodes and scores must have ", rows,
              " entries (one per logits row), got ", nodes.size(0), " and ", scores.size(0));
  TORCH_CHECK(child_start.size(0) >= 1 && child_start.size(0) - 1 < (int64_t{1} << 31) &&
                  child_tokens.size(0) < (int64_t{1} << 31),
              "beam_step: child_start must have num_nodes + 1 >= 1 entries and both trie arrays fit int32 indices");
  if (row_lse) check_vector(*row_lse, "row_lse", at::kFloat, logits);
  if (row_lse) TORCH_CHECK(row_lse->size(0) == rows, "beam_step: row_lse must have ", rows, " entries, got ",
                           row_lse->size(0));

  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t batch = rows / beam;
  const auto i64 = logits.options().dtype(at::kLong);
  at::Tensor out_tokens = at::empty({batch, beam}, i64);
  at::Tensor out_parents = at::empty({batch, beam}, i64);
  at::Tensor out_nodes = at::empty({batch, beam}, logits.options().dtype(at::kInt));
  at::Tensor out_scores = at::empty({batch, beam}, logits.options().dtype(at::kFloat));

  beam_step::BeamStepArgs a;
  a.logits = logits.data_ptr();
  a.row_stride = logits.stride(0);
  a.dtype = dtype;
  a.width = static_cast<int32_t>(width);
  a.by_child = by_child;
  a.row_lse = row_lse ? row_lse->data_ptr<float>() : nullptr;
  a.normalize_valid = normalize_valid;
  a.nodes = nodes.data_ptr<int32_t>();
  a.scores = scores.data_ptr<float>();
  a.child_start = child_start.data_ptr<int32_t>();
  a.num_nodes = static_cast<int32_t>(child_start.size(0) - 1);
  a.child_tokens = child_tokens.data_ptr<int32_t>();
  a.num_children = static_cast<int32_t>(child_tokens.size(0));
  a.batch = static_cast<int32_t>(batch);
  a.beam = static_cast<int32_t>(beam);
  a.out_tokens = out_tokens.data_ptr<int64_t>();
  a.out_parents = out_parents.data_ptr<int64_t>();
  a.out_nodes = out_nodes.data_ptr<int32_t>();
  a.out_scores = out_scores.data_ptr<float>();
  const cudaError_t err = beam_step::launch_beam_step(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "beam_step: kernel launch failed: ", cudaGetErrorString(err));
  return {out_tokens, out_parents, out_nodes, out_scores};
}

// Dense logits [R, V]. dense_root (level 0's token -> node table) is accepted for the caller's convenience
// and not needed: the root's CSR range lists the same children.
Outputs beam_step_dense(const at::Tensor& logits, const at::Tensor& nodes, const at::Tensor& scores,
                        const at::Tensor& child_start, const at::Tensor& child_tokens,
                        const std::optional<at::Tensor>& dense_root, int64_t beam, bool normalize_valid) {
  (void)dense_root;
  return run(logits, std::nullopt, false, nodes, scores, child_start, child_tokens, beam, normalize_valid);
}

// Compact child logits [R, M] (column j = child j of the row's node, M >= the level's max fan-out).
Outputs beam_step_candidates(const at::Tensor& child_logits, const std::optional<at::Tensor>& row_lse,
                             const at::Tensor& nodes, const at::Tensor& scores, const at::Tensor& child_start,
                             const at::Tensor& child_tokens, int64_t beam, bool normalize_valid) {
  TORCH_CHECK(row_lse.has_value() || normalize_valid,
              "beam_step_candidates: normalize='full' needs row_lse (the log-sum-exp over the vocabulary)");
  return run(child_logits, row_lse, true, nodes, scores, child_start, child_tokens, beam, normalize_valid);
}

}  // namespace
}  // namespace onerec_fast

// Registered with the dispatcher (torch.ops.onerec_fast_C.*): see csrc/moe_routing/binding.cpp for why not
// pybind11. Semantics: docs/TRIE_FORMAT.md. beam_step takes dense logits [B*beam, V]; beam_step_candidates
// takes compact child logits [B*beam, M] (column j = child j of the row's node) with logp = logit - row_lse
// (given) or a log-softmax over the valid children (row_lse None, normalize_valid). Both return
// (tokens int64 [B, beam], parents int64, nodes int32, scores float32).
TORCH_LIBRARY_FRAGMENT(onerec_fast_C, m) {
  m.def("beam_step(Tensor logits, Tensor nodes, Tensor scores, Tensor child_start, Tensor child_tokens, "
        "Tensor? dense_root, int beam, bool normalize_valid) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("beam_step_candidates(Tensor child_logits, Tensor? row_lse, Tensor nodes, Tensor scores, "
        "Tensor child_start, Tensor child_tokens, int beam, bool normalize_valid) -> (Tensor, Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(onerec_fast_C, CUDA, m) {
  m.impl("beam_step", &onerec_fast::beam_step_dense);
  m.impl("beam_step_candidates", &onerec_fast::beam_step_candidates);
}
TORCH_LIBRARY_IMPL(onerec_fast_C, CPU, m) {
  m.impl("beam_step", &onerec_fast::beam_step_dense);
  m.impl("beam_step_candidates", &onerec_fast::beam_step_candidates);
}
