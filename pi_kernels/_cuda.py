"""The compiled CUDA backend (``pi_kernels._C``): lazy loading and thin callers of its ops.

The extension is built by ``setup.py`` only where a CUDA build of torch and ``nvcc`` are present; everything works
without it through the Triton kernels. Importing it registers the ``torch.ops.pi_kernels_cuda`` ops (see
``csrc/bindings.cpp``); nothing here touches the GPU until a kernel is launched. The callers below take the same
arguments as the Triton launchers they stand in for (the rotation as one rope record, ``ops/_schema.py``'s ``Rope``),
so an op switches backends by picking a function (the choice is made in :mod:`pi_kernels._backend`). They are where
the record becomes the extension ops' arguments, whose schemas (``csrc/bindings.cpp``) C++ fixes.
"""

import importlib

import torch

from ._positions import position_pointer_and_strides

__all__ = ["available", "kv_cache_append", "require", "rotary", "rotary_embedding"]

BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` on a machine with a CUDA build of torch and "
              "nvcc (CUDA_HOME or /usr/local/cuda), with PI_KERNELS_SKIP_CUDA_BUILD unset")

_extension = {}


def _load():
    if "module" not in _extension:
        try:
            _extension["module"] = importlib.import_module("pi_kernels._C")
            _extension["error"] = None
        except ImportError as err:  # absent, or built against another torch
            _extension["module"] = None
            _extension["error"] = str(err)
    return _extension["module"]


# Evaluated once while torch.compile traces, so choosing a backend never breaks a graph.
@torch.compiler.assume_constant_result
def available():
    """True when the CUDA extension is built and loads."""
    return _load() is not None


def require():
    """Raise a RuntimeError that says how to build the extension unless it is available."""
    if not available():
        raise RuntimeError(f"backend='cuda' asked for, but the CUDA extension pi_kernels._C is not available "
                           f"({_extension['error']}); {BUILD_HINT}")


def rotary(q4, k4, q_out4, k_out4, rope):
    """The CUDA counterpart of ``ops.rotary.launch_rotary_kernel``: same (batch, seq, heads, dim) views and rope
    record."""
    spec = rope.positions
    ids, stride_pb, stride_ps = position_pointer_and_strides(spec, None)
    # The kernels, Triton's too, index cu_seqlens as a contiguous array.
    cu_seqlens = None if spec.cu_seqlens is None else spec.cu_seqlens.contiguous()
    torch.ops.pi_kernels_cuda.rotary(q4, k4, q_out4, k_out4, rope.turns(q4.device), ids, spec.mode, spec.offset,
                                     stride_pb, stride_ps, cu_seqlens, rope.rotary_dim, rope.interleaved,
                                     rope.conjugate)


def rotary_embedding(query4, key4, rope, cos_sin_cache):
    """The CUDA counterpart of ``ops.rotary_embedding.launch_rotary_embedding`` (in place; key4 may have 0 heads)."""
    turns = None if cos_sin_cache is not None else rope.signed_turns(query4.device)
    ids = rope.positions.ids
    # The extension op reads (batch or 1, seq) ids; vLLM's flat (num_tokens,) ones are a batch of one.
    ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
    torch.ops.pi_kernels_cuda.rotary_embedding(query4, key4, ids, cos_sin_cache, turns, rope.rotary_dim,
                                               rope.interleaved)


def kv_cache_append(q4, k4, v4, q_out4, k_cache4, v_cache4, cache_index, paged, rope):
    """The CUDA counterpart of ``ops.kv_cache.launch_cache_append``."""
    spec = rope.positions
    ids, stride_pb, stride_ps = position_pointer_and_strides(spec, None)
    torch.ops.pi_kernels_cuda.kv_cache_append(q4, k4, v4, q_out4, k_cache4, v_cache4, rope.signed_turns(q4.device), ids,
                                              spec.mode, spec.offset, stride_pb, stride_ps, cache_index, paged,
                                              rope.rotary_dim, rope.interleaved)
