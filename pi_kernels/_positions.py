"""Resolved RoPE positions: the :class:`PositionSpec` record and its round trips to op and kernel arguments.

A user's ``positions`` argument (None, an int, offsets or ids; see :func:`pi_kernels.rotary_interp`) is resolved once
by ``_validation.resolve_positions``/``resolve_varlen_positions`` into a PositionSpec. Custom ops cannot take a
record, so it crosses ``torch.library`` as three arguments (:meth:`PositionSpec.op_args`,
:meth:`PositionSpec.from_op_args`), and reaches a kernel as a pointer and two strides
(:func:`position_pointer_and_strides`), read by ``ops._rope.token_positions``.
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


@dataclass(frozen=True)
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
    """

    mode: int
    ids: torch.Tensor | None = None
    offset: int = 0

    def op_args(self):
        """``(positions, position_mode, position_offset)``: the spec as custom-op arguments."""
        return self.ids, self.mode, self.offset

    @classmethod
    def from_op_args(cls, positions, position_mode, position_offset):
        """The spec back from the three arguments of :meth:`op_args`."""
        return cls(position_mode, positions, position_offset)


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
