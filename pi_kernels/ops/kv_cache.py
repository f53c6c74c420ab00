"""Rotary fused with the KV-cache append: ``rotary_kv_cache_append`` and ``rotary_paged_kv_cache_append``.

One Triton kernel, ``_rotary_cache_append_kernel``, rotates q into a new tensor and writes the rotated k and the v of
the new tokens into a KV cache, contiguous per sequence (flash-attention's ``flash_attn_with_kvcache`` layout) or
paged through a slot mapping (the layout of vLLM and FlashInfer), in one launch. No autograd formula: these are
inference ops, and refuse inputs that require grad. Each takes ``backend="auto"|"triton"|"cuda"|"torch"``; the CUDA
kernels of ``csrc/include/kv_cache.cuh`` (see :mod:`pi_kernels._cuda`) and the plain-PyTorch ones of
:mod:`pi_kernels._torch_backend` have the same semantics. Slots, positions and cache lengths are checked on the
host before anything is written (see ``_validation.set_value_checks``), and masked again in the kernel, so an
out-of-range index is never written even with the checks off. The public front is :mod:`pi_kernels.inference`.
"""

import operator

import torch
import triton
import triton.language as tl

from .. import _backend, _cuda, _torch_backend
from .. import _validation as validation
from .._positions import POSITIONS_IDS, POSITIONS_OFFSETS, PositionSpec, position_pointer_and_strides
from ._rope import program_tokens, rope_cos_sin, token_positions
from ._schema import Rope, record_op
from .rotary import LAUNCHERS as ROTARY_LAUNCHERS
from .rotary_embedding import block_sizes, rotate_rows

__all__ = ["KV_LAYOUTS", "LAUNCHERS", "launch_cache_append", "rotary_kv_cache_append", "rotary_paged_kv_cache_append",
           "slot_mapping_from_block_table"]

KV_LAYOUTS = ("nhd", "hnd")


