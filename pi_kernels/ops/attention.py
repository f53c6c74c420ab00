"""Fused attention with interpolated RoPE applied in-kernel (Triton): training forward and backward, and decode.

q and k arrive un-rotated; each tile is rotated by its tokens' PI angles right after it is loaded, so rotated q/k
never exist in memory. The attention itself is FlashAttention-2 (Dao, 2023) as in Triton's fused-attention
tutorial: online softmax over key blocks in the forward, which saves only the log-sum-exp per query; a backward of
one kernel per key block (dk, dv) and one per query block (dq), both recomputing the probabilities. Nothing of size
seq_q × seq_k is ever stored, forward or backward.

How the rotation fits the tensor cores
--------------------------------------
A head is split into its feature pairs: tile ``x1`` holds the first member of every pair, ``x2`` the second, each
(rows, head_dim / 2). Pair ``j < rotary_dim / 2`` is (j, j + rotary_dim/2) for rotate-half, (2j, 2j+1) for
interleaved; the ``head_dim - rotary_dim`` features that are not rotated are split in two halves and paired with
each other at angle 0 (cos 1, sin 0: passed through exactly). Rotation is then elementwise on (x1, x2) and
``q·kᵀ = q1·k1ᵀ + q2·k2ᵀ``: two dots of depth head_dim / 2 instead of one of depth head_dim, with the same
tensor-core shapes. In the backward the gradients of the rotated q and k come out as pairs too and are rotated by
−angle before being written, which is the gradient with respect to the un-rotated inputs.

Angles come from ``_rope.py`` (float64 turns, exact range reduction, float32 cos/sin) like every rotating kernel
here. A program's own tile (q in the forward and dq kernels, k in the dk/dv kernel) gets them per token; the tiles
its loop visits get them by angle addition, from one exact angle per tile and a step table computed once per
program (``_loop_tile_cos_sin``), because float64 range reduction and sin/cos per element of every visited tile
would cost more than the tile's dots. Explicit position ids take the per-token path everywhere.

Numerics and determinism
------------------------
fp16 and bf16 operands feed the dots with float32 accumulation; the softmax runs in float32; probabilities and
ds are rounded to the input dtype before their dots (as FlashAttention does). float32 inputs use TF32 dots on a
GPU. The gradients are deterministic: there are no atomics, every element of dq, dk and dv is accumulated by one
program in a fixed order (dk/dv of a KV head sum its query heads in order).
"""

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .. import _validation as validation
from .._positions import position_pointer_and_strides
from . import _interpreting
from ._rope import rope_cos_sin, token_positions, turns_table

__all__ = ["AttentionRotary", "AttentionRotaryFunction", "attention_backward", "attention_forward",
           "attention_rotary"]

MAX_HEAD_DIM = 256
# Compiled kernels only read globals that are tl.constexpr; host code reads ``.value``.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _loop_bound(x, INTERPRET: tl.constexpr):
    """A runtime loop bound usable by ``range``.

    Compiled Triton takes the runtime value as is (and software-pipelines the loop). Under the interpreter a scalar
    is a one-element numpy array, which numpy ≥ 2 refuses to turn into the Python int that ``range`` needs.
    """
    if INTERPRET:
        return x if isinstance(x, int) else x.handle.data.item()
    else:
        return x


@triton.jit
def _sequence_bounds(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seq_idx, seq_q, seq_k, IS_VARLEN: tl.constexpr):
    """(first q token, q length, first k token, k length) of batch row or packed sequence ``seq_idx``."""
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q_ptr + seq_idx).to(tl.int64)
        len_q = (tl.load(cu_seqlens_q_ptr + seq_idx + 1) - q_start).to(tl.int32)
        k_start = tl.load(cu_seqlens_k_ptr + seq_idx).to(tl.int64)
        len_k = (tl.load(cu_seqlens_k_ptr + seq_idx + 1) - k_start).to(tl.int32)
        return q_start, len_q, k_start, len_k
    else:
        return 0, seq_q, 0, seq_k


@triton.jit
def _half_dims(ROTARY_HALF: tl.constexpr, HALF_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, PAIR_RUN: tl.constexpr):
    """Rotate-half layout: the features of the first and of the second member of each pair, (BLOCK_HALF,) each."""
    pairs = tl.arange(0, BLOCK_HALF)
    if ROTARY_HALF == HALF_DIM:
        return pairs, pairs + HALF_DIM
    else:
        # Pairs past ROTARY_HALF hold the features that are not rotated: the first half of them with the second.
        dim1 = tl.where(pairs < ROTARY_HALF, pairs, pairs + ROTARY_HALF)
        dim2 = tl.where(pairs < ROTARY_HALF, pairs + ROTARY_HALF, pairs + HALF_DIM)
        # Both are runs of PAIR_RUN consecutive features starting at multiples of PAIR_RUN; saying so lets the
        # loads vectorize, which a tl.where otherwise hides.
        dim1 = tl.max_contiguous(tl.multiple_of(dim1, PAIR_RUN), PAIR_RUN)
        dim2 = tl.max_contiguous(tl.multiple_of(dim2, PAIR_RUN), PAIR_RUN)
        return dim1, dim2


@triton.jit
def _cos_sin(turns_ptr, pos_ptr, stride_pb, stride_ps, pos_offset, seq_idx, seq_start, tokens, token_mask,
             ROTARY_HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, POS_MODE: tl.constexpr, CONJUGATE: tl.constexpr):
    """float32 cos/sin (len(tokens), BLOCK_HALF) of ``tokens`` of a sequence; pairs past ROTARY_HALF get angle 0."""
    if POS_MODE == 2:
        # Explicit ids of packed input are indexed by packed token; the sequence's tokens start at seq_start.
        pos_ptr += seq_start * stride_ps
    pos = token_positions(pos_ptr, pos_ptr, seq_idx, tokens, token_mask, pos_offset, 1, stride_pb, stride_ps,
                          POS_MODE, False, 0)
    return rope_cos_sin(pos, turns_ptr, ROTARY_HALF, BLOCK_HALF, CONJUGATE)


@triton.jit
def _loop_tile_cos_sin(step_cos, step_sin, turns_ptr, pos_ptr, stride_pb, stride_ps, pos_offset, seq_idx,
                       seq_start, start, tokens, token_mask,
                       ROTARY_HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, POS_MODE: tl.constexpr):
    """cos/sin of the tile of tokens ``start + 0..BLOCK-1`` visited by a loop.

    With arange positions (POS_MODE 0 or 1) the tile's angles are angle(start) + angle(step): one exact cos/sin per
    pair for the tile's first token, combined with the program's step table by angle addition, 4 FMAs per element
    within a few float32 ulps; float64 range reduction and sin/cos per element would cost more than the tile's
    dots. Explicit ids (POS_MODE 2) have no such structure and take the exact per-element path.
    """
    if POS_MODE == 2:
        return _cos_sin(turns_ptr, pos_ptr, stride_pb, stride_ps, pos_offset, seq_idx, seq_start, tokens,
                        token_mask, ROTARY_HALF, BLOCK_HALF, POS_MODE, False)
    else:
        first = tl.zeros([1], tl.int32) + start
        base_cos, base_sin = _cos_sin(turns_ptr, pos_ptr, stride_pb, stride_ps, pos_offset, seq_idx, seq_start,
                                      first, tl.full([1], True, tl.int1), ROTARY_HALF, BLOCK_HALF, POS_MODE, False)
        return step_cos * base_cos - step_sin * base_sin, step_sin * base_cos + step_cos * base_sin


