"""Inference-engine entry points: vLLM's in-place rotary convention, and rotary fused with the KV-cache append.

* :func:`rotary_embedding` rotates query and key in place on vLLM's flat ``(num_tokens, heads · head_size)`` tensors
  with cos/sin read from a ``cos_sin_cache``; :func:`rotary_embedding_interp` computes the interpolated angles in
  the kernel like :func:`pi_kernels.rotary_interp` (``ops/rotary_embedding.py``);
* :func:`rotary_kv_cache_append` and :func:`rotary_paged_kv_cache_append` rotate the new tokens' q into a new tensor
  and write their rotated k and their v into a KV cache, contiguous per sequence (flash-attention's
  ``flash_attn_with_kvcache`` layout) or paged through a slot mapping (vLLM, FlashInfer), in one launch; see
  :func:`slot_mapping_from_block_table` (``ops/kv_cache.py``).

The rotary ops are differentiable (gradients of in-place calls included); the cache appends are inference-only and
refuse inputs that require grad. Each takes ``backend="auto"|"triton"|"cuda"|"torch"``.
"""

from .ops.kv_cache import rotary_kv_cache_append, rotary_paged_kv_cache_append, slot_mapping_from_block_table
from .ops.rotary_embedding import rotary_embedding, rotary_embedding_interp

__all__ = [
    "rotary_embedding",
    "rotary_embedding_interp",
    "rotary_kv_cache_append",
    "rotary_paged_kv_cache_append",
    "slot_mapping_from_block_table",
]
