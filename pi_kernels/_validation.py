"""Argument checks and position-form resolution shared by every op that takes RoPE positions.

Shape, dtype and device checks run in the Python wrappers, where ``torch.compile`` traces them for free. Checks on
tensor *values* (negative positions, malformed ``cu_seqlens``) need a device-to-host sync, so they run inside the
custom ops' eager implementations, and can be switched off with :func:`set_value_checks` for CUDA-graph or
latency-critical code; they are skipped automatically while a CUDA stream is being captured.
"""

import functools
import math
import numbers
import weakref

import torch

from ._positions import MAX_POSITION, POSITIONS_ARANGE, POSITIONS_IDS, POSITIONS_OFFSETS, PositionSpec

LAYOUTS = ("bshd", "bhsd", "sbhd", "thd")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TO_BSHD = {"bshd": (0, 1, 2, 3), "bhsd": (0, 2, 1, 3), "sbhd": (1, 0, 2, 3)}

_value_checks = {"enabled": True}
# (weakref to the positions tensor last checked, its version): a tensor reused by every layer is checked once.
_last_checked_positions = {}


def set_value_checks(enabled):
    """Turn the synchronizing checks on tensor values (positions ≥ 0, well-formed ``cu_seqlens``) on or off."""
    _value_checks["enabled"] = bool(enabled)


def value_checks_enabled(device):
    if not _value_checks["enabled"]:
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def to_bshd(x, layout):
    """View x (any layout) as (batch, seq, heads, dim); packed ``thd`` becomes a batch of one. No copy."""
    if layout == "thd":
        return x.unsqueeze(0)
    return x.permute(_TO_BSHD[layout])


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _one_of(size, *allowed):
    """``size in allowed`` by equality alone: under ``torch.compile(dynamic=True)`` Dynamo answers ``in`` wrongly for
    a static size among symbolic ones."""
    return any(size == n for n in allowed)


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_tensors(tensors):
    """Check ``(name, tensor)`` pairs (None skipped): float16/bfloat16/float32 tensors of the first one's dtype and
    device."""
    tensors = [(name, x) for name, x in tensors if x is not None]
    first_name, first = tensors[0]
    for name, x in tensors:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype must be float16, bfloat16 or float32, got {x.dtype}")
        if x.dtype != first.dtype:
            raise TypeError(f"{name}.dtype ({x.dtype}) must match {first_name}.dtype ({first.dtype})")
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}; they must be on the "
                             f"same device")


def check_qk(q, k, layout):
    """Check q and k tensors for a layout; returns their (batch, seq, heads, dim) views."""
    check_layout(layout)
    check_tensors((("q", q), ("k", k)))
    ndim = 3 if layout == "thd" else 4
    shape_doc = "(total_tokens, heads, head_dim)" if layout == "thd" else f"{layout} (4-D)"
    for name, x in (("q", q), ("k", k)):
        if x.dim() != ndim:
            raise ValueError(f"{name} must have shape {shape_doc} for layout={layout!r}, got {tuple(x.shape)}")
    q4, k4 = to_bshd(q, layout), to_bshd(k, layout)
    if q4.shape[:2] != k4.shape[:2]:
        what = "token count" if layout == "thd" else "batch and seq sizes"
        raise ValueError(f"q and k must have the same {what}: q {tuple(q.shape)}, k {tuple(k.shape)} ({layout})")
    if k4.shape[3] != q4.shape[3]:
        raise ValueError(f"k head_dim ({k4.shape[3]}) must equal q head_dim ({q4.shape[3]})")
    check_head_dim(q4.shape[3], "head_dim")
    return q4, k4


def check_no_grad(op, tensors):
    """Refuse ``(name, tensor)`` pairs that require grad in an op without a backward, before anything is written."""
    if not torch.is_grad_enabled():
        return
    for name, x in tensors:
        if x is not None and x.requires_grad:
            raise RuntimeError(f"{op} has no backward (an inference op), but {name} requires grad: call it under "
                               f"torch.no_grad() or torch.inference_mode(), or use pi_kernels.rotary_interp to train")


def check_head_dim(head_dim, name):
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"{name} must be a positive even number, got {head_dim}")


