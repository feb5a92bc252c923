// One-launch MoE top-k routing kernel (torch-free). Host API and output contract: moe_routing.h.
//
// One cooperative launch of `B <= #SMs` blocks, each owning a contiguous range of token tiles, in two
// phases separated by one grid barrier:
//
// Phase 1 (per block, per tile of TB tokens):
//   * the tile's logits [TB, E] are loaded coalesced (16-byte vectors) into shared memory as fp32, the
//     next tile's loads being issued (into registers) before this tile is routed;
//   * G lanes per token (G a power of two picked by the host so that every thread has a token even at
//     small T): fp32 max / sum-exp (and sum-sigmoid) over the lane's experts e = lane, lane + G, ...,
//     reduced over the G lanes by xor shuffles; then each lane keeps its own top-KMAX (selection key,
//     expert id, weight) in registers and the G lists are merged by k rounds of a shuffle arg-max;
//   * the normalised score of every (token, expert) overwrites the tile in place, and a column sum over
//     the tile (fixed order) accumulates the block's prob partials; each token's lse^2 is accumulated
//     by its first lane; the block's per-expert pair counts come from shared-memory int atomics
//     (integer sums: order does not matter).
//   The block writes counts[e][b], prob[e][b] and lse[b] to the workspace.
//
// Grid barrier (cooperative_groups::this_grid().sync()).
//
// Phase 2 (every block):
//   * reads the whole counts[B][E] matrix (at most 132 x 256 ints, from L2) to get each expert's total
//     and its pairs in blocks before this one; an exclusive scan over experts gives expert_offsets;
//   * block 0 writes expert_counts / expert_offsets; the final prob_sum / lse_sq_sum reductions are
//     spread over the grid's warps, each a fixed-order sum over the B partials (deterministic);
//   * each block scatters its own pairs: chunks of 256 pairs in pair order, warp-level ranks from
//     __match_any_sync plus per-(warp, expert) counts in shared memory give a stable counting sort.
//
// Why a grid barrier rather than "the last block scatters everything": at T = 16384, k = 2 there are
// 32768 pairs; one block scattering them (128 chunks of read id, rank, write) is ~10 us or more of
// single-SM work after everything else, while every block scattering its own ~250 pairs costs one barrier (~1 us) plus one
// chunk. A cooperative launch guarantees all B blocks are co-resident, so the barrier cannot deadlock,
// and it needs no counter the kernel would have to reset (the driver owns the barrier word), so graph
// replays are safe. The grid is at most one block per SM (256 threads, <= 47 KB shared memory,
// __launch_bounds__(256) caps registers), which is always co-resident.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "moe_routing/moe_routing.h"

