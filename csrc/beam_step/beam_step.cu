// Fused trie-constrained beam step: one launch per step.
//
// Work split. A batch row's `beam` parents are spread over a thread-block cluster of C <= 8 CTAs (P parents
// each): the "full" normalizer needs a log-sum-exp over every logit of every live parent (4096 x 8192 bf16 =
// 67 MB at OneRec's shape), which one CTA per batch row (32 CTAs) could not stream fast enough, while a
// cluster gives 256 CTAs and still merges its results through distributed shared memory in the same launch
// (no global workspace, no counters to reset, nothing that breaks CUDA-graph replay).
//
// Per CTA:
//   1. parent state (node, score, child range); dead parents (-inf score) read nothing.
//   2. normalizer per live parent, split into fixed-size chunks (one warp each; partial (max, sum) in
//      shared memory, combined in chunk order). The chunking depends only on the row, so two identical rows
//      get bit-identical log-sum-exps wherever they run: exact ties in the input stay exact ties.
//   3. exact local top-`beam` of the CTA's candidates by a radix select on the 64-bit key
//      (order(score) << 32 | ~index): 8-bit digits from the top with early exit once the bucket holding
//      the beam-th key is taken whole (typically 3-4 passes). Why radix select: the candidate count is
//      ragged (1 to 8192 children per parent) and the kernel must tolerate any of it; a per-parent top-beam
//      plus merge would cost beam * P list entries per CTA even when parents have 2 children, while the
//      radix passes cost O(candidates) from a shared-memory key cache (24K keys; keys beyond it are
//      recomputed from L2 in each pass, correct but slower). Keys are unique, so the result is exact and
//      deterministic whatever the thread schedule.
//   4. the sorted local list is published in shared memory; after a cluster barrier every CTA copies the C
//      lists, ranks its own entries against the others by binary search (a merge of sorted lists), and writes
//      the entries of global rank < beam. Rank 0 fills the slots nobody reached with -inf / -1.
#include "beam_step/beam_step.cuh"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common/cuda_check.h"

namespace onerec_fast {
namespace beam_step {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCluster = 8;          // portable cluster size
constexpr int kFullUnroll = 4;          // 16-byte vectors per lane in one "full" chunk
constexpr int kValidPerLane = 8;        // children per lane in one "valid" chunk
constexpr int kValidChunk = 32 * kValidPerLane;
constexpr int kBatch = 4;               // candidates per lane per loop trip (loads in flight)
// Shared-memory key cache: 24K keys (96 KB), 3 dense parents of V = 8192. Two CTAs per SM still fit (the
// register count allows no more), and any CTA over 24K candidates recomputes the rest in each radix pass.
constexpr int kCacheKeys = 24576;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ static float get(float x) { return x; }
};
template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ static float get(__half x) { return __half2float(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ static float get(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// Elements of one "full" chunk: every lane reads kFullUnroll 16-byte vectors.
template <typename T>
constexpr int full_chunk() {
  return 32 * kFullUnroll * Elem<T>::kVec;
}

// Shared-memory layout (byte offsets), computed on the host and passed in.
struct Layout {
  int mine, tmp, region, cs0, off, uoff, score, lse, part_m, part_s, hist, misc, mcnt, total;
};

struct KernelParams {
  BeamStepArgs a;
  int cluster;    // C: CTAs per batch row
  int parents;    // P: parents per CTA (the last CTA may hold fewer)
  int cache;      // keys the shared-memory cache holds
  bool aligned;   // logits base and row stride allow 16-byte loads
  Layout lay;
};

// misc[] slots
enum { kNValid = 0, kCount, kDigit, kAbove, kMiscSlots };

struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * exp2f((a.m - m) * kLog2e) + b.s * exp2f((b.m - m) * kLog2e)};
}

// (max, sum exp(x - max)) of n values, then over the warp (tree order fixed: the result in lane 0 is a
// deterministic function of the 32 lanes' values).
template <int N>
__device__ __forceinline__ MaxSum warp_max_sum(const float (&x)[N]) {
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < N; ++i) m = fmaxf(m, x[i]);
  float s = 0.f;
  if (m != -INFINITY) {
#pragma unroll
    for (int i = 0; i < N; ++i) s += exp2f((x[i] - m) * kLog2e);
  }
  MaxSum r{m, s};
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum o{__shfl_down_sync(0xffffffffu, r.m, off), __shfl_down_sync(0xffffffffu, r.s, off)};
    r = combine(r, o);
  }
  return r;
}