def check_rotary_dim(rotary_dim, head_dim):
    if rotary_dim is None:
        return head_dim
    if not _is_int(rotary_dim) or rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be a positive even int ≤ head_dim ({head_dim}), got {rotary_dim!r}")
    return int(rotary_dim)


def _is_positive_real(value):
    """Whether value is a finite real > 0. Under ``torch.compile`` a float argument may be symbolic (``dynamic=True``,
    or a second value seen), which Python's checks cannot inspect without breaking the graph: the check is then left
    to the op's implementation, which repeats it on the real value before it writes anything."""
    if torch.compiler.is_compiling():
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_positive_real(value, name, meaning=""):
    """Refuse a value that is not a finite real > 0 (left to the op's run-time check while compiling)."""
    if not _is_positive_real(value):
        raise ValueError(f"{name} must be a finite number > 0{meaning}, got {value!r}")


def check_scaling_factor(scaling_factor):
    check_positive_real(scaling_factor, "scaling_factor", " (L'/L)")


def check_base(base):
    check_positive_real(base, "base")


def check_inv_freq(inv_freq, rotary_dim):
    """A floating-point tensor of shape (rotary_dim // 2,); the shape is checked once rotary_dim is known."""
    if not isinstance(inv_freq, torch.Tensor) or not inv_freq.is_floating_point():
        raise TypeError(f"inv_freq must be a floating-point tensor, got {getattr(inv_freq, 'dtype', inv_freq)!r}")
    if rotary_dim is not None and inv_freq.shape != (rotary_dim // 2,):
        raise ValueError(f"inv_freq must have shape (rotary_dim // 2,) = ({rotary_dim // 2},), got "
                         f"{tuple(inv_freq.shape)}")


def check_frequencies(scaling_factor, base, inv_freq, rotary_dim):
    """The frequency arguments every rotating op takes: ``scaling_factor``, and ``inv_freq`` or else ``base``."""
    check_scaling_factor(scaling_factor)
    if inv_freq is None:
        check_base(base)
    else:
        check_inv_freq(inv_freq, rotary_dim)


def _check_position_tensor(positions, device):
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be an int32 or int64 tensor, got {positions.dtype}")
    if positions.device != device:
        raise ValueError(f"positions is on {positions.device} but q is on {device}")


def resolve_positions(positions, batch, seq, device):
    """Resolve the dense-layout positions forms (see ``rotary_interp``) into a :class:`PositionSpec`."""
    if positions is None:
        return PositionSpec(POSITIONS_ARANGE, None, 0)
    if _is_int(positions):
        if positions < 0 or positions > MAX_POSITION:
            raise ValueError(f"positions offset must be in [0, 2**31 - 1], got {positions}")
        return PositionSpec(POSITIONS_ARANGE, None, int(positions))
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be None, an int or an integer tensor, got {type(positions).__name__}")
    _check_position_tensor(positions, device)
    expected = f"(batch,)=({batch},) offsets, (seq,)=({seq},) ids or (batch or 1, seq)=({batch}, {seq}) ids"
    if positions.dim() == 2:
        if positions.shape[1] != seq or not _one_of(positions.shape[0], 1, batch):
            raise ValueError(f"positions must have shape {expected}, got {tuple(positions.shape)}")
        return PositionSpec(POSITIONS_IDS, positions, 0)
    if positions.dim() != 1 or not _one_of(positions.shape[0], batch, seq):
        raise ValueError(f"positions must have shape {expected}, got {tuple(positions.shape)}")
    if batch == seq and batch > 1:
        raise ValueError(f"positions of shape ({seq},) is ambiguous when batch == seq == {seq}: pass ids as "
                         f"(1, seq) or (batch, seq), e.g. offsets[:, None] + torch.arange(seq)")
    if positions.shape[0] == seq:
        return PositionSpec(POSITIONS_IDS, positions.unsqueeze(0), 0)
    return PositionSpec(POSITIONS_OFFSETS, positions, 0)


def resolve_varlen_positions(positions, cu_seqlens, max_seqlen, total, device):
    """Resolve packed-layout positions: None/int/(n_seqs,) offsets per sequence or (total_tokens,) ids; the spec
    holds ``cu_seqlens``."""
    if cu_seqlens is None:
        raise ValueError("layout='thd' requires cu_seqlens (n_seqs + 1 cumulative sequence lengths)")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64) \
            or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of n_seqs + 1 ≥ 2 entries")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if max_seqlen is not None and (not _is_int(max_seqlen) or max_seqlen <= 0):
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    n_seqs = cu_seqlens.shape[0] - 1
    if positions is None or _is_int(positions):
        offset = resolve_positions(positions, 1, 1, device).offset
        return PositionSpec(POSITIONS_ARANGE, None, offset, cu_seqlens)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be None, an int or an integer tensor, got {type(positions).__name__}")
    _check_position_tensor(positions, device)
    if positions.dim() != 1 or not _one_of(positions.shape[0], n_seqs, total):
        raise ValueError(f"positions for layout='thd' must have shape (n_seqs,)=({n_seqs},) offsets or "
                         f"(total_tokens,)=({total},) ids, got {tuple(positions.shape)}")
    # With one token per sequence both readings give the same positions, so ids win without ambiguity.
    if positions.shape[0] == total:
        return PositionSpec(POSITIONS_IDS, positions, 0, cu_seqlens)
    return PositionSpec(POSITIONS_OFFSETS, positions, 0, cu_seqlens)


