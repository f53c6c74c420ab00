// Parameters of the CUDA kernels and the entry points that launch them, in plain C++.
//
// The binding file (compiled by the host compiler, with torch) fills these structs from tensors; csrc/kernels.cu
// (compiled by nvcc, without torch) defines the entry points by dispatching to the templated launchers of
// rotary.cuh and kv_cache.cuh. Pointers are device pointers; strides and sizes are in elements, int64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pi_kernels {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// How positions are read; the POSITIONS_* values of pi_kernels/_validation.py.
enum PositionMode : int { kPositionsArange = 0, kPositionsOffsets = 1, kPositionsIds = 2 };

// Strides of a (batch, seq, head, dim) view (for caches: (batch or block, index or offset in block, head, dim)).
struct Strides4 {
  int64_t b, s, h, d;
};

// An int32 or int64 device array.
struct IndexArray {
  const void* data = nullptr;
  bool is_int64 = true;
};

// A resolved position form: arange + `offset` (kPositionsArange), arange + ids[b · stride_b] per batch row or
// packed sequence (kPositionsOffsets), or explicit ids[b · stride_b + s · stride_s] (kPositionsIds).
struct Positions {
  int mode = kPositionsArange;
  int64_t offset = 0;
  IndexArray ids;
  int64_t stride_b = 0, stride_s = 0;
};

// Rotary embedding of q and k, (batch, seq, heads, head_dim) views; the outputs may be the inputs (in place).
struct RotaryParams {
  const void* q = nullptr;
  const void* k = nullptr;
  void* q_out = nullptr;
  void* k_out = nullptr;
  Strides4 q_strides{}, k_strides{}, q_out_strides{}, k_out_strides{};
  int64_t batch = 0, seq_len = 0, n_q_heads = 0, n_k_heads = 0, head_dim = 0, rotary_dim = 0;
  // Angles: from `turns` (float64 (rotary_dim / 2,) turns per position, inv_freq / (2π · scaling_factor)), or, when
  // cos_sin_cache is set, read from vLLM's (cache_rows, rotary_dim) cos | sin table of dtype `cache_dtype`
  // (float32 or the dtype of q). Tokens whose position is outside the table are left untouched.
  const double* turns = nullptr;
  const void* cos_sin_cache = nullptr;
  DType cache_dtype = DType::kFloat32;
  int64_t cache_rows = 0, cache_stride_p = 0, cache_stride_d = 0;
  Positions positions;
  // Packed sequences (layout "thd", batch 1): (n_seqs + 1,) cumulative lengths; positions restart per sequence.
  IndexArray cu_seqlens;
  int64_t n_seqs = 0;
  bool interleaved = false;  // GPT-J pairs (2j, 2j + 1) instead of rotate-half pairs (j, j + rotary_dim / 2)
  bool conjugate = false;    // rotate by -angle (the backward)
};

// Rotate q and k of new tokens; write q_out, and rotated k and v into a KV cache.
struct CacheAppendParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* q_out = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  Strides4 q_strides{}, k_strides{}, v_strides{}, q_out_strides{}, k_cache_strides{}, v_cache_strides{};
  // Dense: batch rows of seq_len new tokens. Paged: batch 1 and seq_len = num_tokens.
  int64_t batch = 0, seq_len = 0, n_q_heads = 0, n_kv_heads = 0, head_dim = 0, rotary_dim = 0;
  const double* turns = nullptr;
  Positions positions;
  // Dense: cache_seqlens (batch,), token t of row b goes to index cache_seqlens[b] + t < cache_slots (max_len).
  // Paged: slot_mapping (seq_len,), slot = block · block_size + offset in [0, cache_slots); -1 is padding.
  // Indices outside [0, cache_slots) are never written.
  IndexArray cache_index;
  int64_t cache_index_stride = 1;
  bool paged = false;
  int64_t cache_slots = 0, block_size = 1;
  bool interleaved = false;
};

// Entry points (csrc/kernels.cu): launch on `stream`, return the launch error (cudaSuccess when nothing to do).
cudaError_t run_rotary(const RotaryParams& params, DType dtype, cudaStream_t stream);
cudaError_t run_kv_cache_append(const CacheAppendParams& params, DType dtype, cudaStream_t stream);

}  // namespace pi_kernels