@triton.jit
def _copy_rows(
    x_ptr, out_ptr,                          # source and destination
    rows, out_rows, row_mask,                # as in _rotate_rows
    stride_h, stride_d, ostride_h, ostride_d,
    head_start, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    heads = (head_start + tl.arange(0, BLOCK_H)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None, None] & (heads < n_heads)[None, :, None] & (dims < HEAD_DIM)[None, None, :]
    dims64 = dims.to(tl.int64)[None, None, :]
    x = tl.load(x_ptr + rows[:, None, None] + heads[None, :, None] * stride_h + dims64 * stride_d, mask=mask)
    tl.store(out_ptr + out_rows[:, None, None] + heads[None, :, None] * ostride_h + dims64 * ostride_d,
             x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_cache_append_kernel(
    q_ptr, k_ptr, v_ptr,                     # new tokens, (batch, new, heads, head_dim) views
    q_out_ptr,                               # rotated q
    k_cache_ptr, v_cache_ptr,                # (batch or block, index or offset in block, kv heads, head_dim) views
    turns_ptr,                               # float64 (ROTARY_HALF,) turns per position
    pos_ptr,                                 # int32/int64 positions (offsets or ids), unused for POS_MODE 0
    index_ptr,                               # PAGED: slot_mapping (new,); else cache_seqlens (batch,)
    pos_offset, seq_len, n_token_blocks,
    cache_slots,                             # PAGED: num_blocks · block_size; else max_len. Writes outside: dropped
    block_size,                              # PAGED only
    n_q_heads, n_kv_heads, n_q_groups,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_qob, stride_qos, stride_qoh, stride_qod,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_pb, stride_ps,                    # positions strides: (batch row, token)
    stride_index,                            # stride of slot_mapping / cache_seqlens
    ROTARY_HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    BLOCK_D: tl.constexpr, POS_MODE: tl.constexpr, PAGED: tl.constexpr, INTERLEAVED: tl.constexpr,
    COPY_TAIL: tl.constexpr,
):
    # Grid: (batch · token blocks, q head groups + kv head groups). A q program rotates q into q_out; a kv program
    # rotates k into k_cache and copies v into v_cache for the same heads and tokens.
    group, batch_idx, tokens, token_mask = program_tokens(n_token_blocks, seq_len, BLOCK_T)
    tokens64 = tokens.to(tl.int64)
    pos = token_positions(pos_ptr, pos_ptr, batch_idx, tokens, token_mask, pos_offset, 1, stride_pb, stride_ps,
                          POS_MODE, False, 0)
    cos, sin = rope_cos_sin(pos, turns_ptr, ROTARY_HALF, BLOCK_HALF, False)
    if group < n_q_groups:
        rotate_rows(q_ptr, q_out_ptr, batch_idx * stride_qb + tokens64 * stride_qs,
                     batch_idx * stride_qob + tokens64 * stride_qos, token_mask,
                     stride_qh, stride_qd, stride_qoh, stride_qod, group * BLOCK_H, n_q_heads, cos, sin,
                     ROTARY_HALF, HEAD_DIM, BLOCK_H, BLOCK_HALF, BLOCK_TAIL, INTERLEAVED, COPY_TAIL)
    else:
        if PAGED:
            slot = tl.load(index_ptr + tokens64 * stride_index, mask=token_mask, other=-1).to(tl.int64)
            # Slot -1 marks a padding token (vLLM's convention); out-of-range slots are dropped, never written.
            write_mask = token_mask & (slot >= 0) & (slot < cache_slots)
            slot = tl.where(write_mask, slot, 0)
            outer = slot // block_size
            inner = slot % block_size
        else:
            index = tl.load(index_ptr + batch_idx * stride_index).to(tl.int64) + tokens64
            write_mask = token_mask & (index >= 0) & (index < cache_slots)
            outer = batch_idx + tokens64 * 0
            inner = index
        head_start = (group - n_q_groups) * BLOCK_H
        rotate_rows(k_ptr, k_cache_ptr, batch_idx * stride_kb + tokens64 * stride_ks,
                     outer * stride_kcb + inner * stride_kcs, write_mask,
                     stride_kh, stride_kd, stride_kch, stride_kcd, head_start, n_kv_heads, cos, sin,
                     ROTARY_HALF, HEAD_DIM, BLOCK_H, BLOCK_HALF, BLOCK_TAIL, INTERLEAVED, COPY_TAIL)
        _copy_rows(v_ptr, v_cache_ptr, batch_idx * stride_vb + tokens64 * stride_vs,
                   outer * stride_vcb + inner * stride_vcs, write_mask,
                   stride_vh, stride_vd, stride_vch, stride_vcd, head_start, n_kv_heads, HEAD_DIM, BLOCK_H, BLOCK_D)


def launch_cache_append(q4, k4, v4, q_out4, k_cache4, v_cache4, cache_index, paged, rope):
    """Rotate q into q_out4 by ``rope`` and write rotated k and v into the caches; every tensor a 4-D view.

    Dense: k_cache4 is (batch, max_len, kv heads, d) and ``cache_index`` the (batch,) cache lengths. Paged:
    (num_blocks, block_size, kv heads, d) and ``cache_index`` the (new,) slot mapping, with batch 1.
    """
    turns = rope.signed_turns(q4.device)
    batch, seq_len, n_q_heads, head_dim = q4.shape
    n_kv_heads = k4.shape[2]
    if batch * seq_len == 0:
        return
    rotary_dim, spec = rope.rotary_dim, rope.positions
    rotary_half = rotary_dim // 2
    block_half = triton.next_power_of_2(rotary_half)
    block_d = triton.next_power_of_2(head_dim)
    copy_tail = rotary_dim < head_dim
    block_tail = triton.next_power_of_2(head_dim - rotary_dim) if copy_tail else 1
    block_t, block_h = block_sizes(seq_len, (n_q_heads, n_kv_heads), block_d)
    n_token_blocks = triton.cdiv(seq_len, block_t)
    n_q_groups = triton.cdiv(n_q_heads, block_h)
    n_groups = n_q_groups + triton.cdiv(n_kv_heads, block_h)
    ids, stride_pb, stride_ps = position_pointer_and_strides(spec, turns)
    cache_slots = k_cache4.shape[0] * k_cache4.shape[1] if paged else k_cache4.shape[1]
    _rotary_cache_append_kernel[(batch * n_token_blocks, n_groups)](
        q4, k4, v4, q_out4, k_cache4, v_cache4, turns, ids, cache_index,
        spec.offset, seq_len, n_token_blocks, cache_slots, k_cache4.shape[1],
        n_q_heads, n_kv_heads, n_q_groups,
        *q4.stride(), *k4.stride(), *v4.stride(), *q_out4.stride(), *k_cache4.stride(), *v_cache4.stride(),
        stride_pb, stride_ps, cache_index.stride(0),
        ROTARY_HALF=rotary_half, HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_TAIL=block_tail, BLOCK_D=block_d, POS_MODE=spec.mode, PAGED=paged, INTERLEAVED=rope.interleaved,
        COPY_TAIL=copy_tail,
        num_warps=4,
    )


def _check_distinct_slots(slot_mapping):
    """Synchronizing check that no slot other than -1 appears twice (two tokens would race for it)."""
    if slot_mapping.numel() < 2 or not validation.value_checks_enabled(slot_mapping.device):
        return
    slots = slot_mapping[slot_mapping >= 0].sort().values
    repeated = slots[1:][slots[1:] == slots[:-1]]
    if repeated.numel():
        raise ValueError(f"slot_mapping must not repeat a slot within one call, got slot {int(repeated[0])} "
                         f"more than once")


# The launcher of each backend, all with launch_cache_append's arguments; its keys are the backends this op has,
# which _backend.resolve_backend reads.
LAUNCHERS = {"triton": launch_cache_append, "cuda": _cuda.kv_cache_append, "torch": _torch_backend.kv_cache_append}


def _nhd(cache, kv_layout):
    """The (blocks or batch, block_size or max_len, heads, dim) view of a cache."""
    return cache if kv_layout == "nhd" else cache.transpose(1, 2)


def _check_cache_index(cache_index, paged, cache_rows, new):
    """The value checks of ``slot_mapping`` (paged; ``cache_rows`` slots) or ``cache_seqlens`` (``new`` tokens per
    row, ``cache_rows`` = max_len)."""
    if paged:
        validation.check_range(cache_index, "slot_mapping", -1, cache_rows,
                               f"-1 or a slot of num_blocks · block_size = {cache_rows}")
        _check_distinct_slots(cache_index)
    else:
        validation.check_range(cache_index, "cache_seqlens", 0, cache_rows - new + 1,
                               f"{new} new tokens must fit in the cache's max_len = {cache_rows}")


@record_op("rotary_kv_cache_append", mutates_args=("k_cache", "v_cache"))
def _cache_append_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_index: torch.Tensor, rope: Rope, paged: bool, kv_layout: str,
                     backend: str) -> torch.Tensor:
    q_out = torch.empty_like(q)
    k_cache4, v_cache4 = _nhd(k_cache, kv_layout), _nhd(v_cache, kv_layout)
    if paged:
        q4, k4, v4, q_out4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), q_out.unsqueeze(0)
        _check_cache_index(cache_index, True, k_cache4.shape[0] * k_cache4.shape[1], 1)
    else:
        q4, k4, v4, q_out4 = q, k, v, q_out
        _check_cache_index(cache_index, False, k_cache4.shape[1], q.shape[1])
    validation.check_values(rope.positions.ids, None, None, 0)
    LAUNCHERS[backend](q4, k4, v4, q_out4, k_cache4, v_cache4, cache_index, paged, rope)
    return q_out


