"""vLLM's in-place rotary convention: ``rotary_embedding`` (cos/sin from a cache) and ``rotary_embedding_interp``.

One Triton kernel, ``_rotary_embedding_kernel``, rotates query and key in place on vLLM's flat
``(num_tokens, heads · head_size)`` tensors in one launch, reading cos/sin from a ``cos_sin_cache`` or computing the
interpolated angles like :func:`pi_kernels.rotary_interp`. On tensors that require grad they rotate copies and copy them
back (``RotaryEmbeddingFunction``), so gradients are right, also under ``torch.compile``. Each takes
``backend="auto"|"triton"|"cuda"|"torch"``; the CUDA kernels of ``csrc/`` (see :mod:`pi_kernels._cuda`) and the
plain-PyTorch ones of :mod:`pi_kernels._torch_backend` have the same semantics. The public front is
:mod:`pi_kernels.inference`. ``rotate_rows`` and ``block_sizes`` are shared with the KV-cache append
(``kv_cache.py``).
"""

import numbers

import torch
import triton
import triton.language as tl

from .. import _backend, _cuda, _torch_backend
from .. import _validation as validation
from .._positions import POSITIONS_IDS, PositionSpec, position_pointer_and_strides
from ._rope import program_tokens, rope_cos_sin, token_positions
from ._schema import Rope, record_op

__all__ = ["LAUNCHERS", "RotaryEmbeddingFunction", "launch_rotary_embedding", "rotary_embedding",
           "rotary_embedding_interp"]


