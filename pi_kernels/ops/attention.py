"""Softmax attention with interpolated RoPE: a rotation pass, then FlashAttention-2 on rotated q and k (Triton).

Design
------
``attention_rotary(q, k, v)`` is three steps, each a ``torch.library`` custom op:

1. **Rotate** q and k once, in a memory-bound pass: the Triton rotary kernel of ``rotary.py``
   (``launch_rotary_kernel``), with the queries' and the keys' own positions (one launch for both when they share
   positions and tokens, as in self-attention). Angles come from ``_rope.py`` (float64 turns, exact range
   reduction, float32 cos/sin) like every rotating kernel here, once per (token, pair) for all heads of a program.
2. **Attend**: the *core*, plain FlashAttention-2 (Dao, 2023) on the rotated q and k, as in Triton's fused-attention
   tutorial (kernels in ``attention_kernels.py``): online softmax over key blocks in the forward, which saves only
   the log-sum-exp; a backward of one kernel per key block (dk, dv) and one per query block (dq), both recomputing
   the probabilities. Nothing of size seq_q × seq_k is ever stored. The core knows nothing of RoPE, so its inner
   loops are the same with and without rotation: rotating a K tile inside every query-tile program, as an earlier
   design did, doubled the instructions per K tile on sm_90 (benchmarks/NOTES.md has the figures). It is the
   dispatch point of backends: ``LAUNCHERS`` maps a backend name to its (forward, backward).
3. **Backward**: the core's backward gives dq and dk with respect to the rotated q and k (saved by the forward
   instead of the inputs: the same memory); the rotation pass with ``conjugate=True`` (rotation by −angle, the
   transpose of the forward rotation) turns them into gradients of the un-rotated inputs.

The rotated q and k cost one read and one write of q and k in the forward and of dq and dk in the backward, against
attention's O(seq²) work: about 1% at 16k tokens by estimate (benchmarks/NOTES.md; not measured on a GPU).

Decode (``rotate_k=False``, keys already rotated in a cache) rotates only q; varlen (packed sequences with
``cu_seqlens``) rotates with per-sequence positions and attends per sequence.

Numerics and determinism
------------------------
Rotated q and k are rounded to the input dtype before the dots, as the earlier in-kernel rotation did; dq and dk
are rounded once more before their conjugate rotation. fp16 and bf16 operands feed the dots with float32
accumulation; the softmax runs in float32; probabilities and ds are rounded to the input dtype before their dots
(as FlashAttention does). float32 inputs use TF32 dots on a GPU. The gradients are deterministic: there are no
atomics, every element of dq, dk and dv is accumulated by one program in a fixed order (dk/dv of a KV head sum its
query heads in order).
"""

import dataclasses
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .. import _backend, _torch_backend
from .. import _validation as validation
from .._backend import _interpreting
from .._positions import POSITIONS_ARANGE, POSITIONS_OFFSETS, PositionSpec
from ._schema import Rope, record_op
from .attention_kernels import (
    LOG2E,
    _attention_backward_delta_kernel,
    _attention_backward_dkdv_kernel,
    _attention_backward_dq_kernel,
    _attention_forward_kernel,
)
from .rotary import LAUNCHERS as ROTARY_LAUNCHERS

__all__ = ["AttentionRotary", "AttentionRotaryFunction", "CoreArgs", "Rotation", "attention_backward",
           "attention_forward", "attention_rotary", "rotate_qk"]

MAX_HEAD_DIM = 256


# eq=False: the ropes hold tensors.
@dataclasses.dataclass(frozen=True, eq=False)
class Rotation:
    """The rotation pass's settings: the arguments of ``pi_kernels::attention_rotate`` besides q, k and the backend.

    ``q.positions`` and ``k.positions`` are the queries' and the keys' positions as the wrapper resolved them (the
    queries' default, the last seq_q of the key positions, included); their ``cu_seqlens`` are also the packing the
    core attends with. The two ropes differ in their positions only.
    """

    q: Rope
    k: Rope
    rotate_q: bool
    rotate_k: bool
    # False where the wrapper derived the queries' positions from the keys' lengths: those are not value-checked
    # (negative where a sequence has more queries than keys, whose first queries then see no key).
    q_positions_given: bool

    def reversed(self):
        """The rotation by −angle (the backward's)."""
        # Field by field, not dataclasses.replace: see Rope.reversed.
        return Rotation(self.q.reversed(), self.k.reversed(), self.rotate_q, self.rotate_k, self.q_positions_given)