def _version_of(tensor):
    try:
        return tensor._version
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


def _checked_before(tensor):
    """True if this very tensor object passed the positions check and has not been modified since.

    Models pass one ``position_ids`` tensor to every layer; remembering it turns one sync per layer into one per step.
    """
    last = _last_checked_positions.get("entry")
    return last is not None and last[0]() is tensor and last[1] is not None and last[1] == _version_of(tensor)



def check_range(values, name, low, high, what):
    """Synchronizing check that ``low ≤ values < high``; skipped like the other value checks."""
    if values.numel() == 0 or not value_checks_enabled(values.device):
        return
    minimum, maximum = int(values.min()), int(values.max())
    if minimum < low or maximum >= high:
        raise ValueError(f"{name} must be in [{low}, {high}) ({what}), got values in [{minimum}, {maximum}]")


def check_values(positions, cu_seqlens, max_seqlen, total_tokens):
    """The synchronizing checks on values; called from custom-op implementations on real tensors."""
    if positions is not None and positions.numel() and value_checks_enabled(positions.device) \
            and not _checked_before(positions):
        minimum, maximum = (int(x) for x in torch.aminmax(positions))
        if minimum < 0:
            raise ValueError(f"positions must be ≥ 0, got a minimum of {minimum}")
        if maximum > MAX_POSITION:
            raise ValueError(f"positions must be ≤ 2**31 - 1 (beyond it the angles lose accuracy), got a maximum "
                             f"of {maximum}")
        _last_checked_positions["entry"] = (weakref.ref(positions), _version_of(positions))
    if cu_seqlens is None or not value_checks_enabled(cu_seqlens.device):
        return
    cu = cu_seqlens.to(device="cpu", dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total_tokens or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at the token count "
                         f"{total_tokens}, got {cu.tolist()[:8]}{'...' if len(cu) > 8 else ''}")
    if max_seqlen is not None and int(lengths.max()) > max_seqlen:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds max_seqlen={max_seqlen}")


# Work bound of the overlap search below: layouts made by slicing, permuting or expanding a buffer need a few dozen
# steps; only contrived ``as_strided`` layouts get near it.
_OVERLAP_SEARCH_BUDGET = 10000