@_cache_append_op.register_fake
def _cache_append_op_fake(q, *args):
    return torch.empty_like(q)


@record_op("rotary_kv_cache_rows")
def _cache_rows_op(q: torch.Tensor, k: torch.Tensor, cache_index: torch.Tensor, cache_rows: int, rope: Rope,
                   paged: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The append's checks and rotation without its cache writes: (rotated q, rotated k). ``cache_rows``: the
    cache's slot count (paged) or max_len."""
    _check_cache_index(cache_index, paged, cache_rows, 1 if paged else q.shape[1])
    validation.check_values(rope.positions.ids, None, None, 0)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    q4, k4, q_out4, k_out4 = (x.unsqueeze(0) if paged else x for x in (q, k, q_out, k_out))
    ROTARY_LAUNCHERS[backend](q4, k4, q_out4, k_out4, rope)
    return q_out, k_out


@_cache_rows_op.register_fake
def _cache_rows_op_fake(q, k, *args):
    return torch.empty_like(q), torch.empty_like(k)


def _append(q, k, v, k_cache, v_cache, cache_index, rope, paged, kv_layout, backend):
    """Both appends after their checks: one launch of the fused op, except under torch.compile with caches that are
    views (``kv[:, 0]``): inductor drops the symbolic storage offset of a view that a custom op mutates, so there the
    op rotates and checks, and indexing writes the caches (a write pattern inductor gets right)."""
    if not (torch.compiler.is_compiling() and (k_cache._base is not None or v_cache._base is not None)):
        return _cache_append_op(q, k, v, k_cache, v_cache, cache_index, rope, paged, kv_layout, backend)
    k_cache4, v_cache4 = _nhd(k_cache, kv_layout), _nhd(v_cache, kv_layout)
    cache_rows = k_cache4.shape[0] * k_cache4.shape[1] if paged else k_cache4.shape[1]
    q_out, k_out = _cache_rows_op(q, k, cache_index, cache_rows, rope, paged, backend)
    if not paged:
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        columns = cache_index[:, None] + torch.arange(q.shape[1], device=q.device)
        k_cache4.index_put_((rows, columns), k_out)
        v_cache4.index_put_((rows, columns), v)
        return q_out
    if q.shape[0] == 0 or cache_rows == 0:
        return q_out
    # A padding token (slot -1) writes nothing, but an index cannot be skipped without a data-dependent shape: it
    # rewrites what a valid token of the call writes (the same value, so the order of equal writes is moot), or,
    # with no valid token, slot 0's own contents.
    valid = cache_index >= 0
    anchor = torch.argmax(valid.to(torch.int32)).reshape(1)  # a tensor index: no data-dependent Python int
    anchor_valid = valid.index_select(0, anchor)
    slots = torch.where(valid, cache_index, torch.where(anchor_valid, cache_index.index_select(0, anchor), 0))
    block_size = k_cache4.shape[1]
    index = (slots // block_size, slots % block_size)
    for cache4, new in ((k_cache4, k_out), (v_cache4, v)):
        fill = torch.where(anchor_valid[:, None, None], new.index_select(0, anchor), cache4[:1, 0])
        cache4.index_put_(index, torch.where(valid[:, None, None], new, fill))
    return q_out


def _check_cache_inputs(q, k, v, k_cache, v_cache, token_dims):
    """Checks shared by both cache appends; ``token_dims`` is 2 (batch, new) or 1 (num_tokens)."""
    ndim = token_dims + 2
    tensors = (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache))
    validation.check_tensors(tensors)
    validation.check_no_grad("rotary_kv_cache_append" if token_dims == 2 else "rotary_paged_kv_cache_append",
                            tensors)
    for name, x in tensors:
        if x.dim() != (4 if name.endswith("cache") else ndim):
            raise ValueError(f"{name} must be {4 if name.endswith('cache') else ndim}-D, got {tuple(x.shape)}")
    lead = "(batch, new)" if token_dims == 2 else "(num_tokens,)"
    if k.shape != v.shape or k.shape[:token_dims] != q.shape[:token_dims]:
        raise ValueError(f"k and v must have the same shape, with q's {lead} leading dims: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k must have the same head_dim, got {head_dim} and {k.shape[-1]}")
    validation.check_head_dim(head_dim, "head_dim")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    validation.check_no_overlap((("k_cache", k_cache), ("v_cache", v_cache)), (("q", q), ("k", k), ("v", v)))
    return head_dim


def _check_index(index, name, length, device):
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {getattr(index, 'dtype', index)!r}")
    if index.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but q is on {device}")


def rotary_kv_cache_append(q, k, v, k_cache, v_cache, cache_seqlens, *, positions=None, scaling_factor=1.0,
                           base=10000.0, inv_freq=None, rotary_dim=None, interleaved=False, backend="auto"):
    """Rotate the new tokens' q and k and append k and v to a per-sequence KV cache, in one launch.

    New token ``t`` of row ``b`` is written at cache index ``cache_seqlens[b] + t`` (flash-attention's
    ``flash_attn_with_kvcache`` layout); its rotary position is that index unless ``positions`` says otherwise.
    The angle of pair ``j`` at position ``m`` is ``(m / scaling_factor) * inv_freq[j]`` as in
    :func:`pi_kernels.rotary_interp`. The caller advances ``cache_seqlens`` afterwards.

    Parameters
    ----------
    q : Tensor
        (batch, new, n_heads, head_dim), float16, bfloat16 or float32, any strides.
    k, v : Tensor
        (batch, new, n_kv_heads, head_dim), q's dtype; any strides. Not modified.
    k_cache, v_cache : Tensor
        (batch, max_len, n_kv_heads, head_dim), q's dtype, any strides; written at the new tokens' indices only.
    cache_seqlens : Tensor
        (batch,) int32/int64 tokens already cached per row; ``cache_seqlens[b] + new ≤ max_len``.
    positions : None, int or integer Tensor, optional
        None: the cache index. Otherwise as in :func:`pi_kernels.rotary_interp`: an int or (batch,) offsets added
        to 0..new-1, or (new,) / (batch or 1, new) ids.
    scaling_factor, base, inv_freq, rotary_dim, interleaved
        As in :func:`pi_kernels.rotary_interp`.
    backend : str
        "auto", "triton", "cuda" or "torch", as in :func:`pi_kernels.inference.rotary_embedding`.

    Returns
    -------
    Tensor
        The rotated q, a new (batch, new, n_heads, head_dim) tensor.

    Examples
    --------
    >>> k_cache = torch.zeros(4, 8192, 8, 128, device="cuda", dtype=torch.bfloat16); v_cache = torch.zeros_like(k_cache)
    >>> q = rotary_kv_cache_append(q, k, v, k_cache, v_cache, cache_seqlens, scaling_factor=4.0)
    >>> cache_seqlens += q.shape[1]
    """
    head_dim = _check_cache_inputs(q, k, v, k_cache, v_cache, 2)
    batch, new, n_kv_heads = k.shape[0], k.shape[1], k.shape[2]
    if k_cache.shape[0] != batch or k_cache.shape[2] != n_kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache and v_cache must have shape (batch, max_len, n_kv_heads, head_dim) = "
                         f"({batch}, max_len, {n_kv_heads}, {head_dim}), got {tuple(k_cache.shape)}")
    _check_index(cache_seqlens, "cache_seqlens", batch, q.device)
    if positions is None:
        spec = PositionSpec(POSITIONS_OFFSETS, cache_seqlens)
    else:
        spec = validation.resolve_positions(positions, batch, new, q.device)
    backend = _backend.resolve_backend(backend, q.device, LAUNCHERS)
    rope = Rope.resolve(spec, head_dim, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                        rotary_dim=rotary_dim, interleaved=interleaved)
    return _append(q, k, v, k_cache, v_cache, cache_seqlens, rope, False, "nhd", backend)


def rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, slot_mapping, positions, *, scaling_factor=1.0,
                                 base=10000.0, inv_freq=None, rotary_dim=None, interleaved=False, kv_layout="nhd",
                                 backend="auto"):
    """Rotate the new tokens' q and k and write k and v into a paged KV cache, in one launch.

    Token ``i`` goes to slot ``slot_mapping[i] = block * block_size + offset`` (vLLM's ``slot_mapping``; see
    :func:`slot_mapping_from_block_table`); slot -1 marks a padding token, whose k and v are not written (its q
    is still rotated). The angle of pair ``j`` at position ``m`` is ``(m / scaling_factor) * inv_freq[j]``.

    Parameters
    ----------
    q : Tensor
        (num_tokens, n_heads, head_dim), float16, bfloat16 or float32, any strides.
    k, v : Tensor
        (num_tokens, n_kv_heads, head_dim), q's dtype, any strides. Not modified.
    k_cache, v_cache : Tensor
        q's dtype, any strides. ``kv_layout="nhd"``: (num_blocks, block_size, n_kv_heads, head_dim), the layout of
        flash-attention's and vLLM's paged caches and of FlashInfer's NHD layout (a FlashInfer
        (num_pages, 2, page_size, heads, head_dim) cache passes as ``cache[:, 0], cache[:, 1]``). ``"hnd"``:
        (num_blocks, n_kv_heads, block_size, head_dim), FlashInfer's HND layout.
    slot_mapping : Tensor
        (num_tokens,) int64/int32, each -1 or in [0, num_blocks * block_size). Two tokens must not share a slot
        (checked, like the range, unless ``set_value_checks(False)``).
    positions : Tensor
        (num_tokens,) int64/int32 rotary positions, ≥ 0.
    scaling_factor, base, inv_freq, rotary_dim, interleaved
        As in :func:`pi_kernels.rotary_interp`.
    kv_layout : str
        "nhd" or "hnd", see above.
    backend : str
        "auto", "triton", "cuda" or "torch", as in :func:`pi_kernels.inference.rotary_embedding`.

    Returns
    -------
    Tensor
        The rotated q, a new (num_tokens, n_heads, head_dim) tensor.

    Examples
    --------
    >>> slots = slot_mapping_from_block_table(block_table, 16, cache_seqlens)  # one decode token per sequence
    >>> q = rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, slots, cache_seqlens, scaling_factor=4.0)
    """
    head_dim = _check_cache_inputs(q, k, v, k_cache, v_cache, 1)
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    num_tokens, n_kv_heads = k.shape[0], k.shape[1]
    heads_dim = 2 if kv_layout == "nhd" else 1
    if k_cache.shape[heads_dim] != n_kv_heads or k_cache.shape[3] != head_dim:
        expected = "(num_blocks, block_size, n_kv_heads, head_dim)" if kv_layout == "nhd" else \
            "(num_blocks, n_kv_heads, block_size, head_dim)"
        raise ValueError(f"k_cache and v_cache must have shape {expected} with n_kv_heads={n_kv_heads}, "
                         f"head_dim={head_dim} for kv_layout={kv_layout!r}, got {tuple(k_cache.shape)}")
    _check_index(slot_mapping, "slot_mapping", num_tokens, q.device)
    _check_index(positions, "positions", num_tokens, q.device)
    backend = _backend.resolve_backend(backend, q.device, LAUNCHERS)
    rope = Rope.resolve(PositionSpec(POSITIONS_IDS, positions), head_dim, scaling_factor=scaling_factor, base=base,
                        inv_freq=inv_freq, rotary_dim=rotary_dim, interleaved=interleaved)
    return _append(q, k, v, k_cache, v_cache, slot_mapping, rope, True, kv_layout, backend)


