"""Fused QKV projection with interpolated RoPE in the GEMM epilogue (Triton), forward and backward.

``q, k, v = x @ weight.T + bias`` split into heads, with q and k rotated exactly as :func:`rotary_interp` rotates
them; the rotated values are written once and never re-read.

How the epilogue sees both halves of every pair
-----------------------------------------------
A program computes ``BLOCK_M`` tokens × one head. Its ``2 · BLOCK_P`` weight rows are loaded in pair order: first
the first member of each pair (``j`` for rotate-half, ``2j`` for GPT-J), then the partners (``j + rotary_dim/2``,
``2j + 1``), so the accumulator of one ``tl.dot`` holds both halves of every pair, and the epilogue separates them
with a reshape, rotates, and stores each column where it belongs. Features past ``rotary_dim`` are paired among
themselves and rotated by angle 0, v heads are not rotated, so every output column is produced once and the FLOPs
are those of the plain GEMM. Ordering rows in the loads works for any ``head_dim`` (80: ``BLOCK_P`` is
``head_dim / 2`` rounded up to a power of two, the padding pairs are computed on a clamped weight row and never
stored) and any ``rotary_dim``. The angles come from ``_rope.py``, once per (token, pair) of a tile, after the K loop.

Backward
--------
``dq_raw, dk_raw`` are the incoming gradients rotated by −angle (rotary_interp's kernel with ``conjugate=True``),
written with dv into one contiguous ``(tokens, rows)`` buffer; then ``dx = dy @ weight`` and ``dweight = dy.T @ x``
are ``torch.matmul`` GEMMs (cuBLAS on a GPU) and ``dbias = dy.sum(0)``. The separate pass costs one read and one
write of the gradients. Rotating in the prologue of Triton dgrad/wgrad GEMMs instead saves that traffic but redoes
the rotation (and, in wgrad, the angles, which change along its reduction over tokens) once per output tile: by an
estimate, not a measurement, that is more CUDA-core work than the pass costs in bandwidth at hidden 4096. Which is
faster is for a GPU measurement to settle; ``benchmarks/bench_qkv_proj.py`` times this backward against the bare
dgrad + wgrad GEMMs.
"""

import dataclasses
import os

import torch
import triton
import triton.language as tl

from .. import _backend, _torch_backend
from .. import _validation as v
from .._backend import _interpreting
from .._positions import position_pointer_and_strides
from . import attention
from ._rope import rope_cos_sin, token_positions, varlen_search
from ._schema import Rope, record_op
from .attention import _ensure_scratch_allocator
from .rotary import LAUNCHERS as ROTARY_LAUNCHERS

__all__ = ["QKVProjRotary", "QKVProjRotaryFunction", "qkv_proj_backward", "qkv_proj_forward", "qkv_proj_rotary"]

# Tiles for H100 and A100 (sm80/sm90, fp32 accumulators). A program's N extent is one head, 2 · BLOCK_P columns
# (128 for head_dim 128), so only the token and K tiles are tuned. Only configs that spill no register on sm_90 and
# sm_80 are kept (benchmarks/results/static/, tests/test_gpu_compile.py): BLOCK_M 128 at 4 warps and 256 at 8
# spilled ~3 KB per thread in 16 bits.
_GPU_CONFIGS_16BIT = [
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=4),
]
# fp32 operands: without tf32 (torch's default precision) the dot is an FMA loop whose operands live in registers;
# the 16-bit tiles spilled up to 48 KB per thread there (and some exceeded shared memory), and 64 x 128 tiles still
# spill at 4 warps: smaller tiles on 8 warps of their own.
_GPU_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=8),
]
_GPU_CONFIGS = _GPU_CONFIGS_16BIT + _GPU_CONFIGS_FP32
# Autotuning under the interpreter would run every config at interpreter speed: one small config there.
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_stages=1, num_warps=4)]
# Below this many tokens a launch has few programs and the tile barely matters; compiling and timing every config
# (seconds per new shape) would cost more than it saves, so one config is used.
_AUTOTUNE_MIN_TOKENS = 1024


def _prune_configs(configs, named_args, **kwargs):
    if configs == _GPU_CONFIGS:
        fp32 = named_args["x_ptr"].dtype == torch.float32
        configs = _GPU_CONFIGS_FP32 if fp32 else _GPU_CONFIGS_16BIT
    # PI_KERNELS_AUTOTUNE=0 (set by the tests): one config, so no test spends minutes compiling and timing eight.
    if named_args["token_bucket"] < _AUTOTUNE_MIN_TOKENS or os.environ.get("PI_KERNELS_AUTOTUNE") == "0":
        return [min(configs, key=lambda config: (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]))]
    return configs


