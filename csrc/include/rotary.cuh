// Interpolated rotary embedding of q and k (the CUDA twin of pi_kernels/ops/rotary.py), and the pieces every
// rotating kernel shares: element conversion, 16-byte vector access, position reading, and the rotation of one
// chunk of one head.
//
// One block handles `tokens_per_block` consecutive tokens (a token-linear grid, also for packed sequences, whose
// sequence is found by binary search over cu_seqlens). It first computes each token's position and row offsets,
// then the cos/sin of every (token, pair) once into shared memory, then rotates all q and k heads of its tokens
// from that table. Threads walk (token, head, chunk) with the chunk fastest, so a warp covers contiguous memory.
// A chunk is 16 bytes when every tensor is contiguous and aligned in the feature dim, else one element (scalar
// fallback for any strides). All offsets are int64. No torch here: see params.h and csrc/bindings.cpp.
//
// Choosing a kernel variant and its launch plan (dispatch_rotary) is separate from the <<<>>> launch
// (launch_rotary, nvcc only), so the CPU test can run the same kernels and plans in emulated blocks
// (csrc/tests/emulate.cpp). Shared memory is static for the same reason.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "params.h"
#include "rope_math.cuh"

namespace pi_kernels {
namespace detail {

constexpr int kThreads = 256;
constexpr int kMaxTokensPerBlock = 32;
// Work of one block: about this many (token, head, chunk) items per thread.
constexpr int kItemsPerThread = 4;
// Shared cos/sin table of a block: (tokens_per_block, rotary_dim / 2) float2, 16 KB.
constexpr int kMaxCosSin = 2048;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N elements as float: one N · sizeof(T)-byte access when VECTOR (contiguous and aligned), else N strided loads.
// Write one 16-byte pack with an explicit 128-bit store on the device. A plain store of the pack is not enough:
// the compiler merges the stores of rotate_chunk's branches (copy, interleaved, rotate-half) into one store whose
// address it no longer knows to be 16-byte aligned, and splits it into 6 x STG.E.U16 + STG.E. An asm store is
// neither merged nor split. The host compiler (CPU emulation) takes the plain store.
template <typename T, int N>
__device__ __forceinline__ void store_pack(Pack<T, N>* ptr, const Pack<T, N>& pack) {
  static_assert(sizeof(Pack<T, N>) == 16, "store_pack writes 16-byte packs");
#ifdef __CUDA_ARCH__
  uint4 bits;
  memcpy(&bits, &pack, sizeof(bits));
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(bits.x), "r"(bits.y), "r"(bits.z),
               "r"(bits.w)
               : "memory");
#else
  *ptr = pack;
#endif
}

template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void load_floats(const T* ptr, int64_t stride, float (&out)[N]) {
  if constexpr (VECTOR) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(ptr[i * stride]);
  }
}

template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void store_floats(T* ptr, int64_t stride, const float (&in)[N]) {
  if constexpr (VECTOR) {
    Pack<T, N> pack;
#pragma unroll
    for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
    store_pack(reinterpret_cast<Pack<T, N>*>(ptr), pack);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) ptr[i * stride] = from_float<T>(in[i]);
  }
}

// Copy N elements bit for bit (features past rotary_dim, and v).
template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void copy_elements(const T* src, int64_t src_stride, T* dst, int64_t dst_stride) {
  if constexpr (VECTOR) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(src);
    store_pack(reinterpret_cast<Pack<T, N>*>(dst), pack);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i * dst_stride] = src[i * src_stride];
  }
}

__device__ __forceinline__ int64_t load_index(const IndexArray& array, int64_t i) {
  return array.is_int64 ? static_cast<const int64_t*>(array.data)[i] : static_cast<const int32_t*>(array.data)[i];
}

// Position of token s of batch row b (dense layouts).
__device__ __forceinline__ int64_t dense_position(const Positions& p, int64_t b, int64_t s) {
  if (p.mode == kPositionsArange) return s + p.offset;
  if (p.mode == kPositionsOffsets) return s + load_index(p.ids, b * p.stride_b);
  return load_index(p.ids, b * p.stride_b + s * p.stride_s);
}

