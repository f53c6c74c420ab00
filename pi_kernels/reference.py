"""Plain-PyTorch oracle for every op in pi_kernels.

Runs on any device and in any floating dtype, float64 included; no kernel imports it. Rotation math happens in the
input dtype (call it on ``q.double()`` for the float64 oracle), angles always in float64, so the reference is exact
to float64 rounding however large the positions are.

The rotary angle of pair ``j`` at position ``m`` is ``(m / scaling_factor) * inv_freq[j]`` with
``inv_freq[j] = base ** (-2j / rotary_dim)`` unless ``inv_freq`` is given.
"""

import torch

__all__ = [
    "attention_rotary_reference",
    "qkv_proj_rotary_reference",
    "rotary_angles",
    "rotary_embedding_reference",
    "rotary_interp_reference",
    "rotary_kv_cache_append_reference",
    "rotary_paged_kv_cache_append_reference",
]

_TO_BSHD = {"bshd": (0, 1, 2, 3), "bhsd": (0, 2, 1, 3), "sbhd": (1, 0, 2, 3)}


def rotary_angles(position_ids, *, scaling_factor=1.0, base=10000.0, inv_freq=None, rotary_dim):
    """Float64 angles ``(position_ids / scaling_factor) * inv_freq``.

    Parameters
    ----------
    position_ids : Tensor, integer, any shape ``P``
    rotary_dim : int
        Number of rotated features; ``rotary_dim // 2`` frequencies.

    Returns
    -------
    Tensor, float64, shape ``P + (rotary_dim // 2,)``
    """
    device = position_ids.device
    if inv_freq is None:
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim
        inv_freq = torch.pow(torch.tensor(base, dtype=torch.float64, device=device), -exponents)
    inv_freq = inv_freq.to(device=device, dtype=torch.float64)
    return (position_ids.to(torch.float64) / scaling_factor)[..., None] * inv_freq


def _rotate(x, cos, sin, rotary_dim, interleaved):
    """Rotate the first ``rotary_dim`` features of x (..., head_dim); cos/sin broadcast to (..., rotary_dim // 2)."""
    rotated, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = rotated.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((out, passthrough), dim=-1)


def _position_ids_bshd(positions, batch, seq, device):
    """Explicit (batch, seq) ids from the documented positions forms for the dense layouts."""
    arange = torch.arange(seq, device=device)
    if positions is None:
        return arange.expand(batch, seq)
    if isinstance(positions, int):
        return (arange + positions).expand(batch, seq)
    positions = positions.to(device)
    if positions.dim() == 2:
        return positions.expand(batch, seq)
    if positions.shape[0] == batch and batch != seq:
        return positions[:, None] + arange
    return positions.expand(batch, seq)


def _position_ids_thd(positions, cu_seqlens, total, device):
    """Per-token ids for packed input from offsets per sequence, per-token ids, or None/int."""
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    local = torch.arange(total, device=device) - cu_seqlens[:-1][seq_of_token]
    if positions is None:
        return local
    if isinstance(positions, int):
        return local + positions
    positions = positions.to(device)
    if positions.shape[0] == total:
        return positions
    return local + positions[seq_of_token]


def rotary_interp_reference(q, k, positions=None, *, scaling_factor=1.0, base=10000.0, inv_freq=None,
                            rotary_dim=None, interleaved=False, layout="bshd", cu_seqlens=None):
    """Reference interpolated RoPE with the semantics of :func:`pi_kernels.rotary_interp`.

    Parameters
    ----------
    q : Tensor, (batch, seq, n_heads, head_dim) for ``"bshd"``; (batch, n_heads, seq, head_dim) for ``"bhsd"``;
        (seq, batch, n_heads, head_dim) for ``"sbhd"``; (total_tokens, n_heads, head_dim) for ``"thd"``.
    k : Tensor, same layout as q with n_kv_heads heads.
    positions : None, int, or integer Tensor
        None: 0..seq-1; int or (batch,): offsets added to 0..seq-1; (seq,) or (batch or 1, seq): explicit ids.
        For ``"thd"``: None/int/(n_seqs,) offsets within each sequence, or (total_tokens,) ids.
    cu_seqlens : Tensor, (n_seqs + 1,), only for ``"thd"``.

    Returns
    -------
    (Tensor, Tensor)
        Rotated q and k in the layout and dtype of the inputs.
    """
    head_dim = q.shape[-1]
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if layout == "thd":
        ids = _position_ids_thd(positions, cu_seqlens, q.shape[0], q.device)
        angles = rotary_angles(ids, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                               rotary_dim=rotary_dim)[:, None, :]
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return _rotate(q, cos, sin, rotary_dim, interleaved), _rotate(k, cos, sin, rotary_dim, interleaved)
    perm = _TO_BSHD[layout]
    q_bshd, k_bshd = q.permute(perm), k.permute(perm)
    batch, seq = q_bshd.shape[:2]
    ids = _position_ids_bshd(positions, batch, seq, q.device)
    angles = rotary_angles(ids, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                           rotary_dim=rotary_dim)[:, :, None, :]
    cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
    q_out = _rotate(q_bshd, cos, sin, rotary_dim, interleaved).permute(perm)
    k_out = _rotate(k_bshd, cos, sin, rotary_dim, interleaved).permute(perm)
    return q_out, k_out