// Order-preserving map float -> uint32 (larger score -> larger key); 0 marks "no candidate" (-inf, NaN).
// -0.0 maps like +0.0, as in the reference's key.
__device__ __forceinline__ uint32_t score_key(float s) {
  if (!(s > -INFINITY)) return 0u;
  uint32_t b = __float_as_uint(s);
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_score(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* row, int64_t col, int width, bool aligned,
                                         float (&out)[Elem<T>::kVec]) {
  constexpr int N = Elem<T>::kVec;
  if (aligned && col + N <= width) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + col));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = Elem<T>::get(e[i]);
  } else {  // same elements per lane as the vector path, so results do not depend on alignment
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = col + i < width ? Elem<T>::get(row[col + i]) : -INFINITY;
  }
}

// Inclusive prefix sum over the lanes of a whole warp.
__device__ __forceinline__ int warp_inclusive_sum(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += y;
  }
  return v;
}

// Exclusive prefix sum of a[0..n) in place, total in a[n]; run by one whole warp.
__device__ void warp_exclusive_scan(int* a, int n) {
  const int lane = threadIdx.x & 31;
  const int per = (n + 31) / 32;
  const int begin = min(n, lane * per), end = min(n, begin + per);
  int sum = 0;
  for (int i = begin; i < end; ++i) sum += a[i];
  const int incl = warp_inclusive_sum(sum);
  int run = incl - sum;
  for (int i = begin; i < end; ++i) {
    const int v = a[i];
    a[i] = run;
    run += v;
  }
  if (lane == 31) a[n] = incl;
}

// Largest p in [0, n) with off[p] <= f (off ascending, off[0] = 0 <= f).
__device__ __forceinline__ int find_segment(const int* off, int n, int f) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (off[mid] <= f) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Number of entries greater than `key` in a descending list of n unique keys.
__device__ __forceinline__ int count_greater(const uint64_t* list, int n, uint64_t key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (list[mid] > key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Warp 0: the digit d of the radix pass holding the krem-th largest key (hist over 256 digits), and how
// many keys lie in digits above it.
__device__ void find_digit(const int* hist, int krem, int* misc) {
  const int lane = threadIdx.x & 31;
  int h[8];
  int sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    h[i] = hist[255 - lane * 8 - i];
    sum += h[i];
  }
  const int incl = warp_inclusive_sum(sum);
  int run = incl - sum;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (run < krem && run + h[i] >= krem) {
      misc[kDigit] = 255 - lane * 8 - i;
      misc[kAbove] = run;
    }
    run += h[i];
  }
}

template <typename T>
struct Cta {
  const KernelParams& kp;
  const T* logits;
  int64_t row0;  // global row of this CTA's first parent
  int p0;        // its first parent within the batch row
  int np;        // parents it holds
  const int* cs0;
  const int* off;
  const float* score;
  const float* lse;
  const uint32_t* cache;

  // Keys of candidates f = base + i*32 + lane (i < kBatch) with f >= from: computed from the logits, with
  // every load of the batch issued before the first use. f >= total gives 0.
  __device__ void compute_keys(int base, int from, int total, uint32_t (&key)[kBatch]) const {
    const BeamStepArgs& a = kp.a;
    const int lane = threadIdx.x & 31;
    int p[kBatch];
    int64_t col[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int f = base + i * 32 + lane;
      p[i] = -1;
      col[i] = -1;
      if (f < total && f >= from) {
        p[i] = find_segment(off, np, f);
        const int j = f - off[p[i]];
        col[i] = a.by_child ? j : __ldg(a.child_tokens + cs0[p[i]] + j);
      }
    }
    float x[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      x[i] = -INFINITY;
      if (col[i] >= 0 && col[i] < a.width) x[i] = Elem<T>::get(logits[(row0 + p[i]) * a.row_stride + col[i]]);
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (p[i] >= 0) key[i] = score_key((x[i] - lse[p[i]]) + score[p[i]]);
    }
  }