// Position of packed token `token`: its sequence is the largest s with cu_seqlens[s] <= token (binary search,
// so the grid stays linear in tokens whatever the sequence lengths); positions restart at each sequence.
__device__ __forceinline__ int64_t packed_position(const Positions& p, const IndexArray& cu_seqlens, int64_t n_seqs,
                                                   int64_t token) {
  int64_t lo = 0, hi = n_seqs;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (load_index(cu_seqlens, mid) <= token) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t local = token - load_index(cu_seqlens, lo);
  if (p.mode == kPositionsArange) return local + p.offset;
  if (p.mode == kPositionsOffsets) return local + load_index(p.ids, lo * p.stride_b);
  return load_index(p.ids, token * p.stride_s);
}

// Elements of one interleaved chunk: a 16-byte vector, or one pair in the scalar fallback.
template <int VEC>
__host__ __device__ constexpr int interleaved_chunk() {
  return VEC > 1 ? VEC : 2;
}

// Chunks of one head that are rotated; the tail past rotary_dim, if copied, follows in chunks of VEC elements.
template <int VEC>
inline int rotated_chunks(int rotary_dim, bool interleaved) {
  return interleaved ? rotary_dim / interleaved_chunk<VEC>() : rotary_dim / 2 / VEC;
}

// Rotate chunk `chunk` of one head from src to dst (which may be src), or copy it when it lies in the tail.
// Rotate-half chunk c holds pairs [c·VEC, c·VEC + VEC) (two accesses); an interleaved chunk holds the
// interleaved_chunk() consecutive elements [c·E, c·E + E). cos_sin: the token's (rotary_dim / 2) table.
template <typename T, int VEC>
__device__ __forceinline__ void rotate_chunk(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int chunk,
                                             int rot_chunks, int rotary_half, const float2* cos_sin,
                                             bool interleaved) {
  constexpr bool kVector = VEC > 1;
  if (chunk >= rot_chunks) {
    const int64_t e = 2 * rotary_half + static_cast<int64_t>(chunk - rot_chunks) * VEC;
    copy_elements<T, VEC, kVector>(src + e * src_stride, src_stride, dst + e * dst_stride, dst_stride);
    return;
  }
  if (interleaved) {
    constexpr int E = interleaved_chunk<VEC>();
    const int64_t e0 = static_cast<int64_t>(chunk) * E;
    float x[E], out[E];
    load_floats<T, E, kVector>(src + e0 * src_stride, src_stride, x);
#pragma unroll
    for (int i = 0; i < E / 2; ++i) {
      const float2 cs = cos_sin[e0 / 2 + i];
      rotate_pair(x[2 * i], x[2 * i + 1], cs.x, cs.y, &out[2 * i], &out[2 * i + 1]);
    }
    store_floats<T, E, kVector>(dst + e0 * dst_stride, dst_stride, out);
  } else {
    const int64_t j0 = static_cast<int64_t>(chunk) * VEC;
    float x1[VEC], x2[VEC], out1[VEC], out2[VEC];
    load_floats<T, VEC, kVector>(src + j0 * src_stride, src_stride, x1);
    load_floats<T, VEC, kVector>(src + (rotary_half + j0) * src_stride, src_stride, x2);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float2 cs = cos_sin[j0 + i];
      rotate_pair(x1[i], x2[i], cs.x, cs.y, &out1[i], &out2[i]);
    }
    store_floats<T, VEC, kVector>(dst + j0 * dst_stride, dst_stride, out1);
    store_floats<T, VEC, kVector>(dst + (rotary_half + j0) * dst_stride, dst_stride, out2);
  }
}

// Whether a tensor allows VEC-element vector access: 16-byte aligned base, unit feature stride, and every other
// stride (of a dim longer than 1) a multiple of VEC.
inline bool vector_friendly(const void* ptr, const Strides4& strides, int64_t batch, int64_t seq, int64_t heads,
                            int vec) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0 || strides.d != 1) return false;
  return (batch <= 1 || strides.b % vec == 0) && (seq <= 1 || strides.s % vec == 0) &&
         (heads <= 1 || strides.h % vec == 0);
}

// Whether the per-head feature layout splits into VEC-element chunks (rotated part and tail).
inline bool vector_features(int64_t head_dim, int64_t rotary_dim, bool interleaved, int vec) {
  const int64_t rotated = interleaved ? rotary_dim : rotary_dim / 2;
  return rotated % vec == 0 && head_dim % vec == 0;
}

