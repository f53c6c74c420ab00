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
def _rows(x_ptr, n_rows, stride_s, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
          USE_DESC: tl.constexpr):
    """The (n_rows, HEAD_DIM) matrix at x_ptr (one head of one sequence) as ``_load_block``/``_store_block`` read it:
    a tensor descriptor of (ROWS, BLOCK_D) tiles when USE_DESC (TMA on sm_90: the launcher has checked a 16-byte
    aligned base, 16-byte row strides and contiguous features), else the pointer itself.

    Made once per matrix, outside the loops: a descriptor made in the kernel is written to global scratch memory."""
    if USE_DESC:
        return tl.make_tensor_descriptor(x_ptr, [n_rows, HEAD_DIM], [stride_s, 1], [ROWS, BLOCK_D])
    else:
        return x_ptr


@triton.jit
def _load_block(rows_src, n_rows, stride_s, stride_d, row0, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr, USE_DESC: tl.constexpr):
    """Rows row0 .. row0 + ROWS - 1 of the (n_rows, HEAD_DIM) matrix ``rows_src`` (see ``_rows``), (ROWS, BLOCK_D)
    in its dtype; zero past the matrix. MASK_ROWS False: the rows are known to be inside it.

    A descriptor's load is one TMA copy into shared memory (zeros past the matrix come from the copy engine), with
    only scalars live between loads; the pointer path masks."""
    if USE_DESC:
        return rows_src.load([row0, 0])
    else:
        cols = tl.arange(0, BLOCK_D)
        offsets = tl.arange(0, ROWS)
        # Row offsets past row0 stay in int32 (at most ROWS · stride_s); row0's own offset is 64-bit.
        ptrs = rows_src + tl.cast(row0, tl.int64) * stride_s + offsets[:, None] * stride_s + cols[None, :] * stride_d
        if MASK_ROWS:
            return tl.load(ptrs, mask=((row0 + offsets) < n_rows)[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _store_block(rows_dst, n_rows, stride_s, stride_d, row0, x, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_D: tl.constexpr, USE_DESC: tl.constexpr):
    """Write float32 rows row0.. of the (n_rows, HEAD_DIM) matrix ``rows_dst`` (see ``_rows``) in its dtype, clipped
    to the matrix: never a row of another sequence of a packed batch."""
    if USE_DESC:
        rows_dst.store([row0, 0], x.to(rows_dst.dtype))
    else:
        cols = tl.arange(0, BLOCK_D)
        offsets = tl.arange(0, ROWS)
        ptrs = rows_dst + tl.cast(row0, tl.int64) * stride_s + offsets[:, None] * stride_s + cols[None, :] * stride_d
        tl.store(ptrs, x.to(rows_dst.dtype.element_ty),
                 mask=((row0 + offsets) < n_rows)[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _forward_block(acc, m_i, l_i, q, rows, n0, len_k, diff, qk_scale, k_rows, v_rows,
                   stride_ks, stride_kd, stride_vs, stride_vd,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, MASK: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_DESC: tl.constexpr):
    """One key block of the online softmax: returns the updated (acc, m_i, l_i); scores are in log2 units."""
    k = _load_block(k_rows, len_k, stride_ks, stride_kd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, MASK, USE_DESC)
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
    v = _load_block(v_rows, len_k, stride_vs, stride_vd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, MASK, USE_DESC)
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
    USE_DESC: tl.constexpr,         # q, k, v, out through tensor descriptors (TMA on sm_90; see _rows)
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
    q_rows = _rows(q_ptr + seq64 * stride_qb + q_start * stride_qs + head64 * stride_qh, len_q, stride_qs, HEAD_DIM,
                   BLOCK_M, BLOCK_D, USE_DESC)
    q = _load_block(q_rows, len_q, stride_qs, stride_qd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True, USE_DESC).to(DOT_DTYPE)

    full_hi, hi = _causal_key_bounds(m0, len_k, diff, BLOCK_M, BLOCK_N, CAUSAL)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_rows = _rows(k_ptr + seq64 * stride_kb + k_start * stride_ks + kv_head * stride_kh, len_k, stride_ks, HEAD_DIM,
                   BLOCK_N, BLOCK_D, USE_DESC)
    v_rows = _rows(v_ptr + seq64 * stride_vb + k_start * stride_vs + kv_head * stride_vh, len_k, stride_vs, HEAD_DIM,
                   BLOCK_N, BLOCK_D, USE_DESC)
    for n0 in range(0, _loop_bound(full_hi, INTERPRET), BLOCK_N):
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, rows, n0, len_k, diff, qk_scale, k_rows, v_rows,
                                       stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL,
                                       False, DOT_DTYPE, USE_DESC)
    for n0 in range(_loop_bound(full_hi, INTERPRET), _loop_bound(hi, INTERPRET), BLOCK_N):
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, rows, n0, len_k, diff, qk_scale, k_rows, v_rows,
                                       stride_ks, stride_kd, stride_vs, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL,
                                       True, DOT_DTYPE, USE_DESC)

    # A query that sees no key (causal with seq_q > seq_k, or seq_k = 0) gets output 0 and lse -inf.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out_rows = _rows(out_ptr + seq64 * stride_ob + q_start * stride_os + head64 * stride_oh, len_q, stride_os,
                     HEAD_DIM, BLOCK_M, BLOCK_D, USE_DESC)
    _store_block(out_rows, len_q, stride_os, stride_od, m0, out, HEAD_DIM, BLOCK_M, BLOCK_D, USE_DESC)
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
                      stride_od, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True, False)
    dout = _load_block(dout_ptr + seq64 * stride_db + q_start * stride_ds + head * stride_dh, len_q, stride_ds,
                       stride_dd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True, False)
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
def _dkdv_block(dk, dv, k, v, cols, m0, len_q, diff, qk_scale, q_rows, dout_rows, lse_head, delta_head,
                stride_qs, stride_qd, stride_ds, stride_dd,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_DESC: tl.constexpr):
    """Add one query block's contribution to a key block's dk and/or dv, on transposed scores (keys, queries).

    Rows past the last query load as zeros and get lse +inf, hence p = 0. CAUSAL_MASK: some of the block's queries
    see only part of the key block."""
    rows = m0 + tl.arange(0, BLOCK_M)
    q = _load_block(q_rows, len_q, stride_qs, stride_qd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True, USE_DESC).to(DOT_DTYPE)
    dout = _load_block(dout_rows, len_q, stride_ds, stride_dd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True, USE_DESC)
    lse2, delta = _load_softmax_stats(lse_head, delta_head, rows, len_q)
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
    if CAUSAL_MASK:
        p_t = tl.where(cols[:, None] <= rows[None, :] + diff, p_t, 0.0)
    if COMPUTE_DV:
        dv = tl.dot(p_t.to(dout.dtype).to(DOT_DTYPE), dout.to(DOT_DTYPE), dv)
    if COMPUTE_DK:
        dp_t = tl.dot(v, tl.trans(dout.to(DOT_DTYPE)))
        ds_t = (p_t * (dp_t - delta[None, :])).to(dout.dtype).to(DOT_DTYPE)
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
    USE_DESC: tl.constexpr,         # every q, k, v, dout, dk, dv tile through tensor descriptors (see _rows)
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
    k_rows = _rows(k_ptr + seq64 * stride_kb + k_start * stride_ks + kv_head * stride_kh, len_k, stride_ks, HEAD_DIM,
                   BLOCK_N, BLOCK_D, USE_DESC)
    v_rows = _rows(v_ptr + seq64 * stride_vb + k_start * stride_vs + kv_head * stride_vh, len_k, stride_vs, HEAD_DIM,
                   BLOCK_N, BLOCK_D, USE_DESC)
    k = _load_block(k_rows, len_k, stride_ks, stride_kd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, True, USE_DESC).to(DOT_DTYPE)
    v = _load_block(v_rows, len_k, stride_vs, stride_vd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, True, USE_DESC).to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Queries before lo see none of this key block. One loop, masked throughout when causal: a second loop for the
    # blocks past the diagonal would hold a second set of prefetched tiles and spill.
    lo = tl.minimum(tl.maximum(n0 - diff, 0), len_q) // BLOCK_M * BLOCK_M if CAUSAL else 0
    for g in range(0, _loop_bound(group_size, INTERPRET)):
        head = kv_head * group_size + g
        q_rows = _rows(q_ptr + seq64 * stride_qb + q_start * stride_qs + head * stride_qh, len_q, stride_qs, HEAD_DIM,
                       BLOCK_M, BLOCK_D, USE_DESC)
        dout_rows = _rows(dout_ptr + seq64 * stride_db + q_start * stride_ds + head * stride_dh, len_q, stride_ds,
                          HEAD_DIM, BLOCK_M, BLOCK_D, USE_DESC)
        lse_head = lse_ptr + seq64 * stride_lb + head * stride_lh + q_start
        delta_head = delta_ptr + seq64 * stride_lb + head * stride_lh + q_start
        for m0 in range(_loop_bound(lo, INTERPRET), _loop_bound(len_q, INTERPRET), BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, cols, m0, len_q, diff, qk_scale, q_rows, dout_rows, lse_head,
                                 delta_head, stride_qs, stride_qd, stride_ds, stride_dd, HEAD_DIM, BLOCK_M, BLOCK_D,
                                 CAUSAL, COMPUTE_DK, COMPUTE_DV, DOT_DTYPE, USE_DESC)

    if COMPUTE_DK:
        dk_rows = _rows(dk_ptr + seq64 * stride_dkb + k_start * stride_dks + kv_head * stride_dkh, len_k, stride_dks,
                        HEAD_DIM, BLOCK_N, BLOCK_D, USE_DESC)
        _store_block(dk_rows, len_k, stride_dks, stride_dkd, n0, dk * softmax_scale, HEAD_DIM, BLOCK_N, BLOCK_D,
                     USE_DESC)
    if COMPUTE_DV:
        dv_rows = _rows(dv_ptr + seq64 * stride_dvb + k_start * stride_dvs + kv_head * stride_dvh, len_k, stride_dvs,
                        HEAD_DIM, BLOCK_N, BLOCK_D, USE_DESC)
        _store_block(dv_rows, len_k, stride_dvs, stride_dvd, n0, dv, HEAD_DIM, BLOCK_N, BLOCK_D, USE_DESC)


