"""The rope record every rotating op takes, and the one path from an op's signature to its ``torch.library`` op.

One record for the rope settings
--------------------------------
:class:`Rope` is a rotation resolved once, by the public wrapper after its checks: the positions in the one form
every kernel reads (:class:`~pi_kernels._positions.PositionSpec`, packed input's ``cu_seqlens`` included), the
frequencies (``inv_freq``, else ``base``), ``scaling_factor``, ``rotary_dim``, the pair layout and the direction.
It travels as one object through an op's autograd Function, its custom op and its fake, into the launcher of every
backend (Triton, CUDA, torch), which reads the fields it needs. A new setting is a field here and a read where it is
used; no signature lists the settings.

One path to a custom op
-----------------------
A custom op cannot take a record, so :func:`record_op` defines the op from a Python signature whose parameters may be
annotated with records (dataclasses, nested ones too): the schema spells each record out as its fields
(``rope_positions_mode``, ``rope_base``, ...), the implementation and the fake get the records back, and callers pass
records. Every op of the package is defined this way.
"""

import dataclasses
import inspect
import math

import torch

from .._positions import PositionSpec
from .._validation import check_frequencies, check_rotary_dim
from ..scaling import rope_inv_freq

__all__ = ["Rope", "record_op"]


_TURNS_CACHE = {}


# eq=False: fields hold tensors, which compare element by element.
@dataclasses.dataclass(frozen=True, eq=False)
class Rope:
    """A rotation with interpolated RoPE, resolved: the pair ``j`` at position ``m`` turns by
    ``(m / scaling_factor) * inv_freq[j]`` (by minus that when ``conjugate``).

    Attributes
    ----------
    positions : PositionSpec
        Positions of the tokens, resolved (``cu_seqlens`` of packed input included).
    inv_freq : Tensor or None
        (rotary_dim // 2,) frequencies of any scheme; None: ``base ** (-2j / rotary_dim)``.
    base : float
        RoPE base, read when ``inv_freq`` is None.
    scaling_factor : float
        PI's L'/L.
    rotary_dim : int
        Leading features of a head that are rotated; the rest pass through.
    interleaved : bool
        GPT-J pairs (2j, 2j + 1) when True, rotate-half pairs (j, j + rotary_dim / 2) when False.
    conjugate : bool
        Rotate by −angle: the transpose of the rotation, which the backward passes apply to gradients.
    """

    positions: PositionSpec
    inv_freq: torch.Tensor | None
    base: float
    scaling_factor: float
    rotary_dim: int
    interleaved: bool
    conjugate: bool = False

    @classmethod
    def resolve(cls, positions, head_dim, *, scaling_factor, base, inv_freq, rotary_dim, interleaved):
        """The record of a public op's rope arguments (as :func:`pi_kernels.rotary_interp` takes them), checked;
        ``positions`` resolved, ``rotary_dim`` None meaning all of ``head_dim``."""
        rotary_dim = check_rotary_dim(rotary_dim, head_dim)
        check_frequencies(scaling_factor, base, inv_freq, rotary_dim)
        return cls(positions, inv_freq, float(base), float(scaling_factor), rotary_dim, bool(interleaved))

    def tensors(self):
        """The tensors the record holds, None where absent. An autograd Function that keeps the record for its
        backward also passes these to ``save_for_backward`` and reads ``saved_tensors`` in the backward, so that
        positions modified in place in between raise there instead of rotating the gradients by the new values."""
        return self.positions.ids, self.positions.cu_seqlens, self.inv_freq

    # The two copies below are built field by field, not with dataclasses.replace: torch.compile traces them (in the
    # wrappers and the autograd Functions' backwards), and Dynamo of torch 2.11 cannot trace replace on a record made
    # inside the graph.
    def with_positions(self, positions):
        """The same rotation of other positions."""
        return Rope(positions, self.inv_freq, self.base, self.scaling_factor, self.rotary_dim, self.interleaved,
                    self.conjugate)

    def reversed(self):
        """The same rotation in the other direction (its transpose)."""
        return Rope(self.positions, self.inv_freq, self.base, self.scaling_factor, self.rotary_dim, self.interleaved,
                    not self.conjugate)

    def signed_turns(self, device):
        """:meth:`turns`, negated when ``conjugate``: for the kernels without a CONJUGATE switch. The rotation by
        −angle is as exact as by CONJUGATE: cos is even and sin odd, also after the range reduction."""
        turns = self.turns(device)
        return -turns if self.conjugate else turns

    def turns(self, device):
        """Float64 ``inv_freq / (2π · scaling_factor)``, (rotary_dim // 2,): the angles in turns per position that
        every kernel reads (``ops/_rope.py`` says why); cached per device for the ``base`` form.

        Every launcher builds this table before it launches, inside the op's implementation, so the scalar checks
        repeated here see the real values even where ``torch.compile`` traced them as symbols (see
        ``_validation._is_positive_real``).
        """
        check_frequencies(self.scaling_factor, self.base, self.inv_freq, None)
        if self.inv_freq is not None:
            return self.inv_freq.to(device=device, dtype=torch.float64) / (2.0 * math.pi * self.scaling_factor)
        key = (float(self.base), int(self.rotary_dim), float(self.scaling_factor), str(device))
        table = _TURNS_CACHE.get(key)
        if table is None:
            table = rope_inv_freq(self.base, self.rotary_dim, device=device) / (2.0 * math.pi * self.scaling_factor)
            _TURNS_CACHE[key] = table
        return table


