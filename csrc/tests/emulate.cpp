// CPU emulation of the extension's CUDA kernels, for tests/test_csrc.py on machines without a GPU.
//
// The kernel sources of csrc/include are compiled here by the host compiler. Each launch goes through the same
// dispatch_* functions as the real launchers (variant choice and launch plan), then runs its blocks one after the
// other, each as kThreads std::threads: __shared__ becomes a function-local static (shared by the block's threads)
// and __syncthreads a barrier. So the kernels' indexing, chunking, vector/scalar paths, masking and phases are
// checked against the float64 reference on CPU; what this cannot check (the GPU memory model, the device math
// library, real alignment faults, speed) is left to the GPU tests. Built as a shared library, called via ctypes.
#include <cuda_runtime.h>

#include <barrier>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

struct EmulatedIndex {
  unsigned x = 0, y = 0, z = 0;
};
thread_local EmulatedIndex threadIdx, blockIdx;
EmulatedIndex blockDim;
std::barrier<>* block_barrier = nullptr;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }

#include "kv_cache.cuh"
#include "rotary.cuh"

using pi_kernels::CacheAppendParams;
using pi_kernels::RotaryParams;
using pi_kernels::detail::kThreads;
using pi_kernels::detail::LaunchPlan;

namespace {

LaunchPlan last_plan;

template <typename Params>
cudaError_t run_blocks(void (*kernel)(Params, LaunchPlan), const Params& params, const LaunchPlan& plan) {
  last_plan = plan;
  std::barrier<> sync(kThreads);
  block_barrier = &sync;
  blockDim.x = kThreads;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      threadIdx.x = t;
      for (int64_t block = 0; block < plan.blocks; ++block) {
        blockIdx.x = static_cast<unsigned>(block);
        kernel(params, plan);
        sync.arrive_and_wait();  // the next block reuses the shared statics
      }
    });
  }
  for (auto& thread : threads) thread.join();
  return cudaSuccess;
}

auto emulated_launch = [](const auto& params) {
  return [&params](auto kernel, const LaunchPlan& plan) { return run_blocks(kernel, params, plan); };
};

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float16, 2 bfloat16 (pi_kernels::DType). Returns the cudaError_t of the dispatch.
int pi_emulate_rotary(const RotaryParams* params, int dtype) {
  switch (dtype) {
    case 0:
      return pi_kernels::detail::dispatch_rotary<float>(*params, emulated_launch(*params));
    case 1:
      return pi_kernels::detail::dispatch_rotary<__half>(*params, emulated_launch(*params));
    default:
      return pi_kernels::detail::dispatch_rotary<__nv_bfloat16>(*params, emulated_launch(*params));
  }
}

int pi_emulate_kv_cache_append(const CacheAppendParams* params, int dtype) {
  switch (dtype) {
    case 0:
      return pi_kernels::detail::dispatch_kv_cache_append<float>(*params, emulated_launch(*params));
    case 1:
      return pi_kernels::detail::dispatch_kv_cache_append<__half>(*params, emulated_launch(*params));
    default:
      return pi_kernels::detail::dispatch_kv_cache_append<__nv_bfloat16>(*params, emulated_launch(*params));
  }
}

// The plan of the last emulated launch: blocks, tokens_per_block, rot_chunks, chunks_per_head, v_chunks.
void pi_last_plan(int64_t* out) {
  out[0] = last_plan.blocks;
  out[1] = last_plan.tokens_per_block;
  out[2] = last_plan.rot_chunks;
  out[3] = last_plan.chunks_per_head;
  out[4] = last_plan.v_chunks;
}

// cos and sin (interleaved, float) of every (position, pair) by rope_math.cuh's host path.
void pi_rope_cos_sin(const int64_t* positions, int64_t n_positions, const double* turns, int64_t n_pairs,
                     float* out) {
  for (int64_t i = 0; i < n_positions; ++i) {
    for (int64_t j = 0; j < n_pairs; ++j) {
      float* pair = out + 2 * (i * n_pairs + j);
      pi_kernels::rope_cos_sin(positions[i], turns[j], false, &pair[0], &pair[1]);
    }
  }
}

