// The extension's only torch-aware file: argument checks, dtype dispatch, device guard and stream, and the
// registration of the torch.ops.pi_kernels_cuda ops that pi_kernels/_cuda.py calls.
//
// The ops take (batch, seq, heads, dim) views and positions already resolved by the Python wrappers, which also
// run the user-facing validation and the synchronizing value checks. The checks here protect the kernels' memory
// accesses from any other caller: device, dtype, rank and shape agreement of every tensor.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "params.h"

namespace {

using pi_kernels::DType;

DType dtype_of(const at::Tensor& t, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
              ".dtype must be float16, bfloat16 or float32, got ", type);
  return type == at::kFloat ? DType::kFloat32 : type == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

// A CUDA tensor of `rank` dims on `like`'s device, with `like`'s dtype.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t rank) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the first tensor is on ",
              like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ".dtype (", t.scalar_type(), ") must be ",
              like.scalar_type());
  TORCH_CHECK(t.dim() == rank, name, " must have ", rank, " dims, got ", t.sizes());
}

pi_kernels::Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

pi_kernels::IndexArray index_array(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64, got ",
              t.scalar_type());
  return {t.data_ptr(), t.scalar_type() == at::kLong};
}

pi_kernels::Positions positions_of(const std::optional<at::Tensor>& ids, int64_t mode, int64_t offset,
                                   int64_t stride_b, int64_t stride_s, const at::Tensor& like) {
  TORCH_CHECK(mode >= pi_kernels::kPositionsArange && mode <= pi_kernels::kPositionsIds,
              "position_mode must be 0, 1 or 2, got ", mode);
  pi_kernels::Positions positions;
  positions.mode = static_cast<int>(mode);
  positions.offset = offset;
  positions.stride_b = stride_b;
  positions.stride_s = stride_s;
  if (mode != pi_kernels::kPositionsArange) {
    TORCH_CHECK(ids.has_value(), "positions are required for position_mode ", mode);
    positions.ids = index_array(*ids, "positions", like);
  }
  return positions;
}

void check_turns(const at::Tensor& turns, int64_t rotary_dim, const at::Tensor& like) {
  TORCH_CHECK(turns.is_cuda() && turns.device() == like.device(), "turns must be on ", like.device());
  TORCH_CHECK(turns.scalar_type() == at::kDouble && turns.is_contiguous() && turns.numel() == rotary_dim / 2,
              "turns must be a contiguous float64 tensor of rotary_dim / 2 = ", rotary_dim / 2, " entries");
}

void check_rotary_dim(int64_t rotary_dim, int64_t head_dim) {
  // The CUDA kernels keep one token's cos/sin in a 16 KB shared table.
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim && rotary_dim <= 4096,
              "rotary_dim must be even, > 0, ≤ head_dim (", head_dim, ") and ≤ 4096 for the CUDA backend, got ",
              rotary_dim);
}

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, "pi_kernels CUDA ", op, " failed: ", cudaGetErrorString(error));
}

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()); }

void rotary(const at::Tensor& q, const at::Tensor& k, at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& turns,
            const std::optional<at::Tensor>& positions, int64_t position_mode, int64_t position_offset,
            int64_t position_stride_b, int64_t position_stride_s, const std::optional<at::Tensor>& cu_seqlens,
            int64_t rotary_dim, bool interleaved, bool conjugate) {
  check_like(q, "q", q, 4);
  check_like(k, "k", q, 4);
  check_like(q_out, "q_out", q, 4);
  check_like(k_out, "k_out", q, 4);
  TORCH_CHECK(q_out.sizes() == q.sizes() && k_out.sizes() == k.sizes(), "q_out and k_out must be shaped like q and k");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "q and k must agree in batch, seq and head_dim: q ", q.sizes(), ", k ", k.sizes());
  check_rotary_dim(rotary_dim, q.size(3));
  check_turns(turns, rotary_dim, q);
  const c10::cuda::CUDAGuard guard(q.device());
  pi_kernels::RotaryParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.q_out_strides = strides_of(q_out);
  p.k_out_strides = strides_of(k_out);
  p.batch = q.size(0);
  p.seq_len = q.size(1);
  p.n_q_heads = q.size(2);
  p.n_k_heads = k.size(2);
  p.head_dim = q.size(3);
  p.rotary_dim = rotary_dim;
  p.turns = turns.data_ptr<double>();
  p.positions = positions_of(positions, position_mode, position_offset, position_stride_b, position_stride_s, q);
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(q.size(0) == 1, "packed input (cu_seqlens) must be a batch of one, got ", q.size(0));
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2 && cu_seqlens->is_contiguous(),
                "cu_seqlens must be a contiguous 1-D tensor of n_seqs + 1 ≥ 2 entries");
    p.cu_seqlens = index_array(*cu_seqlens, "cu_seqlens", q);
    p.n_seqs = cu_seqlens->numel() - 1;
  }
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  check_launch(pi_kernels::run_rotary(p, dtype_of(q, "q"), current_stream(q)), "rotary");
}