@dataclasses.dataclass(frozen=True)
class CoreArgs:
    """The attention core's settings: the arguments of ``pi_kernels::attention_core`` besides the tensors and the
    backend."""

    max_seqlen_q: int | None   # longest packed sequence; None: computed from cu_seqlens (a device sync)
    max_seqlen_k: int | None
    causal: bool
    softmax_scale: float


# --------------------------------------------------------------------------------------------------------------------
# The rotation pass
# --------------------------------------------------------------------------------------------------------------------

def _bshd(x, varlen):
    """(batch, seq, heads, dim) view and its strides; packed input is one row whose batch stride is never used
    (each program offsets by its sequence's first token instead)."""
    x4 = x.unsqueeze(0) if varlen else x
    return x4, (0 if varlen else x4.stride(0), *x4.stride()[1:])


def rotate_qk(q, k, rotation, backend):
    """Rotated copies of q and k (a :class:`Rotation`), each an empty tensor where not rotated.

    One launch when queries and keys share positions and tokens (self-attention), else one per rotated tensor.
    """
    varlen = rotation.q.positions.cu_seqlens is not None
    q_out = torch.empty_like(q) if rotation.rotate_q else q.new_empty(0)
    k_out = torch.empty_like(k) if rotation.rotate_k else k.new_empty(0)
    q4, k4 = _bshd(q, varlen)[0], _bshd(k, varlen)[0]
    # Packed, the same cu_seqlens tensor says the same tokens (PositionSpec.same_as compares it).
    same_tokens = varlen or q.shape[1] == k.shape[1]
    launch = ROTARY_LAUNCHERS[backend]
    if rotation.rotate_q and rotation.rotate_k and same_tokens and rotation.q.positions.same_as(rotation.k.positions):
        launch(q4, k4, _bshd(q_out, varlen)[0], _bshd(k_out, varlen)[0], rotation.q)
        return q_out, k_out
    for enabled, x4, out, rope in ((rotation.rotate_q, q4, q_out, rotation.q), (rotation.rotate_k, k4, k_out,
                                                                                 rotation.k)):
        if enabled:
            out4 = _bshd(out, varlen)[0]
            # The kernel rotates two tensors; the second is given no heads.
            launch(x4, x4[:, :, :0], out4, out4[:, :, :0], rope)
    return q_out, k_out


@record_op("attention_rotate")
def _rotate_op(q: torch.Tensor, k: torch.Tensor, rotation: Rotation, backend: str) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    if not rotation.q.conjugate:  # the forward; the backward sees the same tensors
        varlen = rotation.q.positions.cu_seqlens is not None
        if rotation.q_positions_given:
            validation.check_values(rotation.q.positions.ids, None, None, q.shape[0 if varlen else 1])
        validation.check_values(rotation.k.positions.ids, None, None, k.shape[0 if varlen else 1])
    return rotate_qk(q, k, rotation, backend)


@_rotate_op.register_fake
def _rotate_op_fake(q, k, rotation, backend):
    return (torch.empty_like(q) if rotation.rotate_q else q.new_empty(0),
            torch.empty_like(k) if rotation.rotate_k else k.new_empty(0))


# --------------------------------------------------------------------------------------------------------------------
# The attention core (Triton)
# --------------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


class _Blocks(NamedTuple):
    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