@triton.jit
def _dq_block(dq, q, dout, lse2, delta, rows, n0, len_k, diff, qk_scale, k_rows, v_rows,
              stride_ks, stride_kd, stride_vs, stride_vd,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              CAUSAL: tl.constexpr, MASK: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_DESC: tl.constexpr):
    """Add one key block's contribution to a query block's dq."""
    k_in = _load_block(k_rows, len_k, stride_ks, stride_kd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, MASK, USE_DESC)
    k = k_in.to(DOT_DTYPE)
    v = _load_block(v_rows, len_k, stride_vs, stride_vd, n0, HEAD_DIM, BLOCK_N, BLOCK_D, MASK, USE_DESC).to(DOT_DTYPE)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    if MASK:
        cols = n0 + tl.arange(0, BLOCK_N)
        visible = (cols < len_k)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diff)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(dout, tl.trans(v))
    ds = (p * (dp - delta[:, None])).to(k_in.dtype).to(DOT_DTYPE)
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
    USE_DESC: tl.constexpr,         # q, k, v, dout, dq through tensor descriptors (see _rows)
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
    q_rows = _rows(q_ptr + seq64 * stride_qb + q_start * stride_qs + head64 * stride_qh, len_q, stride_qs, HEAD_DIM,
                   BLOCK_M, BLOCK_D, USE_DESC)
    dout_rows = _rows(dout_ptr + seq64 * stride_db + q_start * stride_ds + head64 * stride_dh, len_q, stride_ds,
                      HEAD_DIM, BLOCK_M, BLOCK_D, USE_DESC)
    q = _load_block(q_rows, len_q, stride_qs, stride_qd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True, USE_DESC).to(DOT_DTYPE)
    dout = _load_block(dout_rows, len_q, stride_ds, stride_dd, m0, HEAD_DIM, BLOCK_M, BLOCK_D, True,
                       USE_DESC).to(DOT_DTYPE)
    stats = seq64 * stride_lb + head64 * stride_lh + q_start
    lse2, delta = _load_softmax_stats(lse_ptr + stats, delta_ptr + stats, rows, len_q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    full_hi, hi = _causal_key_bounds(m0, len_k, diff, BLOCK_M, BLOCK_N, CAUSAL)
    k_rows = _rows(k_ptr + seq64 * stride_kb + k_start * stride_ks + kv_head * stride_kh, len_k, stride_ks, HEAD_DIM,
                   BLOCK_N, BLOCK_D, USE_DESC)
    v_rows = _rows(v_ptr + seq64 * stride_vb + k_start * stride_vs + kv_head * stride_vh, len_k, stride_vs, HEAD_DIM,
                   BLOCK_N, BLOCK_D, USE_DESC)
    for n0 in range(0, _loop_bound(full_hi, INTERPRET), BLOCK_N):
        dq = _dq_block(dq, q, dout, lse2, delta, rows, n0, len_k, diff, qk_scale, k_rows, v_rows, stride_ks,
                       stride_kd, stride_vs, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, False, DOT_DTYPE, USE_DESC)
    for n0 in range(_loop_bound(full_hi, INTERPRET), _loop_bound(hi, INTERPRET), BLOCK_N):
        dq = _dq_block(dq, q, dout, lse2, delta, rows, n0, len_k, diff, qk_scale, k_rows, v_rows, stride_ks,
                       stride_kd, stride_vs, stride_vd, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, True, DOT_DTYPE, USE_DESC)

    dq_rows = _rows(dq_ptr + seq64 * stride_dqb + q_start * stride_dqs + head64 * stride_dqh, len_q, stride_dqs,
                    HEAD_DIM, BLOCK_M, BLOCK_D, USE_DESC)
    _store_block(dq_rows, len_q, stride_dqs, stride_dqd, m0, dq * softmax_scale, HEAD_DIM, BLOCK_M, BLOCK_D, USE_DESC)
