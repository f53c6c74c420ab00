"""``backend="torch"``: every op in plain PyTorch, for CPU tensors (and any device PyTorch runs on).

Each function here takes the same arguments as the Triton launcher it stands in for (``launch_rotary_kernel``,
``launch_rotary_embedding``, ``launch_cache_append``, the qkv_proj forward launcher; the rotation as one rope record,
``ops/_schema.py``'s ``Rope``, read by attribute) and writes the same outputs, so an op's custom op, autograd
formula, checks and ``torch.library`` registration are shared by every backend.

The angles are computed as the kernels compute them (``ops/_rope.py``): float64 turns ``m · turns[j]`` (the table
of ``Rope.turns``), whole turns dropped exactly, the fraction brought into [-1/2, 1/2] and multiplied by 2π in
float64, then one float32 sin/cos per (position, pair), broadcast over heads. The rotation runs in float32 and
rounds once to the output dtype. Everything is vectorized over tokens, heads and pairs; the rotation alone loops in
Python, over blocks of tokens of a fixed size (``_BLOCK_ELEMENTS``), never over single tokens or heads.

This is not :mod:`pi_kernels.reference` (the independent float64 oracle the tests compare every backend to).
"""

import torch

from ._angles import TWO_PI_HI, TWO_PI_LO
from ._validation import POSITIONS_ARANGE, POSITIONS_OFFSETS

__all__ = ["attention_backward", "attention_forward", "kv_cache_append", "qkv_proj", "rope_cos_sin", "rotary",
           "rotary_embedding", "token_positions"]


def token_positions(spec, batch, seq_len, device):
    """int64 positions, (batch or 1, seq_len), of the tokens of (batch, seq_len) input for a :class:`PositionSpec`.

    With the spec's ``cu_seqlens`` the input is packed (batch 1): the arange restarts at each sequence and offsets
    are per sequence, as in the kernels' ``token_positions``.
    """
    tokens = torch.arange(seq_len, device=device)
    cu_seqlens = spec.cu_seqlens
    if cu_seqlens is not None:
        if spec.mode not in (POSITIONS_ARANGE, POSITIONS_OFFSETS):
            return spec.ids.to(torch.int64).reshape(1, seq_len)
        cu = cu_seqlens.to(torch.int64)
        # Sequence of each token: the last s with cu[s] <= token (empty sequences are skipped). Clamped so that a
        # malformed cu_seqlens with the value checks off cannot index out of bounds.
        seq_idx = torch.searchsorted(cu[1:], tokens, right=True).clamp_(max=cu.shape[0] - 2)
        local = tokens - cu[seq_idx]
        if spec.mode == POSITIONS_ARANGE:
            return (local + spec.offset).unsqueeze(0)
        return (local + spec.ids.to(torch.int64)[seq_idx]).unsqueeze(0)
    if spec.mode == POSITIONS_ARANGE:
        return (tokens + spec.offset).unsqueeze(0)
    if spec.mode == POSITIONS_OFFSETS:
        return spec.ids.to(torch.int64).unsqueeze(1) + tokens
    ids = spec.ids if spec.ids.dim() == 2 else spec.ids.unsqueeze(0)
    return ids.to(torch.int64)


def rope_cos_sin(pos, turns, conjugate=False):
    """float32 cos and sin, ``pos.shape + (len(turns),)``, of int64 positions ``pos``; sin negated when conjugate.

    ``turns`` is the float64 table of ``Rope.turns`` (``ops/_schema.py``) (``inv_freq / (2π · scaling_factor)``).
    """
    angle_turns = pos.to(torch.float64).unsqueeze(-1) * turns
    angle_turns.frac_()
    # Into [-1/2, 1/2] turns, i.e. [-π, π], where float32 sin/cos are most accurate.
    angle_turns.sub_((angle_turns > 0.5).to(torch.float64)).add_((angle_turns < -0.5).to(torch.float64))
    angle = (angle_turns * TWO_PI_HI + angle_turns * TWO_PI_LO).to(torch.float32)
    sin = angle.sin()
    return angle.cos_(), sin.neg_() if conjugate else sin


