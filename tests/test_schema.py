"""The rope record and the one op-definition path (``ops/_schema.py``): records spelled out as op arguments and
gathered back, and every ``pi_kernels::`` custom op consistent in schema, fake and dispatch (``torch.library.opcheck``).
"""

import dataclasses

import pytest
import torch

import pi_kernels  # noqa: F401 - registers the ops
from pi_kernels._positions import POSITIONS_ARANGE, POSITIONS_IDS, POSITIONS_OFFSETS, PositionSpec
from pi_kernels.ops import attention, kv_cache, qkv_proj, rotary, rotary_embedding
from pi_kernels.ops._schema import Rope, record_op

from .tolerances import assert_close


@dataclasses.dataclass(frozen=True)
class _Inner:
    ids: torch.Tensor | None
    offset: int


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Inner
    scale: float
    name: str


@record_op("_test_record_round_trip", mutates_args=("out",))
def _round_trip(x: torch.Tensor, out: torch.Tensor, settings: _Outer, flag: bool) -> None:
    inner = settings.inner
    out.copy_(x * settings.scale + inner.offset + (inner.ids if inner.ids is not None else 0))
    if flag and settings.name != "expected":
        raise ValueError(settings.name)


@_round_trip.register_fake
def _round_trip_fake(x, out, settings, flag):
    assert isinstance(settings, _Outer) and isinstance(settings.inner, _Inner)
    return None


def test_records_are_spelled_out_and_gathered_back():
    schema = str(_round_trip._op._opoverload._schema)
    assert schema.endswith("(Tensor x, Tensor(a1!) out, Tensor? settings_inner_ids, SymInt settings_inner_offset, "
                           "float settings_scale, str settings_name, bool flag) -> ()"), schema
    x, out = torch.arange(4.0), torch.empty(4)
    _round_trip(x, out, _Outer(_Inner(torch.ones(4), 3), 2.0, "expected"), True)
    assert torch.equal(out, x * 2 + 4)
    with pytest.raises(ValueError, match="other"):
        _round_trip(x, out, _Outer(_Inner(None, 0), 1.0, "other"), True)


def test_records_cross_torch_compile():
    """The fake gets the records too: a compiled call with dynamic shapes matches eager."""
    def call(x, ids, offset):
        out = torch.empty_like(x)
        _round_trip(x, out, _Outer(_Inner(ids, offset), 0.5, "expected"), True)
        return out

    compiled = torch.compile(call, fullgraph=True, dynamic=True)
    for n in (5, 9):
        x, ids = torch.randn(n), torch.arange(n, dtype=torch.float32)
        assert torch.equal(compiled(x, ids, 2), call(x, ids, 2))


def test_rope_reversed_and_signed_turns():
    rope = Rope(PositionSpec(POSITIONS_ARANGE), None, 10000.0, 4.0, 16, False)
    back = rope.reversed()
    assert back.conjugate and not rope.conjugate and back.reversed().conjugate is False
    assert torch.equal(back.signed_turns("cpu"), -rope.turns("cpu"))
    assert torch.equal(back.turns("cpu"), rope.turns("cpu"))


def test_rope_resolve_checks_the_arguments():
    spec = PositionSpec(POSITIONS_ARANGE)
    with pytest.raises(ValueError, match="rotary_dim"):
        Rope.resolve(spec, 64, scaling_factor=2.0, base=10000.0, inv_freq=None, rotary_dim=65, interleaved=False)
    with pytest.raises(ValueError, match="scaling_factor"):
        Rope.resolve(spec, 64, scaling_factor=0.0, base=10000.0, inv_freq=None, rotary_dim=None, interleaved=False)
    rope = Rope.resolve(spec, 64, scaling_factor=2, base=500000, inv_freq=None, rotary_dim=None, interleaved=1)
    assert (rope.rotary_dim, rope.base, rope.scaling_factor, rope.interleaved) == (64, 500000.0, 2.0, True)


def test_backward_rotation_is_the_transpose():
    """A rope and its reverse undo each other through the custom op, packed positions included."""
    cu_seqlens = torch.tensor([0, 3, 3, 10])
    spec = PositionSpec(POSITIONS_OFFSETS, torch.tensor([5, 0, 100]), 0, cu_seqlens)
    rope = Rope(spec, None, 10000.0, 4.0, 12, True)
    q, k = torch.randn(10, 3, 16), torch.randn(10, 1, 16)
    q_rot, k_rot = rotary.rotary_forward(q, k, rope, None, "thd", False, "torch")
    q_back, k_back = rotary.rotary_forward(q_rot, k_rot, rope.reversed(), None, "thd", False, "torch")
    assert_close(q_back, q.double(), torch.float32, name="q")
    assert_close(k_back, k.double(), torch.float32, name="k")