def _leaves(kind):
    """(attribute path, annotation) of every leaf of a parameter annotated ``kind``: a record's fields, recursively,
    in field order; ``((), kind)`` for anything else."""
    if not dataclasses.is_dataclass(kind):
        return [((), kind)]
    return [((field.name, *path), leaf) for field in dataclasses.fields(kind) for path, leaf in _leaves(field.type)]


def _gather(kind, leaves):
    """A parameter's value back from an iterator over the leaves."""
    if not dataclasses.is_dataclass(kind):
        return next(leaves)
    return kind(**{field.name: _gather(field.type, leaves) for field in dataclasses.fields(kind)})


class RecordOp:
    """A ``pi_kernels::`` custom op called with records (see :func:`record_op`)."""

    def __init__(self, op, kinds):
        self._op = op
        self._kinds = kinds
        self._paths = [[path for path, _ in _leaves(kind)] for kind in kinds]

    def _flatten(self, args):
        leaves = []
        for value, paths in zip(args, self._paths, strict=True):
            for path in paths:
                leaf = value
                for attribute in path:
                    leaf = getattr(leaf, attribute)
                leaves.append(leaf)
        return leaves

    def _unflatten(self, leaves):
        leaves = iter(leaves)
        return [_gather(kind, leaves) for kind in self._kinds]

    def __call__(self, *args):
        return self._op(*self._flatten(args))

    def register_fake(self, fake):
        """Register ``fake``, which takes the op's arguments with records, as the op's fake (meta) function."""
        self._op.register_fake(lambda *leaves: fake(*self._unflatten(leaves)))
        return fake


def record_op(name, *, mutates_args=()):
    """Decorator: define ``pi_kernels::<name>`` from a function whose parameters may be annotated with records.

    The schema is torch's own inference (``torch.library.infer_schema``, as for ``custom_op``) on the signature
    with each record spelled out as its fields, named ``<parameter>_<field>``; the function gets the records back.
    Returns a :class:`RecordOp`, called like the function; its ``register_fake`` takes a fake with the same
    arguments.
    """
    def define(fn):
        signature = inspect.signature(fn)
        kinds = [parameter.annotation for parameter in signature.parameters.values()]
        flat = [inspect.Parameter("_".join((parameter, *path)), inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                  annotation=leaf)
                for parameter, kind in zip(signature.parameters, kinds, strict=True)
                for path, leaf in _leaves(kind)]

        def prototype(*leaves):
            return None

        prototype.__signature__ = signature.replace(parameters=flat)
        schema = torch.library.infer_schema(prototype, mutates_args=mutates_args)
        record = None

        def implementation(*leaves):
            return fn(*record._unflatten(leaves))

        op = torch.library.custom_op(f"pi_kernels::{name}", implementation, mutates_args=mutates_args,
                                     schema=schema)
        record = RecordOp(op, kinds)
        return record

    return define