@triton.jit
def rotate_rows(
    x_ptr, out_ptr,                          # source and destination of one tensor; equal when in place
    rows, out_rows,                          # (BLOCK_T,) int64 offsets of each token's (head 0, dim 0) in x / out
    row_mask,                                # (BLOCK_T,) tokens to write
    stride_h, stride_d, ostride_h, ostride_d,
    head_start, n_heads,
    cos, sin,                                # (BLOCK_T, BLOCK_HALF) float32
    ROTARY_HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr,
):
    heads = (head_start + tl.arange(0, BLOCK_H)).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)
    base_in = rows[:, None, None] + heads[None, :, None] * stride_h
    base_out = out_rows[:, None, None] + heads[None, :, None] * ostride_h
    head_mask = row_mask[:, None, None] & (heads < n_heads)[None, :, None]
    cos3 = cos[:, None, :]
    sin3 = sin[:, None, :]
    if INTERLEAVED:
        # GPT-J pairs (2j, 2j + 1) are adjacent: one contiguous run of rotary_dim features, split into pairs in
        # registers, so accesses are 16 bytes wide rather than one element at stride 2.
        dims = tl.arange(0, 2 * BLOCK_HALF)
        dims64 = dims.to(tl.int64)[None, None, :]
        mask = head_mask & (dims < 2 * ROTARY_HALF)[None, None, :]
        x = tl.load(x_ptr + base_in + dims64 * stride_d, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (x.shape[0], BLOCK_H, BLOCK_HALF, 2)))
        out = tl.reshape(tl.join(x1 * cos3 - x2 * sin3, x1 * sin3 + x2 * cos3), x.shape)
        tl.store(out_ptr + base_out + dims64 * ostride_d, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        dim1 = pairs.to(tl.int64)[None, None, :]
        dim2 = (pairs + ROTARY_HALF).to(tl.int64)[None, None, :]
        mask = head_mask & (pairs < ROTARY_HALF)[None, None, :]
        x1 = tl.load(x_ptr + base_in + dim1 * stride_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + base_in + dim2 * stride_d, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + base_out + dim1 * ostride_d, (x1 * cos3 - x2 * sin3).to(out_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(out_ptr + base_out + dim2 * ostride_d, (x1 * sin3 + x2 * cos3).to(out_ptr.dtype.element_ty),
                 mask=mask)
    if COPY_TAIL:
        # Features past rotary_dim pass through unchanged.
        tail = 2 * ROTARY_HALF + tl.arange(0, BLOCK_TAIL)
        tail_mask = head_mask & (tail < HEAD_DIM)[None, None, :]
        tail64 = tail.to(tl.int64)[None, None, :]
        rest = tl.load(x_ptr + base_in + tail64 * stride_d, mask=tail_mask)
        tl.store(out_ptr + base_out + tail64 * ostride_d, rest.to(out_ptr.dtype.element_ty), mask=tail_mask)


@triton.jit
def _rotary_embedding_kernel(
    query_ptr, key_ptr,                      # (batch, seq, heads, head_size) views, rotated in place
    cos_sin_ptr,                             # (max_position, rotary_dim): cos | sin; read when COS_SIN_FROM_CACHE
    turns_ptr,                               # float64 (ROTARY_HALF,) turns per position; read otherwise
    pos_ptr,                                 # int32/int64 (batch or 1, seq) positions
    max_position,                            # cache rows; a token whose position is outside is left untouched
    seq_len, n_token_blocks,
    n_q_heads, n_k_heads, n_q_groups,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_pb, stride_ps,                    # positions strides (0 for a batch row shared by all)
    stride_cp, stride_cd,                    # cos_sin_cache strides: (position, feature)
    ROTARY_HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    COS_SIN_FROM_CACHE: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    # Grid: (batch · token blocks, q head groups + k head groups); cos/sin once per program, reused by its heads.
    group, batch_idx, tokens, token_mask = program_tokens(n_token_blocks, seq_len, BLOCK_T)
    pos = token_positions(pos_ptr, pos_ptr, batch_idx, tokens, token_mask, 0, 1, stride_pb, stride_ps,
                          2, False, 0)
    if COS_SIN_FROM_CACHE:
        # Positions outside the cache were rejected on the host; masking them keeps unchecked calls in bounds.
        token_mask = token_mask & (pos >= 0) & (pos < max_position)
        pairs = tl.arange(0, BLOCK_HALF)
        row = pos[:, None] * stride_cp + pairs.to(tl.int64)[None, :] * stride_cd
        mask = token_mask[:, None] & (pairs < ROTARY_HALF)[None, :]
        cos = tl.load(cos_sin_ptr + row, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(cos_sin_ptr + row + ROTARY_HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
    else:
        cos, sin = rope_cos_sin(pos, turns_ptr, ROTARY_HALF, BLOCK_HALF, False)
    tokens64 = tokens.to(tl.int64)
    if group < n_q_groups:
        rows = batch_idx * stride_qb + tokens64 * stride_qs
        rotate_rows(query_ptr, query_ptr, rows, rows, token_mask, stride_qh, stride_qd, stride_qh, stride_qd,
                     group * BLOCK_H, n_q_heads, cos, sin,
                     ROTARY_HALF, HEAD_DIM, BLOCK_H, BLOCK_HALF, 1, INTERLEAVED, False)
    else:
        rows = batch_idx * stride_kb + tokens64 * stride_ks
        rotate_rows(key_ptr, key_ptr, rows, rows, token_mask, stride_kh, stride_kd, stride_kh, stride_kd,
                     (group - n_q_groups) * BLOCK_H, n_k_heads, cos, sin,
                     ROTARY_HALF, HEAD_DIM, BLOCK_H, BLOCK_HALF, 1, INTERLEAVED, False)


def block_sizes(seq_len, head_counts, elements_per_token_head):
    """(BLOCK_T, BLOCK_H): about 8k elements per program, heads grouped by the smallest non-zero head count."""
    block_h = min(triton.next_power_of_2(min(n for n in head_counts if n > 0)), 16)
    block_t = max(1, min(8192 // (block_h * elements_per_token_head), triton.next_power_of_2(seq_len)))
    return block_t, block_h


def launch_rotary_embedding(query4, key4, rope, cos_sin_cache):
    """Rotate (batch, seq, heads, head_size) views in place by ``rope``, whose positions are ids, (seq,) or
    (batch or 1, seq); key4 may have 0 heads.

    cos/sin come from ``cos_sin_cache`` rows at the positions when it is given, else from the rope's angles.
    """
    from_cache = cos_sin_cache is not None
    turns = None if from_cache else rope.signed_turns(query4.device)
    batch, seq_len, n_q_heads, head_size = query4.shape
    n_k_heads = key4.shape[2]
    if batch * seq_len == 0 or n_q_heads + n_k_heads == 0:
        return
    rotary_half = rope.rotary_dim // 2
    block_half = triton.next_power_of_2(rotary_half)
    block_t, block_h = block_sizes(seq_len, (n_q_heads, n_k_heads), 2 * block_half)
    n_token_blocks = triton.cdiv(seq_len, block_t)
    n_q_groups = triton.cdiv(n_q_heads, block_h)
    n_groups = n_q_groups + triton.cdiv(n_k_heads, block_h)
    positions, stride_pb, stride_ps = position_pointer_and_strides(rope.positions, None)
    # The pointer the variant does not read gets the other table as a placeholder.
    _rotary_embedding_kernel[(batch * n_token_blocks, n_groups)](
        query4, key4, cos_sin_cache if from_cache else turns, cos_sin_cache if from_cache else turns,
        positions, cos_sin_cache.shape[0] if from_cache else 0, seq_len, n_token_blocks,
        n_q_heads, n_k_heads, n_q_groups, *query4.stride(), *key4.stride(), stride_pb, stride_ps,
        *(cos_sin_cache.stride() if from_cache else (0, 0)),
        ROTARY_HALF=rotary_half, HEAD_DIM=head_size, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
        COS_SIN_FROM_CACHE=from_cache, INTERLEAVED=rope.interleaved,
        num_warps=4,
    )


def _vllm_views(positions, query, key, head_size):
    """(query4, key4): (batch or 1, seq, heads, head_size) views of vLLM-convention tensors.

    A missing key becomes a 0-head view of query, so one launch serves both cases.
    """
    def heads_view(x):
        x4 = x.unflatten(-1, (-1, head_size)) if x.dim() == positions.dim() + 1 else x
        return x4.unsqueeze(0) if positions.dim() == 1 else x4

    query4 = heads_view(query)
    return query4, query4[:, :, :0] if key is None else heads_view(key)


# The launcher of each backend, all with launch_rotary_embedding's arguments; its keys are the backends this op
# has, which _backend.resolve_backend reads.
LAUNCHERS = {"triton": launch_rotary_embedding, "cuda": _cuda.rotary_embedding,
             "torch": _torch_backend.rotary_embedding}


@record_op("rotary_embedding", mutates_args=("query", "key"))
def _rotary_embedding_op(query: torch.Tensor, key: torch.Tensor | None, head_size: int, rope: Rope,
                         cos_sin_cache: torch.Tensor | None, backend: str) -> None:
    positions = rope.positions.ids
    query4, key4 = _vllm_views(positions, query, key, head_size)
    if cos_sin_cache is None:
        validation.check_values(positions, None, None, 0)
    else:
        validation.check_range(positions, "positions", 0, cos_sin_cache.shape[0], "rows of cos_sin_cache")
    LAUNCHERS[backend](query4, key4, rope, cos_sin_cache)


@_rotary_embedding_op.register_fake
def _rotary_embedding_op_fake(*args):
    return None


class RotaryEmbeddingFunction(torch.autograd.Function):
    """Autograd for the in-place vLLM-convention ops on tensors that require grad: the forward returns rotated copies
    (the caller copies them back, so autograd sees the mutation, views included), the backward rotates the gradients
    by −angle with the same op. Outputs are (query, key or None)."""

    @staticmethod
    def forward(ctx, query, key, head_size, rope, cos_sin_cache, backend):
        query, key = query.clone(), None if key is None else key.clone()
        _rotary_embedding_op(query, key, head_size, rope, cos_sin_cache, backend)
        ctx.save_for_backward(cos_sin_cache, *rope.tensors())
        ctx.settings = (head_size, rope, backend)
        return query, key

    @staticmethod
    def backward(ctx, grad_query, grad_key):
        cos_sin_cache = ctx.saved_tensors[0]  # then the rope's tensors (Rope.tensors)
        head_size, rope, backend = ctx.settings
        if cos_sin_cache is None:
            rope = rope.reversed()
        else:
            # The conjugate rotation of each token: its cache row with sin negated, read at the token's own index.
            positions, half = rope.positions.ids, rope.rotary_dim // 2
            rows = cos_sin_cache[positions.reshape(-1)]
            cos_sin_cache = torch.cat((rows[:, :half], -rows[:, half:2 * half]), dim=1)
            own_rows = torch.arange(positions.numel(), device=positions.device).view(positions.shape)
            rope = rope.with_positions(PositionSpec(POSITIONS_IDS, own_rows))
        # Through apply again, so the backward is itself differentiable.
        grad_query, grad_key = RotaryEmbeddingFunction.apply(grad_query, grad_key, head_size, rope, cos_sin_cache,
                                                             backend)
        return grad_query, grad_key, None, None, None, None


def _rotate(query, key, head_size, rope, cos_sin_cache, backend):
    """Both public ops after their checks."""
    # Under torch.compile always out of place, then copied back: inductor drops the symbolic storage offset of a view
    # that a custom op mutates (see rotary.py's _rotate_in_place).
    if torch.compiler.is_compiling() or \
            (torch.is_grad_enabled() and (query.requires_grad or (key is not None and key.requires_grad))):
        query_out, key_out = RotaryEmbeddingFunction.apply(query, key, head_size, rope, cos_sin_cache, backend)
        query.copy_(query_out)
        if key is not None:
            key.copy_(key_out)
    else:
        _rotary_embedding_op(query, key, head_size, rope, cos_sin_cache, backend)


def _check_vllm_inputs(positions, query, key, head_size):
    """Shape, dtype and device checks of vLLM's calling convention."""
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be an int32 or int64 tensor, got {getattr(positions, 'dtype', positions)!r}")
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions must be (num_tokens,) or (batch, seq), got {tuple(positions.shape)}")
    if not isinstance(head_size, numbers.Integral) or isinstance(head_size, bool) or head_size <= 0 or head_size % 2:
        raise ValueError(f"head_size must be a positive even int, got {head_size!r}")
    validation.check_tensors((("query", query), ("key", key)))
    if query.device != positions.device:
        raise ValueError(f"query is on {query.device} but positions is on {positions.device}")
    for name, x in (("query", query), ("key", key)):
        if x is None:
            continue
        flat = x.dim() == positions.dim() + 1 and x.shape[-1] % head_size == 0
        split = positions.dim() == 1 and x.dim() == 3 and x.shape[-1] == head_size
        if x.shape[:positions.dim()] != positions.shape or not (flat or split):
            lead = ", ".join(str(n) for n in positions.shape)
            raise ValueError(f"{name} must have shape ({lead}, heads * head_size) with head_size={head_size}"
                             f"{' or (num_tokens, heads, head_size)' if positions.dim() == 1 else ''} to match "
                             f"positions {tuple(positions.shape)}, got {tuple(x.shape)}")
    validation.check_no_overlap((("query", query), ("key", key)))


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox=True, *, backend="auto"):
    """Rotate query and key in place with cos/sin read from a cache: vLLM's ``rotary_embedding`` convention.

    Parameters
    ----------
    positions : Tensor
        (num_tokens,) or (batch, seq), int64 or int32, each in [0, max_position).
    query : Tensor
        (num_tokens, n_heads * head_size) or (num_tokens, n_heads, head_size); (batch, seq, n_heads * head_size)
        with 2-D positions. float16, bfloat16 or float32, any strides; rotated in place.
    key : Tensor or None
        As query, with n_kv_heads heads; None rotates query only.
    head_size : int
        Features per head (even).
    cos_sin_cache : Tensor
        (max_position, rot_dim), rot_dim even and ≤ head_size: cos of the rot_dim / 2 angles of each position in
        the first half of a row, their sin in the second (vLLM's layout). Same dtype as query, or float32. Only the
        first rot_dim features of a head are rotated; the rest are left as they are.
    is_neox : bool
        True: rotate-half pairs (j, j + rot_dim / 2) (GPT-NeoX, Llama); False: interleaved pairs (2j, 2j + 1)
        (GPT-J).
    backend : str
        "auto" (for GPU inputs the CUDA extension when built, else Triton; for CPU inputs "torch", or Triton's
        interpreter when TRITON_INTERPRET=1), "triton", "cuda" or "torch" (plain PyTorch).

    Returns
    -------
    None
        query and key are modified in place.

    Examples
    --------
    >>> cos_sin_cache = torch.cat((angles.cos(), angles.sin()), dim=-1)  # angles: (max_position, rot_dim // 2)
    >>> rotary_embedding(positions, query, key, 128, cos_sin_cache, is_neox=True)
    """
    _check_vllm_inputs(positions, query, key, head_size)
    if not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache must be a 2-D (max_position, rot_dim) tensor, got "
                         f"{tuple(getattr(cos_sin_cache, 'shape', ())) or type(cos_sin_cache).__name__}")
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim <= 0 or rot_dim % 2 or rot_dim > head_size:
        raise ValueError(f"cos_sin_cache.shape[1] (rot_dim) must be even, > 0 and ≤ head_size ({head_size}), got "
                         f"{rot_dim}")
    if cos_sin_cache.dtype not in (query.dtype, torch.float32):
        raise TypeError(f"cos_sin_cache.dtype must be query's ({query.dtype}) or float32, got {cos_sin_cache.dtype}")
    if cos_sin_cache.device != query.device:
        raise ValueError(f"cos_sin_cache is on {cos_sin_cache.device} but query is on {query.device}")
    if cos_sin_cache.requires_grad and torch.is_grad_enabled():
        raise ValueError("cos_sin_cache requires grad, but no gradient flows to it; pass cos_sin_cache.detach()")
    backend = _backend.resolve_backend(backend, query.device, LAUNCHERS)
    # The cache holds the angles: the rope's frequencies are never read.
    rope = Rope(PositionSpec(POSITIONS_IDS, positions), None, 1.0, 1.0, rot_dim, not is_neox)
    _rotate(query, key, int(head_size), rope, cos_sin_cache, backend)


def rotary_embedding_interp(positions, query, key, head_size, *, rotary_dim=None, scaling_factor=1.0,
                            base=10000.0, inv_freq=None, is_neox=True, backend="auto"):
    """:func:`rotary_embedding` with interpolated angles computed in the kernel instead of read from a cache.

    The pair ``j`` at position ``m`` is rotated by ``(m / scaling_factor) * inv_freq[j]`` exactly as in
    :func:`pi_kernels.rotary_interp` (float64 angle reduction, ~1e-7 of the float64 reference at any position),
    so no (max_position, rot_dim) cache is read or kept, and positions have no upper bound.

    Parameters
    ----------
    positions, query, key, head_size, is_neox, backend
        As in :func:`rotary_embedding`; positions ≥ 0.
    rotary_dim : int, optional
        Leading features rotated per head (even, ≤ head_size); default head_size.
    scaling_factor : float
        PI's L'/L, > 0.
    base : float
        RoPE base, used when ``inv_freq`` is None.
    inv_freq : Tensor, optional
        (rotary_dim // 2,) frequencies of any scheme; overrides ``base``.

    Returns
    -------
    None
        As :func:`rotary_embedding`: query and key are rotated in place.

    Examples
    --------
    >>> rotary_embedding_interp(positions, query, key, 128, scaling_factor=4.0, base=500000.0)
    """
    _check_vllm_inputs(positions, query, key, head_size)
    backend = _backend.resolve_backend(backend, query.device, LAUNCHERS)
    rope = Rope.resolve(PositionSpec(POSITIONS_IDS, positions), head_size, scaling_factor=scaling_factor, base=base,
                        inv_freq=inv_freq, rotary_dim=rotary_dim, interleaved=not is_neox)
    _rotate(query, key, int(head_size), rope, None, backend)