def _rope(seq, **changes):
    spec = PositionSpec(POSITIONS_IDS, torch.randint(0, 50, (1, seq)))
    return dataclasses.replace(Rope(spec, None, 10000.0, 2.0, 12, False), **changes)


def _opcheck_cases():
    """Arguments of each ``pi_kernels::`` op, records included, on small CPU tensors (torch backend)."""
    q, k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    rope = _rope(5)
    rotation = attention.Rotation(rope, rope, True, True, True)
    core = attention.CoreArgs(None, None, True, 0.25)
    out, lse = attention._core_op(q, k, v, None, None, core, "torch")
    x, weight = torch.randn(2, 5, 32), torch.randn(128, 32)
    heads = qkv_proj.Heads(4, 2, 16)
    grads = [torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)]
    cache = torch.zeros(2, 9, 2, 16), torch.zeros(2, 9, 2, 16)
    paged = torch.zeros(3, 4, 2, 16), torch.zeros(3, 4, 2, 16)
    paged_rope = dataclasses.replace(rope, positions=PositionSpec(POSITIONS_IDS, torch.randint(0, 50, (5,))))
    slots = torch.tensor([0, 5, -1, 11, 2])
    cos_sin_cache = torch.randn(50, 12)
    return {
        "rotary_interp": (rotary._rotary_op, (q, k, rope, None, "bshd", "torch")),
        "rotary_interp_": (rotary._rotary_inplace_op, (q.clone(), k.clone(), rope, None, "bshd", "torch")),
        "attention_rotate": (attention._rotate_op, (q, k, rotation, "torch")),
        "attention_core": (attention._core_op, (q, k, v, None, None, core, "torch")),
        "attention_core_backward": (attention._core_backward_op,
                                    (torch.randn_like(out), q, k, v, out, lse, None, None, core, "torch")),
        "qkv_proj_rotary": (qkv_proj.qkv_proj_forward, (x, [weight], [], rope, heads, "torch")),
        "qkv_proj_rotary_backward": (qkv_proj.qkv_proj_backward,
                                     (grads, x, [weight], rope, heads, True, True, True, "torch")),
        "rotary_kv_cache_append": (kv_cache._cache_append_op,
                                   (q, k, v, *cache, torch.tensor([0, 4]), rope, False, "nhd", "torch")),
        "rotary_kv_cache_rows": (kv_cache._cache_rows_op, (q[0], k[0], slots, 12, paged_rope, True, "torch")),
        "rotary_embedding": (rotary_embedding._rotary_embedding_op,
                             (q[0].flatten(1).clone(), k[0].flatten(1).clone(), 16, paged_rope, cos_sin_cache,
                              "torch")),
        "rotary_embedding (paged cache append)": (kv_cache._cache_append_op,
                                                  (q[0], k[0], v[0], *paged, slots, paged_rope, True, "nhd",
                                                   "torch")),
    }


def test_every_op_passes_opcheck():
    """Every registered ``pi_kernels::`` op has a case here (so a new op cannot skip it), and each passes
    ``torch.library.opcheck``: schema, fake, dispatch and the AOT path agree with the implementation."""
    cases = _opcheck_cases()
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("pi_kernels::") and not name.startswith("pi_kernels::_test")}
    covered = {op._op._name for op, _ in cases.values()}
    assert registered == covered, f"ops without an opcheck case: {sorted(registered - covered)}"
    for label, (op, args) in cases.items():
        failures = {test: result for test, result in torch.library.opcheck(op._op, op._flatten(args)).items()
                    if result != "SUCCESS"}
        assert not failures, f"{label}: {failures}"


@pytest.mark.parametrize("op", ["rotary_interp", "qkv_proj_rotary", "attention_rotary", "rotary_embedding_interp"])
def test_positions_modified_before_the_backward_raise(op):
    """Positions modified in place between the forward and the backward raise there (autograd's version check of
    the rope's saved tensors), instead of rotating the gradients by the new positions."""
    positions = torch.arange(5).repeat(2, 1)
    q = torch.randn(2, 5, 4, 16, requires_grad=True)
    k, v = torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    if op == "rotary_interp":
        out = pi_kernels.rotary_interp(q, k, positions, scaling_factor=2.0)[0]
    elif op == "qkv_proj_rotary":
        x, weight = torch.randn(2, 5, 32, requires_grad=True), torch.randn(128, 32)
        out = pi_kernels.qkv_proj_rotary(x, weight, num_heads=4, num_kv_heads=2, head_dim=16, positions=positions)[0]
    elif op == "attention_rotary":
        out = pi_kernels.attention_rotary(q, k, v, positions, scaling_factor=2.0)
    else:
        positions = positions.flatten()
        query = q.detach().flatten(0, 1).flatten(1).clone().requires_grad_()
        out = query * 1.0
        pi_kernels.inference.rotary_embedding_interp(positions, out, None, 16, scaling_factor=2.0)
    positions.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