def _has_integer_solution(terms, target):
    """Whether ``Σ c·k = target`` has a solution with integers ``lo ≤ k ≤ hi`` for ``(c > 0, lo, hi)`` in ``terms``.

    Depth-first over the terms by decreasing ``|c|``, keeping only the ``k`` the remaining terms can still make up
    for; a layout of nested strides (any view of a dense buffer) leaves one or two candidates per level.
    """
    terms = sorted((term for term in terms if term[0] != 0), reverse=True)
    reach_lo, reach_hi = [0] * (len(terms) + 1), [0] * (len(terms) + 1)
    for i in range(len(terms) - 1, -1, -1):
        c, lo, hi = terms[i]
        reach_lo[i], reach_hi[i] = reach_lo[i + 1] + c * lo, reach_hi[i + 1] + c * hi
    budget = [_OVERLAP_SEARCH_BUDGET]

    def visit(i, rest):
        if i == len(terms):
            return rest == 0
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError("the memory layout of the in-place tensors is too irregular to prove that they do not "
                             "overlap; pass contiguous tensors")
        c, lo, hi = terms[i]
        first = max(lo, -((reach_hi[i + 1] - rest) // c))  # ceil((rest - reach_hi) / c)
        last = min(hi, (rest - reach_lo[i + 1]) // c)
        return any(visit(i + 1, rest - c * k) for k in range(first, last + 1))

    return visit(0, target)


def _dims(shape, strides):
    """(stride, size) of the dimensions that have more than one element."""
    return [(stride, size) for stride, size in zip(strides, shape, strict=True) if size > 1]


# Layouts repeat from call to call (every layer of a model), so the answers are cached per layout: a check then costs
# a dictionary lookup.
@functools.lru_cache(maxsize=1024)
def _layout_overlaps_itself(shape, strides):
    """Whether two elements of a layout share memory (an expanded, stride-0 dimension, or strides that collide)."""
    dims = sorted(_dims(shape, strides))
    # Fast path, any slice or permutation of a dense buffer: each stride steps past everything the smaller ones span.
    span = 0
    for stride, size in dims:
        if stride <= span:
            break
        span += (size - 1) * stride
    else:
        return False
    if dims[0][0] == 0 or len({stride for stride, _ in dims}) < len(dims):
        return True
    # Index vectors i ≠ j with Σ (i − j)·stride = 0; as j − i works too, the first nonzero difference can be > 0.
    return any(_has_integer_solution([(stride, 1, size - 1)] + [(s, 1 - n, n - 1) for s, n in dims[first + 1:]], 0)
               for first, (stride, size) in enumerate(dims))


@functools.lru_cache(maxsize=1024)
def _layouts_overlap(shape_a, strides_a, shape_b, strides_b, offset):
    """Whether layout b, ``offset`` elements after layout a in the same storage, shares an element with a."""
    dims_a, dims_b = _dims(shape_a, strides_a), _dims(shape_b, strides_b)
    if sum((n - 1) * s for s, n in dims_a) < offset or sum((n - 1) * s for s, n in dims_b) < -offset:
        return False
    # An element of a at Σ i·stride_a equal to one of b: Σ i·stride_a − Σ j·stride_b = offset. Dimensions of equal
    # stride merge into one term (i − j takes every integer between the bounds).
    merged = {}
    for stride, size in dims_a:
        lo, hi = merged.get(stride, (0, 0))
        merged[stride] = (lo, hi + size - 1)
    for stride, size in dims_b:
        lo, hi = merged.get(stride, (0, 0))
        merged[stride] = (lo - (size - 1), hi)
    return _has_integer_solution([(stride, lo, hi) for stride, (lo, hi) in merged.items()], offset)


def _overlaps_itself(x):
    return x.numel() > 0 and _layout_overlaps_itself(tuple(x.shape), x.stride())


def _overlap_each_other(a, b):
    """Whether a and b (same dtype) share an element of memory."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    return _layouts_overlap(tuple(a.shape), a.stride(), tuple(b.shape), b.stride(),
                            b.storage_offset() - a.storage_offset())


def check_no_overlap(written, read=()):
    """Refuse in-place targets that overlap themselves or each other, or a tensor read by the same call.

    ``written`` and ``read`` are ``(name, tensor)`` pairs (tensors of one dtype, or None); a kernel writing into
    such memory would rotate an element twice or read what it already wrote. Skipped while ``torch.compile``
    traces, where in-place ops are functionalized.
    """
    if torch.compiler.is_compiling():
        return
    written = [(name, x) for name, x in written if x is not None]
    for name, x in written:
        if _overlaps_itself(x):
            raise ValueError(f"{name} is written in place but has elements that share memory (an expanded, "
                             f"stride-0 view?): strides {tuple(x.stride())} for shape {tuple(x.shape)}; pass "
                             f"{name}.contiguous() or its clone")
    others = written + [(name, x) for name, x in read if x is not None]
    for i, (name, x) in enumerate(written):
        for other_name, other in others[i + 1:]:
            if _overlap_each_other(x, other):
                raise ValueError(f"{name} is written in place but shares memory with {other_name}; pass tensors "
                                 f"that do not overlap")