namespace onerec_fast {
namespace moe_routing {

constexpr int kThreads = 256;  // block size; >= kMaxExperts so per-expert steps use one thread each
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Dynamic shared memory for the fp32 logits tile: the static arrays take ~14 KB, and staying under the
// 48 KB default avoids an opt-in attribute call.
constexpr int kTileBytesBudget = 32 * 1024;
static_assert(kThreads >= kMaxExperts, "per-expert steps use one thread per expert");

struct RouteParams {
  const void* logits;        // [T, E]
  const float* expert_bias;  // [E], sigmoid mode only
  int num_tokens;
  int num_experts;
  int top_k;
  int sigmoid;
  int norm_topk;
  int group_log2;     // G = 1 << group_log2 lanes per token
  int tile_tokens;    // TB = kThreads / G
  int tile_stride;    // floats per token row in the shared tile (see tile_stride() in moe_routing.cu)
  int num_tiles;      // ceil(T / TB)
  unsigned e_magic;   // ceil(2^32 / E): i / E == __umulhi(i, e_magic) for i < 2^24 (E >= 2)
  int32_t* topk_ids;
  float* topk_weights;
  int32_t* expert_counts;
  int32_t* expert_offsets;
  int32_t* sorted_pair_idx;
  float* prob_sum;
  float* lse_sq_sum;
  int32_t* ws_counts;  // [B, E] per-block pair counts
  float* ws_prob;      // [E, B] per-block prob partials
  float* ws_lse;       // [B]    per-block lse^2 partials
};

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float sigmoid_f(float x) { return __frcp_rn(1.f + __expf(-x)); }

__device__ __forceinline__ float group_max(float v, int G) {
  for (int off = 1; off < G; off <<= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Xor butterfly: every lane of the group ends with the same bits (fp add is commutative).
__device__ __forceinline__ float group_sum(float v, int G) {
  for (int off = 1; off < G; off <<= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return group_sum(v, 32); }

// Selection order: larger key first, the lower expert id on equal keys.
__device__ __forceinline__ bool ranks_before(float key_a, int id_a, float key_b, int id_b) {
  return key_a > key_b || (key_a == key_b && id_a < id_b);
}

// A lane's best KMAX (key, id, weight) triples, sorted by ranks_before; empty slots are (-inf, INT_MAX)
// so any real expert (even with key -inf) ranks before them.
template <int KMAX>
struct TopList {
  float key[KMAX];
  int id[KMAX];
  float w[KMAX];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      key[j] = -INFINITY;
      id[j] = INT_MAX;
      w[j] = 0.f;
    }
  }

  __device__ __forceinline__ void insert(float k, int i, float wt) {
    if (!ranks_before(k, i, key[KMAX - 1], id[KMAX - 1])) return;
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      if (ranks_before(k, i, key[j], id[j])) {
        const float tk = key[j], tw = w[j];
        const int ti = id[j];
        key[j] = k, id[j] = i, w[j] = wt;
        k = tk, i = ti, wt = tw;
      }
    }
  }

  __device__ __forceinline__ void pop_front() {
#pragma unroll
    for (int j = 0; j + 1 < KMAX; ++j) key[j] = key[j + 1], id[j] = id[j + 1], w[j] = w[j + 1];
    key[KMAX - 1] = -INFINITY, id[KMAX - 1] = INT_MAX, w[KMAX - 1] = 0.f;
  }
};

__device__ __forceinline__ int div_experts(unsigned i, int E, unsigned magic) {
  return E == 1 ? static_cast<int>(i) : static_cast<int>(__umulhi(i, magic));
}

// One tile of logits (n_el = n_tok * E contiguous elements) on its way from global to shared memory:
// fetch() issues the loads into registers (a scalar of the unaligned head and of the tail, then 16-byte
// vectors), store() converts to fp32 and writes tile[r * stride + e]. The kernel fetches tile i + 1
// before routing tile i, so the global-memory latency of all but the first tile is hidden.
template <typename T>
struct TileRegs {
  static constexpr int kVec = 16 / sizeof(T);
  // The host keeps the fp32 tile within kTileBytesBudget, so a thread holds at most this many vectors.
  static constexpr int kMaxVec = kTileBytesBudget / 4 / kVec / kThreads;
  static_assert(kMaxVec >= 1, "tile budget too small for one vector per thread");
  uint4 vec[kMaxVec];
  T head, tail;
  int n_el, head_n, n_vec;

  __device__ __forceinline__ void fetch(const T* __restrict__ src, int n) {
    n_el = n;
    const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(src) & 15u);
    head_n = min(n, static_cast<int>(((16 - misalign) & 15) / sizeof(T)));
    n_vec = (n - head_n) / kVec;
    const int tail_i = head_n + n_vec * kVec + threadIdx.x;
    if (static_cast<int>(threadIdx.x) < head_n) head = src[threadIdx.x];
    if (tail_i < n) tail = src[tail_i];
    const uint4* v = reinterpret_cast<const uint4*>(src + head_n);
#pragma unroll
    for (int j = 0; j < kMaxVec; ++j) {
      const int idx = threadIdx.x + j * kThreads;
      if (idx < n_vec) vec[j] = __ldg(v + idx);
    }
  }