  // Keys of the batch at `base`: from the cache below `cached`, computed above it.
  __device__ void keys(int base, int cached, int total, uint32_t (&key)[kBatch]) const {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int f = base + i * 32 + lane;
      key[i] = f < cached ? cache[f] : 0u;
    }
    if (base + kBatch * 32 > cached) compute_keys(base, cached, total, key);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) beam_step_kernel(const __grid_constant__ KernelParams kp) {
  extern __shared__ __align__(16) unsigned char smem[];
  const BeamStepArgs& a = kp.a;
  const Layout& L = kp.lay;
  uint64_t* mine = reinterpret_cast<uint64_t*>(smem + L.mine);    // sorted local top list (read by the cluster)
  uint64_t* tmp = reinterpret_cast<uint64_t*>(smem + L.tmp);      // unsorted local selection
  uint32_t* cache = reinterpret_cast<uint32_t*>(smem + L.region);  // candidate keys, then the merge buffer
  uint64_t* mbuf = reinterpret_cast<uint64_t*>(smem + L.region);
  int* cs0 = reinterpret_cast<int*>(smem + L.cs0);
  int* off = reinterpret_cast<int*>(smem + L.off);
  int* uoff = reinterpret_cast<int*>(smem + L.uoff);
  float* score = reinterpret_cast<float*>(smem + L.score);
  float* lse = reinterpret_cast<float*>(smem + L.lse);
  float* part_m = reinterpret_cast<float*>(smem + L.part_m);
  float* part_s = reinterpret_cast<float*>(smem + L.part_s);
  int* hist = reinterpret_cast<int*>(smem + L.hist);
  int* misc = reinterpret_cast<int*>(smem + L.misc);
  int* mcnt = reinterpret_cast<int*>(smem + L.mcnt);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int C = kp.cluster, k = a.beam, width = a.width;
  const int crank = blockIdx.x % C;
  const int64_t brow = blockIdx.x / C;
  const int p0 = crank * kp.parents;
  const int np = max(0, min(kp.parents, k - p0));
  const int64_t row0 = brow * k + p0;
  const T* logits = static_cast<const T*>(a.logits);
  const bool need_lse = a.row_lse == nullptr;
  constexpr int kFullChunk = full_chunk<T>();

  // 1. Parent state. off[] gets child counts, uoff[] normalizer chunk counts; both are scanned below.
  for (int t = tid; t < np; t += kThreads) {
    const int64_t r = row0 + t;
    const float s = a.scores[r];
    const int n = a.nodes[r];
    int start = 0, cnt = 0;
    if (s > -INFINITY && n >= 0 && n < a.num_nodes) {
      const int lo = a.child_start[n], hi = a.child_start[n + 1];
      if (lo >= 0 && hi > lo && hi <= a.num_children) {
        start = lo;
        cnt = min(hi - lo, width);
      }
    }
    cs0[t] = start;
    off[t] = cnt;
    score[t] = s;
    int chunks = 0;
    if (cnt > 0 && need_lse) chunks = a.normalize_valid ? (cnt + kValidChunk - 1) / kValidChunk
                                                        : (width + kFullChunk - 1) / kFullChunk;
    uoff[t] = chunks;
    lse[t] = (cnt > 0 && !need_lse) ? a.row_lse[r] : 0.f;
  }
  if (tid < 256) hist[tid] = 0;
  if (tid < kMiscSlots) misc[tid] = 0;
  __syncthreads();
  if (warp == 0) warp_exclusive_scan(off, np);
  if (warp == 1) warp_exclusive_scan(uoff, np);
  __syncthreads();
  const int total = off[np];

  // 2. Normalizer chunks: (row, chunk) units spread over the warps.
  const int units = uoff[np];
  for (int u = warp; u < units; u += kWarps) {
    const int p = find_segment(uoff, np, u);
    const int c = u - uoff[p];
    const T* row = logits + (row0 + p) * a.row_stride;
    MaxSum ms;
    if (!a.normalize_valid) {
      constexpr int V = Elem<T>::kVec;
      float x[kFullUnroll * V];
#pragma unroll
      for (int i = 0; i < kFullUnroll; ++i) {
        float v[V];
        load_vec<T>(row, static_cast<int64_t>(c) * kFullChunk + (i * 32 + lane) * V, width, kp.aligned, v);
#pragma unroll
        for (int e = 0; e < V; ++e) x[i * V + e] = v[e];
      }
      ms = warp_max_sum(x);
    } else {
      const int cnt = off[p + 1] - off[p];
      int col[kValidPerLane];
#pragma unroll
      for (int i = 0; i < kValidPerLane; ++i) {
        const int j = c * kValidChunk + i * 32 + lane;
        col[i] = j < cnt ? (a.by_child ? j : __ldg(a.child_tokens + cs0[p] + j)) : -1;
      }
      float x[kValidPerLane];
#pragma unroll
      for (int i = 0; i < kValidPerLane; ++i)
        x[i] = (col[i] >= 0 && col[i] < width) ? Elem<T>::get(row[col[i]]) : -INFINITY;
      ms = warp_max_sum(x);
    }
    if (lane == 0) {
      part_m[u] = ms.m;
      part_s[u] = ms.s;
    }
  }
  __syncthreads();
  for (int t = tid; t < np; t += kThreads) {
    if (uoff[t + 1] > uoff[t]) {
      MaxSum ms{-INFINITY, 0.f};
      for (int u = uoff[t]; u < uoff[t + 1]; ++u) ms = combine(ms, MaxSum{part_m[u], part_s[u]});
      lse[t] = ms.m + __logf(ms.s);
    }
  }
  __syncthreads();

  // 3. Local exact top-k. Pass 0 computes every key, fills the cache, counts candidates and histograms the
  //    top digit. Loops run warp-uniform trip counts so warp collectives are safe inside.
  const Cta<T> cta{kp, logits, row0, p0, np, cs0, off, score, lse, cache};
  const int stride = kThreads * kBatch;
  const int first = warp * 32 * kBatch;
  for (int base = first; base < total; base += stride) {
    uint32_t key[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) key[i] = 0u;
    cta.compute_keys(base, 0, total, key);
    int valid = 0;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int f = base + i * 32 + lane;
      if (f < kp.cache && f < total) cache[f] = key[i];
      valid += key[i] != 0u;
      const unsigned d = key[i] != 0u ? key[i] >> 24 : 256u;
      const unsigned peers = __match_any_sync(0xffffffffu, d);
      if (d < 256u && lane == __ffs(peers) - 1) atomicAdd(&hist[d], __popc(peers));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) valid += __shfl_xor_sync(0xffffffffu, valid, o);
    if (lane == 0 && valid) atomicAdd(&misc[kNValid], valid);
  }
  __syncthreads();
  const int cached = min(total, kp.cache);
  const int n_valid = misc[kNValid];

  // Local 64-bit key of candidate f: (score key << 32) | ~f (unique; ties -> lower f = lower (parent, child)).
  // Selected: key32 != 0 and key >= thr.
  uint64_t thr = 1ull << 32;
  if (n_valid > k) {
    uint64_t prefix = 0, mask = 0;
    int krem = k;
    for (int shift = 56;; shift -= 8) {
      if (shift != 56) {
        for (int base = first; base < total; base += stride) {
          uint32_t key[kBatch];
          cta.keys(base, cached, total, key);
#pragma unroll
          for (int i = 0; i < kBatch; ++i) {
            const uint32_t f = static_cast<uint32_t>(base + i * 32 + lane);
            const uint64_t full = (static_cast<uint64_t>(key[i]) << 32) | (0xffffffffu - f);
            const unsigned d = (key[i] != 0u && (full & mask) == prefix) ? static_cast<unsigned>((full >> shift) & 0xffu)
                                                                          : 256u;
            const unsigned peers = __match_any_sync(0xffffffffu, d);
            if (d < 256u && lane == __ffs(peers) - 1) atomicAdd(&hist[d], __popc(peers));
          }
        }
        __syncthreads();
      }
      if (warp == 0) find_digit(hist, krem, misc);
      __syncthreads();
      const int d = misc[kDigit];
      krem -= misc[kAbove];
      prefix |= static_cast<uint64_t>(d) << shift;
      mask |= 0xffull << shift;
      const bool done = hist[d] == krem || shift == 0;
      __syncthreads();  // everyone has read hist and misc before they are reset
      if (done) break;
      if (tid < 256) hist[tid] = 0;
      __syncthreads();
    }
    thr = prefix;
  }

  // Compaction of the selected candidates into tmp[], as global keys (flat index over the batch row).
  for (int base = first; base < total; base += stride) {
    uint32_t key[kBatch];
    cta.keys(base, cached, total, key);
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int f = base + i * 32 + lane;
      const uint64_t full = (static_cast<uint64_t>(key[i]) << 32) | (0xffffffffu - static_cast<uint32_t>(f));
      const bool sel = key[i] != 0u && full >= thr;
      const unsigned ballot = __ballot_sync(0xffffffffu, sel);
      int pos = 0;
      if (lane == 0 && ballot) pos = atomicAdd(&misc[kCount], __popc(ballot));
      pos = __shfl_sync(0xffffffffu, pos, 0);
      if (sel) {
        const int p = find_segment(off, np, f);
        const uint32_t flat = static_cast<uint32_t>(p0 + p) * static_cast<uint32_t>(width) +
                              static_cast<uint32_t>(f - off[p]);
        tmp[pos + __popc(ballot & ((1u << lane) - 1u))] = (static_cast<uint64_t>(key[i]) << 32) | (0xffffffffu - flat);
      }
    }
  }
  __syncthreads();
  const int m = misc[kCount];  // == min(k, n_valid)
  for (int e = tid; e < m; e += kThreads) {
    const uint64_t key = tmp[e];
    int r = 0;
    for (int x = 0; x < m; ++x) r += tmp[x] > key;
    mine[r] = key;
  }
  __syncthreads();

  // 4. Merge the cluster's sorted lists.
  const uint64_t* lists = mine;
  int list_stride = 0;
  if (C > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every CTA's list and count are final
    for (int c = 0; c < C; ++c) {
      const uint64_t* remote = cluster.map_shared_rank(mine, c);
      const int rc = *cluster.map_shared_rank(misc + kCount, c);
      if (tid == 0) mcnt[c] = rc;
      for (int e = tid; e < rc; e += kThreads) mbuf[c * k + e] = remote[e];
    }
    cluster.sync();  // nobody reads another CTA's shared memory after this, so CTAs may exit
#endif
    lists = mbuf;
    list_stride = k;
  } else if (tid == 0) {
    mcnt[0] = m;
  }
  __syncthreads();
  for (int e = tid; e < m; e += kThreads) {
    const uint64_t key = mine[e];
    int rank = e;
    for (int c = 0; c < C; ++c)
      if (c != crank) rank += count_greater(lists + c * list_stride, mcnt[c], key);
    if (rank < k) {
      const uint32_t flat = 0xffffffffu - static_cast<uint32_t>(key);
      const int pg = static_cast<int>(flat / static_cast<uint32_t>(width));
      const int ci = cs0[pg - p0] + static_cast<int>(flat - static_cast<uint32_t>(pg) * width);
      const int64_t o = brow * k + rank;
      a.out_tokens[o] = a.child_tokens[ci];
      a.out_parents[o] = pg;
      a.out_nodes[o] = ci;
      a.out_scores[o] = key_score(static_cast<uint32_t>(key >> 32));
    }
  }
  if (crank == 0) {
    int all = 0;
    for (int c = 0; c < C; ++c) all += mcnt[c];
    for (int s = min(all, k) + tid; s < k; s += kThreads) {
      const int64_t o = brow * k + s;
      a.out_tokens[o] = -1;
      a.out_parents[o] = -1;
      a.out_nodes[o] = -1;
      a.out_scores[o] = -INFINITY;
    }
  }
}