// sizeof and the offset of every field, in declaration order, so the ctypes mirror can be checked.
void pi_params_layout(int64_t* rotary, int64_t* cache_append) {
#define PI_FIELD(out, type, field) *out++ = static_cast<int64_t>(offsetof(type, field))
  *rotary++ = sizeof(RotaryParams);
  PI_FIELD(rotary, RotaryParams, q);
  PI_FIELD(rotary, RotaryParams, k);
  PI_FIELD(rotary, RotaryParams, q_out);
  PI_FIELD(rotary, RotaryParams, k_out);
  PI_FIELD(rotary, RotaryParams, q_strides);
  PI_FIELD(rotary, RotaryParams, k_strides);
  PI_FIELD(rotary, RotaryParams, q_out_strides);
  PI_FIELD(rotary, RotaryParams, k_out_strides);
  PI_FIELD(rotary, RotaryParams, batch);
  PI_FIELD(rotary, RotaryParams, seq_len);
  PI_FIELD(rotary, RotaryParams, n_q_heads);
  PI_FIELD(rotary, RotaryParams, n_k_heads);
  PI_FIELD(rotary, RotaryParams, head_dim);
  PI_FIELD(rotary, RotaryParams, rotary_dim);
  PI_FIELD(rotary, RotaryParams, turns);
  PI_FIELD(rotary, RotaryParams, cos_sin_cache);
  PI_FIELD(rotary, RotaryParams, cache_dtype);
  PI_FIELD(rotary, RotaryParams, cache_rows);
  PI_FIELD(rotary, RotaryParams, cache_stride_p);
  PI_FIELD(rotary, RotaryParams, cache_stride_d);
  PI_FIELD(rotary, RotaryParams, positions);
  PI_FIELD(rotary, RotaryParams, cu_seqlens);
  PI_FIELD(rotary, RotaryParams, n_seqs);
  PI_FIELD(rotary, RotaryParams, interleaved);
  PI_FIELD(rotary, RotaryParams, conjugate);
  *cache_append++ = sizeof(CacheAppendParams);
  PI_FIELD(cache_append, CacheAppendParams, q);
  PI_FIELD(cache_append, CacheAppendParams, k);
  PI_FIELD(cache_append, CacheAppendParams, v);
  PI_FIELD(cache_append, CacheAppendParams, q_out);
  PI_FIELD(cache_append, CacheAppendParams, k_cache);
  PI_FIELD(cache_append, CacheAppendParams, v_cache);
  PI_FIELD(cache_append, CacheAppendParams, q_strides);
  PI_FIELD(cache_append, CacheAppendParams, k_strides);
  PI_FIELD(cache_append, CacheAppendParams, v_strides);
  PI_FIELD(cache_append, CacheAppendParams, q_out_strides);
  PI_FIELD(cache_append, CacheAppendParams, k_cache_strides);
  PI_FIELD(cache_append, CacheAppendParams, v_cache_strides);
  PI_FIELD(cache_append, CacheAppendParams, batch);
  PI_FIELD(cache_append, CacheAppendParams, seq_len);
  PI_FIELD(cache_append, CacheAppendParams, n_q_heads);
  PI_FIELD(cache_append, CacheAppendParams, n_kv_heads);
  PI_FIELD(cache_append, CacheAppendParams, head_dim);
  PI_FIELD(cache_append, CacheAppendParams, rotary_dim);
  PI_FIELD(cache_append, CacheAppendParams, turns);
  PI_FIELD(cache_append, CacheAppendParams, positions);
  PI_FIELD(cache_append, CacheAppendParams, cache_index);
  PI_FIELD(cache_append, CacheAppendParams, cache_index_stride);
  PI_FIELD(cache_append, CacheAppendParams, paged);
  PI_FIELD(cache_append, CacheAppendParams, cache_slots);
  PI_FIELD(cache_append, CacheAppendParams, block_size);
  PI_FIELD(cache_append, CacheAppendParams, interleaved);
#undef PI_FIELD
}

}  // extern "C"