  __device__ __forceinline__ void store(const RouteParams& p, float* tile) const {
    const int E = p.num_experts, stride = p.tile_stride;
    const auto put = [&](int i, float x) {
      const int r = div_experts(static_cast<unsigned>(i), E, p.e_magic);
      tile[r * stride + (i - r * E)] = x;
    };
    const int tail_i = head_n + n_vec * kVec + threadIdx.x;
    if (static_cast<int>(threadIdx.x) < head_n) put(threadIdx.x, to_float(head));
    if (tail_i < n_el) put(tail_i, to_float(tail));
#pragma unroll
    for (int j = 0; j < kMaxVec; ++j) {
      const int idx = threadIdx.x + j * kThreads;
      if (idx < n_vec) {
        const T* el = reinterpret_cast<const T*>(&vec[j]);
#pragma unroll
        for (int q = 0; q < kVec; ++q) put(head_n + idx * kVec + q, to_float(el[q]));
      }
    }
  }
};

// Routes the n_tok tokens of the tile starting at token t0 (G lanes per token row). Writes topk_ids /
// topk_weights, counts the block's pairs per expert in s_count, overwrites the tile with normalised
// scores, and adds the tokens' lse^2 to lse_acc (first lane of each group).
template <int KMAX>
__device__ __forceinline__ void route_tile(const RouteParams& p, const float* s_bias, int* s_count, float* tile,
                                           int t0, int n_tok, float& lse_acc) {
  const int G = 1 << p.group_log2;
  const int lane_g = threadIdx.x & (G - 1);
  const int row = threadIdx.x >> p.group_log2;
  const int E = p.num_experts, k = p.top_k;
  const bool valid = row < n_tok;
  float* x = tile + row * p.tile_stride;

  float m = -INFINITY;
  if (valid)
    for (int e = lane_g; e < E; e += G) m = fmaxf(m, x[e]);
  m = group_max(m, G);
  float sum_exp = 0.f, sum_sig = 0.f;
  if (valid) {
    for (int e = lane_g; e < E; e += G) {
      const float v = x[e];
      sum_exp += __expf(v - m);
      if (p.sigmoid) sum_sig += sigmoid_f(v);
    }
  }
  sum_exp = group_sum(sum_exp, G);
  sum_sig = group_sum(sum_sig, G);
  const float inv_exp = __frcp_rn(sum_exp), inv_sig = __frcp_rn(sum_sig);

  TopList<KMAX> top;
  top.init();
  if (valid) {
    for (int e = lane_g; e < E; e += G) {
      const float v = x[e];
      float score, key, prob;
      if (p.sigmoid) {
        score = sigmoid_f(v);
        key = score + s_bias[e];
        prob = score * inv_sig;
      } else {
        score = __expf(v - m) * inv_exp;
        key = prob = score;
      }
      x[e] = prob;
      // A NaN key would match no comparison and could leave a slot without an expert.
      top.insert(isnan(key) ? -INFINITY : key, e, score);
    }
    if (lane_g == 0) {
      const float lse = m + __logf(sum_exp);
      lse_acc += lse * lse;
    }
  }

  // Merge the G lane lists: round r takes the group's best head (shuffle arg-max, same result in
  // every lane) and its owner pops it. Expert ids are unique across lanes, so exactly one lane pops.
  int sel_id[KMAX];
  float sel_w[KMAX];
  float w_sum = 0.f;
#pragma unroll
  for (int r = 0; r < KMAX; ++r) {
    sel_id[r] = 0;
    sel_w[r] = 0.f;
    if (r < k) {
      float bk = top.key[0], bw = top.w[0];
      int bi = top.id[0];
      for (int off = 1; off < G; off <<= 1) {
        const float ok = __shfl_xor_sync(kFullMask, bk, off), ow = __shfl_xor_sync(kFullMask, bw, off);
        const int oi = __shfl_xor_sync(kFullMask, bi, off);
        if (ranks_before(ok, oi, bk, bi)) bk = ok, bi = oi, bw = ow;
      }
      if (top.id[0] == bi) top.pop_front();
      sel_id[r] = bi;
      sel_w[r] = bw;
      w_sum += bw;
    }
  }
  if (!valid) return;
  const int64_t base = static_cast<int64_t>(t0 + row) * k;
#pragma unroll
  for (int r = 0; r < KMAX; ++r) {
    if (r < k && (r & (G - 1)) == lane_g) {
      p.topk_ids[base + r] = sel_id[r];
      p.topk_weights[base + r] = p.norm_topk ? __fdiv_rn(sel_w[r], w_sum) : sel_w[r];
      atomicAdd(&s_count[sel_id[r]], 1);
    }
  }
}

template <typename Elem, int KMAX>
__global__ void __launch_bounds__(kThreads) moe_route_fwd_kernel(RouteParams p) {
  extern __shared__ float s_tile[];  // [TB, tile_stride]
  __shared__ float s_bias[kMaxExperts];
  __shared__ int s_count[kMaxExperts];  // phase 1: this block's pairs per expert
  __shared__ int s_base[kMaxExperts];   // phase 2: next output slot of each expert for this block
  __shared__ float s_part[kThreads];    // per-thread partials, thread = part * E + col
  __shared__ int s_itot[kThreads];
  __shared__ int s_ibefore[kThreads];
  __shared__ int s_wcnt[kWarps][kMaxExperts];  // phase 2: pairs of a scatter chunk per (warp, expert)
  __shared__ float s_warp_f[kWarps];
  __shared__ int s_warp_i[kWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int E = p.num_experts, k = p.top_k, T = p.num_tokens, TB = p.tile_tokens;
  const int B = gridDim.x, b = blockIdx.x;

  for (int e = tid; e < kMaxExperts; e += kThreads) {
    s_count[e] = 0;
    s_bias[e] = (p.sigmoid && e < E) ? p.expert_bias[e] : 0.f;
  }
  for (int i = tid; i < kWarps * kMaxExperts; i += kThreads) (&s_wcnt[0][0])[i] = 0;

  // ---------------- phase 1: route this block's tiles ----------------
  // Contiguous, balanced tile ranges: block order == token order, which the stable sort relies on.
  const int tile_begin = static_cast<int>(static_cast<int64_t>(b) * p.num_tiles / B);
  const int tile_end = static_cast<int>(static_cast<int64_t>(b + 1) * p.num_tiles / B);
  const int tok_begin = min(tile_begin * TB, T), tok_end = min(tile_end * TB, T);
  // Column-sum layout: R threads per expert, thread tid = part * E + col.
  const int R = kThreads / E, col = tid % E, part = tid / E;
  float prob_acc = 0.f, lse_acc = 0.f;
  const Elem* logits = static_cast<const Elem*>(p.logits);
  TileRegs<Elem> regs;
  if (tile_begin < tile_end)
    regs.fetch(logits + static_cast<int64_t>(tile_begin) * TB * E, min(TB, T - tile_begin * TB) * E);
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int t0 = tile * TB, n_tok = min(TB, T - t0);
    __syncthreads();  // the previous tile's column sums are done with s_tile (and init is visible)
    regs.store(p, s_tile);
    if (tile + 1 < tile_end)
      regs.fetch(logits + static_cast<int64_t>(t0 + TB) * E, min(TB, T - t0 - TB) * E);
    __syncthreads();
    route_tile<KMAX>(p, s_bias, s_count, s_tile, t0, n_tok, lse_acc);
    __syncthreads();
    if (part < R)
      for (int r = part; r < n_tok; r += R) prob_acc += s_tile[r * p.tile_stride + col];
  }
  s_part[tid] = part < R ? prob_acc : 0.f;
  lse_acc = warp_sum(lse_acc);
  if (lane == 0) s_warp_f[warp] = lse_acc;
  __syncthreads();
  if (tid < E) {
    float s = 0.f;
    for (int q = 0; q < R; ++q) s += s_part[q * E + tid];
    p.ws_prob[tid * B + b] = s;
    p.ws_counts[b * E + tid] = s_count[tid];
  }
  if (tid == 0) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += s_warp_f[w];
    p.ws_lse[b] = s;
  }