def slot_mapping_from_block_table(block_table, block_size, cache_positions, seq_ids=None):
    """Slots of tokens in a paged KV cache, from a block table (vLLM's ``slot_mapping``).

    ``slot = block_table[seq, pos // block_size] * block_size + pos % block_size`` for a token at index ``pos``
    of sequence ``seq``'s cache.

    Parameters
    ----------
    block_table : Tensor
        (n_seqs, max_blocks_per_seq) int32/int64: the physical block of each logical block of each sequence.
    block_size : int
        Tokens per block.
    cache_positions : Tensor
        (num_tokens,) int32/int64 index of each token in its sequence's cache; a negative index marks a padding
        token, whose slot is -1.
    seq_ids : Tensor, optional
        (num_tokens,) row of ``block_table`` of each token; default ``arange(num_tokens)``, one token per sequence
        (a decode step).

    Returns
    -------
    Tensor
        (num_tokens,) int64 slots.

    Examples
    --------
    >>> block_table = torch.tensor([[7, 2], [5, 0]])
    >>> slot_mapping_from_block_table(block_table, 16, torch.tensor([17, 3]))
    tensor([33, 83])
    """
    block_size = operator.index(block_size)
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.is_floating_point():
        raise ValueError("block_table must be a 2-D integer tensor (n_seqs, max_blocks_per_seq)")
    if not isinstance(cache_positions, torch.Tensor) or cache_positions.dim() != 1:
        raise ValueError("cache_positions must be a 1-D integer tensor (num_tokens,)")
    _check_index(cache_positions, "cache_positions", cache_positions.shape[0], block_table.device)
    if seq_ids is None:
        seq_ids = torch.arange(cache_positions.shape[0], device=block_table.device)
    _check_index(seq_ids, "seq_ids", cache_positions.shape[0], block_table.device)
    positions = cache_positions.long()
    padding = positions < 0
    logical_block = torch.where(padding, 0, positions // block_size)
    seq_ids = seq_ids.long()
    if seq_ids.numel() and (int(seq_ids.min()) < 0 or int(seq_ids.max()) >= block_table.shape[0]):
        raise ValueError(f"seq_ids must index the {block_table.shape[0]} rows of block_table")
    if logical_block.numel() and int(logical_block.max()) >= block_table.shape[1]:
        raise ValueError(f"a cache position needs logical block {int(logical_block.max())}, but block_table has "
                         f"{block_table.shape[1]} blocks per sequence")
    blocks = block_table[seq_ids, logical_block].long()
    slots = blocks * block_size + positions % block_size
    if bool((blocks[~padding] < 0).any()):
        raise ValueError("block_table has a negative block for a token that is not padding")
    return torch.where(padding, -1, slots)