int align16(int x) { return (x + 15) & ~15; }

Layout make_layout(int P, int C, int k, int cache, int units) {
  Layout l{};
  int o = 0;
  auto take = [&o](int bytes) {
    const int at = o;
    o = align16(o + bytes);
    return at;
  };
  l.mine = take(k * 8);
  l.tmp = take(k * 8);
  l.region = take(cache * 4 > C * k * 8 ? cache * 4 : C * k * 8);
  l.cs0 = take(P * 4);
  l.off = take((P + 1) * 4);
  l.uoff = take((P + 1) * 4);
  l.score = take(P * 4);
  l.lse = take(P * 4);
  l.part_m = take(units * 4);
  l.part_s = take(units * 4);
  l.hist = take(256 * 4);
  l.misc = take(kMiscSlots * 4);
  l.mcnt = take(kMaxCluster * 4);
  l.total = o;
  return l;
}

template <typename T>
cudaError_t launch_typed(const BeamStepArgs& a, cudaStream_t stream) {
  int dev = 0, cluster_ok = 0, smem_optin = 0;
  ONEREC_RETURN_IF_ERROR(cudaGetDevice(&dev));
  ONEREC_RETURN_IF_ERROR(cudaDeviceGetAttribute(&cluster_ok, cudaDevAttrClusterLaunch, dev));
  ONEREC_RETURN_IF_ERROR(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));

  KernelParams kp{};
  kp.a = a;
  // Spread the beam's parents over as many CTAs as a portable cluster allows, none left empty.
  int C = cluster_ok ? (a.beam < kMaxCluster ? a.beam : kMaxCluster) : 1;
  const int P = (a.beam + C - 1) / C;
  C = (a.beam + P - 1) / P;
  kp.cluster = C;
  kp.parents = P;
  int chunks = 0;
  if (a.row_lse == nullptr)
    chunks = a.normalize_valid ? (a.width + kValidChunk - 1) / kValidChunk
                               : (a.width + full_chunk<T>() - 1) / full_chunk<T>();
  kp.cache = kCacheKeys;
  kp.lay = make_layout(P, C, a.beam, kp.cache, P * chunks);
  if (kp.lay.total > smem_optin) {  // shrink the cache (keys beyond it are recomputed) before giving up
    kp.cache = (smem_optin - (kp.lay.total - kp.lay.region)) / 4 - 64;
    kp.lay = make_layout(P, C, a.beam, kp.cache > 0 ? kp.cache : 0, P * chunks);
    if (kp.cache < 0 || kp.lay.total > smem_optin) return cudaErrorInvalidValue;
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(a.logits);
  kp.aligned = base % 16 == 0 && (a.row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;

  auto kernel = beam_step_kernel<T>;
  ONEREC_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kp.lay.total));
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(a.batch) * C);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kp.lay.total;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = C;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = C > 1 ? 1 : 0;
  ONEREC_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, kernel, kp));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_beam_step(const BeamStepArgs& a, cudaStream_t stream) {
  if (a.beam < 1 || a.beam > kMaxBeam || a.width < 1 || a.batch < 0) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(a.beam) * a.width >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  if (a.by_child && a.row_lse == nullptr && !a.normalize_valid) return cudaErrorInvalidValue;
  if (a.batch == 0) return cudaSuccess;
  switch (a.dtype) {
    case LogitsDtype::kFloat32: return launch_typed<float>(a, stream);
    case LogitsDtype::kFloat16: return launch_typed<__half>(a, stream);
    case LogitsDtype::kBFloat16: return launch_typed<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace beam_step
}  // namespace onerec_fast