  cooperative_groups::this_grid().sync();

  // ---------------- phase 2: offsets, statistics, stable scatter ----------------
  // Per expert: total pairs, and pairs in blocks before b. Thread (part, col) sums counts[q][col] over
  // the blocks q = part (mod R) with independent (unrolled, coalesced) loads; one thread per expert then
  // adds the R parts. This whole-matrix read (E * B ints from L2) replaces a second grid barrier.
  int tot_part = 0, before_part = 0;
  if (part < R) {
#pragma unroll 8
    for (int q = part; q < B; q += R) {
      const int c = p.ws_counts[q * E + col];
      tot_part += c;
      before_part += q < b ? c : 0;
    }
  }
  s_itot[tid] = tot_part;
  s_ibefore[tid] = before_part;
  __syncthreads();
  int tot = 0, before = 0;
  if (tid < E) {
    for (int q = 0; q < R; ++q) tot += s_itot[q * E + tid], before += s_ibefore[q * E + tid];
  }
  // Exclusive scan of the totals over experts, one thread per expert.
  int incl = tot;
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) s_warp_i[warp] = incl;
  __syncthreads();
  int excl = incl - tot;
  for (int w = 0; w < warp; ++w) excl += s_warp_i[w];
  if (tid < E) {
    s_base[tid] = excl + before;
    if (b == 0) p.expert_counts[tid] = tot, p.expert_offsets[tid] = excl;
  }
  if (b == 0 && tid == 0) p.expert_offsets[E] = T * k;
  // Final statistics: job j < E sums prob partials of expert j, job E the lse^2 partials; each is a
  // warp's fixed-order sum over the B blocks.
  for (int j = b * kWarps + warp; j <= E; j += B * kWarps) {
    const float* src = j < E ? p.ws_prob + j * B : p.ws_lse;
    float s = 0.f;
    for (int q = lane; q < B; q += 32) s += src[q];
    s = warp_sum(s);
    if (lane == 0) *(j < E ? p.prob_sum + j : p.lse_sq_sum) = s;
  }
  __syncthreads();  // s_base complete
  // Stable scatter of this block's pairs [tok_begin * k, tok_end * k), 256 at a time in pair order:
  // slot = next slot of the expert + same-expert pairs of earlier warps + rank within the warp.
  const int p_end = tok_end * k;
  for (int c0 = tok_begin * k; c0 < p_end; c0 += kThreads) {
    const int pair = c0 + tid;
    const bool v = pair < p_end;
    const int e = v ? p.topk_ids[pair] : -1;  // written by this block in phase 1 (plain load, not __ldg)
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (v && rank == 0) s_wcnt[warp][e] = __popc(peers);
    __syncthreads();
    if (v) {
      int slot = s_base[e] + rank;
      for (int w = 0; w < warp; ++w) slot += s_wcnt[w][e];
      p.sorted_pair_idx[slot] = pair;
    }
    __syncthreads();
    if (tid < E) {
      int n = 0;
      for (int w = 0; w < kWarps; ++w) n += s_wcnt[w][tid], s_wcnt[w][tid] = 0;
      s_base[tid] += n;
    }
    __syncthreads();
  }
}

}  // namespace moe_routing
}  // namespace onerec_fast
