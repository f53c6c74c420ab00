"""Triton kernels of the attention core: FlashAttention-2 on already-rotated q and k (see ``attention.py``).

Forward: one program per (query block, sequence, head) runs the online softmax over the key blocks and saves the
log-sum-exp. Backward: a delta pass (rowsum(out · dout)); one program per (key block, sequence, KV head) for dk and
dv, walking the queries of every query head of its group, so dk/dv are summed without atomics; one program per
(query block, sequence, head) for dq. Probabilities are recomputed from the lse; nothing of size seq_q × seq_k is
stored. No kernel here knows about RoPE: the inner loops are the plain flash-attention loops.

Tiles are (rows, BLOCK_D) with BLOCK_D the head_dim rounded up to a power of two; the features past head_dim load
as zeros. Row blocks are split between warpgroups by the compiler (wgmma is 64 rows per warpgroup on sm_90), so a
tile of 64 · num_warps / 4 rows gives each warpgroup its own rows.
"""

import triton
import triton.language as tl

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
def _query_block_program(n_q_blocks, n_heads, CAUSAL: tl.constexpr):
    """(query block, sequence, head) of this program in a grid of (n_q_blocks · sequences · heads,).

    Causal grids run the longest rows first: better balance of the tail of the grid.
    """
    pid = tl.program_id(0)
    block = pid % n_q_blocks
    if CAUSAL:
        block = n_q_blocks - 1 - block
    return block, (pid // n_q_blocks) // n_heads, (pid // n_q_blocks) % n_heads


@triton.jit
def _load_block(x_ptr, n_rows, stride_s, stride_d, row0, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Rows row0 .. row0 + ROWS - 1 of the (n_rows, HEAD_DIM) matrix at x_ptr (one head of one sequence), (ROWS,
    BLOCK_D) in its dtype; zero past the matrix. MASK_ROWS False: the rows are known to be inside it.

    A block pointer keeps only scalars live between loads (no per-row offsets held in registers across a loop)."""
    block = tl.make_block_ptr(x_ptr, (n_rows, HEAD_DIM), (stride_s, stride_d), (row0, 0), (ROWS, BLOCK_D), (1, 0))
    if MASK_ROWS:
        return tl.load(block, boundary_check=(0, 1), padding_option="zero")
    elif HEAD_DIM == BLOCK_D:
        return tl.load(block)
    else:
        return tl.load(block, boundary_check=(1,), padding_option="zero")


@triton.jit
def _store_block(x_ptr, n_rows, stride_s, stride_d, row0, x, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Write float32 rows row0.. of a (n_rows, HEAD_DIM) matrix at x_ptr in its dtype, clipped to the matrix."""
    block = tl.make_block_ptr(x_ptr, (n_rows, HEAD_DIM), (stride_s, stride_d), (row0, 0), (ROWS, BLOCK_D), (1, 0))
    tl.store(block, x.to(x_ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _forward_block(acc, m_i, l_i, q, rows, n0, len_k, diff, qk_scale, k_head, v_head,
                   stride_ks, stride_kd, stride_vs, stride_vd,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, MASK: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One key block of the online softmax: returns the updated (acc, m_i, l_i); scores are in log2 units."""
    k = _load_block(k_head, len_k, stride_ks, stride_kd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, MASK)
    qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)))
    if MASK:
        cols = n0 + tl.arange(0, BLOCK_N)
        visible = (cols < len_k)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diff)
        qk = tl.where(visible, qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps its p and alpha at 0.
    m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_block(v_head, len_k, stride_vs, stride_vd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, MASK)
    acc = tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None])
    return acc, m_ij, l_i


@triton.jit
def _causal_key_bounds(m0, len_k, diff, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_hi, hi) of a query block at m0: keys below full_hi are visible to every row (no mask); keys in
    [full_hi, hi) need the mask; keys from hi on are visible to none."""
    if CAUSAL:
        hi = tl.maximum(tl.minimum(len_k, m0 + BLOCK_M + diff), 0)
        full_hi = tl.maximum(tl.minimum(len_k, m0 + diff + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = len_k
        full_hi = len_k // BLOCK_N * BLOCK_N
    return full_hi, hi


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr,  # (n_seqs + 1,) cumulative lengths, read when IS_VARLEN
    seq_q, seq_k,                   # dense sequence lengths (ignored when IS_VARLEN)
    n_q_blocks, n_heads, group_size,  # query blocks per sequence; heads; query heads per KV head
    qk_scale,                       # softmax_scale · log2(e): scores in log2 units, for exp2
    stride_qb, stride_qs, stride_qh, stride_qd,  # element strides, (batch, token, head, dim); batch 0 if packed
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh,           # lse (batch, head, token) float32, token stride 1
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    INTERPRET: tl.constexpr,        # Triton's interpreter runs the kernel (see _loop_bound)
    DOT_DTYPE: tl.constexpr,        # dot operand type: the input's; float32 under the interpreter (16-bit dots break)
):
    # Grid: (n_q_blocks · sequences · heads,). One program owns BLOCK_M queries of one head and walks the keys.
    block, seq_idx, head = _query_block_program(n_q_blocks, n_heads, CAUSAL)
    q_start, len_q, k_start, len_k = _sequence_bounds(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seq_idx, seq_q, seq_k,
                                                      IS_VARLEN)
    m0 = block * BLOCK_M
    if m0 >= len_q:
        return
    diff = len_k - len_q  # bottom-right alignment: query i sees keys j <= i + diff
    seq64 = seq_idx.to(tl.int64)
    head64 = head.to(tl.int64)
    kv_head = (head // group_size).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    q = _load_block(q_ptr + seq64 * stride_qb + q_start * stride_qs + head64 * stride_qh, len_q, stride_qs,
                    stride_qd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True).to(DOT_DTYPE)

    full_hi, hi = _causal_key_bounds(m0, len_k, diff, BLOCK_M, BLOCK_N, CAUSAL)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_head = k_ptr + seq64 * stride_kb + k_start * stride_ks + kv_head * stride_kh
    v_head = v_ptr + seq64 * stride_vb + k_start * stride_vs + kv_head * stride_vh
    for n0 in range(0, _loop_bound(full_hi, INTERPRET), BLOCK_N):
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, rows, n0, len_k, diff, qk_scale, k_head, v_head,
                                       stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL,
                                       False, DOT_DTYPE)
    for n0 in range(_loop_bound(full_hi, INTERPRET), _loop_bound(hi, INTERPRET), BLOCK_N):
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, rows, n0, len_k, diff, qk_scale, k_head, v_head,
                                       stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL,
                                       True, DOT_DTYPE)

    # A query that sees no key (causal with seq_q > seq_k, or seq_k = 0) gets output 0 and lse -inf.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    _store_block(out_ptr + seq64 * stride_ob + q_start * stride_os + head64 * stride_oh, len_q, stride_os, stride_od,
                 m0, out, HEAD_DIM, BLOCK_M, BLOCK_D)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + seq64 * stride_lb + head64 * stride_lh + q_start + rows, lse, mask=rows < len_q)


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
    m0 = (pid % n_q_blocks) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    seq64 = seq_idx.to(tl.int64)
    out = _load_block(out_ptr + seq64 * stride_ob + q_start * stride_os + head * stride_oh, len_q, stride_os,
                      stride_od, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True)
    dout = _load_block(dout_ptr + seq64 * stride_db + q_start * stride_ds + head * stride_dh, len_q, stride_ds,
                       stride_dd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    tl.store(delta_ptr + seq64 * stride_lb + head * stride_lh + q_start + rows, delta, mask=rows < len_q)


@triton.jit
def _load_softmax_stats(lse_ptr, delta_ptr, rows, len_q):
    """(lse in log2 units, delta) of the queries ``rows`` of one head and sequence; lse +inf for padding and for
    queries that see no key, so their recomputed probabilities are exactly 0."""
    row_mask = rows < len_q
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_block(dk, dv, k, v, cols, m0, len_q, diff, qk_scale, q_head, dout_head, lse_head, delta_head,
                stride_qs, stride_qd, stride_ds, stride_dd,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Add one query block's contribution to a key block's dk and/or dv, on transposed scores (keys, queries).

    Rows past the last query load as zeros and get lse +inf, hence p = 0. CAUSAL_MASK: some of the block's queries
    see only part of the key block."""
    rows = m0 + tl.arange(0, BLOCK_M)
    q = _load_block(q_head, len_q, stride_qs, stride_qd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True).to(DOT_DTYPE)
    dout = _load_block(dout_head, len_q, stride_ds, stride_dd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True)
    lse2, delta = _load_softmax_stats(lse_head, delta_head, rows, len_q)
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
    if CAUSAL_MASK:
        p_t = tl.where(cols[:, None] <= rows[None, :] + diff, p_t, 0.0)
    if COMPUTE_DV:
        dv = tl.dot(p_t.to(dout.dtype).to(DOT_DTYPE), dout.to(DOT_DTYPE), dv)
    if COMPUTE_DK:
        dp_t = tl.dot(v, tl.trans(dout.to(DOT_DTYPE)))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_head.dtype.element_ty).to(DOT_DTYPE)
        dk = tl.dot(ds_t, q, dk)
    return dk, dv


@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr,
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
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,  # which of dk and dv this launch computes (see _blocks)
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
    seq64 = seq_idx.to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    k = _load_block(k_ptr + seq64 * stride_kb + k_start * stride_ks + kv_head * stride_kh, len_k, stride_ks,
                    stride_kd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, True).to(DOT_DTYPE)
    v = _load_block(v_ptr + seq64 * stride_vb + k_start * stride_vs + kv_head * stride_vh, len_k, stride_vs,
                    stride_vd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, True).to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Queries before lo see none of this key block. One loop, masked throughout when causal: a second loop for the
    # blocks past the diagonal would hold a second set of prefetched tiles and spill.
    lo = tl.minimum(tl.maximum(n0 - diff, 0), len_q) // BLOCK_M * BLOCK_M if CAUSAL else 0
    for g in range(0, _loop_bound(group_size, INTERPRET)):
        head = kv_head * group_size + g
        q_head = q_ptr + seq64 * stride_qb + q_start * stride_qs + head * stride_qh
        dout_head = dout_ptr + seq64 * stride_db + q_start * stride_ds + head * stride_dh
        lse_head = lse_ptr + seq64 * stride_lb + head * stride_lh + q_start
        delta_head = delta_ptr + seq64 * stride_lb + head * stride_lh + q_start
        for m0 in range(_loop_bound(lo, INTERPRET), _loop_bound(len_q, INTERPRET), BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, cols, m0, len_q, diff, qk_scale, q_head, dout_head, lse_head,
                                 delta_head, stride_qs, stride_qd, stride_ds, stride_dd, HEAD_DIM, BLOCK_M, BLOCK_D,
                                 CAUSAL, COMPUTE_DK, COMPUTE_DV, DOT_DTYPE)

    if COMPUTE_DK:
        _store_block(dk_ptr + seq64 * stride_dkb + k_start * stride_dks + kv_head * stride_dkh, len_k, stride_dks,
                     stride_dkd, n0, dk * softmax_scale, HEAD_DIM, BLOCK_N, BLOCK_D)
    if COMPUTE_DV:
        _store_block(dv_ptr + seq64 * stride_dvb + k_start * stride_dvs + kv_head * stride_dvh, len_k, stride_dvs,
                     stride_dvd, n0, dv, HEAD_DIM, BLOCK_N, BLOCK_D)


@triton.jit
def _dq_block(dq, q, dout, lse2, delta, rows, n0, len_k, diff, qk_scale, k_head, v_head,
              stride_ks, stride_kd, stride_vs, stride_vd,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              CAUSAL: tl.constexpr, MASK: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Add one key block's contribution to a query block's dq."""
    k = _load_block(k_head, len_k, stride_ks, stride_kd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, MASK).to(DOT_DTYPE)
    v = _load_block(v_head, len_k, stride_vs, stride_vd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, MASK).to(DOT_DTYPE)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    if MASK:
        cols = n0 + tl.arange(0, BLOCK_N)
        visible = (cols < len_k)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diff)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(dout, tl.trans(v))
    ds = (p * (dp - delta[:, None])).to(k_head.dtype.element_ty).to(DOT_DTYPE)
    return tl.dot(ds, k, dq)


@triton.jit
def _attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seq_q, seq_k,
    n_q_blocks, n_heads, group_size,
    qk_scale, softmax_scale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,      # dout
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_lb, stride_lh,                            # lse and delta
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    INTERPRET: tl.constexpr,        # Triton's interpreter runs the kernel (see _loop_bound)
    DOT_DTYPE: tl.constexpr,        # dot operand type: the input's; float32 under the interpreter (16-bit dots break)
):
    # Grid: (n_q_blocks · sequences · heads,). One program owns BLOCK_M queries of one head and walks the keys, as
    # the forward does.
    block, seq_idx, head = _query_block_program(n_q_blocks, n_heads, CAUSAL)
    q_start, len_q, k_start, len_k = _sequence_bounds(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seq_idx, seq_q, seq_k,
                                                      IS_VARLEN)
    m0 = block * BLOCK_M
    if m0 >= len_q:
        return
    diff = len_k - len_q
    seq64 = seq_idx.to(tl.int64)
    head64 = head.to(tl.int64)
    kv_head = (head // group_size).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    q = _load_block(q_ptr + seq64 * stride_qb + q_start * stride_qs + head64 * stride_qh, len_q, stride_qs,
                    stride_qd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True).to(DOT_DTYPE)
    dout = _load_block(dout_ptr + seq64 * stride_db + q_start * stride_ds + head64 * stride_dh, len_q, stride_ds,
                       stride_dd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True).to(DOT_DTYPE)
    stats = seq64 * stride_lb + head64 * stride_lh + q_start
    lse2, delta = _load_softmax_stats(lse_ptr + stats, delta_ptr + stats, rows, len_q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    full_hi, hi = _causal_key_bounds(m0, len_k, diff, BLOCK_M, BLOCK_N, CAUSAL)
    k_head = k_ptr + seq64 * stride_kb + k_start * stride_ks + kv_head * stride_kh
    v_head = v_ptr + seq64 * stride_vb + k_start * stride_vs + kv_head * stride_vh
    for n0 in range(0, _loop_bound(full_hi, INTERPRET), BLOCK_N):
        dq = _dq_block(dq, q, dout, lse2, delta, rows, n0, len_k, diff, qk_scale, k_head, v_head, stride_ks,
                       stride_kd, stride_vs, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, False, DOT_DTYPE)
    for n0 in range(_loop_bound(full_hi, INTERPRET), _loop_bound(hi, INTERPRET), BLOCK_N):
        dq = _dq_block(dq, q, dout, lse2, delta, rows, n0, len_k, diff, qk_scale, k_head, v_head, stride_ks,
                       stride_kd, stride_vs, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, True, DOT_DTYPE)

    _store_block(dq_ptr + seq64 * stride_dqb + q_start * stride_dqs + head64 * stride_dqh, len_q, stride_dqs,
                 stride_dqd, m0, dq * softmax_scale, HEAD_DIM, BLOCK_M, BLOCK_D)
