"""Plain-PyTorch oracle for every op in pi_kernels.

Runs on any device and in any floating dtype, float64 included; no kernel imports it. Rotation math happens in the
input dtype (call it on ``q.double()`` for the float64 oracle), angles always in float64, so the reference is exact
to float64 rounding however large the positions are.

The rotary angle of pair ``j`` at position ``m`` is ``(m / scaling_factor) * inv_freq[j]`` with
``inv_freq[j] = base ** (-2j / rotary_dim)`` unless ``inv_freq`` is given.
"""

import torch

__all__ = ["rotary_angles", "rotary_interp_reference"]

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
