// The extension's kernel translation unit: the entry points of params.h, dispatching a dtype to the templated
// launchers. Framework-free, so CI compiles exactly this file with nvcc for sm_80 and sm_90 (tests/test_csrc.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kv_cache.cuh"
#include "params.h"
#include "rotary.cuh"

namespace pi_kernels {

cudaError_t run_rotary(const RotaryParams& params, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_rotary<float>(params, stream);
    case DType::kFloat16:
      return launch_rotary<__half>(params, stream);
    case DType::kBFloat16:
      return launch_rotary<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_kv_cache_append(const CacheAppendParams& params, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_kv_cache_append<float>(params, stream);
    case DType::kFloat16:
      return launch_kv_cache_append<__half>(params, stream);
    case DType::kBFloat16:
      return launch_kv_cache_append<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pi_kernels