def rotary_embedding_reference(positions, query, key, head_size, cos_sin_cache=None, *, is_neox=True,
                               rotary_dim=None, scaling_factor=1.0, base=10000.0, inv_freq=None):
    """Reference for vLLM's rotary convention (:func:`pi_kernels.inference.rotary_embedding` and its ``_interp``
    variant), out of place.

    Parameters
    ----------
    positions : Tensor, integer, (num_tokens,) or (batch, seq)
    query : Tensor, (num_tokens, n_heads * head_size), (num_tokens, n_heads, head_size) or
        (batch, seq, n_heads * head_size)
    key : Tensor or None, as query with n_kv_heads heads.
    cos_sin_cache : Tensor, optional
        (max_position, rot_dim): cos in the first rot_dim / 2 columns, sin in the rest (vLLM's layout). When None
        the angles come from ``scaling_factor``, ``base``/``inv_freq`` and ``rotary_dim`` (default head_size).
    is_neox : bool
        True: rotate-half pairs; False: GPT-J interleaved pairs.

    Returns
    -------
    (Tensor, Tensor or None)
        Rotated query and key, shaped and typed like the inputs.
    """
    if cos_sin_cache is None:
        rotary_dim = head_size if rotary_dim is None else rotary_dim
        angles = rotary_angles(positions, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                               rotary_dim=rotary_dim)
        cos, sin = angles.cos(), angles.sin()
    else:
        rotary_dim = cos_sin_cache.shape[-1]
        rows = cos_sin_cache.to(torch.float64)[positions.long()]
        cos, sin = rows[..., :rotary_dim // 2], rows[..., rotary_dim // 2:]

    def rotate(x):
        heads = x.reshape(*positions.shape, -1, head_size)
        out = _rotate(heads, cos[..., None, :].to(x.dtype), sin[..., None, :].to(x.dtype), rotary_dim, not is_neox)
        return out.reshape(x.shape)

    return rotate(query), None if key is None else rotate(key)


def rotary_kv_cache_append_reference(q, k, v, k_cache, v_cache, cache_seqlens, positions=None, *,
                                     scaling_factor=1.0, base=10000.0, inv_freq=None, rotary_dim=None,
                                     interleaved=False):
    """Reference for :func:`pi_kernels.inference.rotary_kv_cache_append`, out of place.

    Parameters
    ----------
    q : Tensor, (batch, new, n_heads, head_dim)
    k, v : Tensor, (batch, new, n_kv_heads, head_dim)
    k_cache, v_cache : Tensor, (batch, max_len, n_kv_heads, head_dim)
    cache_seqlens : Tensor, integer, (batch,): new token t of row b goes to cache index cache_seqlens[b] + t.
    positions : None, int or integer Tensor
        None: the cache index; otherwise the dense forms of :func:`rotary_interp_reference`.

    Returns
    -------
    (Tensor, Tensor, Tensor)
        Rotated q, and copies of the caches holding the rotated k and v at the new tokens' indices.
    """
    batch, new = q.shape[:2]
    rotary_dim = q.shape[-1] if rotary_dim is None else rotary_dim
    index = cache_seqlens.to(q.device).long()[:, None] + torch.arange(new, device=q.device)
    ids = index if positions is None else _position_ids_bshd(positions, batch, new, q.device)
    angles = rotary_angles(ids, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                           rotary_dim=rotary_dim)[:, :, None, :]
    cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
    rows = torch.arange(batch, device=q.device)[:, None].expand(batch, new)
    k_cache_out, v_cache_out = k_cache.clone(), v_cache.clone()
    k_cache_out[rows, index] = _rotate(k, cos, sin, rotary_dim, interleaved).to(k_cache.dtype)
    v_cache_out[rows, index] = v.to(v_cache.dtype)
    return _rotate(q, cos, sin, rotary_dim, interleaved), k_cache_out, v_cache_out


def rotary_paged_kv_cache_append_reference(q, k, v, k_cache, v_cache, slot_mapping, positions, *,
                                           scaling_factor=1.0, base=10000.0, inv_freq=None, rotary_dim=None,
                                           interleaved=False, kv_layout="nhd"):
    """Reference for :func:`pi_kernels.inference.rotary_paged_kv_cache_append`, out of place.

    Parameters
    ----------
    q : Tensor, (num_tokens, n_heads, head_dim)
    k, v : Tensor, (num_tokens, n_kv_heads, head_dim)
    k_cache, v_cache : Tensor, (num_blocks, block_size, n_kv_heads, head_dim) for ``kv_layout="nhd"``,
        (num_blocks, n_kv_heads, block_size, head_dim) for ``"hnd"``.
    slot_mapping : Tensor, integer, (num_tokens,): ``block * block_size + offset``, or -1 to skip the token.
    positions : Tensor, integer, (num_tokens,)

    Returns
    -------
    (Tensor, Tensor, Tensor)
        Rotated q, and copies of the caches holding the rotated k and v in the tokens' slots.
    """
    rotary_dim = q.shape[-1] if rotary_dim is None else rotary_dim
    angles = rotary_angles(positions, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                           rotary_dim=rotary_dim)[:, None, :]
    cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
    k_cache_out, v_cache_out = k_cache.clone(), v_cache.clone()
    # Index through (block, offset-in-block, head, dim) views; writes land in the copies.
    k_view, v_view = (k_cache_out, v_cache_out) if kv_layout == "nhd" else \
        (k_cache_out.transpose(1, 2), v_cache_out.transpose(1, 2))
    block_size = k_view.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_view[slots // block_size, slots % block_size] = _rotate(k, cos, sin, rotary_dim, interleaved)[keep].to(
        k_cache.dtype)
    v_view[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)
    return _rotate(q, cos, sin, rotary_dim, interleaved), k_cache_out, v_cache_out


def qkv_proj_rotary_reference(x, weight, bias=None, *, num_heads, num_kv_heads, head_dim, positions=None,
                              scaling_factor=1.0, base=10000.0, inv_freq=None, rotary_dim=None, interleaved=False,
                              cu_seqlens=None):
    """Reference of :func:`pi_kernels.qkv_proj_rotary`: ``x @ weight.T + bias``, split into heads, q and k rotated.

    Parameters
    ----------
    x : Tensor, (batch, seq, hidden), or packed (total_tokens, hidden) with ``cu_seqlens``.
    weight : Tensor, ((num_heads + 2·num_kv_heads)·head_dim, hidden), the q, k and v projections' rows stacked.
    bias : Tensor, ((num_heads + 2·num_kv_heads)·head_dim,), optional.
    positions, scaling_factor, base, inv_freq, rotary_dim, interleaved, cu_seqlens
        As in :func:`rotary_interp_reference` (layout ``"bshd"``, or ``"thd"`` with ``cu_seqlens``).

    Returns
    -------
    (Tensor, Tensor, Tensor)
        q (..., num_heads, head_dim), k and v (..., num_kv_heads, head_dim), in x's dtype.
    """
    projected = x @ weight.T
    if bias is not None:
        projected = projected + bias
    q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = projected.split([q_rows, kv_rows, kv_rows], dim=-1)
    lead = tuple(x.shape[:-1])
    q = q.reshape(*lead, num_heads, head_dim)
    k = k.reshape(*lead, num_kv_heads, head_dim)
    v = v.reshape(*lead, num_kv_heads, head_dim)
    q, k = rotary_interp_reference(q, k, positions, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                                   rotary_dim=rotary_dim, interleaved=interleaved,
                                   layout="bshd" if cu_seqlens is None else "thd", cu_seqlens=cu_seqlens)
    return q, k, v


def _attention_bshd(q, k, v, q_ids, k_ids, *, scaling_factor, base, inv_freq, rotary_dim, interleaved, causal,
                    softmax_scale, rotate_q, rotate_k):
    """Rotate then attend, one dense batch: q (batch, seq_q, n_heads, d), k/v (batch, seq_k, n_kv_heads, d).

    ``q_ids``/``k_ids`` are (batch, seq) explicit positions, or None for the defaults (keys 0..seq_k-1, queries the
    last seq_q of them). Returns out (batch, seq_q, n_heads, d) and lse (batch, n_heads, seq_q).
    """
    batch, seq_q, n_heads, head_dim = q.shape
    seq_k, n_kv_heads = k.shape[1], k.shape[2]
    rope = dict(scaling_factor=scaling_factor, base=base, inv_freq=inv_freq, rotary_dim=rotary_dim)
    if q_ids is None:
        q_ids = (torch.arange(seq_q, device=q.device) + (seq_k - seq_q)).expand(batch, seq_q)
    if k_ids is None:
        k_ids = torch.arange(seq_k, device=q.device).expand(batch, seq_k)
    if rotate_q:
        angles = rotary_angles(q_ids, **rope)[:, :, None, :]
        q = _rotate(q, angles.cos().to(q.dtype), angles.sin().to(q.dtype), rotary_dim, interleaved)
    if rotate_k:
        angles = rotary_angles(k_ids, **rope)[:, :, None, :]
        k = _rotate(k, angles.cos().to(k.dtype), angles.sin().to(k.dtype), rotary_dim, interleaved)
    group = n_heads // n_kv_heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device)
    if causal:
        # Bottom-right aligned: query i sees keys j <= i + seq_k - seq_q.
        visible = torch.arange(seq_k, device=q.device)[None, :] <= torch.arange(seq_q, device=q.device)[:, None] \
            + (seq_k - seq_q)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A query that sees no key gets a zero output (and zero gradients), as in flash-attention.
    blind = ~visible.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(blind, 0.0), dim=-1).masked_fill(blind, 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


def attention_rotary_reference(q, k, v, positions=None, *, scaling_factor=1.0, base=10000.0, inv_freq=None,
                               rotary_dim=None, interleaved=False, causal=True, softmax_scale=None, k_positions=None,
                               cu_seqlens_q=None, cu_seqlens_k=None, rotate_q=True, rotate_k=True, return_lse=False):
    """Reference attention with interpolated RoPE: :func:`rotary_interp_reference` semantics, then exact softmax.

    Same arguments and semantics as :func:`pi_kernels.attention_rotary`. Materializes the (seq_q, seq_k) scores:
    for testing only.

    Parameters
    ----------
    q : Tensor, (batch, seq_q, n_heads, d), or (total_q, n_heads, d) with ``cu_seqlens_q``.
    k, v : Tensor, (batch, seq_k, n_kv_heads, d), or (total_k, n_kv_heads, d) with ``cu_seqlens_k``.
    positions, k_positions : None, int or integer Tensor
        Query and key positions in the forms of :func:`rotary_interp_reference`. Defaults: keys 0..seq_k-1 and
        queries the last seq_q of those positions; keys take ``positions`` when only it is given.
    causal : bool
        Bottom-right aligned mask: query i sees keys j <= i + seq_k - seq_q.
    rotate_q, rotate_k : bool
        Rotate the queries, the keys (False: already rotated, e.g. read from a KV cache).

    Returns
    -------
    Tensor, or (Tensor, Tensor) with ``return_lse``
        Output shaped like q; lse (batch, n_heads, seq_q), or (n_heads, total_q) for packed input, -inf for a query
        that sees no key.
    """
    rotary_dim = q.shape[-1] if rotary_dim is None else rotary_dim
    softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    options = dict(scaling_factor=scaling_factor, base=base, inv_freq=inv_freq, rotary_dim=rotary_dim,
                   interleaved=interleaved, causal=causal, softmax_scale=softmax_scale, rotate_q=rotate_q,
                   rotate_k=rotate_k)
    if cu_seqlens_q is None:
        batch = q.shape[0]
        q_ids = None if positions is None else _position_ids_bshd(positions, batch, q.shape[1], q.device)
        k_ids = q_ids if k_positions is None else _position_ids_bshd(k_positions, batch, k.shape[1], q.device)
        out, lse = _attention_bshd(q, k, v, q_ids, k_ids, **options)
        return (out, lse) if return_lse else out
    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_q if cu_seqlens_k is None else cu_seqlens_k.tolist()
    q_ids = None if positions is None else _position_ids_thd(positions, cu_seqlens_q, q.shape[0], q.device)
    k_ids = q_ids
    if k_positions is not None:
        k_ids = _position_ids_thd(k_positions, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k, k.shape[0],
                                  q.device)
    outs, lses = [], []
    for q_lo, q_hi, k_lo, k_hi in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True):
        out, lse = _attention_bshd(q[None, q_lo:q_hi], k[None, k_lo:k_hi], v[None, k_lo:k_hi],
                                   None if q_ids is None else q_ids[None, q_lo:q_hi],
                                   None if k_ids is None else k_ids[None, k_lo:k_hi], **options)
        outs.append(out[0])
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=-1)
    return (out, lse) if return_lse else out