def _pairs(x4, rotary_dim, interleaved):
    """Views of the first and second members of every rotated pair of x4 (..., head_dim)."""
    if interleaved:
        return x4[..., 0:rotary_dim:2], x4[..., 1:rotary_dim:2]
    half = rotary_dim // 2
    return x4[..., :half], x4[..., half:rotary_dim]


# Elements of x rotated per block of tokens. Each op below is one pass over its operands; over a whole large tensor
# every pass goes to memory, over a block its float32 temporaries (2 MiB each) stay in cache between the passes.
# Measured on one thread, bf16 q (1, 2048, 32, 128): 38 ms unblocked, 4.1 ms in blocks of 2^19 (2^18: 4.6, 2^20: 3.8
# but slower at fp32 and smaller shapes).
_BLOCK_ELEMENTS = 1 << 19


def _rotate_into(x4, out4, cos, sin, rotary_dim, interleaved, copy_tail):
    """out4 = x4 rotated, in blocks of tokens; out4 may be x4 (in place).

    x4, out4: (..., tokens, heads, head_dim); cos, sin: float32 (..., tokens, 1, rotary_dim // 2), broadcast over
    heads.
    """
    if x4.numel() == 0:
        return
    tokens = x4.shape[-3]
    block = max(1, _BLOCK_ELEMENTS * tokens // x4[..., :rotary_dim].numel())
    for start in range(0, tokens, block):
        x_block, out_block, cos_block, sin_block = (
            (x4, out4, cos, sin) if block >= tokens
            else (t.narrow(-3, start, min(block, tokens - start)) for t in (x4, out4, cos, sin)))
        # One float32 copy of the rotated features (none when x4 is float32), one float32 result written back with a
        # single rounding; both halves are computed before anything is written (in place, x4 and out4 are the same
        # memory).
        x1, x2 = _pairs(x_block[..., :rotary_dim].to(torch.float32), rotary_dim, interleaved)
        rotated = torch.empty(x_block.shape[:-1] + (rotary_dim,), dtype=torch.float32, device=x4.device)
        out1, out2 = _pairs(rotated, rotary_dim, interleaved)
        torch.mul(x1, cos_block, out=out1).addcmul_(x2, sin_block, value=-1.0)
        torch.mul(x1, sin_block, out=out2).addcmul_(x2, cos_block)
        out_block[..., :rotary_dim].copy_(rotated)
    if copy_tail and rotary_dim < x4.shape[-1] and out4.data_ptr() != x4.data_ptr():
        out4[..., rotary_dim:].copy_(x4[..., rotary_dim:])


def _head_cos_sin(pos, turns, conjugate=False):
    """cos, sin of (batch or 1, seq) positions as (batch or 1, seq, 1, pairs), to broadcast over heads."""
    cos, sin = rope_cos_sin(pos, turns, conjugate)
    return cos.unsqueeze(2), sin.unsqueeze(2)


def _rope_cos_sin(rope, batch, seq_len, device):
    """cos, sin of a rope record's rotation of (batch, seq_len) tokens, (batch or 1, seq_len, 1, pairs)."""
    positions = token_positions(rope.positions, batch, seq_len, device)
    return _head_cos_sin(positions, rope.turns(device), rope.conjugate)


def rotary(q4, k4, q_out4, k_out4, rope):
    """The torch counterpart of ``ops.rotary.launch_rotary_kernel``: (batch, seq, heads, dim) views; outputs may
    be the inputs (in place)."""
    batch, seq_len = q4.shape[:2]
    cos, sin = _rope_cos_sin(rope, batch, seq_len, q4.device)
    _rotate_into(q4, q_out4, cos, sin, rope.rotary_dim, rope.interleaved, True)
    _rotate_into(k4, k_out4, cos, sin, rope.rotary_dim, rope.interleaved, True)


def rotary_embedding(query4, key4, rope, cos_sin_cache):
    """The torch counterpart of ``ops.rotary_embedding.launch_rotary_embedding``: rotate in place; key4 may have 0
    heads.

    cos/sin come from ``cos_sin_cache`` rows at the rope's position ids when it is given, else from its angles.
    """
    rotary_dim, interleaved = rope.rotary_dim, rope.interleaved
    if cos_sin_cache is None:
        cos, sin = _rope_cos_sin(rope, *query4.shape[:2], query4.device)
    else:
        positions = token_positions(rope.positions, *query4.shape[:2], query4.device)
        half = rotary_dim // 2
        inside = (positions >= 0) & (positions < cos_sin_cache.shape[0])
        rows = cos_sin_cache[torch.where(inside, positions, 0)].to(torch.float32).unsqueeze(2)
        # A position outside the cache (only possible with the value checks off) is rotated by angle 0, i.e. left
        # as it is, like the kernels leave it.
        inside = inside[..., None, None]
        cos = torch.where(inside, rows[..., :half], 1.0)
        sin = torch.where(inside, rows[..., half:2 * half], 0.0)
    _rotate_into(query4, query4, cos, sin, rotary_dim, interleaved, False)
    _rotate_into(key4, key4, cos, sin, rotary_dim, interleaved, False)


def kv_cache_append(q4, k4, v4, q_out4, k_cache4, v_cache4, cache_index, paged, rope):
    """The torch counterpart of ``ops.kv_cache.launch_cache_append``: q rotated into q_out4, rotated k and v written
    into the caches (dense: ``cache_index`` = (batch,) cache lengths; paged: the (new,) slot mapping, batch 1).

    Writes that would land outside the cache (slot -1 padding, or out-of-range indices with the value checks off)
    are dropped, as in the kernels.
    """
    batch, seq_len = q4.shape[:2]
    rotary_dim, interleaved = rope.rotary_dim, rope.interleaved
    cos, sin = _rope_cos_sin(rope, batch, seq_len, q4.device)
    _rotate_into(q4, q_out4, cos, sin, rotary_dim, interleaved, True)
    index = cache_index.to(torch.int64)
    if paged:
        block_size = k_cache4.shape[1]
        inside = (index >= 0) & (index < k_cache4.shape[0] * block_size)
        (tokens,) = inside.nonzero(as_tuple=True)
        rows = torch.zeros_like(tokens)
        outer, inner = index[tokens] // block_size, index[tokens] % block_size
    else:
        index = index.unsqueeze(1) + torch.arange(seq_len, device=q4.device)
        rows, tokens = ((index >= 0) & (index < k_cache4.shape[1])).nonzero(as_tuple=True)
        outer, inner = rows, index[rows, tokens]
    k_new = k4[rows, tokens]
    k_rotated = torch.empty_like(k_new)
    if k_new.numel():
        _rotate_into(k_new, k_rotated, cos.expand(batch, -1, -1, -1)[rows, tokens],
                     sin.expand(batch, -1, -1, -1)[rows, tokens], rotary_dim, interleaved, True)
    k_cache4[outer, inner] = k_rotated
    v_cache4[outer, inner] = v4[rows, tokens]


def qkv_proj(x3, weights, biases, outs, head_dim, rope):
    """The torch counterpart of ``ops.qkv_proj._launch_forward``: x3 (batch, seq, hidden); ``weights`` and
    ``biases`` the (q, k, v) row blocks (v and biases may be None); outs (batch, seq, heads, head_dim) q, k
    (and v). The GEMMs are ``torch.nn.functional.linear``; q and k are then rotated like ``rotary``."""
    cos, sin = _rope_cos_sin(rope, *x3.shape[:2], x3.device)
    for which, (weight, bias, out4) in enumerate(zip(weights, biases, outs, strict=False)):
        projected = torch.nn.functional.linear(x3, weight, bias).unflatten(-1, (-1, head_dim))
        if which < 2:
            _rotate_into(projected, out4, cos, sin, rope.rotary_dim, rope.interleaved, True)
        else:
            out4.copy_(projected)


# The attention core: exact softmax attention of q and k already rotated, in float32 over chunks of queries, so that
# no more than ~_CHUNK_ELEMENTS scores exist at once. The forward returns the log-sum-exp, from which the backward
# recomputes the probabilities chunk by chunk (FlashAttention's recipe, with PyTorch matmuls as the tiles).
_CHUNK_ELEMENTS = 1 << 24


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(q rows, k rows) of each sequence: the whole batch at once when dense, one packed sequence at a time."""
    if cu_seqlens_q is None:
        return [(slice(None), slice(None))]
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(slice(q0, q1), slice(k0, k1))
            for q0, q1, k0, k1 in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True)]


def _grouped(x, n_kv_heads):
    """(batch, seq, heads, d) → (batch, kv heads, group, seq, d): the query heads that share a KV head together."""
    return x.unflatten(2, (n_kv_heads, -1)).permute(0, 2, 3, 1, 4)


def _ungrouped(x):
    return x.permute(0, 3, 1, 2, 4).flatten(2, 3)


def _scores(q_chunk, k, rows, diagonal, core):
    """Scaled scores of query rows ``rows``: q_chunk (b, hk, g, c, d) against k (b, hk, keys, d) → (b, hk, g, c,
    keys); -inf where the causal mask hides a key (bottom-right aligned: row i sees keys j ≤ i + ``diagonal``)."""
    scores = torch.matmul(q_chunk, k.unsqueeze(2).transpose(-1, -2)).mul_(core.softmax_scale)
    if core.causal:
        hidden = torch.arange(k.shape[2], device=k.device) > (rows + diagonal).unsqueeze(1)
        scores.masked_fill_(hidden, float("-inf"))
    return scores


def _probabilities(scores, lse):
    """exp(scores − lse) in place; a query that sees no key (lse -inf) gets probabilities 0, not NaN."""
    return scores.sub_(torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1)).exp_()


def _chunks(q_grouped, seq_k, causal):
    """(query rows as a slice and as indices, keys they can see) of each chunk of queries; with the causal mask a
    chunk's keys end after its last row's diagonal, so the hidden upper triangle is mostly not computed."""
    seq_q = q_grouped.shape[3]
    step = max(1, _CHUNK_ELEMENTS // (q_grouped.shape[0] * q_grouped.shape[1] * q_grouped.shape[2] * max(1, seq_k)))
    chunks = []
    for start in range(0, seq_q, step):
        end = min(seq_q, start + step)
        keys = min(seq_k, max(0, end + seq_k - seq_q)) if causal else seq_k
        chunks.append((slice(start, end), torch.arange(start, end, device=q_grouped.device), keys))
    return chunks


def _attend(q, k, v, core):
    """Forward of one dense batch in float32: q (b, sq, h, d), k/v (b, sk, hk, d) → out (b, sq, h, d),
    lse (b, h, sq)."""
    n_kv_heads, seq_q, seq_k = k.shape[2], q.shape[1], k.shape[1]
    qg, kg, vg = _grouped(q, n_kv_heads), k.transpose(1, 2), v.transpose(1, 2)
    out = qg.new_empty(qg.shape)
    lse = qg.new_empty(qg.shape[:-1])
    for chunk, rows, keys in _chunks(qg, seq_k, core.causal):
        scores = _scores(qg[..., chunk, :], kg[..., :keys, :], rows, seq_k - seq_q, core)
        lse[..., chunk] = chunk_lse = torch.logsumexp(scores, dim=-1)
        out[..., chunk, :] = torch.matmul(_probabilities(scores, chunk_lse), vg[..., :keys, :].unsqueeze(2))
    return _ungrouped(out), lse.flatten(1, 2)


def _attend_backward(grad_out, q, k, v, out, lse, core):
    """Backward of :func:`_attend` in float32: (dq, dk, dv)."""
    n_kv_heads, seq_q, seq_k = k.shape[2], q.shape[1], k.shape[1]
    qg, kg, vg = _grouped(q, n_kv_heads), k.transpose(1, 2), v.transpose(1, 2)
    grad_g = _grouped(grad_out, n_kv_heads)
    lse_g = lse.unflatten(1, (n_kv_heads, -1))
    delta = (grad_g * _grouped(out, n_kv_heads)).sum(-1)  # rowsum(dO ∘ O) = rowsum(P ∘ dP)
    dq, dk, dv = qg.new_empty(qg.shape), torch.zeros_like(kg), torch.zeros_like(vg)
    for chunk, rows, keys in _chunks(qg, seq_k, core.causal):
        k_seen, v_seen = kg[..., :keys, :], vg[..., :keys, :]
        probs = _probabilities(_scores(qg[..., chunk, :], k_seen, rows, seq_k - seq_q, core), lse_g[..., chunk])
        grad_chunk = grad_g[..., chunk, :]
        dv[..., :keys, :] += torch.matmul(probs.transpose(-1, -2), grad_chunk).sum(2)
        dscores = torch.matmul(grad_chunk, v_seen.unsqueeze(2).transpose(-1, -2))
        dscores.sub_(delta[..., chunk].unsqueeze(-1)).mul_(probs).mul_(core.softmax_scale)
        dq[..., chunk, :] = torch.matmul(dscores, k_seen.unsqueeze(2))
        dk[..., :keys, :] += torch.matmul(dscores.transpose(-1, -2), qg[..., chunk, :]).sum(2)
    return _ungrouped(dq), dk.transpose(1, 2), dv.transpose(1, 2)


def _like(x, value):
    """``value`` in a tensor laid out as ``torch.empty_like(x)``: the strides the ops' fakes promise (the chunked
    float32 computation leaves heads and tokens permuted)."""
    out = torch.empty_like(x)
    out.copy_(value)
    return out


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, core):
    """The torch counterpart of the attention core's forward (``ops.attention.attention_forward``) on rotated q
    and k: out (like q) and the float32 natural-log lse, (batch, heads, seq_q), or (heads, total_q) packed; -inf
    where a query sees no key."""
    qf, kf, vf = (x.to(torch.float32) for x in (q, k, v))
    if cu_seqlens_q is None:
        out, lse = _attend(qf, kf, vf, core)
        return _like(q, out), lse
    out = torch.empty_like(q)
    lse = qf.new_empty(q.shape[1], q.shape[0])
    for q_rows, k_rows in _sequences(cu_seqlens_q, cu_seqlens_k):
        seq_out, seq_lse = _attend(qf[None, q_rows], kf[None, k_rows], vf[None, k_rows], core)
        out[q_rows], lse[:, q_rows] = seq_out[0], seq_lse[0]
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, core):
    """The torch counterpart of the attention core's backward: (dq, dk, dv) of the rotated q and k."""
    tensors = [x.to(torch.float32) for x in (grad_out, q, k, v, out)]
    if cu_seqlens_q is None:
        grads = _attend_backward(*tensors, lse, core)
        return tuple(_like(x, grad) for grad, x in zip(grads, (q, k, v), strict=True))
    grad_f, qf, kf, vf, out_f = tensors
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for q_rows, k_rows in _sequences(cu_seqlens_q, cu_seqlens_k):
        grads = _attend_backward(grad_f[None, q_rows], qf[None, q_rows], kf[None, k_rows], vf[None, k_rows],
                                 out_f[None, q_rows], lse[None, :, q_rows], core)
        dq[q_rows], dk[k_rows], dv[k_rows] = (grad[0] for grad in grads)
    return dq, dk, dv
