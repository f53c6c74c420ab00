// Rotary fused with the KV-cache append (the CUDA twin of the cache kernels of pi_kernels/inference.py).
//
// For the new tokens: rotate q into q_out, rotate k into the cache and copy v into the cache, in one launch. The
// cache is per sequence (batch, max_len, kv heads, d), token t of row b at cache_seqlens[b] + t, or paged
// (num_blocks, block_size, kv heads, d) through a slot mapping (-1: padding, not written). Either way through
// strides, so FlashInfer's HND layout or the halves of a combined (pages, 2, ...) cache are views, not copies.
// A block handles consecutive tokens as in rotary.cuh: positions and destination rows first, cos/sin of every
// (token, pair) once into shared memory, then (token, item) work where an item is a chunk of a q head, of a k head,
// or of a v head. Indices outside the cache are dropped here even if the host checks were skipped.
//
// The vLLM-convention rotary (in place, cos/sin from a cache or computed) is launch_rotary of rotary.cuh with
// RotaryParams::cos_sin_cache set or not: the same kernel, so it is not repeated here.
#pragma once

#include "rotary.cuh"

namespace pi_kernels {
namespace detail {

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) cache_append_kernel(const CacheAppendParams p, const LaunchPlan plan) {
  __shared__ float2 cos_sin[kMaxCosSin];  // (tokens_per_block, rotary_half)
  __shared__ int64_t token_pos[kMaxTokensPerBlock];
  // Offsets of (token, head 0, dim 0) in q, k, v, q_out, k_cache, v_cache.
  __shared__ int64_t token_row[6][kMaxTokensPerBlock];
  __shared__ bool token_valid[kMaxTokensPerBlock];  // a token of this launch
  __shared__ bool token_cached[kMaxTokensPerBlock];  // ... whose cache index is in range

  const int tokens_per_block = plan.tokens_per_block, chunks_per_head = plan.chunks_per_head;
  const int v_chunks = plan.v_chunks;
  const int64_t total = p.batch * p.seq_len;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int rotary_half = static_cast<int>(p.rotary_dim / 2);

  const int thread = static_cast<int>(threadIdx.x), n_threads = static_cast<int>(blockDim.x);
  if (thread < tokens_per_block) {
    const int t = thread;
    const int64_t token = first + t;
    const bool valid = token < total;
    bool cached = false;
    int64_t pos = 0;
    if (valid) {
      const int64_t b = token / p.seq_len;
      const int64_t s = token - b * p.seq_len;
      pos = dense_position(p.positions, b, s);
      int64_t outer, inner;
      if (p.paged) {
        const int64_t slot = load_index(p.cache_index, s * p.cache_index_stride);
        cached = slot >= 0 && slot < p.cache_slots;
        outer = cached ? slot / p.block_size : 0;
        inner = cached ? slot % p.block_size : 0;
      } else {
        inner = load_index(p.cache_index, b * p.cache_index_stride) + s;
        cached = inner >= 0 && inner < p.cache_slots;
        outer = b;
      }
      token_row[0][t] = b * p.q_strides.b + s * p.q_strides.s;
      token_row[1][t] = b * p.k_strides.b + s * p.k_strides.s;
      token_row[2][t] = b * p.v_strides.b + s * p.v_strides.s;
      token_row[3][t] = b * p.q_out_strides.b + s * p.q_out_strides.s;
      token_row[4][t] = outer * p.k_cache_strides.b + inner * p.k_cache_strides.s;
      token_row[5][t] = outer * p.v_cache_strides.b + inner * p.v_cache_strides.s;
    }
    token_pos[t] = pos;
    token_valid[t] = valid;
    token_cached[t] = cached;
  }
  __syncthreads();

  for (int i = thread; i < tokens_per_block * rotary_half; i += n_threads) {
    const int t = i / rotary_half;
    const int j = i - t * rotary_half;
    float c = 1.0f, s = 0.0f;
    if (token_valid[t]) rope_cos_sin(token_pos[t], p.turns[j], false, &c, &s);
    cos_sin[i] = make_float2(c, s);
  }
  __syncthreads();

  const int q_items = static_cast<int>(p.n_q_heads) * chunks_per_head;
  const int k_items = static_cast<int>(p.n_kv_heads) * chunks_per_head;
  const int items_per_token = q_items + k_items + static_cast<int>(p.n_kv_heads) * v_chunks;
  const int items = tokens_per_block * items_per_token;
  for (int i = thread; i < items; i += n_threads) {
    const int t = i / items_per_token;
    int r = i - t * items_per_token;
    if (!token_valid[t]) continue;
    if (r < q_items) {
      const int64_t head = r / chunks_per_head;
      const T* src = static_cast<const T*>(p.q) + token_row[0][t] + head * p.q_strides.h;
      T* dst = static_cast<T*>(p.q_out) + token_row[3][t] + head * p.q_out_strides.h;
      rotate_chunk<T, VEC>(src, p.q_strides.d, dst, p.q_out_strides.d, r % chunks_per_head, plan.rot_chunks,
                           rotary_half, cos_sin + t * rotary_half, p.interleaved);
      continue;
    }
    if (!token_cached[t]) continue;
    r -= q_items;
    if (r < k_items) {
      const int64_t head = r / chunks_per_head;
      const T* src = static_cast<const T*>(p.k) + token_row[1][t] + head * p.k_strides.h;
      T* dst = static_cast<T*>(p.k_cache) + token_row[4][t] + head * p.k_cache_strides.h;
      rotate_chunk<T, VEC>(src, p.k_strides.d, dst, p.k_cache_strides.d, r % chunks_per_head, plan.rot_chunks,
                           rotary_half, cos_sin + t * rotary_half, p.interleaved);
    } else {
      r -= k_items;
      const int64_t head = r / v_chunks;
      const int64_t e = static_cast<int64_t>(r % v_chunks) * VEC;
      const T* src = static_cast<const T*>(p.v) + token_row[2][t] + head * p.v_strides.h + e * p.v_strides.d;
      T* dst = static_cast<T*>(p.v_cache) + token_row[5][t] + head * p.v_cache_strides.h + e * p.v_cache_strides.d;
      copy_elements<T, VEC, (VEC > 1)>(src, p.v_strides.d, dst, p.v_cache_strides.d);
    }
  }
}

template <int VEC>
cudaError_t plan_cache_append(const CacheAppendParams& p, LaunchPlan& plan) {
  plan.rot_chunks = rotated_chunks<VEC>(static_cast<int>(p.rotary_dim), p.interleaved);
  plan.chunks_per_head = plan.rot_chunks + static_cast<int>((p.head_dim - p.rotary_dim) / VEC);
  plan.v_chunks = static_cast<int>(p.head_dim / VEC);
  const int64_t items_per_token = (p.n_q_heads + p.n_kv_heads) * plan.chunks_per_head + p.n_kv_heads * plan.v_chunks;
  return finish_plan(plan, p.batch * p.seq_len, items_per_token, p.rotary_dim / 2);
}

// Picks the kernel variant for p (vector or scalar access) and its plan, and hands both to `launch(kernel, plan)`.
template <typename T, typename Launch>
cudaError_t dispatch_kv_cache_append(const CacheAppendParams& p, Launch&& launch) {
  if (p.batch * p.seq_len == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const int64_t cache_outer = p.paged ? p.cache_slots / p.block_size : p.batch;
  const int64_t cache_inner = p.paged ? p.block_size : p.cache_slots;
  const bool vector =
      vector_features(p.head_dim, p.rotary_dim, p.interleaved, kVec) &&
      vector_friendly(p.q, p.q_strides, p.batch, p.seq_len, p.n_q_heads, kVec) &&
      vector_friendly(p.q_out, p.q_out_strides, p.batch, p.seq_len, p.n_q_heads, kVec) &&
      vector_friendly(p.k, p.k_strides, p.batch, p.seq_len, p.n_kv_heads, kVec) &&
      vector_friendly(p.v, p.v_strides, p.batch, p.seq_len, p.n_kv_heads, kVec) &&
      vector_friendly(p.k_cache, p.k_cache_strides, cache_outer, cache_inner, p.n_kv_heads, kVec) &&
      vector_friendly(p.v_cache, p.v_cache_strides, cache_outer, cache_inner, p.n_kv_heads, kVec);
  LaunchPlan plan;
  const cudaError_t planned = vector ? plan_cache_append<kVec>(p, plan) : plan_cache_append<1>(p, plan);
  if (planned != cudaSuccess) return planned;
  return vector ? launch(&cache_append_kernel<T, kVec>, plan) : launch(&cache_append_kernel<T, 1>, plan);
}

}  // namespace detail

#ifdef __CUDACC__
// Rotate q into q_out and append rotated k and v to the cache (see CacheAppendParams) on `stream`; T is float,
// __half or __nv_bfloat16, the element type of all six tensors.
template <typename T>
cudaError_t launch_kv_cache_append(const CacheAppendParams& p, cudaStream_t stream) {
  return detail::dispatch_kv_cache_append<T>(p, [&](auto kernel, const detail::LaunchPlan& plan) {
    kernel<<<static_cast<unsigned>(plan.blocks), detail::kThreads, 0, stream>>>(p, plan);
    return cudaGetLastError();
  });
}
#endif

}  // namespace pi_kernels