// How a kernel variant is launched: blocks of kThreads threads, each on tokens_per_block consecutive tokens.
struct LaunchPlan {
  int64_t blocks = 0;
  int tokens_per_block = 1;
  int rot_chunks = 0;       // rotated chunks per head
  int chunks_per_head = 0;  // rotated chunks + copied tail chunks
  int v_chunks = 0;         // chunks of a v head (cache append)
};

// Completes a plan from its chunk counts: tokens per block so that every thread gets about kItemsPerThread items
// within the shared cos/sin table; cudaErrorInvalidValue when one token's table does not fit (rotary_dim > 4096).
inline cudaError_t finish_plan(LaunchPlan& plan, int64_t total_tokens, int64_t items_per_token, int64_t rotary_half) {
  if (rotary_half > kMaxCosSin) return cudaErrorInvalidValue;
  int tokens = 1;
  while (tokens < kMaxTokensPerBlock && tokens * items_per_token < kThreads * kItemsPerThread &&
         2 * tokens * rotary_half <= kMaxCosSin) {
    tokens *= 2;
  }
  plan.tokens_per_block = tokens;
  plan.blocks = (total_tokens + tokens - 1) / tokens;
  if (plan.blocks > INT_MAX || items_per_token * tokens > INT_MAX) return cudaErrorInvalidConfiguration;
  return cudaSuccess;
}

// Where the angles come from: the float64 turns table, or a cos | sin cache of element type C.
struct TurnsSource {};
template <typename C>
struct CacheSource {
  using type = C;
};

template <typename T, int VEC, typename Source>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p, const LaunchPlan plan) {
  __shared__ float2 cos_sin[kMaxCosSin];  // (tokens_per_block, rotary_half)
  __shared__ int64_t token_pos[kMaxTokensPerBlock];
  __shared__ int64_t token_row[4][kMaxTokensPerBlock];  // offsets of (token, head 0, dim 0) in q, k, q_out, k_out
  __shared__ bool token_ok[kMaxTokensPerBlock];

  const int tokens_per_block = plan.tokens_per_block, chunks_per_head = plan.chunks_per_head;
  const int64_t total = p.batch * p.seq_len;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int rotary_half = static_cast<int>(p.rotary_dim / 2);
  const bool packed = p.cu_seqlens.data != nullptr;

  const int thread = static_cast<int>(threadIdx.x), n_threads = static_cast<int>(blockDim.x);
  if (thread < tokens_per_block) {
    const int t = thread;
    const int64_t token = first + t;
    bool ok = token < total;
    int64_t pos = 0;
    if (ok) {
      const int64_t b = packed ? 0 : token / p.seq_len;
      const int64_t s = token - b * p.seq_len;
      pos = packed ? packed_position(p.positions, p.cu_seqlens, p.n_seqs, token)
                   : dense_position(p.positions, b, s);
      if constexpr (!std::is_same_v<Source, TurnsSource>) ok = pos >= 0 && pos < p.cache_rows;
      token_row[0][t] = b * p.q_strides.b + s * p.q_strides.s;
      token_row[1][t] = b * p.k_strides.b + s * p.k_strides.s;
      token_row[2][t] = b * p.q_out_strides.b + s * p.q_out_strides.s;
      token_row[3][t] = b * p.k_out_strides.b + s * p.k_out_strides.s;
    }
    token_pos[t] = pos;
    token_ok[t] = ok;
  }
  __syncthreads();

  for (int i = thread; i < tokens_per_block * rotary_half; i += n_threads) {
    const int t = i / rotary_half;
    const int j = i - t * rotary_half;
    float c = 1.0f, s = 0.0f;
    if (token_ok[t]) {
      if constexpr (std::is_same_v<Source, TurnsSource>) {
        rope_cos_sin(token_pos[t], p.turns[j], p.conjugate, &c, &s);
      } else {
        const auto* cache = static_cast<const typename Source::type*>(p.cos_sin_cache);
        const int64_t row = token_pos[t] * p.cache_stride_p;
        c = to_float(cache[row + j * p.cache_stride_d]);
        s = to_float(cache[row + (rotary_half + j) * p.cache_stride_d]);
        if (p.conjugate) s = -s;
      }
    }
    cos_sin[i] = make_float2(c, s);
  }
  __syncthreads();

  const int heads = static_cast<int>(p.n_q_heads + p.n_k_heads);
  const int items = tokens_per_block * heads * chunks_per_head;
  for (int i = thread; i < items; i += n_threads) {
    const int chunk = i % chunks_per_head;
    const int r = i / chunks_per_head;
    const int h = r % heads;
    const int t = r / heads;
    if (!token_ok[t]) continue;
    const bool is_q = h < p.n_q_heads;
    const int64_t head = is_q ? h : h - p.n_q_heads;
    const Strides4& in = is_q ? p.q_strides : p.k_strides;
    const Strides4& out = is_q ? p.q_out_strides : p.k_out_strides;
    const T* src = static_cast<const T*>(is_q ? p.q : p.k) + token_row[is_q ? 0 : 1][t] + head * in.h;
    T* dst = static_cast<T*>(is_q ? p.q_out : p.k_out) + token_row[is_q ? 2 : 3][t] + head * out.h;
    rotate_chunk<T, VEC>(src, in.d, dst, out.d, chunk, plan.rot_chunks, rotary_half, cos_sin + t * rotary_half,
                         p.interleaved);
  }
}