void rotary_embedding(at::Tensor& query, at::Tensor& key, const at::Tensor& positions,
                      const std::optional<at::Tensor>& cos_sin_cache, const std::optional<at::Tensor>& turns,
                      int64_t rotary_dim, bool interleaved) {
  check_like(query, "query", query, 4);
  check_like(key, "key", query, 4);
  TORCH_CHECK(key.size(0) == query.size(0) && key.size(1) == query.size(1) && key.size(3) == query.size(3),
              "query and key must agree in tokens and head_size: query ", query.sizes(), ", key ", key.sizes());
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == query.size(1) &&
                  (positions.size(0) == 1 || positions.size(0) == query.size(0)),
              "positions must be (batch or 1, seq), got ", positions.sizes(), " for query ", query.sizes());
  check_rotary_dim(rotary_dim, query.size(3));
  const c10::cuda::CUDAGuard guard(query.device());
  pi_kernels::RotaryParams p;
  p.q = p.q_out = query.data_ptr();
  p.k = p.k_out = key.data_ptr();
  p.q_strides = p.q_out_strides = strides_of(query);
  p.k_strides = p.k_out_strides = strides_of(key);
  p.batch = query.size(0);
  p.seq_len = query.size(1);
  p.n_q_heads = query.size(2);
  p.n_k_heads = key.size(2);
  p.head_dim = query.size(3);
  p.rotary_dim = rotary_dim;
  p.positions = positions_of(positions, pi_kernels::kPositionsIds, 0, positions.size(0) > 1 ? positions.stride(0) : 0,
                             positions.stride(1), query);
  if (cos_sin_cache.has_value()) {
    const at::Tensor& cache = *cos_sin_cache;
    TORCH_CHECK(cache.is_cuda() && cache.device() == query.device(), "cos_sin_cache must be on ", query.device());
    TORCH_CHECK(cache.dim() == 2 && cache.size(1) == rotary_dim, "cos_sin_cache must be (max_position, ", rotary_dim,
                "), got ", cache.sizes());
    TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == query.scalar_type(),
                "cos_sin_cache.dtype must be float32 or query's, got ", cache.scalar_type());
    p.cos_sin_cache = cache.data_ptr();
    p.cache_dtype = dtype_of(cache, "cos_sin_cache");
    p.cache_rows = cache.size(0);
    p.cache_stride_p = cache.stride(0);
    p.cache_stride_d = cache.stride(1);
  } else {
    TORCH_CHECK(turns.has_value(), "rotary_embedding needs cos_sin_cache or turns");
    check_turns(*turns, rotary_dim, query);
    p.turns = turns->data_ptr<double>();
  }
  p.interleaved = interleaved;
  check_launch(pi_kernels::run_rotary(p, dtype_of(query, "query"), current_stream(query)), "rotary_embedding");
}