@triton.jit
def _load_pairs(x_ptr, row_offsets, row_mask, stride_d,
                ROTARY_HALF: tl.constexpr, HALF_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
                PAIR_RUN: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rows of q or k as pair tiles (x1, x2), (rows, BLOCK_HALF) each in x's dtype; zero past the masks.

    Pair j < ROTARY_HALF is (j, j + ROTARY_HALF) for rotate-half and (2j, 2j+1) for interleaved; the pairs past it
    hold the features that are not rotated (angle 0 leaves them exact).
    """
    rows = x_ptr + row_offsets[:, None]
    if INTERLEAVED:
        dims = tl.arange(0, 2 * BLOCK_HALF)
        x = tl.load(rows + dims[None, :] * stride_d, mask=row_mask[:, None] & (dims < 2 * HALF_DIM)[None, :],
                    other=0.0)
        x1, x2 = tl.split(tl.reshape(x, [x.shape[0], BLOCK_HALF, 2]))
    else:
        dim1, dim2 = _half_dims(ROTARY_HALF, HALF_DIM, BLOCK_HALF, PAIR_RUN)
        mask = row_mask[:, None] & (tl.arange(0, BLOCK_HALF) < HALF_DIM)[None, :]
        x1 = tl.load(rows + dim1[None, :] * stride_d, mask=mask, other=0.0)
        x2 = tl.load(rows + dim2[None, :] * stride_d, mask=mask, other=0.0)
    return x1, x2


@triton.jit
def _rotate(x1, x2, cos, sin):
    """Rotate pair tiles by their angles in float32; the result keeps x's dtype (it feeds the dots)."""
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    return (x1f * cos - x2f * sin).to(x1.dtype), (x1f * sin + x2f * cos).to(x2.dtype)


@triton.jit
def _store_pairs(x_ptr, row_offsets, row_mask, stride_d, x1, x2,
                 turns_ptr, pos_ptr, stride_pb, stride_ps, pos_offset, seq_idx, seq_start, tokens,
                 ROTARY_HALF: tl.constexpr, HALF_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, PAIR_RUN: tl.constexpr,
                 POS_MODE: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE: tl.constexpr):
    """Write float32 pair tiles of a gradient, rotated by −angle when ROTATE (the transpose of the forward)."""
    if ROTATE:
        cos, sin = _cos_sin(turns_ptr, pos_ptr, stride_pb, stride_ps, pos_offset, seq_idx, seq_start, tokens,
                            row_mask, ROTARY_HALF, BLOCK_HALF, POS_MODE, True)
        out1 = x1 * cos - x2 * sin
        out2 = x1 * sin + x2 * cos
    else:
        out1 = x1
        out2 = x2
    rows = x_ptr + row_offsets[:, None]
    if INTERLEAVED:
        dims = tl.arange(0, 2 * BLOCK_HALF)
        tl.store(rows + dims[None, :] * stride_d, tl.interleave(out1, out2).to(x_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (dims < 2 * HALF_DIM)[None, :])
    else:
        dim1, dim2 = _half_dims(ROTARY_HALF, HALF_DIM, BLOCK_HALF, PAIR_RUN)
        mask = row_mask[:, None] & (tl.arange(0, BLOCK_HALF) < HALF_DIM)[None, :]
        tl.store(rows + dim1[None, :] * stride_d, out1.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(rows + dim2[None, :] * stride_d, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_rows(x_ptr, row_offsets, row_mask, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Whole rows (rows, BLOCK_D) of v, out or dout in their dtype; zero past the mask."""
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = row_mask[:, None] & (dims < HEAD_DIM)[None, :]
    return tl.load(x_ptr + row_offsets[:, None] + dims[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _load_rotated(x_ptr, row_offsets, row_mask, stride_d,
                  turns_ptr, pos_ptr, stride_pb, stride_ps, pos_offset, seq_idx, seq_start, tokens,
                  ROTARY_HALF: tl.constexpr, HALF_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  PAIR_RUN: tl.constexpr, POS_MODE: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE: tl.constexpr):
    """A program's own tile of q or k as pair tiles, rotated (when ROTATE) with exact per-token angles."""
    x1, x2 = _load_pairs(x_ptr, row_offsets, row_mask, stride_d, ROTARY_HALF, HALF_DIM, BLOCK_HALF, PAIR_RUN,
                         INTERLEAVED)
    if ROTATE:
        cos, sin = _cos_sin(turns_ptr, pos_ptr, stride_pb, stride_ps, pos_offset, seq_idx, seq_start, tokens,
                            row_mask, ROTARY_HALF, BLOCK_HALF, POS_MODE, False)
        x1, x2 = _rotate(x1, x2, cos, sin)
    return x1, x2


@triton.jit
def _step_table(turns_ptr, BLOCK: tl.constexpr, ROTARY_HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                POS_MODE: tl.constexpr, ROTATE: tl.constexpr):
    """The step table of :func:`_loop_tile_cos_sin` for a loop over tiles of BLOCK tokens (zeros where unused)."""
    step_cos = tl.zeros([BLOCK, BLOCK_HALF], tl.float32)
    step_sin = step_cos
    if ROTATE and POS_MODE != 2:
        # cos/sin of the angles of positions 0..BLOCK-1.
        step_cos, step_sin = rope_cos_sin(tl.arange(0, BLOCK).to(tl.int64), turns_ptr, ROTARY_HALF, BLOCK_HALF, False)
    return step_cos, step_sin


@triton.jit
def _forward_block(acc, m_i, l_i, q1, q2, rows, n0, len_k, diff, qk_scale,
                   k_ptr, v_ptr, k_base, v_base, k_start, stride_ks, stride_kd, stride_vs, stride_vd,
                   step_cos, step_sin, turns_ptr, k_pos_ptr, stride_kpb, stride_kps, k_pos_offset, seq_idx,
                   ROTARY_HALF: tl.constexpr, HALF_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                   PAIR_RUN: tl.constexpr, K_POS_MODE: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE_K: tl.constexpr,
                   CAUSAL: tl.constexpr, MASK: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One key block of the online softmax: returns the updated (acc, m_i, l_i); scores are in log2 units."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < len_k
    k_tokens = (k_start + cols).to(tl.int64)
    k1, k2 = _load_pairs(k_ptr, k_base + k_tokens * stride_ks, col_mask, stride_kd, ROTARY_HALF, HALF_DIM,
                         BLOCK_HALF, PAIR_RUN, INTERLEAVED)
    if ROTATE_K:
        cos, sin = _loop_tile_cos_sin(step_cos, step_sin, turns_ptr, k_pos_ptr, stride_kpb, stride_kps,
                                      k_pos_offset, seq_idx, k_start, n0, cols, col_mask, ROTARY_HALF, BLOCK_HALF,
                                      K_POS_MODE)
        k1, k2 = _rotate(k1, k2, cos, sin)
    qk = tl.dot(q1, tl.trans(k1.to(DOT_DTYPE)), tl.zeros([q1.shape[0], BLOCK_N], tl.float32))
    qk = tl.dot(q2, tl.trans(k2.to(DOT_DTYPE)), qk)
    if MASK:
        visible = col_mask[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diff)
        qk = tl.where(visible, qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps its p and alpha at 0.
    m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    vt = _load_rows(v_ptr, v_base + k_tokens * stride_vs, col_mask, stride_vd, HEAD_DIM, BLOCK_D)
    acc = tl.dot(p.to(vt.dtype).to(DOT_DTYPE), vt.to(DOT_DTYPE), acc * alpha[:, None])
    return acc, m_ij, l_i


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    turns_ptr,                      # float64 (ROTARY_HALF,): inv_freq / (2π · scaling_factor), turns per position
    q_pos_ptr, k_pos_ptr,           # int32/int64 positions (ids or offsets); unused for POS_MODE 0
    cu_seqlens_q_ptr, cu_seqlens_k_ptr,  # (n_seqs + 1,) cumulative lengths, read when IS_VARLEN
    q_pos_offset, k_pos_offset,     # scalar offsets for POS_MODE 0
    seq_q, seq_k,                   # dense sequence lengths (ignored when IS_VARLEN)
    n_q_blocks, n_heads, group_size,  # query blocks per sequence; heads; query heads per KV head
    qk_scale,                       # softmax_scale · log2(e): scores in log2 units, for exp2
    stride_qb, stride_qs, stride_qh, stride_qd,  # element strides, (batch, token, head, dim); batch 0 if packed
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh,           # lse (batch, head, token) float32, token stride 1
    stride_qpb, stride_qps, stride_kpb, stride_kps,  # positions strides (batch row or sequence, token)
    HEAD_DIM: tl.constexpr, ROTARY_HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PAIR_RUN: tl.constexpr,         # features per contiguous run in a pair tile (rotate-half with a pass-through tail)
    Q_POS_MODE: tl.constexpr, K_POS_MODE: tl.constexpr,
    Q_FROM_END: tl.constexpr,       # default query positions: the last len_q of the key positions
    INTERLEAVED: tl.constexpr, ROTATE_Q: tl.constexpr, ROTATE_K: tl.constexpr, CAUSAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERPRET: tl.constexpr,        # Triton's interpreter runs the kernel (see _loop_bound)
    DOT_DTYPE: tl.constexpr,        # dot operand type: the input's; float32 under the interpreter (16-bit dots break)
):
    # Grid: (n_q_blocks · sequences · heads,). One program owns BLOCK_M queries of one head and walks the keys.
    pid = tl.program_id(0)
    block = pid % n_q_blocks
    if CAUSAL:
        block = n_q_blocks - 1 - block  # longest rows first: better balance of the tail of the grid
    seq_idx = (pid // n_q_blocks) // n_heads
    head = (pid // n_q_blocks) % n_heads
    q_start, len_q, k_start, len_k = _sequence_bounds(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seq_idx, seq_q, seq_k,
                                                      IS_VARLEN)
    m0 = block * BLOCK_M
    if m0 >= len_q:
        return
    diff = len_k - len_q  # bottom-right alignment: query i sees keys j <= i + diff
    if Q_FROM_END:
        q_pos_offset += diff
    seq64 = seq_idx.to(tl.int64)
    head64 = head.to(tl.int64)
    kv_head = (head // group_size).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < len_q
    q_tokens = (q_start + rows).to(tl.int64)
    q1, q2 = _load_rotated(q_ptr, seq64 * stride_qb + q_tokens * stride_qs + head64 * stride_qh, row_mask,
                           stride_qd, turns_ptr, q_pos_ptr, stride_qpb, stride_qps, q_pos_offset, seq_idx, q_start,
                           rows, ROTARY_HALF, HEAD_DIM // 2, BLOCK_HALF, PAIR_RUN, Q_POS_MODE, INTERLEAVED, ROTATE_Q)
    q1 = q1.to(DOT_DTYPE)
    q2 = q2.to(DOT_DTYPE)
    step_cos, step_sin = _step_table(turns_ptr, BLOCK_N, ROTARY_HALF, BLOCK_HALF, K_POS_MODE, ROTATE_K)

    # Keys below full_hi are visible to every row of the block (no mask); [full_hi, hi) needs the mask.
    if CAUSAL:
        hi = tl.maximum(tl.minimum(len_k, m0 + BLOCK_M + diff), 0)
        full_hi = tl.maximum(tl.minimum(len_k, m0 + diff + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = len_k
        full_hi = len_k // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = seq64 * stride_kb + kv_head * stride_kh
    v_base = seq64 * stride_vb + kv_head * stride_vh
    for n0 in range(0, _loop_bound(full_hi, INTERPRET), BLOCK_N):
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q1, q2, rows, n0, len_k, diff, qk_scale,
                                       k_ptr, v_ptr, k_base, v_base, k_start, stride_ks, stride_kd, stride_vs,
                                       stride_vd, step_cos, step_sin, turns_ptr, k_pos_ptr, stride_kpb, stride_kps,
                                       k_pos_offset, seq_idx, ROTARY_HALF, HEAD_DIM // 2, HEAD_DIM, BLOCK_N,
                                       BLOCK_HALF, BLOCK_D, PAIR_RUN, K_POS_MODE, INTERLEAVED, ROTATE_K, CAUSAL, False,
                                       DOT_DTYPE)
    for n0 in range(_loop_bound(full_hi, INTERPRET), _loop_bound(hi, INTERPRET), BLOCK_N):
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q1, q2, rows, n0, len_k, diff, qk_scale,
                                       k_ptr, v_ptr, k_base, v_base, k_start, stride_ks, stride_kd, stride_vs,
                                       stride_vd, step_cos, step_sin, turns_ptr, k_pos_ptr, stride_kpb, stride_kps,
                                       k_pos_offset, seq_idx, ROTARY_HALF, HEAD_DIM // 2, HEAD_DIM, BLOCK_N,
                                       BLOCK_HALF, BLOCK_D, PAIR_RUN, K_POS_MODE, INTERLEAVED, ROTATE_K, CAUSAL, True,
                                       DOT_DTYPE)

    # A query that sees no key (causal with seq_q > seq_k, or seq_k = 0) gets output 0 and lse -inf.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    out_rows = seq64 * stride_ob + q_tokens * stride_os + head64 * stride_oh
    tl.store(out_ptr + out_rows[:, None] + dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (dims < HEAD_DIM)[None, :])
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + seq64 * stride_lb + head64 * stride_lh + q_tokens, lse, mask=row_mask)


@triton.jit
def _attention_backward_delta_kernel(
    out_ptr, dout_ptr, delta_ptr,   # delta = rowsum(out · dout), float32, laid out like lse
    cu_seqlens_q_ptr,
    seq_q, n_q_blocks, n_heads,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # Grid: (n_q_blocks · sequences · heads,).
    pid = tl.program_id(0)
    seq_idx = (pid // n_q_blocks) // n_heads
    head = ((pid // n_q_blocks) % n_heads).to(tl.int64)
    q_start, len_q, _, _ = _sequence_bounds(cu_seqlens_q_ptr, cu_seqlens_q_ptr, seq_idx, seq_q, seq_q, IS_VARLEN)
    rows = (pid % n_q_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < len_q
    seq64 = seq_idx.to(tl.int64)
    tokens = (q_start + rows).to(tl.int64)
    out = _load_rows(out_ptr, seq64 * stride_ob + tokens * stride_os + head * stride_oh, row_mask, stride_od,
                     HEAD_DIM, BLOCK_D)
    dout = _load_rows(dout_ptr, seq64 * stride_db + tokens * stride_ds + head * stride_dh, row_mask, stride_dd,
                      HEAD_DIM, BLOCK_D)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    tl.store(delta_ptr + seq64 * stride_lb + head * stride_lh + tokens, delta, mask=row_mask)


@triton.jit
def _load_softmax_stats(lse_ptr, delta_ptr, row_offsets, row_mask):
    """(lse in log2 units, delta) of a block of queries; lse +inf for padding and for queries that see no key, so
    their recomputed probabilities are exactly 0."""
    lse = tl.load(lse_ptr + row_offsets, mask=row_mask, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_ptr + row_offsets, mask=row_mask, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_block(dk1, dk2, dv, k1, k2, vt, cols, m0, len_q, diff, qk_scale,
                q_ptr, dout_ptr, lse_ptr, delta_ptr, q_base, dout_base, lse_base, q_start,
                stride_qs, stride_qd, stride_ds, stride_dd,
                step_cos, step_sin, turns_ptr, q_pos_ptr, stride_qpb, stride_qps, q_pos_offset, seq_idx,
                ROTARY_HALF: tl.constexpr, HALF_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                PAIR_RUN: tl.constexpr, Q_POS_MODE: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE_Q: tl.constexpr,
                MASK: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Add one query block's contribution to a key block's (dk1, dk2, dv), on transposed scores (keys, queries)."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < len_q
    tokens = (q_start + rows).to(tl.int64)
    q1, q2 = _load_pairs(q_ptr, q_base + tokens * stride_qs, row_mask, stride_qd, ROTARY_HALF, HALF_DIM, BLOCK_HALF,
                         PAIR_RUN, INTERLEAVED)
    if ROTATE_Q:
        cos, sin = _loop_tile_cos_sin(step_cos, step_sin, turns_ptr, q_pos_ptr, stride_qpb, stride_qps,
                                      q_pos_offset, seq_idx, q_start, m0, rows, row_mask, ROTARY_HALF, BLOCK_HALF,
                                      Q_POS_MODE)
        q1, q2 = _rotate(q1, q2, cos, sin)
    q1 = q1.to(DOT_DTYPE)
    q2 = q2.to(DOT_DTYPE)
    dout = _load_rows(dout_ptr, dout_base + tokens * stride_ds, row_mask, stride_dd, HEAD_DIM, BLOCK_D)
    lse2, delta = _load_softmax_stats(lse_ptr, delta_ptr, lse_base + tokens, row_mask)
    s_t = tl.dot(k1, tl.trans(q1), tl.zeros([k1.shape[0], BLOCK_M], tl.float32))
    s_t = tl.dot(k2, tl.trans(q2), s_t)
    p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
    if MASK:
        p_t = tl.where(cols[:, None] <= rows[None, :] + diff, p_t, 0.0)
    dout = dout.to(DOT_DTYPE)
    dv = tl.dot(p_t.to(dout_ptr.dtype.element_ty).to(DOT_DTYPE), dout, dv)
    dp_t = tl.dot(vt, tl.trans(dout), tl.zeros([k1.shape[0], BLOCK_M], tl.float32))
    ds_t = (p_t * (dp_t - delta[None, :])).to(q_ptr.dtype.element_ty).to(DOT_DTYPE)
    dk1 = tl.dot(ds_t, q1, dk1)
    dk2 = tl.dot(ds_t, q2, dk2)
    return dk1, dk2, dv


@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    turns_ptr, q_pos_ptr, k_pos_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    q_pos_offset, k_pos_offset,
    seq_q, seq_k,
    n_k_blocks, n_kv_heads, group_size,
    qk_scale, softmax_scale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,      # dout
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_lb, stride_lh,                            # lse and delta
    stride_qpb, stride_qps, stride_kpb, stride_kps,
    HEAD_DIM: tl.constexpr, ROTARY_HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PAIR_RUN: tl.constexpr,         # features per contiguous run in a pair tile (rotate-half with a pass-through tail)
    Q_POS_MODE: tl.constexpr, K_POS_MODE: tl.constexpr, Q_FROM_END: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROTATE_Q: tl.constexpr, ROTATE_K: tl.constexpr, CAUSAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERPRET: tl.constexpr,        # Triton's interpreter runs the kernel (see _loop_bound)
    DOT_DTYPE: tl.constexpr,        # dot operand type: the input's; float32 under the interpreter (16-bit dots break)
):
    # Grid: (n_k_blocks · sequences · KV heads,). One program owns BLOCK_N keys of one KV head and walks the
    # queries of every query head that reads it, so dk and dv are summed in registers without atomics.
    pid = tl.program_id(0)
    seq_idx = (pid // n_k_blocks) // n_kv_heads
    kv_head = ((pid // n_k_blocks) % n_kv_heads).to(tl.int64)
    q_start, len_q, k_start, len_k = _sequence_bounds(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seq_idx, seq_q, seq_k,
                                                      IS_VARLEN)
    n0 = (pid % n_k_blocks) * BLOCK_N
    if n0 >= len_k:
        return
    diff = len_k - len_q
    if Q_FROM_END:
        q_pos_offset += diff
    seq64 = seq_idx.to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < len_k
    k_tokens = (k_start + cols).to(tl.int64)
    k1, k2 = _load_rotated(k_ptr, seq64 * stride_kb + k_tokens * stride_ks + kv_head * stride_kh, col_mask,
                           stride_kd, turns_ptr, k_pos_ptr, stride_kpb, stride_kps, k_pos_offset, seq_idx, k_start,
                           cols, ROTARY_HALF, HEAD_DIM // 2, BLOCK_HALF, PAIR_RUN, K_POS_MODE, INTERLEAVED, ROTATE_K)
    k1 = k1.to(DOT_DTYPE)
    k2 = k2.to(DOT_DTYPE)
    vt = _load_rows(v_ptr, seq64 * stride_vb + k_tokens * stride_vs + kv_head * stride_vh, col_mask, stride_vd,
                    HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
    step_cos, step_sin = _step_table(turns_ptr, BLOCK_M, ROTARY_HALF, BLOCK_HALF, Q_POS_MODE, ROTATE_Q)
    dk1 = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Queries in [lo, mid) see part of this key block (masked); queries from mid on see all of it.
    if CAUSAL:
        lo = tl.minimum(tl.maximum(n0 - diff, 0), len_q) // BLOCK_M * BLOCK_M
        mid = tl.minimum((tl.maximum(n0 + BLOCK_N - 1 - diff, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, len_q)
    else:
        lo = 0
        mid = 0
    for g in range(0, _loop_bound(group_size, INTERPRET)):
        head = kv_head * group_size + g
        q_base = seq64 * stride_qb + head * stride_qh
        dout_base = seq64 * stride_db + head * stride_dh
        lse_base = seq64 * stride_lb + head * stride_lh
        for m0 in range(_loop_bound(lo, INTERPRET), _loop_bound(mid, INTERPRET), BLOCK_M):
            dk1, dk2, dv = _dkdv_block(dk1, dk2, dv, k1, k2, vt, cols, m0, len_q, diff, qk_scale,
                                       q_ptr, dout_ptr, lse_ptr, delta_ptr, q_base, dout_base, lse_base, q_start,
                                       stride_qs, stride_qd, stride_ds, stride_dd,
                                       step_cos, step_sin, turns_ptr, q_pos_ptr, stride_qpb, stride_qps,
                                       q_pos_offset, seq_idx, ROTARY_HALF, HEAD_DIM // 2, HEAD_DIM, BLOCK_M,
                                       BLOCK_HALF, BLOCK_D, PAIR_RUN, Q_POS_MODE, INTERLEAVED, ROTATE_Q, True,
                                       DOT_DTYPE)
        for m0 in range(_loop_bound(mid, INTERPRET), _loop_bound(len_q, INTERPRET), BLOCK_M):
            dk1, dk2, dv = _dkdv_block(dk1, dk2, dv, k1, k2, vt, cols, m0, len_q, diff, qk_scale,
                                       q_ptr, dout_ptr, lse_ptr, delta_ptr, q_base, dout_base, lse_base, q_start,
                                       stride_qs, stride_qd, stride_ds, stride_dd,
                                       step_cos, step_sin, turns_ptr, q_pos_ptr, stride_qpb, stride_qps,
                                       q_pos_offset, seq_idx, ROTARY_HALF, HEAD_DIM // 2, HEAD_DIM, BLOCK_M,
                                       BLOCK_HALF, BLOCK_D, PAIR_RUN, Q_POS_MODE, INTERLEAVED, ROTATE_Q, False,
                                       DOT_DTYPE)

    _store_pairs(dk_ptr, seq64 * stride_dkb + k_tokens * stride_dks + kv_head * stride_dkh, col_mask, stride_dkd,
                 dk1 * softmax_scale, dk2 * softmax_scale, turns_ptr, k_pos_ptr, stride_kpb, stride_kps,
                 k_pos_offset, seq_idx, k_start, cols, ROTARY_HALF, HEAD_DIM // 2, BLOCK_HALF, PAIR_RUN, K_POS_MODE,
                 INTERLEAVED, ROTATE_K)
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    dv_rows = seq64 * stride_dvb + k_tokens * stride_dvs + kv_head * stride_dvh
    tl.store(dv_ptr + dv_rows[:, None] + dims[None, :] * stride_dvd, dv.to(dv_ptr.dtype.element_ty),
             mask=col_mask[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _dq_block(dq1, dq2, q1, q2, dout, lse2, delta, rows, n0, len_k, diff, qk_scale,
              k_ptr, v_ptr, k_base, v_base, k_start, stride_ks, stride_kd, stride_vs, stride_vd,
              step_cos, step_sin, turns_ptr, k_pos_ptr, stride_kpb, stride_kps, k_pos_offset, seq_idx,
              ROTARY_HALF: tl.constexpr, HALF_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
              PAIR_RUN: tl.constexpr, K_POS_MODE: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE_K: tl.constexpr,
              CAUSAL: tl.constexpr, MASK: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Add one key block's contribution to a query block's (dq1, dq2)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < len_k
    k_tokens = (k_start + cols).to(tl.int64)
    k1, k2 = _load_pairs(k_ptr, k_base + k_tokens * stride_ks, col_mask, stride_kd, ROTARY_HALF, HALF_DIM,
                         BLOCK_HALF, PAIR_RUN, INTERLEAVED)
    if ROTATE_K:
        cos, sin = _loop_tile_cos_sin(step_cos, step_sin, turns_ptr, k_pos_ptr, stride_kpb, stride_kps,
                                      k_pos_offset, seq_idx, k_start, n0, cols, col_mask, ROTARY_HALF, BLOCK_HALF,
                                      K_POS_MODE)
        k1, k2 = _rotate(k1, k2, cos, sin)
    k1 = k1.to(DOT_DTYPE)
    k2 = k2.to(DOT_DTYPE)
    vt = _load_rows(v_ptr, v_base + k_tokens * stride_vs, col_mask, stride_vd, HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
    s = tl.dot(q1, tl.trans(k1), tl.zeros([q1.shape[0], BLOCK_N], tl.float32))
    s = tl.dot(q2, tl.trans(k2), s)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASK:
        visible = col_mask[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diff)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(dout, tl.trans(vt), tl.zeros([q1.shape[0], BLOCK_N], tl.float32))
    ds = (p * (dp - delta[:, None])).to(k_ptr.dtype.element_ty).to(DOT_DTYPE)
    dq1 = tl.dot(ds, k1, dq1)
    dq2 = tl.dot(ds, k2, dq2)
    return dq1, dq2


@triton.jit
def _attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    turns_ptr, q_pos_ptr, k_pos_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    q_pos_offset, k_pos_offset,
    seq_q, seq_k,
    n_q_blocks, n_heads, group_size,
    qk_scale, softmax_scale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,      # dout
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_lb, stride_lh,                            # lse and delta
    stride_qpb, stride_qps, stride_kpb, stride_kps,
    HEAD_DIM: tl.constexpr, ROTARY_HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PAIR_RUN: tl.constexpr,         # features per contiguous run in a pair tile (rotate-half with a pass-through tail)
    Q_POS_MODE: tl.constexpr, K_POS_MODE: tl.constexpr, Q_FROM_END: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROTATE_Q: tl.constexpr, ROTATE_K: tl.constexpr, CAUSAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERPRET: tl.constexpr,        # Triton's interpreter runs the kernel (see _loop_bound)
    DOT_DTYPE: tl.constexpr,        # dot operand type: the input's; float32 under the interpreter (16-bit dots break)
):
    # Grid: (n_q_blocks · sequences · heads,). One program owns BLOCK_M queries of one head and walks the keys, as
    # the forward does.
    pid = tl.program_id(0)
    block = pid % n_q_blocks
    if CAUSAL:
        block = n_q_blocks - 1 - block
    seq_idx = (pid // n_q_blocks) // n_heads
    head = (pid // n_q_blocks) % n_heads
    q_start, len_q, k_start, len_k = _sequence_bounds(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seq_idx, seq_q, seq_k,
                                                      IS_VARLEN)
    m0 = block * BLOCK_M
    if m0 >= len_q:
        return
    diff = len_k - len_q
    if Q_FROM_END:
        q_pos_offset += diff
    seq64 = seq_idx.to(tl.int64)
    head64 = head.to(tl.int64)
    kv_head = (head // group_size).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < len_q
    tokens = (q_start + rows).to(tl.int64)
    q1, q2 = _load_rotated(q_ptr, seq64 * stride_qb + tokens * stride_qs + head64 * stride_qh, row_mask, stride_qd,
                           turns_ptr, q_pos_ptr, stride_qpb, stride_qps, q_pos_offset, seq_idx, q_start, rows,
                           ROTARY_HALF, HEAD_DIM // 2, BLOCK_HALF, PAIR_RUN, Q_POS_MODE, INTERLEAVED, ROTATE_Q)
    q1 = q1.to(DOT_DTYPE)
    q2 = q2.to(DOT_DTYPE)
    dout = _load_rows(dout_ptr, seq64 * stride_db + tokens * stride_ds + head64 * stride_dh, row_mask, stride_dd,
                      HEAD_DIM, BLOCK_D).to(DOT_DTYPE)
    lse2, delta = _load_softmax_stats(lse_ptr, delta_ptr, seq64 * stride_lb + head64 * stride_lh + tokens, row_mask)
    step_cos, step_sin = _step_table(turns_ptr, BLOCK_N, ROTARY_HALF, BLOCK_HALF, K_POS_MODE, ROTATE_K)
    dq1 = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)

    if CAUSAL:
        hi = tl.maximum(tl.minimum(len_k, m0 + BLOCK_M + diff), 0)
        full_hi = tl.maximum(tl.minimum(len_k, m0 + diff + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = len_k
        full_hi = len_k // BLOCK_N * BLOCK_N
    k_base = seq64 * stride_kb + kv_head * stride_kh
    v_base = seq64 * stride_vb + kv_head * stride_vh
    for n0 in range(0, _loop_bound(full_hi, INTERPRET), BLOCK_N):
        dq1, dq2 = _dq_block(dq1, dq2, q1, q2, dout, lse2, delta, rows, n0, len_k, diff, qk_scale,
                             k_ptr, v_ptr, k_base, v_base, k_start, stride_ks, stride_kd, stride_vs, stride_vd,
                             step_cos, step_sin, turns_ptr, k_pos_ptr, stride_kpb, stride_kps, k_pos_offset, seq_idx,
                             ROTARY_HALF, HEAD_DIM // 2, HEAD_DIM, BLOCK_N, BLOCK_HALF, BLOCK_D, PAIR_RUN, K_POS_MODE,
                             INTERLEAVED, ROTATE_K, CAUSAL, False, DOT_DTYPE)
    for n0 in range(_loop_bound(full_hi, INTERPRET), _loop_bound(hi, INTERPRET), BLOCK_N):
        dq1, dq2 = _dq_block(dq1, dq2, q1, q2, dout, lse2, delta, rows, n0, len_k, diff, qk_scale,
                             k_ptr, v_ptr, k_base, v_base, k_start, stride_ks, stride_kd, stride_vs, stride_vd,
                             step_cos, step_sin, turns_ptr, k_pos_ptr, stride_kpb, stride_kps, k_pos_offset, seq_idx,
                             ROTARY_HALF, HEAD_DIM // 2, HEAD_DIM, BLOCK_N, BLOCK_HALF, BLOCK_D, PAIR_RUN, K_POS_MODE,
                             INTERLEAVED, ROTATE_K, CAUSAL, True, DOT_DTYPE)

    _store_pairs(dq_ptr, seq64 * stride_dqb + tokens * stride_dqs + head64 * stride_dqh, row_mask, stride_dqd,
                 dq1 * softmax_scale, dq2 * softmax_scale, turns_ptr, q_pos_ptr, stride_qpb, stride_qps,
                 q_pos_offset, seq_idx, q_start, rows, ROTARY_HALF, HEAD_DIM // 2, BLOCK_HALF, PAIR_RUN, Q_POS_MODE,
                 INTERLEAVED, ROTATE_Q)


_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


class _Blocks(NamedTuple):
    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


def _blocks(kernel, head_dim, element_size, interpret):
    """Tile sizes of ``kernel`` ("forward", "dkdv" or "dq") for a head_dim and input element size in bytes.

    Under the interpreter: small, unequal tiles (query and key tiles differ, as on a GPU), so sequences of ~100
    tokens span several blocks and every masking path runs. On a GPU: the sizes that compile for sm_90 without
    register spills for head_dim ≤ 128 (checked with ptxas, RoPE on and off); head_dim 256 with RoPE still spills.
    float32 tiles get at most two pipeline stages, to stay within the 227 KiB of shared memory of an H100. Not yet
    tuned by timing on a GPU.
    """
    if interpret:
        return {"forward": _Blocks(64, 32, 4, 1), "dkdv": _Blocks(32, 64, 4, 1), "dq": _Blocks(64, 32, 4, 1)}[kernel]
    if head_dim <= 64:
        table = {"forward": _Blocks(128, 64, 8, 3), "dkdv": _Blocks(32, 64, 8, 2), "dq": _Blocks(128, 32, 8, 2)}
    elif head_dim <= 128:
        table = {"forward": _Blocks(128, 64, 8, 3), "dkdv": _Blocks(16, 64, 8, 2), "dq": _Blocks(64, 32, 8, 2)}
    else:
        table = {"forward": _Blocks(128, 32, 8, 2), "dkdv": _Blocks(16, 64, 8, 2), "dq": _Blocks(64, 32, 8, 2)}
    blocks = table[kernel]
    return blocks._replace(num_stages=min(blocks.num_stages, 2)) if element_size > 2 else blocks


@dataclass(frozen=True)
class _Problem:
    """Everything the kernels need besides q, k, v, with tensors already checked."""

    q_spec: validation.PositionSpec
    k_spec: validation.PositionSpec
    q_from_end: bool           # default query positions: the last seq_q of the key positions
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    max_seqlen_q: int          # longest query sequence (the dense seq_q)
    max_seqlen_k: int
    turns: torch.Tensor        # float64 turns per position of each rotated pair
    rotary_dim: int
    interleaved: bool
    causal: bool
    softmax_scale: float
    rotate_q: bool
    rotate_k: bool

    @property
    def varlen(self):
        return self.cu_seqlens_q is not None


def _bshd(x, varlen):
    """(batch, seq, heads, dim) view and its strides; packed input is one row whose batch stride is never used
    (each program offsets by its sequence's first token instead)."""
    x4 = x.unsqueeze(0) if varlen else x
    return x4, (0 if varlen else x4.stride(0), *x4.stride()[1:])


def _common_args(problem, q4, k4):
    """The kernel arguments shared by the forward and backward kernels, in their order."""
    q_ids, stride_qpb, stride_qps = position_pointer_and_strides(problem.q_spec, problem.turns)
    k_ids, stride_kpb, stride_kps = position_pointer_and_strides(problem.k_spec, problem.turns)
    cu_q = problem.cu_seqlens_q if problem.varlen else problem.turns
    cu_k = problem.cu_seqlens_k if problem.varlen else problem.turns
    pointers = (problem.turns, q_ids, k_ids, cu_q, cu_k)
    scalars = (problem.q_spec.offset, problem.k_spec.offset, q4.shape[1], k4.shape[1])
    position_strides = (stride_qpb, stride_qps, stride_kpb, stride_kps)
    return pointers, scalars, position_strides


def _block_half(head_dim):
    """Pair tiles are (rows, BLOCK_HALF) and whole rows (rows, 2 · BLOCK_HALF); 16 is the smallest dot size."""
    return max(16, triton.next_power_of_2(head_dim // 2))


def _pair_run(rotary_dim, head_dim):
    """Largest power of two dividing both the rotated and the passed-through halves (see ``_half_dims``)."""
    runs = math.gcd(rotary_dim // 2, (head_dim - rotary_dim) // 2)
    return runs & -runs


def _constexprs(problem, head_dim, dtype, blocks):
    interpret = _interpreting()
    block_half = _block_half(head_dim)
    return dict(
        HEAD_DIM=head_dim, ROTARY_HALF=problem.rotary_dim // 2, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        BLOCK_HALF=block_half, BLOCK_D=2 * block_half, PAIR_RUN=_pair_run(problem.rotary_dim, head_dim),
        Q_POS_MODE=problem.q_spec.mode, K_POS_MODE=problem.k_spec.mode, Q_FROM_END=problem.q_from_end,
        INTERLEAVED=problem.interleaved, ROTATE_Q=problem.rotate_q, ROTATE_K=problem.rotate_k, CAUSAL=problem.causal,
        IS_VARLEN=problem.varlen, INTERPRET=interpret, DOT_DTYPE=tl.float32 if interpret else _TRITON_DTYPES[dtype],
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _lse_strides(lse, varlen):
    """(sequence, head) strides of lse; packed lse (heads, total_q) is indexed by packed token."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def attention_forward(q, k, v, problem):
    """Launch the forward kernel; returns out (like q) and lse (float32, natural log; see ``attention_rotary``)."""
    q4, q_strides = _bshd(q, problem.varlen)
    k4, k_strides = _bshd(k, problem.varlen)
    v4, v_strides = _bshd(v, problem.varlen)
    out = torch.empty_like(q)
    out4, out_strides = _bshd(out, problem.varlen)
    lse = torch.empty(_lse_shape(q, problem.varlen), device=q.device, dtype=torch.float32)
    n_seqs = problem.cu_seqlens_q.shape[0] - 1 if problem.varlen else q4.shape[0]
    n_heads, head_dim = q4.shape[2], q4.shape[3]
    blocks = _blocks("forward", head_dim, q.element_size(), _interpreting())
    # Few queries per sequence (decode): a query tile no taller than needed wastes less of the dots.
    blocks = blocks._replace(block_m=min(blocks.block_m, max(16, triton.next_power_of_2(problem.max_seqlen_q))))
    n_q_blocks = triton.cdiv(problem.max_seqlen_q, blocks.block_m)
    grid = (n_q_blocks * n_seqs * n_heads,)
    if grid[0] == 0:
        return out, lse
    pointers, scalars, position_strides = _common_args(problem, q4, k4)
    _attention_forward_kernel[grid](
        q4, k4, v4, out4, lse, *pointers, *scalars,
        n_q_blocks, n_heads, n_heads // k4.shape[2], problem.softmax_scale * LOG2E.value,
        *q_strides, *k_strides, *v_strides, *out_strides, *_lse_strides(lse, problem.varlen), *position_strides,
        **_constexprs(problem, head_dim, q.dtype, blocks),
    )
    return out, lse


def attention_backward(q, k, v, out, lse, grad_out, problem):
    """Launch the backward kernels; returns (dq, dk, dv) with respect to the un-rotated q and k."""
    q4, q_strides = _bshd(q, problem.varlen)
    k4, k_strides = _bshd(k, problem.varlen)
    v4, v_strides = _bshd(v, problem.varlen)
    out4, out_strides = _bshd(out, problem.varlen)
    dout4, dout_strides = _bshd(grad_out, problem.varlen)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dq4, dq_strides = _bshd(dq, problem.varlen)
    dk4, dk_strides = _bshd(dk, problem.varlen)
    dv4, dv_strides = _bshd(dv, problem.varlen)
    n_seqs = problem.cu_seqlens_q.shape[0] - 1 if problem.varlen else q4.shape[0]
    n_heads, n_kv_heads, head_dim = q4.shape[2], k4.shape[2], q4.shape[3]
    if n_seqs * n_heads == 0:
        return dq, dk, dv
    interpret = _interpreting()
    lse_strides = _lse_strides(lse, problem.varlen)
    delta = torch.empty_like(lse)
    pointers, scalars, position_strides = _common_args(problem, q4, k4)
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=2 * _block_half(head_dim), IS_VARLEN=problem.varlen)

    delta_block = 16 if interpret else 64
    n_delta_blocks = triton.cdiv(problem.max_seqlen_q, delta_block)
    if n_delta_blocks:
        _attention_backward_delta_kernel[(n_delta_blocks * n_seqs * n_heads,)](
            out4, dout4, delta, problem.cu_seqlens_q if problem.varlen else lse, q4.shape[1], n_delta_blocks,
            n_heads, *out_strides, *dout_strides, *lse_strides, BLOCK_M=delta_block, **consts, num_warps=4,
        )
    scales = (problem.softmax_scale * LOG2E.value, problem.softmax_scale)
    blocks = _blocks("dkdv", head_dim, q.element_size(), interpret)
    n_k_blocks = triton.cdiv(problem.max_seqlen_k, blocks.block_n)
    if n_k_blocks:
        _attention_backward_dkdv_kernel[(n_k_blocks * n_seqs * n_kv_heads,)](
            q4, k4, v4, dout4, lse, delta, dk4, dv4, *pointers, *scalars,
            n_k_blocks, n_kv_heads, n_heads // n_kv_heads, *scales,
            *q_strides, *k_strides, *v_strides, *dout_strides, *dk_strides, *dv_strides, *lse_strides,
            *position_strides, **_constexprs(problem, head_dim, q.dtype, blocks),
        )
    blocks = _blocks("dq", head_dim, q.element_size(), interpret)
    n_q_blocks = triton.cdiv(problem.max_seqlen_q, blocks.block_m)
    if n_q_blocks:
        _attention_backward_dq_kernel[(n_q_blocks * n_seqs * n_heads,)](
            q4, k4, v4, dout4, lse, delta, dq4, *pointers, *scalars,
            n_q_blocks, n_heads, n_heads // n_kv_heads, *scales,
            *q_strides, *k_strides, *v_strides, *dout_strides, *dq_strides, *lse_strides,
            *position_strides, **_constexprs(problem, head_dim, q.dtype, blocks),
        )
    return dq, dk, dv


def _problem(q, k, q_positions, k_positions, cu_seqlens_q, cu_seqlens_k, inv_freq, q_position_mode,
             q_position_offset, q_from_end, k_position_mode, k_position_offset, max_seqlen_q, max_seqlen_k, base,
             scaling_factor, rotary_dim, interleaved, causal, softmax_scale, rotate_q, rotate_k, *, check_values):
    """Build the kernels' :class:`_Problem` from the custom ops' arguments, after the synchronizing value checks
    when ``check_values`` (the forward; the backward sees the same tensors).

    ``k_positions`` (with a mode that reads a tensor) and ``cu_seqlens_k`` are None when the keys share the queries'
    tensor: torch.compile refuses one tensor passed twice to an autograd.Function.
    """
    varlen = cu_seqlens_q is not None
    if k_positions is None and k_position_mode != validation.POSITIONS_ARANGE:
        k_positions = q_positions
    if varlen and cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    total_q, total_k = (q.shape[0], k.shape[0]) if varlen else (q.shape[1], k.shape[1])
    if check_values:
        validation.check_values(q_positions, cu_seqlens_q, max_seqlen_q, total_q)
        validation.check_values(k_positions, cu_seqlens_k, max_seqlen_k, total_k)
    if varlen:
        # The grid needs the longest sequence; without max_seqlen_* that costs one device-to-host sync.
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    else:
        max_seqlen_q, max_seqlen_k = total_q, total_k
    turns = turns_table(inv_freq, base, scaling_factor, rotary_dim, q.device)
    return _Problem(validation.PositionSpec(q_position_mode, q_positions, q_position_offset),
                    validation.PositionSpec(k_position_mode, k_positions, k_position_offset), q_from_end, cu_seqlens_q,
                    cu_seqlens_k, max_seqlen_q, max_seqlen_k, turns, rotary_dim, interleaved, causal, softmax_scale,
                    rotate_q, rotate_k)


@torch.library.custom_op("pi_kernels::attention_rotary", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor | None,
                  k_positions: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                  cu_seqlens_k: torch.Tensor | None, inv_freq: torch.Tensor | None, q_position_mode: int,
                  q_position_offset: int, q_from_end: bool, k_position_mode: int, k_position_offset: int,
                  max_seqlen_q: int | None, max_seqlen_k: int | None, base: float, scaling_factor: float,
                  rotary_dim: int, interleaved: bool, causal: bool, softmax_scale: float, rotate_q: bool,
                  rotate_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    problem = _problem(q, k, q_positions, k_positions, cu_seqlens_q, cu_seqlens_k, inv_freq, q_position_mode,
                       q_position_offset, q_from_end, k_position_mode, k_position_offset, max_seqlen_q, max_seqlen_k,
                       base, scaling_factor, rotary_dim, interleaved, causal, softmax_scale, rotate_q, rotate_k,
                       check_values=True)
    return attention_forward(q, k, v, problem)


@_attention_op.register_fake
def _attention_op_fake(q, k, v, q_positions, k_positions, cu_seqlens_q, *args):
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("pi_kernels::attention_rotary_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           grad_out: torch.Tensor, q_positions: torch.Tensor | None,
                           k_positions: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                           cu_seqlens_k: torch.Tensor | None, inv_freq: torch.Tensor | None, q_position_mode: int,
                           q_position_offset: int, q_from_end: bool, k_position_mode: int, k_position_offset: int,
                           max_seqlen_q: int | None, max_seqlen_k: int | None, base: float, scaling_factor: float,
                           rotary_dim: int, interleaved: bool, causal: bool, softmax_scale: float, rotate_q: bool,
                           rotate_k: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    problem = _problem(q, k, q_positions, k_positions, cu_seqlens_q, cu_seqlens_k, inv_freq, q_position_mode,
                       q_position_offset, q_from_end, k_position_mode, k_position_offset, max_seqlen_q, max_seqlen_k,
                       base, scaling_factor, rotary_dim, interleaved, causal, softmax_scale, rotate_q, rotate_k,
                       check_values=False)
    return attention_backward(q, k, v, out, lse, grad_out, problem)


@_attention_backward_op.register_fake
def _attention_backward_op_fake(q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class AttentionRotaryFunction(torch.autograd.Function):
    """Autograd for fused RoPE attention: the backward kernels return gradients of the un-rotated q and k.

    ``settings`` is the tuple of the custom ops' non-tensor arguments, in their order. The backward is not itself
    differentiable (no double backward), as in flash-attention.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_positions, k_positions, cu_seqlens_q, cu_seqlens_k, inv_freq, settings):
        tensors = (q_positions, k_positions, cu_seqlens_q, cu_seqlens_k, inv_freq)
        out, lse = torch.ops.pi_kernels.attention_rotary(q, k, v, *tensors, *settings)
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        ctx.settings = settings
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        dq, dk, dv = torch.ops.pi_kernels.attention_rotary_backward(q, k, v, out, lse, grad_out, *tensors,
                                                                     *ctx.settings)
        return dq, dk, dv, None, None, None, None, None, None


def _check_tensors(q, k, v, varlen):
    """Shape, dtype and device checks of q, k, v; returns (n_heads, n_kv_heads, head_dim)."""
    ndim, shape_doc = (3, "(total_tokens, heads, head_dim) with cu_seqlens_q") if varlen else \
        (4, "(batch, seq, heads, head_dim)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != ndim:
            raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")
        if x.dtype not in validation.SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype must be float16, bfloat16 or float32, got {x.dtype}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype ({x.dtype}) must match q.dtype ({q.dtype})")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; they must be on the same device")
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
    if not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale!r}")
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


def _resolve_key_positions(q, k, positions, k_positions, q_spec, rotate_q, rotate_k, same_tokens, varlen,
                           cu_seqlens_k, max_seqlen_k):
    """The keys' PositionSpec (see ``attention_rotary`` for the defaults)."""
    if not rotate_k:
        if k_positions is not None:
            raise ValueError("k_positions is given but rotate_k=False (the keys are already rotated)")
        if positions is not None and not rotate_q:
            raise ValueError("positions is given but rotate_q and rotate_k are both False (nothing is rotated)")
        return validation.PositionSpec(validation.POSITIONS_ARANGE, None, 0)
    if k_positions is not None:
        if positions is None:
            raise ValueError("k_positions is given without positions: pass the queries' positions too")
        if varlen:
            return validation.resolve_varlen_positions(k_positions, cu_seqlens_k, max_seqlen_k, k.shape[0], q.device)
        return validation.resolve_positions(k_positions, k.shape[0], k.shape[1], q.device)
    if positions is None:
        return validation.PositionSpec(validation.POSITIONS_ARANGE, None, 0)
    if not same_tokens:
        raise ValueError("k_positions is required when positions is given and the keys are not the query tokens "
                         "(seq_q != seq_k, or a separate cu_seqlens_k)")
    return q_spec


def attention_rotary(q, k, v, positions=None, *, scaling_factor=1.0, base=10000.0, inv_freq=None, rotary_dim=None,
                     interleaved=False, causal=True, softmax_scale=None, k_positions=None, cu_seqlens_q=None,
                     cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, rotate_q=True, rotate_k=True,
                     return_lse=False):
    """Softmax attention of un-rotated q and k, rotated in-kernel by interpolated RoPE; forward and backward fused.

    Equals :func:`rotary_interp` on q and k followed by exact softmax attention, without writing the rotated q/k
    or any seq_q × seq_k tensor: memory is O(seq) in the forward and the backward. The pair ``j`` of a head at
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
    rotary_dim = validation.check_rotary_dim(rotary_dim, head_dim)
    validation.check_scaling_factor(scaling_factor)
    if inv_freq is None:
        validation.check_base(base)
    else:
        validation.check_inv_freq(inv_freq, rotary_dim)
    softmax_scale = _check_softmax_scale(softmax_scale, head_dim)
    if varlen:
        same_tokens = cu_seqlens_k is None or cu_seqlens_k is cu_seqlens_q
        cu_seqlens_k, max_seqlen_k, q_spec = _resolve_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                                 max_seqlen_k, positions)
    else:
        same_tokens = q.shape[1] == k.shape[1]
        q_spec = validation.resolve_positions(positions, q.shape[0], q.shape[1], q.device)
    k_spec = _resolve_key_positions(q, k, positions, k_positions, q_spec, rotate_q, rotate_k, same_tokens, varlen,
                                    cu_seqlens_k, max_seqlen_k)
    settings = (q_spec.mode, q_spec.offset, positions is None, k_spec.mode, k_spec.offset, max_seqlen_q,
                max_seqlen_k, float(base), float(scaling_factor), rotary_dim, bool(interleaved), bool(causal),
                softmax_scale, bool(rotate_q), bool(rotate_k))
    # A tensor the keys share with the queries is passed once (see _problem).
    k_ids = None if k_spec.ids is q_spec.ids else k_spec.ids
    cu_seqlens_k = None if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k
    out, lse = AttentionRotaryFunction.apply(q, k, v, q_spec.ids, k_ids, cu_seqlens_q, cu_seqlens_k, inv_freq,
                                             settings)
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
        cu_seqlens_k, max_seqlen_q, max_seqlen_k, rotate_q, rotate_k, return_lse)."""
        return attention_rotary(q, k, v, positions, scaling_factor=self.scaling_factor, base=self.base,
                                inv_freq=self.inv_freq, rotary_dim=self.rotary_dim, interleaved=self.interleaved,
                                causal=self.causal, softmax_scale=self.softmax_scale, **options)

    def extra_repr(self):
        return (f"rotary_dim={self.rotary_dim}, base={self.base}, scaling_factor={self.scaling_factor}, "
                f"interleaved={self.interleaved}, causal={self.causal}")
