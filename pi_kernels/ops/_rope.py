"""RoPE pieces shared by every kernel that rotates: positions of a block of tokens, and accurate cos/sin.

How the angle is computed, and why
----------------------------------
The rotation of pair ``j`` at position ``m`` uses ``(m / scaling_factor) * inv_freq[j]``. Plain float32
``m * inv_freq`` has an absolute error of about ``ulp(angle)``: at m = 2**20 and scaling_factor 16 the angle reaches
65536 rad, whose float32 ulp is 0.004 rad, a relative output error of ~3e-4. Instead the host folds
``1 / (2π · scaling_factor)`` into a float64 table (``Rope.turns`` in ``_schema.py``), so the kernel gets the angle
in *turns*: ``t = m · inv_freq[j] / (2π s)`` in float64 (one multiply, exact to 1e-16 relative), drops the whole turns
(``t - trunc(t)``, exact, then into [-1/2, 1/2]), and multiplies the fraction by 2π split into a float32-exact high
part and a low part, still in float64. The reduced angle, in [-π, π], is rounded to float32 once and fed to float32
sin/cos, so the result keeps float32 accuracy (~1e-7) at any position below 2**32 (positions and offsets past
``_positions.MAX_POSITION`` = 2**31 - 1 are refused: further out the error would grow silently). The float64 work
is a handful of operations per (token, pair), amortized over every head a program rotates.
"""

import triton
import triton.language as tl

from .._angles import TWO_PI_HI, TWO_PI_LO

# The 2π split of _angles.py (shared with the torch backend) as constexprs a kernel may read.
_TWO_PI_HI = tl.constexpr(TWO_PI_HI)
_TWO_PI_LO = tl.constexpr(TWO_PI_LO)


@triton.jit
def program_tokens(n_token_blocks, seq_len, BLOCK_T: tl.constexpr):
    """(head group, int64 batch row, token indices, their mask) of this program in a (batch · token blocks, head
    groups) grid of BLOCK_T tokens per program: the grid of the rotary, rotary_embedding and cache-append kernels."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    batch_idx = (pid // n_token_blocks).to(tl.int64)
    tokens = (pid % n_token_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    return group, batch_idx, tokens, tokens < seq_len


@triton.jit
def token_positions(pos_ptr, cu_seqlens_ptr, batch_idx, tokens, token_mask, pos_offset, n_seqs, stride_pb,
                    stride_ps, POS_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """int64 positions of ``tokens`` (a block of token indices; of batch row ``batch_idx``, a scalar or a block).

    POS_MODE 0: arange + ``pos_offset``; 1: arange + offset per batch row (per sequence when IS_VARLEN); 2: ids.
    With IS_VARLEN, ``tokens`` index the packed tokens and the arange restarts at each sequence of ``cu_seqlens``.
    """
    tokens64 = tokens.to(tl.int64)
    if IS_VARLEN:
        # Sequence of each token: the largest s with cu_seqlens[s] <= token, by a vectorized binary search, so
        # grids stay linear in tokens whatever the sequence lengths.
        lo = tl.zeros_like(tokens)
        hi = tl.zeros_like(tokens) + n_seqs
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            active = (hi - lo) > 1
            start = tl.load(cu_seqlens_ptr + mid, mask=active & token_mask, other=0)
            go_right = active & (start <= tokens)
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(active & ~go_right, mid, hi)
        seq_idx = lo.to(tl.int64)
        local = tokens64 - tl.load(cu_seqlens_ptr + seq_idx, mask=token_mask, other=0).to(tl.int64)
        if POS_MODE == 0:
            pos = local + pos_offset
        elif POS_MODE == 1:
            pos = local + tl.load(pos_ptr + seq_idx * stride_pb, mask=token_mask, other=0).to(tl.int64)
        else:
            pos = tl.load(pos_ptr + tokens64 * stride_ps, mask=token_mask, other=0).to(tl.int64)
    else:
        if POS_MODE == 0:
            pos = tokens64 + pos_offset
        elif POS_MODE == 1:
            row = batch_idx * stride_pb + tokens64 * 0
            pos = tokens64 + tl.load(pos_ptr + row, mask=token_mask, other=0).to(tl.int64)
        else:
            pos = tl.load(pos_ptr + batch_idx * stride_pb + tokens64 * stride_ps, mask=token_mask, other=0)
            pos = pos.to(tl.int64)
    return pos


@triton.jit
def rope_cos_sin(pos, turns_ptr, ROTARY_HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, CONJUGATE: tl.constexpr):
    """float32 cos and sin, (len(pos), BLOCK_HALF), of the angles of int64 ``pos``; sin negated when CONJUGATE."""
    pairs = tl.arange(0, BLOCK_HALF)
    turns_per_pos = tl.load(turns_ptr + pairs, mask=pairs < ROTARY_HALF, other=0.0)
    turns = pos.to(tl.float64)[:, None] * turns_per_pos[None, :]
    turns = turns - turns.to(tl.int64).to(tl.float64)
    # Into [-1/2, 1/2] turns, i.e. [-π, π], where hardware sin/cos approximations are most accurate.
    turns = tl.where(turns > 0.5, turns - 1.0, tl.where(turns < -0.5, turns + 1.0, turns))
    angle = (turns * _TWO_PI_HI + turns * _TWO_PI_LO).to(tl.float32)
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if CONJUGATE:
        sin = -sin
    return cos, sin


def varlen_search(cu_seqlens):
    """(n_seqs, binary-search depth) for packed input; the depth is rounded up to a multiple of 4 so few kernel
    variants get compiled (extra steps are no-ops)."""
    if cu_seqlens is None:
        return 1, 0
    n_seqs = cu_seqlens.shape[0] - 1
    return n_seqs, 4 * triton.cdiv(max(1, n_seqs).bit_length(), 4)
