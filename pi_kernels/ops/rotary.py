"""Interpolated rotary embedding (RoPE with Position Interpolation) as one Triton kernel.

The rotation of pair ``j`` at position ``m`` uses the angle ``(m / scaling_factor) * inv_freq[j]``. Angles are
computed in the kernel from the positions, once per (token, pair), and reused for every head of q and k handled
by the program, so no cos/sin cache is read.

The angle computation (float64 turns, exact range reduction, float32 sin/cos) lives in ``_rope.py`` with its
rationale; it keeps float32 accuracy (~1e-7) at every accepted position (below 2**32).
"""

import functools

import torch
import triton
import triton.language as tl

from .. import _backend, _cuda, _torch_backend
from .. import _validation as v
from .._positions import position_pointer_and_strides
from ._rope import program_tokens, rope_cos_sin, token_positions, varlen_search
from ._schema import Rope, record_op

__all__ = ["LAUNCHERS", "RotaryInterp", "RotaryInterpFunction", "launch_rotary_kernel", "rotary_forward",
           "rotary_interp"]


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr,                         # input and output of one tensor (q or k); equal when in place
    stride_b, stride_s, stride_h, stride_d,  # input strides in elements, (batch, seq, head, dim) order
    ostride_b, ostride_s, ostride_h, ostride_d,
    batch_idx, tokens, token_mask,          # scalar batch row; (BLOCK_T,) token indices within it
    head_start, n_heads,
    cos, sin,                               # (BLOCK_T, BLOCK_HALF) float32
    ROTARY_HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr,
):
    # Heads are a loop over 2-D (token, pair) tiles rather than a third tile dimension: cos/sin then share the
    # layout of the data, so the compiler neither converts layouts nor recomputes the angles once per head. The loop
    # is not unrolled (range, not static_range): a program may rotate every head of a model.
    pairs = tl.arange(0, BLOCK_HALF)
    # int64 before multiplying by strides: a tensor may hold more than 2**31 elements.
    tokens64 = tokens.to(tl.int64)
    row_in = (batch_idx * stride_b + tokens64 * stride_s)[:, None]
    row_out = (batch_idx * ostride_b + tokens64 * ostride_s)[:, None]
    if INTERLEAVED:
        # GPT-J pairs (2j, 2j + 1) are adjacent: the rotated features are loaded and stored as one contiguous run
        # and split into pairs in registers, so accesses are 16 bytes wide rather than one element at stride 2.
        dims = tl.arange(0, 2 * BLOCK_HALF).to(tl.int64)[None, :]
        dims_in = dims * stride_d
        dims_out = dims * ostride_d
        pair_mask = token_mask[:, None] & (dims < 2 * ROTARY_HALF)
    else:
        dim1_in = pairs.to(tl.int64)[None, :] * stride_d
        dim2_in = (pairs + ROTARY_HALF).to(tl.int64)[None, :] * stride_d
        dim1_out = pairs.to(tl.int64)[None, :] * ostride_d
        dim2_out = (pairs + ROTARY_HALF).to(tl.int64)[None, :] * ostride_d
        pair_mask = token_mask[:, None] & (pairs < ROTARY_HALF)[None, :]
    if COPY_TAIL:
        tail = (2 * ROTARY_HALF + tl.arange(0, BLOCK_TAIL)).to(tl.int64)
        tail_mask = token_mask[:, None] & (tail < HEAD_DIM)[None, :]
    for i in range(HEADS):
        head = (head_start + i).to(tl.int64)
        in_range = head < n_heads
        x_head = x_ptr + row_in + head * stride_h
        out_head = out_ptr + row_out + head * ostride_h
        # tl.where, not `pair_mask & in_range`: Triton 3.9's interpreter keeps a block & scalar mask as int32 and
        # rejects it at the load; compiled, both give the same code.
        mask = tl.where(in_range, pair_mask, False)
        if INTERLEAVED:
            x = tl.load(x_head + dims_in, mask=mask, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (x.shape[0], BLOCK_HALF, 2)))
            out = tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos)
            tl.store(out_head + dims_out, tl.reshape(out, x.shape).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            x1 = tl.load(x_head + dim1_in, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_head + dim2_in, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_head + dim1_out, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out_head + dim2_out, (x1 * sin + x2 * cos).to(out_ptr.dtype.element_ty), mask=mask)
        if COPY_TAIL:
            # Features past rotary_dim pass through unchanged (only needed when not writing in place).
            head_tail_mask = tl.where(in_range, tail_mask, False)
            rest = tl.load(x_head + tail[None, :] * stride_d, mask=head_tail_mask)
            tl.store(out_head + tail[None, :] * ostride_d, rest, mask=head_tail_mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr,
    turns_ptr,                  # float64 (ROTARY_HALF,): inv_freq / (2π · scaling_factor), turns per position
    pos_ptr,                    # int32/int64 positions (ids or offsets), unused for POS_MODE 0
    cu_seqlens_ptr,             # int32/int64 (n_seqs + 1,), only read when IS_VARLEN
    pos_offset,                 # scalar offset for POS_MODE 0
    seq_len, n_token_blocks, n_seqs,
    n_q_heads, n_k_heads,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_qob, stride_qos, stride_qoh, stride_qod,
    stride_kob, stride_kos, stride_koh, stride_kod,
    stride_pb, stride_ps,       # positions strides: (batch row or sequence, token)
    ROTARY_HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    POS_MODE: tl.constexpr, IS_VARLEN: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
    COPY_TAIL: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    # Grid: (batch · token blocks, head groups). One program rotates BLOCK_T tokens × (Q_HEADS heads of q and
    # K_HEADS heads of k), computing the angles of its tokens once for all of them: with one group (the default when
    # that fills the GPU), once per (token, pair) for the whole of q and k.
    group, batch_idx, tokens, token_mask = program_tokens(n_token_blocks, seq_len, BLOCK_T)

    pos = token_positions(pos_ptr, cu_seqlens_ptr, batch_idx, tokens, token_mask, pos_offset, n_seqs,
                          stride_pb, stride_ps, POS_MODE, IS_VARLEN, SEARCH_STEPS)
    cos, sin = rope_cos_sin(pos, turns_ptr, ROTARY_HALF, BLOCK_HALF, CONJUGATE)

    _rotate_heads(q_ptr, q_out_ptr, stride_qb, stride_qs, stride_qh, stride_qd,
                  stride_qob, stride_qos, stride_qoh, stride_qod,
                  batch_idx, tokens, token_mask, group * Q_HEADS, n_q_heads, cos, sin,
                  ROTARY_HALF, HEAD_DIM, Q_HEADS, BLOCK_HALF, BLOCK_TAIL, INTERLEAVED, COPY_TAIL)
    _rotate_heads(k_ptr, k_out_ptr, stride_kb, stride_ks, stride_kh, stride_kd,
                  stride_kob, stride_kos, stride_koh, stride_kod,
                  batch_idx, tokens, token_mask, group * K_HEADS, n_k_heads, cos, sin,
                  ROTARY_HALF, HEAD_DIM, K_HEADS, BLOCK_HALF, BLOCK_TAIL, INTERLEAVED, COPY_TAIL)


@functools.cache
def _min_programs(device):
    """Programs needed to fill the device: 8 per SM on a GPU; 1 under the interpreter, where each costs time."""
    if device.type != "cuda":
        return 1
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def launch_rotary_kernel(q4, k4, q_out4, k_out4, rope):
    """Rotate (batch, seq, heads, dim) views by ``rope`` (a :class:`Rope`); outputs may be the inputs (in place)."""
    turns = rope.turns(q4.device)
    batch, seq_len, n_q_heads, head_dim = q4.shape
    n_k_heads = k4.shape[2]
    if batch * seq_len == 0 or n_q_heads + n_k_heads == 0:
        return
    rotary_dim, spec = rope.rotary_dim, rope.positions
    rotary_half = rotary_dim // 2
    block_half = triton.next_power_of_2(rotary_half)
    # A (token, pair) tile of ~1k elements per half: one 16-byte vector per thread and load at 4 warps. Every head of
    # q and k in one program (angles computed once per (token, pair)), split into more head groups only while
    # that leaves too few programs to fill the GPU.
    block_t = max(1, min(1024 // block_half, triton.next_power_of_2(seq_len)))
    n_token_blocks = triton.cdiv(seq_len, block_t)
    groups = 1
    min_programs = _min_programs(q4.device)
    while groups < max(n_q_heads, n_k_heads) and batch * n_token_blocks * groups < min_programs:
        groups *= 2
    q_heads, k_heads = triton.cdiv(n_q_heads, groups), triton.cdiv(n_k_heads, groups)
    copy_tail = rotary_dim < head_dim and q_out4.data_ptr() != q4.data_ptr()
    block_tail = triton.next_power_of_2(head_dim - rotary_dim) if copy_tail else 1
    ids, stride_pb, stride_ps = position_pointer_and_strides(spec, turns)
    n_seqs, search_steps = varlen_search(spec.cu_seqlens)
    grid = (batch * n_token_blocks, groups)
    _rotary_kernel[grid](
        q4, k4, q_out4, k_out4, turns, ids, spec.cu_seqlens if spec.cu_seqlens is not None else turns,
        spec.offset, seq_len, n_token_blocks, n_seqs,
        n_q_heads, n_k_heads,
        *q4.stride(), *k4.stride(), *q_out4.stride(), *k_out4.stride(), stride_pb, stride_ps,
        ROTARY_HALF=rotary_half, HEAD_DIM=head_dim, BLOCK_T=block_t, Q_HEADS=q_heads, K_HEADS=k_heads,
        BLOCK_HALF=block_half,
        BLOCK_TAIL=block_tail, POS_MODE=spec.mode, IS_VARLEN=spec.cu_seqlens is not None,
        INTERLEAVED=rope.interleaved, CONJUGATE=rope.conjugate, COPY_TAIL=copy_tail, SEARCH_STEPS=search_steps,
        num_warps=4,
    )


# The rotary launcher of each backend; all take the arguments of launch_rotary_kernel. Its keys are the backends
# this op has, which _backend.resolve_backend reads.
LAUNCHERS = {"triton": launch_rotary_kernel, "cuda": _cuda.rotary, "torch": _torch_backend.rotary}


def _run(q, k, q_out, k_out, rope, max_seqlen, layout, backend):
    """Shared body of the two custom ops: value checks, then one launch for q and k (Triton, CUDA or torch)."""
    q4, k4 = v.to_bshd(q, layout), v.to_bshd(k, layout)
    v.check_values(rope.positions.ids, rope.positions.cu_seqlens, max_seqlen, q4.shape[1])
    LAUNCHERS[backend](q4, k4, v.to_bshd(q_out, layout), v.to_bshd(k_out, layout), rope)


@record_op("rotary_interp")
def _rotary_op(q: torch.Tensor, k: torch.Tensor, rope: Rope, max_seqlen: int | None, layout: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _run(q, k, q_out, k_out, rope, max_seqlen, layout, backend)
    return q_out, k_out


@_rotary_op.register_fake
def _rotary_op_fake(q, k, *args):
    return torch.empty_like(q), torch.empty_like(k)


@record_op("rotary_interp_", mutates_args=("q", "k"))
def _rotary_inplace_op(q: torch.Tensor, k: torch.Tensor, rope: Rope, max_seqlen: int | None, layout: str,
                       backend: str) -> None:
    _run(q, k, q, k, rope, max_seqlen, layout, backend)


@_rotary_inplace_op.register_fake
def _rotary_inplace_op_fake(q, k, *args):
    return None


def rotary_forward(q, k, rope, max_seqlen, layout, inplace, backend):
    """Rotate q and k by ``rope`` (a :class:`Rope`, resolved and checked); returns (q_out, k_out).

    ``backend`` is a resolved one, "triton", "cuda" or "torch" (see ``_backend.resolve_backend``).
    """
    if inplace:
        _rotary_inplace_op(q, k, rope, max_seqlen, layout, backend)
        return q, k
    return _rotary_op(q, k, rope, max_seqlen, layout, backend)


def _no_heads_like(x, layout):
    """An empty tensor shaped like x with 0 heads: the k of a launch that rotates x alone."""
    shape = list(x.shape)
    shape[1 if layout in ("bhsd", "thd") else 2] = 0
    return x.new_empty(shape)


class RotaryInterpFunction(torch.autograd.Function):
    """Autograd for interpolated RoPE: the backward is the same kernel rotating the gradients by -angle.

    ``k=None`` rotates q alone and returns one tensor: PyTorch lets a Function that modifies a view in place return
    only one, so in-place calls on views under autograd take one Function per tensor.
    """

    @staticmethod
    def forward(ctx, q, k, rope, max_seqlen, layout, inplace, backend):
        q_out, k_out = rotary_forward(q, _no_heads_like(q, layout) if k is None else k, rope, max_seqlen, layout,
                                      inplace, backend)
        if inplace:
            ctx.mark_dirty(*((q,) if k is None else (q, k)))
        ctx.save_for_backward(*rope.tensors())  # for the in-place check (Rope.tensors)
        ctx.rope, ctx.options = rope, (max_seqlen, layout, backend)
        ctx.rotates_k = k is not None
        return (q_out, k_out) if k is not None else q_out

    @staticmethod
    def backward(ctx, grad_q, grad_k=None):
        ctx.saved_tensors  # noqa: B018 - raises if the rope's tensors were modified in place since the forward
        max_seqlen, layout, backend = ctx.options
        # Going through apply again keeps the backward itself differentiable (double backward).
        grads = RotaryInterpFunction.apply(grad_q, grad_k, ctx.rope.reversed(), max_seqlen, layout, False, backend)
        grad_q, grad_k = grads if ctx.rotates_k else (grads, None)
        return grad_q, grad_k, None, None, None, None, None


def rotary_interp(q, k, positions=None, *, scaling_factor=1.0, base=10000.0, inv_freq=None, rotary_dim=None,
                  interleaved=False, layout="bshd", inplace=False, cu_seqlens=None, max_seqlen=None, backend="auto"):
    """Apply rotary position embedding with Position Interpolation to q and k, in one launch.

    The pair ``j`` of a head at position ``m`` is rotated by ``(m / scaling_factor) * inv_freq[j]``, with
    ``inv_freq[j] = base ** (-2j / rotary_dim)`` unless ``inv_freq`` is given. ``scaling_factor`` is PI's L'/L.

    Parameters
    ----------
    q : Tensor
        (batch, seq, n_heads, head_dim) for ``layout="bshd"``; (batch, n_heads, seq, head_dim) for ``"bhsd"``
        (Hugging Face); (seq, batch, n_heads, head_dim) for ``"sbhd"`` (Megatron); (total_tokens, n_heads,
        head_dim) for packed ``"thd"``. float16, bfloat16 or float32, any strides.
    k : Tensor
        Same layout, dtype and device as q, with n_kv_heads heads (GQA/MQA: n_kv_heads may differ from n_heads).
    positions : None, int or integer Tensor, optional
        None: 0..seq-1. An int or a (batch,) tensor: offsets added to 0..seq-1 (e.g. the KV-cache length). A (seq,)
        or (batch or 1, seq) tensor: explicit ids, like Hugging Face's ``position_ids``. A 1-D tensor is ambiguous
        when batch == seq > 1 and rejected then. For ``"thd"``: None, an int or a (n_seqs,) tensor of offsets
        within each sequence, or (total_tokens,) ids. int32 or int64, ≥ 0.
    scaling_factor : float
        L'/L, the context extension factor; > 0 (1.0 means plain RoPE).
    base : float
        RoPE base (``rope_theta``), used when ``inv_freq`` is None.
    inv_freq : Tensor, optional
        (rotary_dim // 2,) frequencies of any scheme (NTK, YaRN, Llama-3, ...); overrides ``base``.
    rotary_dim : int, optional
        Number of leading features rotated (even, ≤ head_dim); the rest pass through. Default head_dim.
    interleaved : bool
        False: rotate-half pairs (j, j + rotary_dim/2) as in GPT-NeoX/Llama. True: GPT-J pairs (2j, 2j+1).
    layout : str
        One of ``"bshd"``, ``"bhsd"``, ``"sbhd"``, ``"thd"``.
    inplace : bool
        Write into q and k, also under autograd and on views (``mark_dirty``; views under autograd take one launch
        per tensor, PyTorch's rule for in-place Functions on views). q and k must not overlap each other or
        themselves (an expanded, stride-0 q is refused). Otherwise q and k are never modified.
    cu_seqlens : Tensor, optional
        (n_seqs + 1,) int32/int64 cumulative sequence lengths; required for ``"thd"`` and only valid with it.
    max_seqlen : int, optional
        Longest sequence of a ``"thd"`` batch (flash-attention's convention); when given it is checked.
    backend : str
        ``"auto"``: for GPU inputs the compiled CUDA extension when it is built, else Triton; for CPU inputs
        ``"torch"`` (Triton's interpreter when ``TRITON_INTERPRET=1``). ``"triton"``, ``"cuda"`` (an error that
        says how to build it when it is missing) or ``"torch"`` (plain PyTorch, any device). All give the same
        results to float32 rounding.

    Returns
    -------
    (Tensor, Tensor)
        Rotated q and k, with the shapes and dtype of the inputs (the inputs themselves when ``inplace``).

    Examples
    --------
    >>> q = torch.randn(2, 4096, 32, 128, device="cuda", dtype=torch.bfloat16)
    >>> k = torch.randn(2, 4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    >>> q, k = pi_kernels.rotary_interp(q, k, scaling_factor=4.0, base=500000.0)
    """
    q4, k4 = v.check_qk(q, k, layout)
    if layout == "thd":
        spec = v.resolve_varlen_positions(positions, cu_seqlens, max_seqlen, q4.shape[1], q.device)
    else:
        if cu_seqlens is not None or max_seqlen is not None:
            raise ValueError(f"cu_seqlens and max_seqlen are only valid with layout='thd', got layout={layout!r}")
        spec = v.resolve_positions(positions, q4.shape[0], q4.shape[1], q.device)
    backend = _backend.resolve_backend(backend, q.device, LAUNCHERS)
    if inplace:
        v.check_no_overlap((("q", q), ("k", k)))
    rope = Rope.resolve(spec, q4.shape[3], scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                        rotary_dim=rotary_dim, interleaved=interleaved)
    if not inplace:
        return RotaryInterpFunction.apply(q, k, rope, max_seqlen, layout, False, backend)
    return _rotate_in_place(q, k, rope, max_seqlen, layout, backend)


def _rotate_in_place(q, k, rope, max_seqlen, layout, backend):
    """rotary_interp(inplace=True) after its checks."""
    if torch.compiler.is_compiling():
        # Out of place, then copied back: under AOTAutograd a Function that marks a view dirty gets a backward that
        # ignores the rotation, and inductor drops the symbolic storage offset of a view a custom op mutates (wrong
        # forward after a dynamic-shape recompile). copy_ into a view is a pattern functionalization, autograd and
        # inductor all handle.
        q_out, k_out = RotaryInterpFunction.apply(q, k, rope, max_seqlen, layout, False, backend)
        q.copy_(q_out)
        k.copy_(k_out)
    elif not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        rotary_forward(q, k, rope, max_seqlen, layout, True, backend)  # the mutating op: one launch
    elif q._base is not None or k._base is not None:
        # Eager autograd: one Function per tensor, PyTorch's rule for in-place Functions on views.
        RotaryInterpFunction.apply(q, None, rope, max_seqlen, layout, True, backend)
        RotaryInterpFunction.apply(k, None, rope, max_seqlen, layout, True, backend)
    else:
        RotaryInterpFunction.apply(q, k, rope, max_seqlen, layout, True, backend)
    return q, k


class RotaryInterp(torch.nn.Module):
    """Interpolated RoPE as a module holding the frequency scheme and options.

    Parameters
    ----------
    rotary_dim : int, optional
        Rotated features per head (default: all of head_dim).
    base, scaling_factor, inv_freq, interleaved, layout
        As in :func:`rotary_interp`; ``inv_freq`` is kept as a non-persistent buffer so it follows ``.to()``.

    Examples
    --------
    >>> rope = RotaryInterp(base=10000.0, scaling_factor=4.0)
    >>> q, k = rope(q, k, position_ids)
    """

    def __init__(self, rotary_dim=None, *, base=10000.0, scaling_factor=1.0, inv_freq=None, interleaved=False,
                 layout="bshd"):
        super().__init__()
        v.check_layout(layout)
        v.check_frequencies(scaling_factor, base, inv_freq, rotary_dim)
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.scaling_factor = float(scaling_factor)
        self.interleaved = bool(interleaved)
        self.layout = layout
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q, k, positions=None, *, inplace=False, cu_seqlens=None, max_seqlen=None):
        """Rotate q and k; see :func:`rotary_interp` for shapes."""
        return rotary_interp(q, k, positions, scaling_factor=self.scaling_factor, base=self.base,
                             inv_freq=self.inv_freq, rotary_dim=self.rotary_dim, interleaved=self.interleaved,
                             layout=self.layout, inplace=inplace, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def extra_repr(self):
        return (f"rotary_dim={self.rotary_dim}, base={self.base}, scaling_factor={self.scaling_factor}, "
                f"interleaved={self.interleaved}, layout={self.layout!r}")