def _device_arch(device):
    """Compute capability of a CUDA ``device`` as one number (90 for sm_90). The compile check
    (tests/gpu_compile_check.py) replaces this function to stand its target in for the device."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _blocks(kernel, head_dim, element_size, device):
    """Tile sizes of ``kernel`` ("forward", "dkdv" or "dq") for a head_dim, input element size in bytes and device.

    Under the interpreter: small, unequal tiles (query and key tiles differ, as on a GPU), so sequences of ~100
    tokens span several blocks and every masking path runs. On a GPU (checked with ptxas, see benchmarks/NOTES.md):
    on sm_90 each tile dimension that is a dot's N is at least 64 (wgmma N ≥ 64), and the rows a program owns are 64
    per warpgroup (8 warps: 128 rows), so no two warpgroups compute the same rows; before sm_90 (mma.sync: the
    accumulators live in registers) 16-bit tiles are sized not to spill. Not yet tuned by timing on a GPU.
    """
    if _interpreting():
        return {"forward": _Blocks(64, 32, 4, 1), "dkdv": _Blocks(32, 64, 4, 1), "dq": _Blocks(64, 32, 4, 1)}[kernel]
    if element_size > 2:
        # float32 (TF32 dots): twice the bytes per tile and register; the backward's loop steps are 16 rows (wgmma
        # N = 16: the sm_90 budgets are for 16-bit inputs), single-staged, and the forward's key step 64 on sm_90,
        # 32 before, 1 stage: the widest tiles found that do not spill, within an A100's shared memory (163 KiB).
        # (sm_80's pointer loads spilled 8 bytes at 2 stages, where the block pointers they replace did not.)
        forward = _Blocks(128, 64, 8, 1) if _device_arch(device) >= 90 else _Blocks(128, 32, 8, 1)
        table = {"forward": forward, "dkdv": _Blocks(16, 128, 8, 1), "dq": _Blocks(128, 16, 8, 1)}
    elif head_dim > 128:
        table = {"forward": _Blocks(64, 64, 4, 2), "dkdv": _Blocks(64, 64, 4, 1), "dq": _Blocks(64, 64, 4, 1)}
    elif _device_arch(device) >= 90:
        # dk/dv single-staged: with the next query tile prefetched it spilled 20-44 bytes on sm_90 whenever the
        # query length is not known to be a multiple of 16 (varlen, or seq_q 217).
        table = {"forward": _Blocks(128, 128, 8, 3), "dkdv": _Blocks(64, 128, 8, 1), "dq": _Blocks(128, 64, 8, 2)}
    else:
        # sm_80: the sm_90 tiles spilled 36-388 bytes here; half the loop step (forward 64 keys, dq 32 keys) and 32
        # queries per dk/dv step do not.
        table = {"forward": _Blocks(128, 64, 8, 3), "dkdv": _Blocks(32, 128, 8, 1), "dq": _Blocks(128, 32, 8, 2)}
    return table[kernel]


def _constexprs(head_dim, dtype, blocks, causal, varlen, use_desc):
    interpret = _interpreting()
    return dict(
        HEAD_DIM=head_dim, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_D=_block_d(head_dim), CAUSAL=causal,
        IS_VARLEN=varlen, INTERPRET=interpret, DOT_DTYPE=tl.float32 if interpret else _TRITON_DTYPES[dtype],
        USE_DESC=use_desc, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )


# Triton's interpreter before 3.6 checks a descriptor's strides as if they were bytes (they are elements).
_INTERPRETER_STRIDES_IN_ELEMENTS = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6)


def _descriptor_alignment(x4, strides):
    """Whether a tensor descriptor can address the (batch, seq, heads, dim) view ``x4`` (or any other tensor: the
    QKV GEMM's operands) with the kernel's element ``strides``: last dimension contiguous, the base and every other
    stride a multiple of 16 bytes (TMA's rules; a head of a sequence then starts 16-byte aligned too; under the
    interpreter of Triton 3.4 and 3.5, a multiple of 16 elements, as it checks)."""
    size = 1 if _INTERPRETER_STRIDES_IN_ELEMENTS and _interpreting() else x4.element_size()
    return (strides[-1] == 1 and x4.data_ptr() % 16 == 0
            and all(stride * size % 16 == 0 for stride in strides[:-1]))


def _use_descriptors(device, *views):
    """USE_DESC of the attention kernels for these ``(x4, strides)`` views: tensor descriptors (TMA loads and
    stores) on sm_90 and later, and under the interpreter so that its tests run the same loads; pointer loads before
    sm_90 and, anywhere, for a view the descriptors cannot address (any strides are accepted: the fallback)."""
    if not hasattr(tl, "make_tensor_descriptor"):  # Triton before 3.4
        return False
    if not _interpreting() and _device_arch(device) < 90:
        return False
    return all(_descriptor_alignment(x4, strides) for x4, strides in views)


def _scratch(size, alignment, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_scratch_allocator():
    """Descriptors made inside a kernel are written to global scratch memory that Triton asks its allocator for;
    set one (torch's caching allocator) unless the caller has set their own. Triton keeps it in a ContextVar (3.5
    on; a module global in 3.4), so each thread that launches sets it once."""
    from triton.runtime import _allocation  # private: read defensively
    current = getattr(_allocation, "_allocator", None)
    current = current.get() if hasattr(current, "get") else current
    null = getattr(_allocation, "NullAllocator", None)
    if current is None or null is None or isinstance(current, null):
        triton.set_allocator(_scratch)


def _block_d(head_dim):
    """Tiles are (rows, BLOCK_D): head_dim rounded up to a power of two; 16 is the smallest dot size."""
    return max(16, triton.next_power_of_2(head_dim))


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _lse_strides(lse, varlen):
    """(sequence, head) strides of lse; packed lse (heads, total_q) is indexed by packed token."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _sequences(q, k, cu_seqlens_q, cu_seqlens_k):
    """(cu_seqlens for the kernels, or placeholders when dense; number of sequences; dense seq_q; dense seq_k)."""
    if cu_seqlens_q is None:
        return (q, q), q.shape[0], q.shape[1], k.shape[1]
    return (cu_seqlens_q, cu_seqlens_k), cu_seqlens_q.shape[0] - 1, q.shape[0], k.shape[0]


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, core):
    """Launch the forward kernel on rotated q and k; returns out (like q) and lse (float32, natural log; see
    ``attention_rotary``). ``cu_seqlens_k`` is given whenever ``cu_seqlens_q`` is; ``core.max_seqlen_*`` are ints."""
    varlen = cu_seqlens_q is not None
    q4, q_strides = _bshd(q, varlen)
    k4, k_strides = _bshd(k, varlen)
    v4, v_strides = _bshd(v, varlen)
    out = torch.empty_like(q)
    out4, out_strides = _bshd(out, varlen)
    lse = torch.empty(_lse_shape(q, varlen), device=q.device, dtype=torch.float32)
    cu_seqlens, n_seqs, seq_q, seq_k = _sequences(q, k, cu_seqlens_q, cu_seqlens_k)
    n_heads, head_dim = q4.shape[2], q4.shape[3]
    blocks = _blocks("forward", head_dim, q.element_size(), q.device)
    # Few queries per sequence (decode): a query tile no taller than needed wastes less of the dots.
    if core.max_seqlen_q < blocks.block_m:
        block_m = max(16, triton.next_power_of_2(core.max_seqlen_q))
        blocks = blocks._replace(block_m=block_m, num_warps=min(blocks.num_warps, max(4, block_m // 16)))
    n_q_blocks = triton.cdiv(core.max_seqlen_q, blocks.block_m)
    grid = (n_q_blocks * n_seqs * n_heads,)
    if grid[0] == 0:
        return out, lse
    use_desc = _use_descriptors(q.device, (q4, q_strides), (k4, k_strides), (v4, v_strides), (out4, out_strides))
    if use_desc and not _interpreting():
        _ensure_scratch_allocator()
    _attention_forward_kernel[grid](
        q4, k4, v4, out4, lse, *cu_seqlens, seq_q, seq_k, n_q_blocks, n_heads, n_heads // k4.shape[2],
        core.softmax_scale * LOG2E.value, *q_strides, *k_strides, *v_strides, *out_strides,
        *_lse_strides(lse, varlen), **_constexprs(head_dim, q.dtype, blocks, core.causal, varlen, use_desc),
    )
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, core):
    """Launch the backward kernels; returns (dq, dk, dv) with respect to the (rotated) q and k it is given."""
    varlen = cu_seqlens_q is not None
    q4, q_strides = _bshd(q, varlen)
    k4, k_strides = _bshd(k, varlen)
    v4, v_strides = _bshd(v, varlen)
    out4, out_strides = _bshd(out, varlen)
    dout4, dout_strides = _bshd(grad_out, varlen)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dq4, dq_strides = _bshd(dq, varlen)
    dk4, dk_strides = _bshd(dk, varlen)
    dv4, dv_strides = _bshd(dv, varlen)
    cu_seqlens, n_seqs, seq_q, seq_k = _sequences(q, k, cu_seqlens_q, cu_seqlens_k)
    n_heads, n_kv_heads, head_dim = q4.shape[2], k4.shape[2], q4.shape[3]
    if n_seqs * n_heads == 0:
        return dq, dk, dv
    interpret = _interpreting()
    lse_strides = _lse_strides(lse, varlen)
    delta = torch.empty_like(lse)

    delta_block = 16 if interpret else 64
    n_delta_blocks = triton.cdiv(core.max_seqlen_q, delta_block)
    if n_delta_blocks:
        _attention_backward_delta_kernel[(n_delta_blocks * n_seqs * n_heads,)](
            out4, dout4, delta, cu_seqlens[0], seq_q, n_delta_blocks, n_heads, *out_strides, *dout_strides,
            *lse_strides, HEAD_DIM=head_dim, BLOCK_M=delta_block, BLOCK_D=_block_d(head_dim), IS_VARLEN=varlen,
            num_warps=4,
        )
    scales = (core.softmax_scale * LOG2E.value, core.softmax_scale)
    use_desc = _use_descriptors(q.device, (q4, q_strides), (k4, k_strides), (v4, v_strides), (dout4, dout_strides),
                                (dq4, dq_strides), (dk4, dk_strides), (dv4, dv_strides))
    if use_desc and not interpret:
        _ensure_scratch_allocator()
    blocks = _blocks("dkdv", head_dim, q.element_size(), q.device)
    n_k_blocks = triton.cdiv(core.max_seqlen_k, blocks.block_n)
    # Past head_dim 64 the dk and dv accumulators of a 128-key tile fill the registers: one launch computes dv, a
    # second dk (recomputing the scores: 5 dots instead of 4), and neither spills.
    outputs = ((True, True),) if head_dim <= 64 else ((False, True), (True, False))
    for compute_dk, compute_dv in outputs if n_k_blocks else ():
        _attention_backward_dkdv_kernel[(n_k_blocks * n_seqs * n_kv_heads,)](
            q4, k4, v4, dout4, lse, delta, dk4, dv4, *cu_seqlens, seq_q, seq_k, n_k_blocks, n_kv_heads,
            n_heads // n_kv_heads, *scales, *q_strides, *k_strides, *v_strides, *dout_strides, *dk_strides,
            *dv_strides, *lse_strides, COMPUTE_DK=compute_dk, COMPUTE_DV=compute_dv,
            **_constexprs(head_dim, q.dtype, blocks, core.causal, varlen, use_desc),
        )
    blocks = _blocks("dq", head_dim, q.element_size(), q.device)
    n_q_blocks = triton.cdiv(core.max_seqlen_q, blocks.block_m)
    if n_q_blocks:
        _attention_backward_dq_kernel[(n_q_blocks * n_seqs * n_heads,)](
            q4, k4, v4, dout4, lse, delta, dq4, *cu_seqlens, seq_q, seq_k, n_q_blocks, n_heads,
            n_heads // n_kv_heads, *scales, *q_strides, *k_strides, *v_strides, *dout_strides, *dq_strides,
            *lse_strides, **_constexprs(head_dim, q.dtype, blocks, core.causal, varlen, use_desc),
        )
    return dq, dk, dv


# Backend name -> (forward, backward) of the core, with the signatures of attention_forward / attention_backward;
# its keys are the backends this op has (no CUDA-extension kernel), which _backend.resolve_backend reads.
LAUNCHERS = {"triton": (attention_forward, attention_backward),
             "torch": (_torch_backend.attention_forward, _torch_backend.attention_backward)}


def _resolve_core(q, k, cu_seqlens_q, cu_seqlens_k, core, backend, check_values):
    """``core`` with int max_seqlen_*, after the synchronizing checks of cu_seqlens when ``check_values`` (the
    forward; the backward sees the same tensors)."""
    if backend not in LAUNCHERS:
        raise ValueError(f"backend must be one of {sorted(LAUNCHERS)}, got {backend!r}")
    validation.check_positive_real(core.softmax_scale, "softmax_scale")  # symbolic while compiling: checked here
    if cu_seqlens_q is None:
        return dataclasses.replace(core, max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1])
    if check_values:
        validation.check_values(None, cu_seqlens_q, core.max_seqlen_q, q.shape[0])
        validation.check_values(None, cu_seqlens_k, core.max_seqlen_k, k.shape[0])
    # The grid needs the longest sequence; without max_seqlen_* that costs one device-to-host sync.
    max_seqlen_q, max_seqlen_k = core.max_seqlen_q, core.max_seqlen_k
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    return dataclasses.replace(core, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


@record_op("attention_core")
def _core_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
             cu_seqlens_k: torch.Tensor | None, core: CoreArgs, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    core = _resolve_core(q, k, cu_seqlens_q, cu_seqlens_k, core, backend, check_values=True)
    forward, _ = LAUNCHERS[backend]
    return forward(q, k, v, cu_seqlens_q, cu_seqlens_k, core)


@_core_op.register_fake
def _core_op_fake(q, k, v, cu_seqlens_q, *args):
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
    return torch.empty_like(q), lse


@record_op("attention_core_backward")
def _core_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                      core: CoreArgs, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    core = _resolve_core(q, k, cu_seqlens_q, cu_seqlens_k, core, backend, check_values=False)
    _, backward = LAUNCHERS[backend]
    return backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, core)


@_core_backward_op.register_fake
def _core_backward_op_fake(grad_out, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# --------------------------------------------------------------------------------------------------------------------
# Autograd and the public API
# --------------------------------------------------------------------------------------------------------------------

class AttentionRotaryFunction(torch.autograd.Function):
    """Autograd of rotate → core: saves the rotated q and k; the backward un-rotates the core's dq and dk.

    ``rotation`` and ``core`` are :class:`Rotation` and :class:`CoreArgs`; the cu_seqlens of packed input are those
    of the rotation's positions. The backward is not itself differentiable (no double backward), as in
    flash-attention.
    """

    @staticmethod
    def forward(ctx, q, k, v, rotation, core, backend):
        q_rot, k_rot = q, k
        if rotation.rotate_q or rotation.rotate_k:
            q_out, k_out = _rotate_op(q, k, rotation, backend)
            q_rot = q_out if rotation.rotate_q else q
            k_rot = k_out if rotation.rotate_k else k
        cu_seqlens = rotation.q.positions.cu_seqlens, rotation.k.positions.cu_seqlens
        out, lse = _core_op(q_rot, k_rot, v, *cu_seqlens, core, backend)
        ctx.save_for_backward(q_rot, k_rot, v, out, lse, *rotation.q.tensors(), *rotation.k.tensors())
        ctx.settings = (rotation, core, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q_rot, k_rot, v, out, lse = ctx.saved_tensors[:5]  # then the ropes' tensors (Rope.tensors)
        rotation, core, backend = ctx.settings
        cu_seqlens = rotation.q.positions.cu_seqlens, rotation.k.positions.cu_seqlens
        dq, dk, dv = _core_backward_op(grad_out, q_rot, k_rot, v, out, lse, *cu_seqlens, core, backend)
        if rotation.rotate_q or rotation.rotate_k:
            dq_out, dk_out = _rotate_op(dq, dk, rotation.reversed(), backend)
            dq = dq_out if rotation.rotate_q else dq
            dk = dk_out if rotation.rotate_k else dk
        return dq, dk, dv, None, None, None


def _check_tensors(q, k, v, varlen):
    """Shape, dtype and device checks of q, k, v; returns (n_heads, n_kv_heads, head_dim)."""
    validation.check_tensors((("q", q), ("k", k), ("v", v)))
    ndim, shape_doc = (3, "(total_tokens, heads, head_dim) with cu_seqlens_q") if varlen else \
        (4, "(batch, seq, heads, head_dim)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != ndim:
            raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size: q {tuple(q.shape)}, k {tuple(k.shape)}")
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    n_kv_heads = k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k head_dim ({k.shape[-1]}) must equal q head_dim ({head_dim})")
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be even and at most {MAX_HEAD_DIM}, got {head_dim}")
    if n_heads == 0 or n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})")
    return n_heads, n_kv_heads, head_dim


def _check_softmax_scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    validation.check_positive_real(softmax_scale, "softmax_scale")
    return float(softmax_scale)


def _resolve_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, positions):
    """Checked packed-layout arguments: (cu_seqlens_k, max_seqlen_k, query PositionSpec)."""
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
        max_seqlen_k = max_seqlen_q if max_seqlen_k is None else max_seqlen_k
    q_spec = validation.resolve_varlen_positions(positions, cu_seqlens_q, max_seqlen_q, q.shape[0], q.device)
    validation.resolve_varlen_positions(None, cu_seqlens_k, max_seqlen_k, k.shape[0], q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have the shape of cu_seqlens_q {tuple(cu_seqlens_q.shape)} (one entry "
                         f"per sequence, plus one), got {tuple(cu_seqlens_k.shape)}")
    return cu_seqlens_k, max_seqlen_k, q_spec


def _resolve_key_positions(k, positions, k_positions, q_spec, k_arange, rotate_q, rotate_k, same_tokens,
                           max_seqlen_k):
    """The keys' PositionSpec (see ``attention_rotary`` for the defaults); ``k_arange`` is 0..seq_k-1 (per packed
    sequence)."""
    if not rotate_k:
        if k_positions is not None:
            raise ValueError("k_positions is given but rotate_k=False (the keys are already rotated)")
        if positions is not None and not rotate_q:
            raise ValueError("positions is given but rotate_q and rotate_k are both False (nothing is rotated)")
        return k_arange
    if k_positions is not None:
        if positions is None:
            raise ValueError("k_positions is given without positions: pass the queries' positions too")
        if k_arange.cu_seqlens is not None:
            return validation.resolve_varlen_positions(k_positions, k_arange.cu_seqlens, max_seqlen_k, k.shape[0],
                                                       k.device)
        return validation.resolve_positions(k_positions, k.shape[0], k.shape[1], k.device)
    if positions is None:
        return k_arange
    if not same_tokens:
        raise ValueError("k_positions is required when positions is given and the keys are not the query tokens "
                         "(seq_q != seq_k, or a separate cu_seqlens_k)")
    return q_spec


def _queries_at_the_end(q, k, q_arange, k_arange):
    """The queries' default positions: query i of a sequence at key position i + len_k - len_q (bottom-right
    alignment, as the causal mask); ``q_arange`` and ``k_arange`` are 0..len-1 of each."""
    if q_arange.cu_seqlens is None:
        return PositionSpec(POSITIONS_ARANGE, None, k.shape[1] - q.shape[1])
    if k_arange.cu_seqlens is q_arange.cu_seqlens:
        return q_arange
    lengths_q = q_arange.cu_seqlens[1:] - q_arange.cu_seqlens[:-1]
    lengths_k = k_arange.cu_seqlens[1:] - k_arange.cu_seqlens[:-1]
    return PositionSpec(POSITIONS_OFFSETS, lengths_k - lengths_q, 0, q_arange.cu_seqlens)


def attention_rotary(q, k, v, positions=None, *, scaling_factor=1.0, base=10000.0, inv_freq=None, rotary_dim=None,
                     interleaved=False, causal=True, softmax_scale=None, k_positions=None, cu_seqlens_q=None,
                     cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, rotate_q=True, rotate_k=True,
                     return_lse=False, backend="auto"):
    """Softmax attention of un-rotated q and k with interpolated RoPE: a rotation pass, then flash attention.

    Equals :func:`rotary_interp` on q and k followed by exact softmax attention, without any seq_q × seq_k tensor:
    memory is O(seq) in the forward and the backward (the rotated q and k are saved for the backward instead of q
    and k). The pair ``j`` of a head at
    position ``m`` is rotated by ``(m / scaling_factor) * inv_freq[j]``, ``inv_freq[j] = base ** (-2j /
    rotary_dim)`` unless ``inv_freq`` is given.

    Parameters
    ----------
    q : Tensor
        (batch, seq_q, n_heads, head_dim), or (total_q, n_heads, head_dim) packed with ``cu_seqlens_q``. float16,
        bfloat16 or float32 (computed with TF32 dots on a GPU), any strides; head_dim even, at most 256.
    k, v : Tensor
        (batch, seq_k, n_kv_heads, head_dim), or (total_k, n_kv_heads, head_dim) packed; n_heads must be a multiple
        of n_kv_heads (GQA, MQA). Same dtype and device as q.
    positions : None, int or integer Tensor, optional
        Query positions, in the forms of :func:`rotary_interp`: an int or (batch,) offsets added to 0..seq_q-1,
        (seq_q,) or (batch or 1, seq_q) ids; packed: an int or (n_seqs,) offsets per sequence, or (total_q,) ids.
        Default: the queries are the last seq_q of the key positions (seq_k - seq_q + 0..seq_q-1).
    scaling_factor, base, inv_freq, rotary_dim, interleaved
        The rotation, as in :func:`rotary_interp`.
    causal : bool
        Causal mask aligned bottom-right as in flash-attention: query i sees keys j <= i + seq_k - seq_q (per
        sequence when packed). A query that sees no key gets a zero output.
    softmax_scale : float, optional
        Scale of q·kᵀ before the softmax; default 1 / sqrt(head_dim).
    k_positions : None, int or integer Tensor, optional
        Key positions, same forms for seq_k (or total_k). Default 0..seq_k-1; when only ``positions`` is given the
        keys are the query tokens (requires seq_q == seq_k, and no separate cu_seqlens_k) and share it.
    cu_seqlens_q, cu_seqlens_k : Tensor, optional
        (n_seqs + 1,) int32/int64 cumulative lengths of packed sequences; ``cu_seqlens_k`` defaults to
        ``cu_seqlens_q`` (self-attention).
    max_seqlen_q, max_seqlen_k : int, optional
        Longest packed sequence; computed with a device sync (in the forward and the backward) when omitted,
        checked when given.
    rotate_q, rotate_k : bool
        Rotate the queries, the keys. ``rotate_k=False`` takes keys already rotated (a KV cache filled by the
        cache-append op): the decode path. Both False: plain attention on pre-rotated inputs.
    return_lse : bool
        Also return the float32 log-sum-exp of the scaled scores (not differentiable).
    backend : str
        ``"auto"`` (Triton for GPU inputs; for CPU inputs ``"torch"``, or Triton's interpreter when
        ``TRITON_INTERPRET=1``), ``"triton"`` or ``"torch"``: the rotation of ``rotary_interp``'s torch backend and
        exact attention in float32 PyTorch matmuls over chunks of queries (memory O(chunk · seq_k)).

    Returns
    -------
    Tensor, or (Tensor, Tensor) with ``return_lse``
        Output shaped like q in q's dtype; lse (batch, n_heads, seq_q), or (n_heads, total_q) packed, -inf for a
        query that sees no key.

    Notes
    -----
    Gradients are deterministic (no atomics; a fixed summation order). dq, dk and dv are gradients of the
    un-rotated q and k.

    Examples
    --------
    >>> q = torch.randn(2, 4096, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> k = torch.randn(2, 4096, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> v = torch.randn(2, 4096, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> out = pi_kernels.attention_rotary(q, k, v, scaling_factor=4.0, base=500000.0)
    >>> out.sum().backward()
    >>> # Decode: one new query at position cache_len - 1 against a cache of already-rotated keys.
    >>> out = pi_kernels.attention_rotary(q_new, k_cache, v_cache, cache_len - 1, scaling_factor=4.0,
    ...                                   rotate_k=False)
    """
    varlen = cu_seqlens_q is not None
    if not varlen and (cu_seqlens_k is not None or max_seqlen_q is not None or max_seqlen_k is not None):
        raise ValueError("cu_seqlens_k, max_seqlen_q and max_seqlen_k are only valid with cu_seqlens_q (packed "
                         "sequences)")
    n_heads, n_kv_heads, head_dim = _check_tensors(q, k, v, varlen)
    softmax_scale = _check_softmax_scale(softmax_scale, head_dim)
    if varlen:
        cu_seqlens_k, max_seqlen_k, q_spec = _resolve_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                                 max_seqlen_k, positions)
        same_tokens = cu_seqlens_k is cu_seqlens_q
    else:
        q_spec = validation.resolve_positions(positions, q.shape[0], q.shape[1], q.device)
        same_tokens = q.shape[1] == k.shape[1]
    k_arange = PositionSpec(POSITIONS_ARANGE, None, 0, cu_seqlens_k)
    k_spec = _resolve_key_positions(k, positions, k_positions, q_spec, k_arange, rotate_q, rotate_k, same_tokens,
                                    max_seqlen_k)
    if positions is None:
        q_spec = _queries_at_the_end(q, k, q_spec, k_arange)
    backend = _backend.resolve_backend(backend, q.device, LAUNCHERS)
    q_rope = Rope.resolve(q_spec, head_dim, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                          rotary_dim=rotary_dim, interleaved=interleaved)
    rotation = Rotation(q_rope, q_rope.with_positions(k_spec), bool(rotate_q), bool(rotate_k),
                        positions is not None)
    core = CoreArgs(max_seqlen_q, max_seqlen_k, bool(causal), softmax_scale)
    out, lse = AttentionRotaryFunction.apply(q, k, v, rotation, core, backend)
    return (out, lse) if return_lse else out


class AttentionRotary(torch.nn.Module):
    """Fused RoPE attention as a module holding the frequency scheme and the attention options.

    Parameters
    ----------
    rotary_dim : int, optional
        Rotated features per head (default: all of head_dim).
    base, scaling_factor, inv_freq, interleaved, causal, softmax_scale
        As in :func:`attention_rotary`; ``inv_freq`` is a non-persistent buffer, so it follows ``.to()``.

    Examples
    --------
    >>> attn = AttentionRotary(base=500000.0, scaling_factor=4.0)
    >>> out = attn(q, k, v, position_ids)
    """

    def __init__(self, rotary_dim=None, *, base=10000.0, scaling_factor=1.0, inv_freq=None, interleaved=False,
                 causal=True, softmax_scale=None):
        super().__init__()
        validation.check_scaling_factor(scaling_factor)
        if inv_freq is None:
            validation.check_base(base)
        elif rotary_dim is not None:
            validation.check_inv_freq(inv_freq, rotary_dim)
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.scaling_factor = float(scaling_factor)
        self.interleaved = bool(interleaved)
        self.causal = bool(causal)
        self.softmax_scale = softmax_scale
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q, k, v, positions=None, **options):
        """Attend; ``options`` are the per-call arguments of :func:`attention_rotary` (k_positions, cu_seqlens_q,
        cu_seqlens_k, max_seqlen_q, max_seqlen_k, rotate_q, rotate_k, return_lse, backend)."""
        return attention_rotary(q, k, v, positions, scaling_factor=self.scaling_factor, base=self.base,
                                inv_freq=self.inv_freq, rotary_dim=self.rotary_dim, interleaved=self.interleaved,
                                causal=self.causal, softmax_scale=self.softmax_scale, **options)

    def extra_repr(self):
        return (f"rotary_dim={self.rotary_dim}, base={self.base}, scaling_factor={self.scaling_factor}, "
                f"interleaved={self.interleaved}, causal={self.causal}")