void kv_cache_append(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& q_out,
                     at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& turns,
                     const std::optional<at::Tensor>& positions, int64_t position_mode, int64_t position_offset,
                     int64_t position_stride_b, int64_t position_stride_s, const at::Tensor& cache_index, bool paged,
                     int64_t rotary_dim, bool interleaved) {
  check_like(q, "q", q, 4);
  check_like(k, "k", q, 4);
  check_like(v, "v", q, 4);
  check_like(q_out, "q_out", q, 4);
  check_like(k_cache, "k_cache", q, 4);
  check_like(v_cache, "v_cache", q, 4);
  TORCH_CHECK(q_out.sizes() == q.sizes(), "q_out must be shaped like q");
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k and v must have the same shape, agreeing with q in batch, tokens and head_dim: q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == k.size(2) && k_cache.size(3) == k.size(3),
              "k_cache and v_cache must have the same shape with k's heads and head_dim: k_cache ", k_cache.sizes(),
              ", v_cache ", v_cache.sizes(), ", k ", k.sizes());
  check_rotary_dim(rotary_dim, q.size(3));
  check_turns(turns, rotary_dim, q);
  TORCH_CHECK(cache_index.dim() == 1, "cache_index must be 1-D, got ", cache_index.sizes());
  if (paged) {
    TORCH_CHECK(q.size(0) == 1, "paged append takes a batch of one (num_tokens as seq), got ", q.size(0));
    TORCH_CHECK(k_cache.size(1) > 0, "a paged cache needs block_size > 0");
    TORCH_CHECK(cache_index.size(0) == q.size(1), "slot_mapping must have one entry per token (", q.size(1),
                "), got ", cache_index.size(0));
  } else {
    TORCH_CHECK(k_cache.size(0) == q.size(0), "the cache batch (", k_cache.size(0), ") must equal q's (", q.size(0),
                ")");
    TORCH_CHECK(cache_index.size(0) == q.size(0), "cache_seqlens must have one entry per batch row (", q.size(0),
                "), got ", cache_index.size(0));
  }
  const c10::cuda::CUDAGuard guard(q.device());
  pi_kernels::CacheAppendParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_out = q_out.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  p.q_out_strides = strides_of(q_out);
  p.k_cache_strides = strides_of(k_cache);
  p.v_cache_strides = strides_of(v_cache);
  p.batch = q.size(0);
  p.seq_len = q.size(1);
  p.n_q_heads = q.size(2);
  p.n_kv_heads = k.size(2);
  p.head_dim = q.size(3);
  p.rotary_dim = rotary_dim;
  p.turns = turns.data_ptr<double>();
  p.positions = positions_of(positions, position_mode, position_offset, position_stride_b, position_stride_s, q);
  p.cache_index = index_array(cache_index, paged ? "slot_mapping" : "cache_seqlens", q);
  p.cache_index_stride = cache_index.stride(0);
  p.paged = paged;
  p.cache_slots = paged ? k_cache.size(0) * k_cache.size(1) : k_cache.size(1);
  p.block_size = paged ? k_cache.size(1) : 1;
  p.interleaved = interleaved;
  check_launch(pi_kernels::run_kv_cache_append(p, dtype_of(q, "q"), current_stream(q)), "kv_cache_append");
}

}  // namespace

TORCH_LIBRARY(pi_kernels_cuda, m) {
  m.def(
      "rotary(Tensor q, Tensor k, Tensor(a!) q_out, Tensor(b!) k_out, Tensor turns, Tensor? positions, "
      "int position_mode, int position_offset, int position_stride_b, int position_stride_s, Tensor? cu_seqlens, "
      "int rotary_dim, bool interleaved, bool conjugate) -> ()");
  m.def(
      "rotary_embedding(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor? cos_sin_cache, Tensor? turns, "
      "int rotary_dim, bool interleaved) -> ()");
  m.def(
      "kv_cache_append(Tensor q, Tensor k, Tensor v, Tensor(a!) q_out, Tensor(b!) k_cache, Tensor(c!) v_cache, "
      "Tensor turns, Tensor? positions, int position_mode, int position_offset, int position_stride_b, "
      "int position_stride_s, Tensor cache_index, bool paged, int rotary_dim, bool interleaved) -> ()");
}

TORCH_LIBRARY_IMPL(pi_kernels_cuda, CUDA, m) {
  m.impl("rotary", &rotary);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("kv_cache_append", &kv_cache_append);
}

// Importing pi_kernels._C runs the registrations above; the module itself is empty (no pybind11 needed).
#define PI_KERNELS_CONCAT(a, b) a##b
#define PI_KERNELS_MODULE_INIT(name) PI_KERNELS_CONCAT(PyInit_, name)
PyMODINIT_FUNC PI_KERNELS_MODULE_INIT(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "pi_kernels._C",
                               "pi_kernels CUDA kernels, registered as torch.ops.pi_kernels_cuda", -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