@triton.jit
def _pair_columns(pairs, HEAD_DIM: tl.constexpr, ROTARY_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Columns (within a head) of the two members of each pair: rotated pairs first, then the pass-through tail."""
    if INTERLEAVED:
        first = 2 * pairs
        second = first + 1
    elif 2 * ROTARY_HALF == HEAD_DIM:
        # Plain arithmetic on an arange, so the compiler knows both halves are contiguous runs (128-bit stores).
        first = pairs
        second = pairs + ROTARY_HALF
    else:
        # Past rotary_dim, the tail's (head_dim - rotary_dim) features pair as (t, t + half of the tail).
        tail = pairs - ROTARY_HALF
        first = tl.where(tail < 0, pairs, 2 * ROTARY_HALF + tail)
        second = tl.where(tail < 0, pairs + ROTARY_HALF, first + (HEAD_DIM - 2 * ROTARY_HALF) // 2)
    return first, second


@triton.jit
def _project_head(
    x_ptr, w_ptr, b_ptr, out_ptr,           # activations (a tensor descriptor when USE_DESC); one of q/k/v's
                                            # weight, bias and output
    row0, n_tokens,                         # first token row of the tile (flat over batch · seq); rows of the GEMM
    row_x, batch_idx, tokens, token_mask,   # (BLOCK_M,): int64 row offsets into x, batch row, token, validity
    head, n_w_heads,                        # head index within this weight; heads of this weight (and output)
    stride_xk, stride_wn, stride_wk, stride_b,
    stride_ob, stride_os, stride_oh, stride_od,
    turns_ptr, pos_ptr, cu_seqlens_ptr, pos_offset, n_seqs, stride_pb, stride_ps,  # positions, as in rotary
    ROTATE: tl.constexpr, HIDDEN: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    POS_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HALVES_IN_ORDER: tl.constexpr, USE_DESC: tl.constexpr,
):
    # A rotated head's 2·BLOCK_P columns: the first members of BLOCK_P pairs, then their partners, so one tl.dot
    # computes both halves of every pair and the epilogue separates them with a reshape. A head that is not rotated
    # (v) takes its columns in order.
    tile_cols = tl.arange(0, 2 * BLOCK_P)
    if ROTATE:
        pairs = tile_cols % BLOCK_P
        first, second = _pair_columns(pairs, HEAD_DIM, ROTARY_HALF, INTERLEAVED)
        col_mask = pairs < HEAD_DIM // 2
        cols = tl.where(tile_cols < BLOCK_P, first, second)
    else:
        col_mask = tile_cols < HEAD_DIM
        cols = tile_cols
    # Padding columns (head_dim / 2 not a power of two) read a valid weight row instead of masking every load.
    cols = tl.where(col_mask, cols, 0)
    ks = tl.arange(0, BLOCK_K)
    if not USE_DESC:
        x_ptrs = x_ptr + row_x[:, None] + ks[None, :] * stride_xk
    # The weight rows of the tile are one contiguous run when they are taken in order (v; rotate-half over the whole
    # head with head_dim / 2 a power of two, whose pair order is the row order): then one TMA box of 2·BLOCK_P rows
    # (rows past the head, read for padding columns only, are the next head's or zeros). Other pair orders (GPT-J,
    # partial rotary, padded pairs) gather rows with pointers.
    if USE_DESC and ((not ROTATE) or HALVES_IN_ORDER):
        w_desc = tl.make_tensor_descriptor(w_ptr, [n_w_heads * HEAD_DIM, HIDDEN], [stride_wn, 1],
                                           [2 * BLOCK_P, BLOCK_K])
    else:
        row_w = (head * HEAD_DIM + cols).to(tl.int64) * stride_wn
        w_ptrs = w_ptr + row_w[None, :] + ks[:, None] * stride_wk  # (BLOCK_K, 2·BLOCK_P): weight rows transposed
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_P), dtype=tl.float32)
    for k_step in range(0, tl.cdiv(HIDDEN, BLOCK_K)):
        k_mask = ks < HIDDEN - k_step * BLOCK_K
        if USE_DESC:
            # One TMA copy into shared memory; rows past n_tokens and columns past HIDDEN come in as zeros.
            x_tile = x_ptr.load([row0, k_step * BLOCK_K])
        elif HIDDEN % BLOCK_K == 0:
            x_tile = tl.load(x_ptrs)
        else:
            x_tile = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        if USE_DESC and ((not ROTATE) or HALVES_IN_ORDER):
            w_tile = tl.trans(w_desc.load([head * HEAD_DIM, k_step * BLOCK_K]))
        elif HIDDEN % BLOCK_K == 0:
            w_tile = tl.load(w_ptrs)
        else:
            w_tile = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if DOT_FP32:
            # Triton's interpreter may return garbage for 16-bit tl.dot; fp32 products of 16-bit values are exact.
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        if not USE_DESC:
            x_ptrs += BLOCK_K * stride_xk
        if not (USE_DESC and ((not ROTATE) or HALVES_IN_ORDER)):
            w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(b_ptr + (head * HEAD_DIM + cols) * stride_b).to(tl.float32)[None, :]
    row_out = out_ptr + (batch_idx * stride_ob + tokens.to(tl.int64) * stride_os + head * stride_oh)[:, None]
    if ROTATE:
        pos = token_positions(pos_ptr, cu_seqlens_ptr, batch_idx, tokens, token_mask, pos_offset, n_seqs,
                              stride_pb, stride_ps, POS_MODE, IS_VARLEN, SEARCH_STEPS)
        # Pairs past rotary_dim / 2 read no frequency (angle 0): cos 1, sin 0, so the tail passes through exactly.
        cos, sin = rope_cos_sin(pos, turns_ptr, ROTARY_HALF, BLOCK_P, False)
        acc1, acc2 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_P)), (0, 2, 1)))
        out1 = (acc1 * cos - acc2 * sin).to(out_ptr.dtype.element_ty)
        out2 = (acc1 * sin + acc2 * cos).to(out_ptr.dtype.element_ty)
        # Stores whose columns are an arange, so the compiler can prove runs of contiguous, aligned columns and
        # write 16 bytes at a time (columns computed with tl.where gave one 2-byte store per element).
        if INTERLEAVED:
            # Pair j is columns (2j, 2j + 1): out1 and out2 interleaved are the head's columns in order.
            out = tl.reshape(tl.join(out1, out2), (BLOCK_M, 2 * BLOCK_P))
            if USE_DESC:
                _store_head_desc(out_ptr, n_tokens, n_w_heads, stride_os, stride_oh, row0, head, 0, out, HEAD_DIM,
                                 BLOCK_M, 2 * BLOCK_P)
            else:
                tl.store(row_out + tile_cols.to(tl.int64)[None, :] * stride_od, out,
                         mask=token_mask[:, None] & (tile_cols < HEAD_DIM)[None, :])
        elif USE_DESC and HALVES_IN_ORDER:
            # The halves are columns [0, BLOCK_P) and [BLOCK_P, 2·BLOCK_P) of the head: two TMA stores.
            _store_head_desc(out_ptr, n_tokens, n_w_heads, stride_os, stride_oh, row0, head, 0, out1, HEAD_DIM,
                             BLOCK_M, BLOCK_P)
            _store_head_desc(out_ptr, n_tokens, n_w_heads, stride_os, stride_oh, row0, head, BLOCK_P, out2, HEAD_DIM,
                             BLOCK_M, BLOCK_P)
        else:
            half_cols = tl.arange(0, BLOCK_P)
            first, second = _pair_columns(half_cols, HEAD_DIM, ROTARY_HALF, INTERLEAVED)
            half_mask = token_mask[:, None] & (half_cols < HEAD_DIM // 2)[None, :]
            tl.store(row_out + first.to(tl.int64)[None, :] * stride_od, out1, mask=half_mask)
            tl.store(row_out + second.to(tl.int64)[None, :] * stride_od, out2, mask=half_mask)
    elif USE_DESC:
        _store_head_desc(out_ptr, n_tokens, n_w_heads, stride_os, stride_oh, row0, head, 0,
                         acc.to(out_ptr.dtype.element_ty), HEAD_DIM, BLOCK_M, 2 * BLOCK_P)
    else:
        tl.store(row_out + tile_cols.to(tl.int64)[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
                 mask=token_mask[:, None] & col_mask[None, :])


@triton.jit
def _store_head_desc(out_ptr, n_tokens, n_heads, stride_os, stride_oh, row0, head, col0, tile, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, COLS: tl.constexpr):
    """Store a (BLOCK_M, COLS) tile at (tokens row0.., ``head``, columns col0..) of the (tokens, heads, HEAD_DIM)
    output through a tensor descriptor (TMA on sm_90), clipped to the tokens and to the head's HEAD_DIM columns."""
    desc = tl.make_tensor_descriptor(out_ptr, [n_tokens, n_heads, HEAD_DIM], [stride_os, stride_oh, 1],
                                     [BLOCK_M, 1, COLS])
    desc.store([row0, head, col0], tl.reshape(tile, (BLOCK_M, 1, COLS)))


@triton.autotune(configs=_INTERPRETER_CONFIGS if _interpreting() else _GPU_CONFIGS,
                 key=["token_bucket", "HIDDEN", "n_q_heads", "n_kv_heads", "HEAD_DIM", "HAS_V"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _qkv_rotary_kernel(
    x_ptr,                                  # (batch, seq, hidden) activations; packed input is a batch of one
    wq_ptr, wk_ptr, wv_ptr,                 # (heads · head_dim, hidden) weights in nn.Linear layout; wv if HAS_V
    bq_ptr, bk_ptr, bv_ptr,                 # (heads · head_dim,) biases, read when HAS_BIAS
    q_ptr, k_ptr, v_ptr,                    # (batch, seq, heads, head_dim) outputs
    turns_ptr,                              # float64 (ROTARY_HALF,): inv_freq / (2π · scaling_factor)
    pos_ptr,                                # int32/int64 positions (ids or offsets), unused for POS_MODE 0
    cu_seqlens_ptr,                         # int32/int64 (n_seqs + 1,), only read when IS_VARLEN
    pos_offset, n_seqs,                     # scalar offset for POS_MODE 0; number of packed sequences
    n_tokens, seq_len,                      # batch · seq rows of the GEMM, tokens per batch row
    n_q_heads, n_kv_heads, n_heads,         # q heads, k (and v) heads, heads of all outputs
    token_bucket,                           # next power of two of n_tokens: the autotuning key, not read
    stride_xb, stride_xs, stride_xk,
    stride_wqn, stride_wqk, stride_wkn, stride_wkk, stride_wvn, stride_wvk,
    stride_bq, stride_bk, stride_bv,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_pb, stride_ps,                   # positions strides: (batch row or sequence, token)
    HIDDEN: tl.constexpr,                   # reduction length; a model constant, and a constant trip count
    HEAD_DIM: tl.constexpr, ROTARY_HALF: tl.constexpr, BLOCK_P: tl.constexpr,
    POS_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_V: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HALVES_IN_ORDER: tl.constexpr,          # rotate-half over the whole head, head_dim / 2 == BLOCK_P: pair order
                                            # is row (and column) order
    USE_DESC: tl.constexpr,                 # tensor descriptors (TMA on sm_90): x's tiles, the weight's where its
                                            # rows are in order, the output tiles (see _launch_forward)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # 1-D grid over (token block, head); GROUP_M token blocks run over all heads before the next group starts,
    # so a group's activations stay in L2 while the weights stream (the Triton matmul tutorial's ordering).
    pid = tl.program_id(0)
    n_token_blocks = tl.cdiv(n_tokens, BLOCK_M)
    programs_per_group = GROUP_M * n_heads
    first_block = (pid // programs_per_group) * GROUP_M
    group_size = min(n_token_blocks - first_block, GROUP_M)
    token_block = first_block + (pid % programs_per_group) % group_size
    head = (pid % programs_per_group) // group_size

    rows = token_block * BLOCK_M + tl.arange(0, BLOCK_M)
    token_mask = rows < n_tokens
    # Rows past the end read row 0 rather than masking every load; they are never stored.
    rows = tl.where(token_mask, rows, 0).to(tl.int64)
    batch_idx = rows // seq_len
    tokens = rows % seq_len
    row_x = batch_idx * stride_xb + tokens * stride_xs
    row0 = token_block * BLOCK_M
    # x as one (n_tokens, HIDDEN) matrix: the launcher has checked that batch rows follow each other.
    if USE_DESC:
        x_src = tl.make_tensor_descriptor(x_ptr, [n_tokens, HIDDEN], [stride_xs, 1], [BLOCK_M, BLOCK_K])
    else:
        x_src = x_ptr

    if head < n_q_heads:
        _project_head(x_src, wq_ptr, bq_ptr, q_ptr, row0, n_tokens, row_x, batch_idx, tokens, token_mask, head,
                      n_q_heads,
                      stride_xk, stride_wqn, stride_wqk, stride_bq, stride_qb, stride_qs, stride_qh, stride_qd,
                      turns_ptr, pos_ptr, cu_seqlens_ptr, pos_offset, n_seqs, stride_pb, stride_ps,
                      True, HIDDEN, HEAD_DIM, ROTARY_HALF, BLOCK_M, BLOCK_P, BLOCK_K, POS_MODE, IS_VARLEN,
                      SEARCH_STEPS, INTERLEAVED, HAS_BIAS, DOT_FP32, INPUT_PRECISION, HALVES_IN_ORDER, USE_DESC)
    elif head < n_q_heads + n_kv_heads:
        _project_head(x_src, wk_ptr, bk_ptr, k_ptr, row0, n_tokens, row_x, batch_idx, tokens, token_mask,
                      head - n_q_heads, n_kv_heads,
                      stride_xk, stride_wkn, stride_wkk, stride_bk, stride_kb, stride_ks, stride_kh,
                      stride_kd, turns_ptr, pos_ptr, cu_seqlens_ptr, pos_offset, n_seqs, stride_pb, stride_ps,
                      True, HIDDEN, HEAD_DIM, ROTARY_HALF, BLOCK_M, BLOCK_P, BLOCK_K, POS_MODE, IS_VARLEN,
                      SEARCH_STEPS, INTERLEAVED, HAS_BIAS, DOT_FP32, INPUT_PRECISION, HALVES_IN_ORDER, USE_DESC)
    elif HAS_V:
        _project_head(x_src, wv_ptr, bv_ptr, v_ptr, row0, n_tokens, row_x, batch_idx, tokens, token_mask,
                      head - n_q_heads - n_kv_heads, n_kv_heads, stride_xk, stride_wvn, stride_wvk, stride_bv,
                      stride_vb, stride_vs, stride_vh, stride_vd,
                      turns_ptr, pos_ptr, cu_seqlens_ptr, pos_offset, n_seqs, stride_pb, stride_ps,
                      False, HIDDEN, HEAD_DIM, ROTARY_HALF, BLOCK_M, BLOCK_P, BLOCK_K, POS_MODE, IS_VARLEN,
                      SEARCH_STEPS, INTERLEAVED, HAS_BIAS, DOT_FP32, INPUT_PRECISION, HALVES_IN_ORDER, USE_DESC)


def _split_heads(weights, biases, num_heads, num_kv_heads, head_dim):
    """(wq, wk, wv or None) and (bq, bk, bv) or Nones, as views, from the fused or the separate form."""
    if len(weights) == 1:
        q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
        sizes = [q_rows, kv_rows, kv_rows]
        split_weights = list(weights[0].split(sizes))
        split_biases = list(biases[0].split(sizes)) if biases else [None] * 3
    else:
        split_weights = list(weights) + [None] * (3 - len(weights))
        split_biases = list(biases) + [None] * (3 - len(biases)) if biases else [None] * 3
    return split_weights, split_biases


def _input_precision(dtype):
    """fp32 GEMMs use tf32 exactly when ``torch.matmul`` would (``torch.set_float32_matmul_precision``); None
    (Triton's default) for 16-bit operands, where it does not apply."""
    if dtype != torch.float32:
        return None
    return "tf32" if not _interpreting() and torch.get_float32_matmul_precision() != "highest" else "ieee"


def _use_descriptors(x3, weights, outs):
    """USE_DESC of the GEMM: tensor descriptors (TMA on sm_90 and later; under the interpreter, so that the tests
    run the same loads) when every operand is TMA-addressable, the rules attention's views follow (16-byte aligned
    base, strides multiples of 16 bytes, last dimension contiguous), and x's batch rows follow each other (one
    (tokens, hidden) matrix); masked pointer loads and stores otherwise, before sm_90, and for the fp32 FMA loop
    (no tf32: its operands go to registers, and with TMA tiles its 64-token configs spilled 1320 bytes on sm_90)."""
    if not hasattr(tl, "make_tensor_descriptor"):  # Triton before 3.4
        return False
    if not _interpreting() and (attention._device_arch(x3.device) < 90 or _input_precision(x3.dtype) == "ieee"):
        return False
    batch, seq_len, _ = x3.shape
    flat = batch == 1 or x3.stride(0) == seq_len * x3.stride(1)
    tensors = [x3, *weights, *outs]
    return flat and all(attention._descriptor_alignment(t, t.stride()) for t in tensors)


def _launch_forward(x3, weights, biases, outs, head_dim, rope):
    """Launch the fused kernel: x3 (batch, seq, hidden); outs (batch, seq, heads, head_dim) q, k and maybe v, q and k
    rotated by ``rope``."""
    turns = rope.signed_turns(x3.device)
    rotary_dim, interleaved, spec = rope.rotary_dim, rope.interleaved, rope.positions
    batch, seq_len, hidden = x3.shape
    n_tokens = batch * seq_len
    (wq, wk, wv), (bq, bk, bv) = weights, biases
    q4, k4 = outs[0], outs[1]
    has_v = wv is not None
    v4 = outs[2] if has_v else q4
    n_q_heads, n_kv_heads = q4.shape[2], k4.shape[2]
    if n_tokens == 0:
        return
    n_heads = n_q_heads + n_kv_heads + (n_kv_heads if has_v else 0)
    ids, stride_pb, stride_ps = position_pointer_and_strides(spec, turns)
    n_seqs, search_steps = varlen_search(spec.cu_seqlens)
    has_bias = bq is not None
    # Placeholders for the pointers a specialization never reads.
    wv, bq, bk, bv = (wv if has_v else wq), (bq if has_bias else wq), (bk if has_bias else wq), \
        (bv if has_bias and has_v else wq)
    stride_b = [b.stride(0) if has_bias else 0 for b in (bq, bk, bv)]
    # tl.dot needs every block dimension ≥ 16.
    block_pairs = max(16, triton.next_power_of_2(head_dim // 2))

    halves_in_order = not interleaved and rotary_dim == head_dim and head_dim == 2 * block_pairs
    use_desc = _use_descriptors(x3, [wq, wk] + ([wv] if has_v else []), [q4, k4] + ([v4] if has_v else []))
    if use_desc and not _interpreting():
        _ensure_scratch_allocator()

    def grid(meta):
        return (triton.cdiv(n_tokens, meta["BLOCK_M"]) * n_heads,)

    _qkv_rotary_kernel[grid](
        x3, wq, wk, wv, bq, bk, bv, q4, k4, v4, turns, ids, spec.cu_seqlens if spec.cu_seqlens is not None else turns,
        spec.offset, n_seqs, n_tokens, seq_len, n_q_heads, n_kv_heads, n_heads, triton.next_power_of_2(n_tokens),
        *x3.stride(), *wq.stride(), *wk.stride(), *wv.stride(), *stride_b,
        *q4.stride(), *k4.stride(), *v4.stride(), stride_pb, stride_ps,
        HIDDEN=hidden, HEAD_DIM=head_dim, ROTARY_HALF=rotary_dim // 2, BLOCK_P=block_pairs,
        POS_MODE=spec.mode, IS_VARLEN=spec.cu_seqlens is not None, SEARCH_STEPS=search_steps,
        INTERLEAVED=interleaved, HAS_BIAS=has_bias, HAS_V=has_v, DOT_FP32=_interpreting(),
        INPUT_PRECISION=_input_precision(x3.dtype), HALVES_IN_ORDER=halves_in_order, USE_DESC=use_desc,
    )


# The forward launcher of each backend, all with _launch_forward's arguments; its keys are the backends this op has
# (no CUDA-extension kernel), which _backend.resolve_backend reads.
LAUNCHERS = {"triton": _launch_forward, "torch": _torch_backend.qkv_proj}


@dataclasses.dataclass(frozen=True)
class Heads:
    """How the projection's rows split into heads: q heads, k (and v) heads, features per head."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def _output_shapes(x, weights, heads):
    """Shapes of q, k (and v when the weights include it): x's leading dims, then (heads, head_dim)."""
    lead = tuple(x.shape[:-1])
    shapes = [(*lead, heads.num_heads, heads.head_dim), (*lead, heads.num_kv_heads, heads.head_dim)]
    if len(weights) != 2:
        shapes.append((*lead, heads.num_kv_heads, heads.head_dim))
    return shapes


def _as_bshd(t):
    """(batch, seq, ...) view of a dense tensor, or a batch of one for packed (tokens, ...) input."""
    return t if t.dim() == 4 else t.unsqueeze(0)


@record_op("qkv_proj_rotary")
def qkv_proj_forward(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], rope: Rope,
                     heads: Heads, backend: str) -> list[torch.Tensor]:
    """Projection and rotation on validated arguments; returns [q, k] or [q, k, v] (new tensors).

    ``weights`` is ``[fused]``, ``[wq, wk]`` or ``[wq, wk, wv]``; ``biases`` is empty or matches it. ``backend``
    is a resolved one, "triton" or "torch".
    """
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    v.check_values(rope.positions.ids, rope.positions.cu_seqlens, None, x3.shape[1])
    outs = [x.new_empty(shape) for shape in _output_shapes(x, weights, heads)]
    split_weights, split_biases = _split_heads(weights, biases, heads.num_heads, heads.num_kv_heads, heads.head_dim)
    LAUNCHERS[backend](x3, split_weights, split_biases, [_as_bshd(out) for out in outs], heads.head_dim, rope)
    return outs


@qkv_proj_forward.register_fake
def _qkv_proj_forward_fake(x, weights, biases, rope, heads, backend):
    return [x.new_empty(shape) for shape in _output_shapes(x, weights, heads)]


@record_op("qkv_proj_rotary_backward")
def qkv_proj_backward(grads: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor], rope: Rope,
                      heads: Heads, need_x_grad: bool, need_weight_grad: bool, need_bias_grad: bool,
                      backend: str) -> list[torch.Tensor]:
    """Gradients of :func:`qkv_proj_forward` from the gradients of its outputs (any strides, stride 0 included).

    Returns ``[dx]`` if ``need_x_grad``, then one gradient per weight if ``need_weight_grad``, then one per bias if
    ``need_bias_grad``, each in the shape of its input.
    """
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    n_tokens, hidden = x3.shape[0] * x3.shape[1], x3.shape[2]
    q_rows, kv_rows = heads.num_heads * heads.head_dim, heads.num_kv_heads * heads.head_dim
    rows = [q_rows, kv_rows] + ([kv_rows] if len(grads) == 3 else [])
    # dy: the gradient of x @ weight.T + bias, i.e. dq and dk rotated back by -angle, and dv as it is.
    grad_rows = x.new_empty(n_tokens, sum(rows))
    parts = [part.view(*x3.shape[:2], part_rows // heads.head_dim, heads.head_dim)
             for part, part_rows in zip(grad_rows.split(rows, dim=1), rows, strict=True)]
    ROTARY_LAUNCHERS[backend](_as_bshd(grads[0]), _as_bshd(grads[1]), parts[0], parts[1], rope.reversed())
    if len(grads) == 3:
        parts[2].copy_(_as_bshd(grads[2]))
    # One block for a fused weight, one per weight otherwise (views of grad_rows, no copies).
    blocks = [grad_rows] if len(weights) == 1 else grad_rows.split(rows, dim=1)
    out = []
    if need_x_grad:
        grad_x = blocks[0] @ weights[0]
        for block, weight in zip(blocks[1:], weights[1:], strict=True):
            grad_x.addmm_(block, weight)
        out.append(grad_x.view(x.shape))
    if need_weight_grad:
        x2 = x3.reshape(n_tokens, hidden)
        out += [block.t() @ x2 for block in blocks]
    if need_bias_grad:
        out += [block.sum(0, dtype=torch.float32).to(x.dtype) for block in blocks]
    return out


@qkv_proj_backward.register_fake
def _qkv_proj_backward_fake(grads, x, weights, rope, heads, need_x_grad, need_weight_grad, need_bias_grad,
                            backend):
    out = [torch.empty_like(x)] if need_x_grad else []
    if need_weight_grad:
        out += [torch.empty_like(weight) for weight in weights]
    if need_bias_grad:
        out += [weight.new_empty(weight.shape[0]) for weight in weights]
    return out


class QKVProjRotaryFunction(torch.autograd.Function):
    """Autograd for the fused projection: up to three weights and three biases (None where absent)."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, weight_c, bias_a, bias_b, bias_c, rope, heads, backend):
        weights = [w for w in (weight_a, weight_b, weight_c) if w is not None]
        biases = [b for b in (bias_a, bias_b, bias_c) if b is not None]
        outs = qkv_proj_forward(x, weights, biases, rope, heads, backend)
        ctx.save_for_backward(*rope.tensors(), x, *weights)
        ctx.options = (rope, heads, backend)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        rope, heads, backend = ctx.options
        x, *weights = ctx.saved_tensors[len(rope.tensors()):]  # after the rope's tensors (Rope.tensors)
        needs = ctx.needs_input_grad
        need_x, need_weight, need_bias = needs[0], any(needs[1:4]), any(needs[4:7])
        computed = iter(qkv_proj_backward(list(grads), x, weights, rope, heads, need_x, need_weight, need_bias,
                                          backend))
        grad_x = next(computed) if need_x else None
        padding = [None] * (3 - len(weights))
        grad_weights = [next(computed) for _ in weights] + padding if need_weight else [None] * 3
        grad_biases = [next(computed) for _ in weights] + padding if need_bias else [None] * 3
        return grad_x, *grad_weights, *grad_biases, None, None, None


def _check_int(value, name, minimum):
    if not v._is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")


def _check_param(tensor, name, shape, x):
    """A weight or bias: a tensor of ``shape`` with x's dtype and device."""
    v.check_tensors(((name, tensor),))
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    v.check_tensors((("x", x), (name, tensor)))


def _check_projection(x, weight, bias, num_heads, num_kv_heads, head_dim):
    """Check x, weight and bias; returns the lists of weights and biases (fused: one of each)."""
    v.check_tensors((("x", x),))
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape (batch, seq, hidden), or (tokens, hidden) with cu_seqlens, got "
                         f"{tuple(x.shape)}")
    _check_int(num_heads, "num_heads", 1)
    _check_int(num_kv_heads, "num_kv_heads", 1)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}): each kv head "
                         "serves a whole group of query heads")
    _check_int(head_dim, "head_dim", 2)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    hidden = x.shape[-1]
    q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
    if isinstance(weight, torch.Tensor):
        rows = q_rows + 2 * kv_rows
        if weight.dim() == 2 and weight.shape[0] != rows:
            raise ValueError(f"weight has {weight.shape[0]} rows but (num_heads + 2·num_kv_heads)·head_dim = "
                             f"({num_heads} + 2·{num_kv_heads})·{head_dim} = {rows}: check the head counts")
        _check_param(weight, "weight", (rows, hidden), x)
        weights = [weight]
        if bias is not None:
            _check_param(bias, "bias", (rows,), x)
        biases = [] if bias is None else [bias]
        return weights, biases
    if not isinstance(weight, (tuple, list)) or len(weight) not in (2, 3):
        raise TypeError("weight must be a tensor (q, k and v rows concatenated) or a tuple (q_weight, k_weight) or "
                        f"(q_weight, k_weight, v_weight), got {type(weight).__name__}")
    names = ("weight[0] (q)", "weight[1] (k)", "weight[2] (v)")
    row_counts = (q_rows, kv_rows, kv_rows)
    for tensor, name, rows in zip(weight, names, row_counts, strict=False):
        _check_param(tensor, name, (rows, hidden), x)
    if bias is None:
        return list(weight), []
    if not isinstance(bias, (tuple, list)) or len(bias) != len(weight):
        raise TypeError(f"with a tuple of {len(weight)} weights, bias must be None or a tuple of {len(weight)} "
                        f"tensors, got {type(bias).__name__}")
    for tensor, name, rows in zip(bias, ("bias[0] (q)", "bias[1] (k)", "bias[2] (v)"), row_counts, strict=False):
        _check_param(tensor, name, (rows,), x)
    return list(weight), list(bias)


def qkv_proj_rotary(x, weight, bias=None, *, num_heads, num_kv_heads, head_dim, positions=None, scaling_factor=1.0,
                    base=10000.0, inv_freq=None, rotary_dim=None, interleaved=False, cu_seqlens=None, backend="auto"):
    """Project x to q, k and v in one GEMM and rotate q and k with interpolated RoPE in its epilogue.

    Equivalent to ``y = x @ weight.T + bias``, split into q, k and v heads, then
    ``rotary_interp(q, k, positions, ...)``, with the same positions forms, options and precision; q and k are
    written once, already rotated.

    Parameters
    ----------
    x : Tensor
        (batch, seq, hidden), or packed (total_tokens, hidden) with ``cu_seqlens``. float16, bfloat16 or float32,
        any strides.
    weight : Tensor or tuple of Tensors
        ((num_heads + 2·num_kv_heads)·head_dim, hidden) in ``nn.Linear`` layout, i.e.
        ``torch.cat([q_proj.weight, k_proj.weight, v_proj.weight])``; or the separate weights, never copied:
        ``(q_weight, k_weight, v_weight)``, or ``(q_weight, k_weight)`` to compute q and k only. x's dtype and device.
    bias : Tensor or tuple of Tensors, optional
        ((num_heads + 2·num_kv_heads)·head_dim,) for a fused weight, a tuple of the same length as a tuple weight.
        Added before the rotation, as in the model.
    num_heads, num_kv_heads, head_dim : int
        Query heads, key/value heads (GQA/MQA: fewer) and the head dimension (even).
    positions : None, int or integer Tensor, optional
        As in :func:`rotary_interp`: None: 0..seq-1; an int or (batch,) tensor: offsets; (seq,) or (batch or 1, seq):
        ids. For packed x: None, an int or (n_seqs,) offsets within each sequence, or (total_tokens,) ids.
    scaling_factor, base, inv_freq, rotary_dim, interleaved
        As in :func:`rotary_interp`.
    cu_seqlens : Tensor, optional
        (n_seqs + 1,) int32/int64 cumulative sequence lengths of packed x; required with 2-D x, invalid with 3-D x.
    backend : str
        ``"auto"`` (Triton for GPU inputs; for CPU inputs ``"torch"``, or Triton's interpreter when
        ``TRITON_INTERPRET=1``), ``"triton"`` or ``"torch"`` (``torch.nn.functional.linear``, then the rotation).

    Returns
    -------
    tuple of Tensors
        ``(q, k, v)``, or ``(q, k)`` for a two-weight tuple: q (batch, seq, num_heads, head_dim), k and v
        (batch, seq, num_kv_heads, head_dim), contiguous, in x's dtype; (total_tokens, heads, head_dim) for packed x.

    Examples
    --------
    >>> attn = model.model.layers[0].self_attn
    >>> weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    >>> q, k, v = pi_kernels.qkv_proj_rotary(hidden_states, weight, num_heads=32, num_kv_heads=8, head_dim=128,
    ...                                      positions=position_ids, scaling_factor=4.0, base=500000.0)
    >>> q, k = pi_kernels.qkv_proj_rotary(hidden_states, (attn.q_proj.weight, attn.k_proj.weight), num_heads=32,
    ...                                   num_kv_heads=8, head_dim=128, scaling_factor=4.0)
    """
    weights, biases = _check_projection(x, weight, bias, num_heads, num_kv_heads, head_dim)
    if x.dim() == 2:
        if cu_seqlens is None:
            raise ValueError("x of shape (tokens, hidden) is packed input and requires cu_seqlens; pass x[None] for "
                             "a single sequence")
        spec = v.resolve_varlen_positions(positions, cu_seqlens, None, x.shape[0], x.device)
    else:
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is only valid with packed x of shape (tokens, hidden), got x of shape "
                             f"{tuple(x.shape)}")
        spec = v.resolve_positions(positions, x.shape[0], x.shape[1], x.device)
    backend = _backend.resolve_backend(backend, x.device, LAUNCHERS)
    padding = [None] * (3 - len(weights))
    bias_args = biases + [None] * (3 - len(biases))
    rope = Rope.resolve(spec, head_dim, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                        rotary_dim=rotary_dim, interleaved=interleaved)
    return QKVProjRotaryFunction.apply(x, *weights, *padding, *bias_args, rope,
                                       Heads(num_heads, num_kv_heads, head_dim), backend)


class QKVProjRotary(torch.nn.Module):
    """The q/k/v projection of an attention layer with interpolated RoPE fused into it; owns the fused weight.

    Parameters
    ----------
    hidden_size, num_heads, num_kv_heads, head_dim : int
        ``weight`` is ((num_heads + 2·num_kv_heads)·head_dim, hidden_size).
    bias : bool
        Whether the projection has a bias (Qwen2 does, Llama does not).
    rotary_dim, base, scaling_factor, inv_freq, interleaved
        As in :func:`qkv_proj_rotary`. ``inv_freq`` is kept in float64 and is not a buffer, so ``.to(bfloat16)``
        does not round it (a bf16 frequency table is off by ~0.4%, radians at long positions); it is copied to the
        input's device once per device.
    device, dtype : optional
        Of the parameters, as in ``nn.Linear``.

    Examples
    --------
    >>> proj = QKVProjRotary.from_hf_attention(model.model.layers[0].self_attn)
    >>> q, k, v = proj(hidden_states, position_ids)
    """

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, *, bias=False, rotary_dim=None,
                 base=10000.0, scaling_factor=1.0, inv_freq=None, interleaved=False, device=None, dtype=None):
        super().__init__()
        _check_int(hidden_size, "hidden_size", 1)
        _check_int(num_heads, "num_heads", 1)
        _check_int(num_kv_heads, "num_kv_heads", 1)
        _check_int(head_dim, "head_dim", 2)
        self.rotary_dim = v.check_rotary_dim(rotary_dim, head_dim)
        v.check_frequencies(scaling_factor, base, inv_freq, self.rotary_dim)
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, \
            head_dim
        self.base = float(base)
        self.scaling_factor = float(scaling_factor)
        self.interleaved = bool(interleaved)
        # nn.Linear's parameters and initialization, with the three projections' rows stacked.
        linear = torch.nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, device=device,
                                 dtype=dtype)
        self.weight = linear.weight
        self.bias = linear.bias
        self.inv_freq = None if inv_freq is None else inv_freq.detach().to(dtype=torch.float64)
        self._inv_freq_by_device = {}

    @classmethod
    def from_linear(cls, q_proj, k_proj, v_proj, *, num_heads, num_kv_heads, head_dim, **rope_options):
        """Build from three ``nn.Linear`` projections (their weights are copied once into the fused weight).

        ``rope_options`` are the keyword arguments of the constructor from ``rotary_dim`` on.
        """
        has_bias = q_proj.bias is not None
        if (k_proj.bias is not None) != has_bias or (v_proj.bias is not None) != has_bias:
            raise ValueError("q_proj, k_proj and v_proj must all have a bias or all have none")
        hidden = q_proj.weight.shape[1]
        for name, proj, heads in (("q_proj", q_proj, num_heads), ("k_proj", k_proj, num_kv_heads),
                                  ("v_proj", v_proj, num_kv_heads)):
            if tuple(proj.weight.shape) != (heads * head_dim, hidden):
                raise ValueError(f"{name}.weight must have shape ({heads}·{head_dim}, {hidden}) for these head "
                                 f"counts, got {tuple(proj.weight.shape)}")
        module = cls(hidden, num_heads, num_kv_heads, head_dim, bias=has_bias, device=q_proj.weight.device,
                     dtype=q_proj.weight.dtype, **rope_options)
        with torch.no_grad():
            module.weight.copy_(torch.cat([q_proj.weight, k_proj.weight, v_proj.weight]))
            if has_bias:
                module.bias.copy_(torch.cat([q_proj.bias, k_proj.bias, v_proj.bias]))
        return module

    @classmethod
    def from_hf_attention(cls, attention, config=None, *, interleaved=False):
        """Build from a Hugging Face attention layer (``q_proj``, ``k_proj``, ``v_proj`` and its config).

        Head counts come from the config (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``); the
        frequencies from its rope settings through :func:`pi_kernels.scaling.rope_frequencies_from_config`, so PI
        (``rope_type="linear"``) arrives as already-divided ``inv_freq``. Schemes that scale cos and sin (YaRN,
        LongRoPE: ``attention_factor != 1``) are refused: the kernel does not apply that factor.
        """
        from ..scaling import rope_frequencies_from_config

        config = attention.config if config is None else config

        def get(key):
            return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

        num_heads = get("num_attention_heads")
        num_kv_heads = get("num_key_value_heads") or num_heads
        head_dim = get("head_dim") or get("hidden_size") // num_heads
        frequencies = rope_frequencies_from_config(config, device=attention.q_proj.weight.device)
        if frequencies.attention_factor != 1.0:
            raise ValueError(f"this config's rope scheme scales cos/sin by attention_factor="
                             f"{frequencies.attention_factor}, which qkv_proj_rotary does not apply")
        return cls.from_linear(attention.q_proj, attention.k_proj, attention.v_proj, num_heads=num_heads,
                               num_kv_heads=num_kv_heads, head_dim=head_dim,
                               rotary_dim=2 * frequencies.inv_freq.shape[0], inv_freq=frequencies.inv_freq,
                               interleaved=interleaved)

    def forward(self, x, positions=None, *, cu_seqlens=None):
        """(q, k, v) of x; see :func:`qkv_proj_rotary` for shapes."""
        inv_freq = None
        if self.inv_freq is not None:
            inv_freq = self._inv_freq_by_device.get(x.device)
            if inv_freq is None:
                inv_freq = self._inv_freq_by_device.setdefault(x.device, self.inv_freq.to(x.device))
        return qkv_proj_rotary(x, self.weight, self.bias, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                               head_dim=self.head_dim, positions=positions, scaling_factor=self.scaling_factor,
                               base=self.base, inv_freq=inv_freq, rotary_dim=self.rotary_dim,
                               interleaved=self.interleaved, cu_seqlens=cu_seqlens)

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, bias={self.bias is not None}, rotary_dim={self.rotary_dim}, "
                f"base={self.base}, scaling_factor={self.scaling_factor}, interleaved={self.interleaved}")