template <int VEC>
cudaError_t plan_rotary(const RotaryParams& p, LaunchPlan& plan) {
  // Features past rotary_dim are copied only out of place; in place they already hold their values.
  const bool copy_tail = p.rotary_dim < p.head_dim && p.q_out != p.q;
  plan.rot_chunks = rotated_chunks<VEC>(static_cast<int>(p.rotary_dim), p.interleaved);
  plan.chunks_per_head = plan.rot_chunks + (copy_tail ? static_cast<int>((p.head_dim - p.rotary_dim) / VEC) : 0);
  return finish_plan(plan, p.batch * p.seq_len, (p.n_q_heads + p.n_k_heads) * plan.chunks_per_head,
                     p.rotary_dim / 2);
}

template <typename T, typename Source, typename Launch>
cudaError_t dispatch_rotary_vector(const RotaryParams& p, Launch& launch) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vector =
      vector_features(p.head_dim, p.rotary_dim, p.interleaved, kVec) &&
      vector_friendly(p.q, p.q_strides, p.batch, p.seq_len, p.n_q_heads, kVec) &&
      vector_friendly(p.q_out, p.q_out_strides, p.batch, p.seq_len, p.n_q_heads, kVec) &&
      (p.n_k_heads == 0 || (vector_friendly(p.k, p.k_strides, p.batch, p.seq_len, p.n_k_heads, kVec) &&
                            vector_friendly(p.k_out, p.k_out_strides, p.batch, p.seq_len, p.n_k_heads, kVec)));
  LaunchPlan plan;
  const cudaError_t planned = vector ? plan_rotary<kVec>(p, plan) : plan_rotary<1>(p, plan);
  if (planned != cudaSuccess) return planned;
  return vector ? launch(&rotary_kernel<T, kVec, Source>, plan) : launch(&rotary_kernel<T, 1, Source>, plan);
}

// Picks the kernel variant for p (angle source, vector or scalar access) and its plan, and hands both to
// `launch(kernel, plan)`; returns its error. Nothing to do is success.
template <typename T, typename Launch>
cudaError_t dispatch_rotary(const RotaryParams& p, Launch&& launch) {
  if (p.batch * p.seq_len == 0 || p.n_q_heads + p.n_k_heads == 0) return cudaSuccess;
  if (p.cos_sin_cache == nullptr) return dispatch_rotary_vector<T, TurnsSource>(p, launch);
  if (p.cache_dtype == DType::kFloat32) return dispatch_rotary_vector<T, CacheSource<float>>(p, launch);
  return dispatch_rotary_vector<T, CacheSource<T>>(p, launch);
}

}  // namespace detail

#ifdef __CUDACC__
// Rotate q and k (see RotaryParams) on `stream`; T is float, __half or __nv_bfloat16, the element type of q, k and
// the outputs.
template <typename T>
cudaError_t launch_rotary(const RotaryParams& p, cudaStream_t stream) {
  return detail::dispatch_rotary<T>(p, [&](auto kernel, const detail::LaunchPlan& plan) {
    kernel<<<static_cast<unsigned>(plan.blocks), detail::kThreads, 0, stream>>>(p, plan);
    return cudaGetLastError();
  });
}
#endif

}  // namespace pi_kernels
