"""Context parallelism: one sequence split across the ranks of a ``torch.distributed`` group, positions included.

Layout (load-balanced for causal attention, as in Llama 3's training and Megatron-LM): the sequence of length S is
cut into 2·W chunks of S / (2·W) tokens for a group of W ranks; rank r keeps chunks r and 2W−1−r, so under a causal
mask every rank attends over the same number of (query, key) pairs. A token keeps its position in the *unsharded*
sequence: :func:`context_parallel_positions` gives each rank the int64 ids of its tokens, which every op takes as
explicit positions, so RoPE rotates a shard at [r·c .. (r+1)·c) ∪ [(2W−1−r)·c .. (2W−r)·c), never at 0..2c−1.

:func:`context_parallel_attention_rotary` all-gathers K and V (and the key positions) across the group and runs
:func:`pi_kernels.attention_rotary` on this rank's queries; its backward reduce-scatters dK and dV. Per layer and
step, each rank sends and receives (W−1)/W of the full K and V once forward and their gradients once backward (see
the README, "Training past one GPU").

Only ``torch.distributed`` is used: process groups and the tensor all-gather and reduce-scatter collectives
(``all_gather_into_tensor`` / ``reduce_scatter_tensor``, which torch 2.13 renamed ``all_gather_single`` /
``reduce_scatter_single``), so NCCL, gloo and any other backend that has them work.
"""

import torch
import torch.distributed as dist

from .ops.attention import attention_rotary

__all__ = ["context_parallel_attention_rotary", "context_parallel_positions", "context_parallel_shard",
           "context_parallel_unshard"]


def _group_shape(group):
    """(world size, rank) of ``group`` (None: the default group), with a clear error when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context parallelism needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_seq_dim(x, seq_dim, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if isinstance(seq_dim, bool) or not isinstance(seq_dim, int) or not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim must be an int in [{-x.dim()}, {x.dim()}) for {name} of shape {tuple(x.shape)}, "
                         f"got {seq_dim!r}")
    return seq_dim % x.dim()


def _chunk_len(seq_len, world_size, what):
    """Tokens per chunk: the sequence is cut into 2·world_size equal chunks."""
    if seq_len % (2 * world_size):
        raise ValueError(f"{what} must be a multiple of 2 × the group size ({2 * world_size}) to be cut into "
                         f"load-balanced chunks, got {seq_len}")
    return seq_len // (2 * world_size)


def _rank_chunks(rank, world_size):
    """The two chunk indices a rank keeps, in its local order."""
    return rank, 2 * world_size - 1 - rank


def _to_sequence_order(gathered, seq_dim):
    """(W, *local) stack of every rank's shard -> the unsharded tensor (seq_dim counts in the local shape)."""
    halves = gathered.unflatten(seq_dim + 1, (2, -1))
    # Chunks 0..W-1 are the ranks' first halves in rank order; chunks W..2W-1 their second halves, last rank first.
    chunks = torch.cat([halves.select(seq_dim + 1, 0), halves.select(seq_dim + 1, 1).flip(0)])
    return chunks.movedim(0, seq_dim).flatten(seq_dim, seq_dim + 1)


def _to_rank_order(full, seq_dim, world_size):
    """Inverse of :func:`_to_sequence_order`: the unsharded tensor -> (W, *local), contiguous."""
    chunks = full.unflatten(seq_dim, (2 * world_size, -1)).movedim(seq_dim, 0)
    halves = torch.stack([chunks[:world_size], chunks[world_size:].flip(0)], dim=seq_dim + 1)
    return halves.flatten(seq_dim + 1, seq_dim + 2).contiguous()


def _tensor_collective(name, old_name):
    """``torch.distributed.<name>``, or its name before torch 2.13 (which deprecates the old one with a warning)."""
    return getattr(dist, name, None) or getattr(dist, old_name)


