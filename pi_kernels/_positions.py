"""Resolved RoPE positions: the :class:`PositionSpec` record, and how a kernel reads it.

A user's ``positions`` argument (None, an int, offsets or ids; see :func:`pi_kernels.rotary_interp`), with the
``cu_seqlens`` of packed input, is resolved once, by the public wrapper (``_validation.resolve_positions`` /
``resolve_varlen_positions``), into a PositionSpec, which every op and backend takes as it is (inside the rope record
of ``ops/_schema.py``). It reaches a kernel as a pointer and two strides (:func:`position_pointer_and_strides`), read
by ``ops._rope.token_positions``.
"""

from dataclasses import dataclass

import torch

# How a kernel reads positions: 0 = arange + scalar offset, 1 = arange + offset per batch row (or per sequence for
# packed input), 2 = explicit ids.
POSITIONS_ARANGE, POSITIONS_OFFSETS, POSITIONS_IDS = 0, 1, 2

# Largest position id or offset accepted (int32's). Angles are computed in float64 turns (ops/_rope.py), whose
# fraction keeps float32 accuracy while m · inv_freq / (2π · scaling_factor) < 2**29, i.e. for every position
# offset + index < 2**32 at inv_freq ≤ 1; past that the error grows with the position (1e-5 at 2**40), silently.
MAX_POSITION = 2**31 - 1


# eq=False: fields hold tensors, which compare element by element; same_as compares what matters.
@dataclass(frozen=True, eq=False)
class PositionSpec:
    """Resolved positions.

    Attributes
    ----------
    mode : int
        One of POSITIONS_ARANGE, POSITIONS_OFFSETS, POSITIONS_IDS.
    ids : Tensor or None
        int32/int64 offsets, (batch,) or (n_seqs,), for POSITIONS_OFFSETS; ids, (batch or 1, seq) or packed
        (total_tokens,), for POSITIONS_IDS; None for POSITIONS_ARANGE.
    offset : int
        Added to 0..seq-1 for POSITIONS_ARANGE; 0 otherwise.
    cu_seqlens : Tensor or None
        (n_seqs + 1,) int32/int64 cumulative sequence lengths of packed input, whose arange restarts at each
        sequence and whose offsets are per sequence; None for dense (batch, seq) input.
    """

    mode: int
    ids: torch.Tensor | None = None
    offset: int = 0
    cu_seqlens: torch.Tensor | None = None

    def same_as(self, other):
        """Whether ``other`` reads the very same positions (the same tensors, not equal ones)."""
        return (self.mode == other.mode and self.ids is other.ids and self.offset == other.offset
                and self.cu_seqlens is other.cu_seqlens)


def position_pointer_and_strides(spec, placeholder):
    """(tensor, stride per batch row or sequence, stride per token) for a kernel to read ``spec``'s positions.

    ``placeholder`` is passed where the kernel reads no positions (any tensor on the device, or None).
    """
    if spec.mode == POSITIONS_ARANGE:
        return placeholder, 0, 0
    if spec.mode == POSITIONS_OFFSETS:
        return spec.ids, spec.ids.stride(0), 0
    # One row of ids shared by every batch row reads with a batch stride of 0.
    stride_pb = 0 if spec.ids.dim() == 1 or spec.ids.shape[0] == 1 else spec.ids.stride(0)
    return spec.ids, stride_pb, spec.ids.stride(-1)