def _all_gather_sequence(local, seq_dim, group, world_size):
    """Every rank's shard of ``local`` in sequence order (no autograd)."""
    # The concatenated form (every backend takes it; gloo refuses the stacked one), viewed as a stack.
    gathered = local.new_empty((world_size * local.shape[0], *local.shape[1:]))
    _tensor_collective("all_gather_single", "all_gather_into_tensor")(gathered, local.contiguous(), group=group)
    return _to_sequence_order(gathered.view(world_size, *local.shape), seq_dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather of sequence shards; the backward reduce-scatters (sums) the gradient back to each rank's shard."""

    @staticmethod
    def forward(ctx, local, seq_dim, group, world_size):
        ctx.seq_dim, ctx.group, ctx.world_size = seq_dim, group, world_size
        return _all_gather_sequence(local, seq_dim, group, world_size)

    @staticmethod
    def backward(ctx, grad_full):
        stacked = _to_rank_order(grad_full, ctx.seq_dim, ctx.world_size)
        grad_local = stacked.new_empty(stacked.shape[1:])
        _tensor_collective("reduce_scatter_single", "reduce_scatter_tensor")(grad_local, stacked.flatten(0, 1),
                                                                             group=ctx.group)
        return grad_local, None, None, None


def context_parallel_shard(x, seq_dim, group=None):
    """This rank's load-balanced shard of a sequence: chunks r and 2W−1−r of 2·W, concatenated.

    Parameters
    ----------
    x : Tensor
        The whole sequence, identical on every rank of ``group``, e.g. (batch, seq) token ids or
        (batch, seq, hidden) activations; ``x.shape[seq_dim]`` a multiple of 2·W.
    seq_dim : int
        The sequence dimension of ``x``.
    group : ProcessGroup, optional
        The context-parallel group of W ranks; default: the default process group.

    Returns
    -------
    Tensor
        A new tensor, ``x`` with ``seq_dim`` of size seq / W. Differentiable (the gradient reaches x's rows of
        this rank only).

    Examples
    --------
    >>> ids = context_parallel_shard(input_ids, 1, group)        # (batch, seq / W)
    >>> positions = context_parallel_positions(input_ids.shape[1], group, device=ids.device)
    """
    seq_dim = _check_seq_dim(x, seq_dim, "x")
    world_size, rank = _group_shape(group)
    chunk = _chunk_len(x.shape[seq_dim], world_size, f"x.shape[{seq_dim}]")
    return torch.cat([x.narrow(seq_dim, index * chunk, chunk) for index in _rank_chunks(rank, world_size)], seq_dim)


def context_parallel_unshard(x, seq_dim, group=None):
    """Inverse of :func:`context_parallel_shard`: all-gather every rank's shard and restore sequence order.

    Parameters
    ----------
    x : Tensor
        This rank's shard, same shape on every rank; ``x.shape[seq_dim]`` even.
    seq_dim : int
        The sequence dimension of ``x``.
    group : ProcessGroup, optional
        The context-parallel group; default: the default process group.

    Returns
    -------
    Tensor
        The whole sequence (``seq_dim`` of size W · x.shape[seq_dim]), the same on every rank. Differentiable: the
        backward sums the gradients that all ranks send to each shard (reduce-scatter), as a collective must; if
        every rank computes the same loss from the result, that loss counts W times.
    """
    seq_dim = _check_seq_dim(x, seq_dim, "x")
    world_size, _ = _group_shape(group)
    if x.shape[seq_dim] % 2:
        raise ValueError(f"x.shape[{seq_dim}] must be even (two chunks per rank), got {x.shape[seq_dim]}")
    return _GatherSequence.apply(x, seq_dim, group, world_size)


def context_parallel_positions(seq_len, group=None, *, offset=0, device=None):
    """The positions, in the unsharded sequence, of the tokens that :func:`context_parallel_shard` gives this rank.

    Parameters
    ----------
    seq_len : int
        Length of the unsharded sequence, a multiple of 2·W.
    group : ProcessGroup, optional
        The context-parallel group; default: the default process group.
    offset : int or integer Tensor
        Position of the sequence's first token: an int, or (batch,) per-sequence offsets.
    device : torch.device, optional
        Device of the result (default: ``offset``'s device for a tensor offset, else CPU).

    Returns
    -------
    Tensor
        int64 (seq_len / W,) ids for an int offset, (batch, seq_len / W) for a tensor offset: pass them as the
        ``positions`` of every op (``position_ids`` of a Hugging Face model, unsqueezed to (1, seq_len / W)).

    Examples
    --------
    On 2 ranks, seq_len 8: rank 0 gets [0, 1, 6, 7], rank 1 gets [2, 3, 4, 5].
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    world_size, rank = _group_shape(group)
    chunk = _chunk_len(seq_len, world_size, "seq_len")
    if isinstance(offset, torch.Tensor):
        if offset.dim() != 1 or offset.dtype.is_floating_point or offset.dtype.is_complex or \
                offset.dtype == torch.bool:
            raise ValueError(f"offset must be an int or a (batch,) integer Tensor, got a {offset.dtype} tensor of "
                             f"shape {tuple(offset.shape)}")
        device = offset.device if device is None else device
    elif isinstance(offset, bool) or not isinstance(offset, int):
        raise ValueError(f"offset must be an int or a (batch,) integer Tensor, got {offset!r}")
    ids = torch.cat([torch.arange(index * chunk, (index + 1) * chunk, dtype=torch.int64, device=device)
                     for index in _rank_chunks(rank, world_size)])
    if isinstance(offset, torch.Tensor):
        return offset.to(device=device, dtype=torch.int64)[:, None] + ids
    return ids + offset


def _check_attention_inputs(q, k, v, positions):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a (batch, seq / W, heads, head_dim) Tensor (this rank's shard)"
                             + (f", got shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else ""))
    if not q.shape[:2] == k.shape[:2] == v.shape[:2]:
        raise ValueError(f"q, k and v must share (batch, seq / W) (self-attention over one sharded sequence), got "
                         f"{tuple(q.shape[:2])}, {tuple(k.shape[:2])}, {tuple(v.shape[:2])}")
    if q.shape[1] % 2:
        raise ValueError(f"the local sequence must be even (two chunks per rank), got {q.shape[1]} tokens")
    if positions is None:
        return
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.dtype.is_complex \
            or positions.dtype == torch.bool:
        raise ValueError("positions must be an integer Tensor of this rank's token positions "
                         "(context_parallel_positions)")
    batch, local_len = q.shape[:2]
    if positions.shape not in ((local_len,), (1, local_len), (batch, local_len)):
        raise ValueError(f"positions must have shape ({local_len},), (1, {local_len}) or ({batch}, {local_len}), "
                         f"got {tuple(positions.shape)}")


def context_parallel_attention_rotary(q, k, v, positions=None, *, group=None, causal=True, scaling_factor=1.0,
                                      base=10000.0, inv_freq=None, rotary_dim=None, interleaved=False,
                                      softmax_scale=None, backend="auto"):
    """This rank's output of RoPE attention over the whole sequence, from this rank's shard of q, k and v.

    Exactly :func:`pi_kernels.attention_rotary` on the unsharded sequence, restricted to this rank's query tokens:
    K, V and the key positions are all-gathered across ``group`` (the backward reduce-scatters dK and dV); each
    query is rotated at its own position and each key at its own. The causal mask is the unsharded sequence's
    (token t sees tokens 0..t): the two local query chunks (sequence chunks r and 2W−1−r) are attended separately,
    each against the keys of the chunks up to its own, so no rank computes a masked-out tile.

    Parameters
    ----------
    q : Tensor
        (batch, seq / W, n_heads, head_dim), this rank's shard (:func:`context_parallel_shard` on dim 1).
    k, v : Tensor
        (batch, seq / W, n_kv_heads, head_dim), this rank's shard; n_heads a multiple of n_kv_heads.
    positions : integer Tensor, optional
        (seq / W,), (1, seq / W) or (batch, seq / W) positions of this rank's tokens
        (:func:`context_parallel_positions`, possibly with offsets); default: 0..seq−1 sharded.
    group : ProcessGroup, optional
        The context-parallel group of W ranks; default: the default process group.
    causal : bool
        Causal mask over the unsharded sequence; False: every query sees every key.
    scaling_factor, base, inv_freq, rotary_dim, interleaved, softmax_scale, backend
        As in :func:`pi_kernels.attention_rotary`.

    Returns
    -------
    Tensor
        (batch, seq / W, n_heads, head_dim) in q's dtype: this rank's rows of the unsharded attention output.
        Differentiable in q, k and v.

    Notes
    -----
    Communication per call, each rank: all-gather of K, V (2 · batch · seq · n_kv_heads · head_dim elements in
    all, (W−1)/W of it received) and of the key positions (batch or 1 · seq int64) forward; reduce-scatter of dK,
    dV (same volume) backward. Compute per rank: 1/W of the (causal) attention of the whole sequence. The
    all-gather runs before the attention, not overlapped with it (no ring exchange). Padded layouts only: packed
    sequences (``cu_seqlens``) are not sharded by this layout.

    Examples
    --------
    >>> positions = context_parallel_positions(seq_len, group, device=q.device)
    >>> out = context_parallel_attention_rotary(q, k, v, positions, group=group, scaling_factor=4.0)
    """
    _check_attention_inputs(q, k, v, positions)
    world_size, rank = _group_shape(group)
    chunk = q.shape[1] // 2
    if positions is None:
        positions = context_parallel_positions(2 * world_size * chunk, group, device=q.device)
        k_positions = 0     # the unsharded keys sit at 0..seq-1
    else:
        k_positions = _all_gather_sequence(positions.to(device=q.device, dtype=torch.int64), positions.dim() - 1,
                                           group, world_size)
    k_full = _GatherSequence.apply(k, 1, group, world_size)
    v_full = _GatherSequence.apply(v, 1, group, world_size)
    options = {"scaling_factor": scaling_factor, "base": base, "inv_freq": inv_freq, "rotary_dim": rotary_dim,
               "interleaved": interleaved, "softmax_scale": softmax_scale, "causal": causal, "backend": backend}
    if not causal:
        return attention_rotary(q, k_full, v_full, positions, k_positions=k_positions, **options)
    outputs = []
    for half, index in enumerate(_rank_chunks(rank, world_size)):
        rows = slice(half * chunk, (half + 1) * chunk)
        n_keys = (index + 1) * chunk
        # The queries are the last `chunk` of the first n_keys tokens: attention_rotary's bottom-right causal
        # alignment is then exactly the unsharded sequence's mask.
        key_positions = k_positions if isinstance(k_positions, int) else k_positions[..., :n_keys]
        outputs.append(attention_rotary(q[:, rows], k_full[:, :n_keys], v_full[:, :n_keys], positions[..., rows],
                                        k_positions=key_positions, **options))
    return torch.cat(outputs, dim=1)
