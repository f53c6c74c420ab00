"""Parity of the Triton rotary_interp op with the float64 reference, its autograd, torch.compile and input checks.

Runs under Triton's interpreter on a CPU machine and compiled on a GPU (see conftest.py), with the same code.
"""

import functools
import math

import pytest
import torch

import pi_kernels
from pi_kernels import scaling
from pi_kernels.ops import rotary as rotary_op
from pi_kernels.ops._schema import Rope
from pi_kernels.reference import rotary_interp_reference

from .tolerances import TOLERANCE, assert_close, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["bshd", "bhsd", "sbhd", "thd"]
SEQLENS_THD = [5, 1, 0, 17, 3]  # an empty and a one-token sequence among them


def make_qk(layout, device, dtype, *, batch=2, seq=33, n_heads=4, n_kv_heads=1, head_dim=80, seqlens=None,
            noncontiguous=False, requires_grad=False):
    """Random q, k in ``layout``; ``noncontiguous`` slices them out of a fused qkv buffer, as projections do."""
    if layout == "thd":
        tokens = sum(seqlens or SEQLENS_THD)
        shape_q, shape_k, heads_dim = (tokens, n_heads, head_dim), (tokens, n_kv_heads, head_dim), 1
    else:
        dims = {"bshd": (batch, seq), "bhsd": (batch, seq), "sbhd": (seq, batch)}[layout]
        shape_q, shape_k, heads_dim = (*dims, n_heads, head_dim), (*dims, n_kv_heads, head_dim), 2
    if noncontiguous:
        fused = torch.randn(*shape_q[:-2], n_heads + 2 * n_kv_heads, head_dim + 16, device=device, dtype=dtype)
        q = fused[..., :n_heads, 8:8 + head_dim]
        k = fused[..., n_heads:n_heads + n_kv_heads, 8:8 + head_dim]
    else:
        q = torch.randn(shape_q, device=device, dtype=dtype)
        k = torch.randn(shape_k, device=device, dtype=dtype)
    if layout == "bhsd":
        q, k = q.transpose(1, heads_dim), k.transpose(1, heads_dim)
    if requires_grad:
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    return q, k


def make_positions(kind, layout, device, *, batch=2, seq=33, seqlens=None, dtype=torch.int64):
    """Positions of each documented form; values reach past a 4k window so interpolation matters."""
    seqlens = seqlens or SEQLENS_THD
    if kind == "none":
        return None
    if kind == "int":
        return 4093
    if layout == "thd":
        count = len(seqlens) if kind == "offsets" else sum(seqlens)
    else:
        count = {"offsets": batch, "ids1d": seq}.get(kind)
    if kind == "ids" and layout != "thd":
        return torch.randint(0, 20000, (batch, seq), device=device, dtype=dtype)
    return torch.randint(0, 20000, (count,), device=device, dtype=dtype)


def cu_seqlens_for(seqlens, device):
    return torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], device=device, dtype=torch.int32)


def call_both(q, k, positions, layout, **options):
    """Our op, and the float64 reference on the same inputs (taken before an in-place call)."""
    if layout == "thd":
        options.setdefault("cu_seqlens", cu_seqlens_for(SEQLENS_THD, q.device))
    reference_options = {name: value for name, value in options.items() if name not in ("inplace", "max_seqlen")}
    ref = rotary_interp_reference(q.detach().double(), k.detach().double(), positions, layout=layout,
                                  **reference_options)
    return pi_kernels.rotary_interp(q, k, positions, layout=layout, **options), ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 48])
@pytest.mark.parametrize("position_kind", ["none", "int", "offsets", "ids"])
@pytest.mark.parametrize("inplace", [False, True])
def test_forward_matches_reference(device, dtype, layout, interleaved, rotary_dim, position_kind, inplace):
    q, k = make_qk(layout, device, dtype, n_heads=4, n_kv_heads=2 if interleaved else 1)
    positions = make_positions(position_kind, layout, device)
    q_before, k_before = q.clone(), k.clone()
    (q_out, k_out), (q_ref, k_ref) = call_both(q, k, positions, layout, scaling_factor=4.0, rotary_dim=rotary_dim,
                                               interleaved=interleaved, inplace=inplace)
    assert_close(q_out, q_ref, dtype, name="q")
    assert_close(k_out, k_ref, dtype, name="k")
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    if inplace:
        assert q_out is q and k_out is k
    else:
        assert torch.equal(q, q_before) and torch.equal(k, k_before), "a non-inplace call modified its inputs"
    if rotary_dim is not None:
        # Features past rotary_dim are copied bit for bit.
        assert torch.equal(q_out[..., rotary_dim:], q_before[..., rotary_dim:])
        assert torch.equal(k_out[..., rotary_dim:], k_before[..., rotary_dim:])


@pytest.mark.parametrize("shape", [
    dict(batch=1, seq=1, n_heads=8, n_kv_heads=1, head_dim=128),     # decode step, MQA
    dict(batch=2, seq=217, n_heads=3, n_kv_heads=3, head_dim=80),    # odd length, odd heads, d=80
    dict(batch=3, seq=7, n_heads=32, n_kv_heads=8, head_dim=64),     # GQA 4:1, more heads than a block
    dict(batch=1, seq=5, n_heads=2, n_kv_heads=2, head_dim=2),       # one pair
])
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "sbhd"])
def test_odd_shapes_and_views(device, shape, noncontiguous, layout):
    q, k = make_qk(layout, device, torch.float32, noncontiguous=noncontiguous, **shape)
    positions = torch.randint(0, 50000, (shape["batch"], shape["seq"]), device=device)
    (q_out, k_out), (q_ref, k_ref) = call_both(q, k, positions, layout, scaling_factor=2.5, base=500000.0)
    assert_close(q_out, q_ref, torch.float32, name="q")
    assert_close(k_out, k_ref, torch.float32, name="k")


def test_noncontiguous_inplace_writes_only_its_slice(device):
    fused = torch.randn(2, 19, 4 + 2 * 2, 64, device=device)
    before = fused.clone()
    q, k = fused[:, :, :4], fused[:, :, 4:6]
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), 11, scaling_factor=8.0)
    pi_kernels.rotary_interp(q, k, 11, scaling_factor=8.0, inplace=True)
    assert_close(fused[:, :, :4], q_ref, torch.float32, name="q")
    assert_close(fused[:, :, 4:6], k_ref, torch.float32, name="k")
    assert torch.equal(fused[:, :, 6:], before[:, :, 6:]), "v was written"


@pytest.mark.parametrize("seqlens", [[1, 1, 1, 1], [217], [0, 4, 0, 9, 1, 30, 2, 2, 5]])
def test_packed_sequences(device, seqlens):
    q, k = make_qk("thd", device, torch.float32, seqlens=seqlens, n_heads=4, n_kv_heads=1)
    cu_seqlens = cu_seqlens_for(seqlens, device)
    for positions in (None, make_positions("offsets", "thd", device, seqlens=seqlens),
                      make_positions("ids", "thd", device, seqlens=seqlens, dtype=torch.int32)):
        q_out, k_out = pi_kernels.rotary_interp(q, k, positions, layout="thd", cu_seqlens=cu_seqlens,
                                                max_seqlen=max(seqlens), scaling_factor=3.0)
        q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), positions, layout="thd",
                                               cu_seqlens=cu_seqlens, scaling_factor=3.0)
        assert_close(q_out, q_ref, torch.float32, name="q")
        assert_close(k_out, k_ref, torch.float32, name="k")


def test_poisoned_outputs_are_fully_written(device):
    """Launch into NaN-filled outputs: every element, rotated or passed through, must be written."""
    q, k = make_qk("bshd", device, torch.float16, batch=2, seq=37, n_heads=5, n_kv_heads=3, head_dim=80)
    q_out, k_out = torch.full_like(q, math.nan), torch.full_like(k, math.nan)
    spec = pi_kernels._validation.resolve_positions(None, 2, 37, q.device)
    rotary_op.launch_rotary_kernel(q, k, q_out, k_out, Rope(spec, None, 10000.0, 4.0, 48, False))
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), scaling_factor=4.0, rotary_dim=48)
    assert_close(q_out, q_ref, torch.float16, name="q")
    assert_close(k_out, k_ref, torch.float16, name="k")


def test_precision_at_a_million_positions(device):
    """fp32 at positions up to 2**20 with scaling_factor 16 must match float64 to 1e-6 (plain fp32 angles: ~3e-4)."""
    positions = torch.randint(0, 2**20, (2, 64), device=device)
    positions[0, 0] = 2**20
    q, k = make_qk("bshd", device, torch.float32, batch=2, seq=64, n_heads=4, n_kv_heads=2, head_dim=128)
    (q_out, k_out), (q_ref, k_ref) = call_both(q, k, positions, "bshd", scaling_factor=16.0)
    assert rel_error(q_out, q_ref) <= 1e-6 and rel_error(k_out, k_ref) <= 1e-6
    # The bar is meaningful: the usual float32 cos/sin cache misses it by orders of magnitude.
    inv_freq = scaling.rope_inv_freq(10000.0, 128, device=device, dtype=torch.float32)
    angles = (positions.float() / 16.0)[..., None] * inv_freq
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    x1, x2 = q.chunk(2, dim=-1)
    q_naive = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    assert rel_error(q_naive, q_ref) > 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 48])
def test_gradients(device, dtype, layout, interleaved, rotary_dim):
    q, k = make_qk(layout, device, dtype, n_heads=4, n_kv_heads=2, requires_grad=True)
    positions = make_positions("ids", layout, device)
    options = dict(scaling_factor=4.0, rotary_dim=rotary_dim, interleaved=interleaved)
    if layout == "thd":
        options["cu_seqlens"] = cu_seqlens_for(SEQLENS_THD, device)
    q_out, k_out = pi_kernels.rotary_interp(q, k, positions, layout=layout, **options)
    grad_q, grad_k = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (grad_q, grad_k))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    q_ref, k_ref = rotary_interp_reference(q64, k64, positions, layout=layout, **options)
    torch.autograd.backward((q_ref, k_ref), (grad_q.double(), grad_k.double()))
    assert_close(q.grad, q64.grad, dtype, name="dq")
    assert_close(k.grad, k64.grad, dtype, name="dk")


def test_gradients_of_expanded_upstream_grads(device):
    """The grad of ``.sum()`` arrives as a stride-0 expanded tensor; the kernel must honour its strides."""
    q, k = make_qk("bshd", device, torch.float32, n_heads=4, n_kv_heads=1, requires_grad=True)
    q_out, k_out = pi_kernels.rotary_interp(q, k, 100, scaling_factor=2.0)
    (q_out.sum() + 3.0 * k_out.sum()).backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    q_ref, k_ref = rotary_interp_reference(q64, k64, 100, scaling_factor=2.0)
    (q_ref.sum() + 3.0 * k_ref.sum()).backward()
    assert_close(q.grad, q64.grad, torch.float32, name="dq")
    assert_close(k.grad, k64.grad, torch.float32, name="dk")


@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_inplace_under_autograd(device, layout):
    leaf_q, leaf_k = make_qk(layout, device, torch.float32, requires_grad=True)
    q, k = leaf_q * 1.0, leaf_k * 1.0  # in-place on a non-leaf, as inside a model
    positions = make_positions("ids", layout, device)
    options = {"cu_seqlens": cu_seqlens_for(SEQLENS_THD, device)} if layout == "thd" else {}
    q_out, k_out = pi_kernels.rotary_interp(q, k, positions, layout=layout, scaling_factor=4.0, inplace=True,
                                            **options)
    assert q_out is q and k_out is k
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(k)
    torch.autograd.backward((q_out, k_out), (grad_q, grad_k))
    q64, k64 = leaf_q.detach().double().requires_grad_(), leaf_k.detach().double().requires_grad_()
    q_ref, k_ref = rotary_interp_reference(q64, k64, positions, layout=layout, scaling_factor=4.0, **options)
    torch.autograd.backward((q_ref, k_ref), (grad_q.double(), grad_k.double()))
    assert_close(leaf_q.grad, q64.grad, torch.float32, name="dq")
    assert_close(leaf_k.grad, k64.grad, torch.float32, name="dk")


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_inplace_under_autograd_on_views(device, layout):
    """q and k as views of projection outputs, as in a model: ``q_proj(x).view(...)``, rotated in place."""
    x = torch.randn(2, 33, 96, device=device, requires_grad=True)
    w_q, w_k = torch.randn(4 * 16, 96, device=device), torch.randn(2 * 16, 96, device=device)
    positions = make_positions("ids", layout, device)

    def project(rotary):
        q, k = (x @ w_q.T).view(2, 33, 4, 16), (x @ w_k.T).view(2, 33, 2, 16)
        if layout == "bhsd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return rotary(q, k, positions, layout=layout, scaling_factor=4.0)

    q_out, k_out = project(functools.partial(pi_kernels.rotary_interp, inplace=True))
    grad_q, grad_k = torch.randn_like(q_out), torch.randn_like(k_out)
    (dx,) = torch.autograd.grad((q_out, k_out), x, (grad_q, grad_k))
    q_ref, k_ref = project(rotary_interp_reference)
    (dx_ref,) = torch.autograd.grad((q_ref, k_ref), x, (grad_q, grad_k))
    assert_close(q_out, q_ref, torch.float32, name="q")
    assert_close(k_out, k_ref, torch.float32, name="k")
    assert_close(dx, dx_ref, torch.float32, name="dx")


def _overlapping_inplace_inputs(kind, device):
    if kind == "expanded q":
        return torch.randn(1, 3, 1, 8, device=device).expand(1, 3, 4, 8), torch.randn(1, 3, 1, 8, device=device)
    if kind == "q is k":
        x = torch.randn(1, 3, 2, 8, device=device)
        return x, x
    buffer = torch.randn(1, 3, 5, 8, device=device)  # heads 0-3 and 2-4 of one buffer
    return buffer[:, :, :4], buffer[:, :, 2:]


@pytest.mark.parametrize("kind,match", [("expanded q", "q is written in place but has elements that share memory"),
                                        ("q is k", "q is written in place but shares memory with k"),
                                        ("overlapping views", "q is written in place but shares memory with k")])
def test_inplace_refuses_overlapping_memory(device, kind, match):
    q, k = _overlapping_inplace_inputs(kind, device)
    q_before, k_before = q.clone(), k.clone()
    with pytest.raises(ValueError, match=match):
        pi_kernels.rotary_interp(q, k, inplace=True)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    # Out of place, the same inputs are fine.
    q_out, k_out = pi_kernels.rotary_interp(q, k)
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double())
    assert_close(q_out, q_ref, torch.float32, name="q")
    assert_close(k_out, k_ref, torch.float32, name="k")


def test_double_backward(device):
    """The backward goes through the op again, so gradients of gradients exist and match the reference."""
    q, k = make_qk("bshd", device, torch.float32, requires_grad=True)
    upstream = torch.randn_like(q, requires_grad=True)
    q_out, _ = pi_kernels.rotary_interp(q, k, scaling_factor=4.0)
    (dq,) = torch.autograd.grad(q_out, q, upstream, create_graph=True)
    probe = torch.randn_like(dq)
    (d_upstream,) = torch.autograd.grad(dq, upstream, probe)
    # d(R^T g)/dg applied to probe is R probe: the forward rotation of the probe.
    expected, _ = rotary_interp_reference(probe.double(), k.detach().double(), scaling_factor=4.0)
    assert_close(d_upstream, expected, torch.float32, name="d(dq)/d(upstream)")


def test_custom_inv_freq_and_interpolation(device):
    """inv_freq overrides base; PI through scaling_factor equals dividing the frequencies."""
    q, k = make_qk("bshd", device, torch.float32, head_dim=64)
    llama3 = scaling.rope_frequencies({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}, 64).inv_freq
    (q_out, k_out), (q_ref, k_ref) = call_both(q, k, 9000, "bshd", inv_freq=llama3.float())
    assert_close(q_out, q_ref, torch.float32, name="q")
    plain = scaling.rope_inv_freq(10000.0, 64, device=device)
    via_factor, _ = pi_kernels.rotary_interp(q, k, 9000, scaling_factor=4.0)
    via_inv_freq, _ = pi_kernels.rotary_interp(q, k, 9000, inv_freq=scaling.linear_inv_freq(plain, 4.0))
    assert rel_error(via_factor, via_inv_freq) <= TOLERANCE[torch.float32]


def test_custom_inv_freq_with_interpolation(device):
    """A custom inv_freq and scaling_factor ≠ 1 together: the factor divides the angle (a multiply would not pass)."""
    q, k = make_qk("bshd", device, torch.float32, head_dim=64)
    yarn = scaling.rope_frequencies({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 4096}, 64).inv_freq.to(device)
    positions = make_positions("ids", "bshd", device)
    (q_out, k_out), (q_ref, k_ref) = call_both(q, k, positions, "bshd", inv_freq=yarn, scaling_factor=3.0)
    assert_close(q_out, q_ref, torch.float32, name="q")
    assert_close(k_out, k_ref, torch.float32, name="k")
    via_inv_freq, _ = pi_kernels.rotary_interp(q, k, positions, inv_freq=yarn / 3.0)
    assert rel_error(q_out, via_inv_freq) <= TOLERANCE[torch.float32]


def test_interpolated_positions_stay_in_trained_range(device):
    """PI's point: position m with factor s rotates exactly like position m / s without it."""
    q, k = make_qk("bshd", device, torch.float32, batch=1, seq=16)
    ids = torch.arange(0, 64, 4, device=device)[None]
    interpolated, _ = pi_kernels.rotary_interp(q, k, ids, scaling_factor=4.0)
    plain, _ = pi_kernels.rotary_interp(q, k, ids // 4)
    assert rel_error(interpolated, plain) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("inplace,views", [(False, False), (True, False), (True, True)])
def test_torch_compile_fullgraph(device, inplace, views):
    def step(q, k, positions):
        q, k = q * 1.0, k * 1.0
        if views:
            q, k = q.view(q.shape), k.view(k.shape)
        q, k = pi_kernels.rotary_interp(q, k, positions, scaling_factor=4.0, inplace=inplace)
        return (q.float() ** 2).sum() + (k * 3.0).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    q, k = make_qk("bshd", device, torch.float32, requires_grad=True)
    positions = torch.randint(0, 9000, (2, 33), device=device)
    loss = compiled(q, k, positions)
    loss.backward()
    grads = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    loss_eager = step(q, k, positions)
    loss_eager.backward()
    assert rel_error(loss, loss_eager) <= TOLERANCE[torch.float32]
    assert_close(grads[0], q.grad, torch.float32, name="dq")
    assert_close(grads[1], k.grad, torch.float32, name="dk")


def test_module(device):
    inv_freq = scaling.rope_inv_freq(500000.0, 48, device=device)
    rope = pi_kernels.RotaryInterp(48, scaling_factor=8.0, inv_freq=inv_freq, interleaved=True, layout="bhsd")
    assert "scaling_factor=8.0" in repr(rope)
    q, k = make_qk("bhsd", device, torch.float32)
    (q_out, k_out) = rope(q, k, 123)
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), 123, scaling_factor=8.0, inv_freq=inv_freq,
                                           rotary_dim=48, interleaved=True, layout="bhsd")
    assert_close(q_out, q_ref, torch.float32, name="q")
    assert_close(k_out, k_ref, torch.float32, name="k")


def test_value_checks_can_be_switched_off(device):
    q, k = make_qk("bshd", device, torch.float32)
    negative = torch.full((2,), -1, device=device)
    with pytest.raises(ValueError, match="positions must be ≥ 0"):
        pi_kernels.rotary_interp(q, k, negative)
    pi_kernels.set_value_checks(False)
    try:
        pi_kernels.rotary_interp(q, k, negative)
    finally:
        pi_kernels.set_value_checks(True)


BAD_INPUTS = [
    ("odd head_dim", dict(q=(2, 8, 4, 63), k=(2, 8, 1, 63)), {}, ValueError, "head_dim must be a positive even"),
    ("zero head_dim", dict(q=(2, 8, 4, 0), k=(2, 8, 1, 0)), {}, ValueError, "head_dim must be a positive even"),
    ("odd rotary_dim", {}, dict(rotary_dim=31), ValueError, "rotary_dim must be a positive even int"),
    ("rotary_dim > head_dim", {}, dict(rotary_dim=96), ValueError, "rotary_dim must be"),
    ("dtype mismatch", dict(k_dtype=torch.float16), {}, TypeError, "k.dtype"),
    ("unsupported dtype", dict(dtype=torch.float64), {}, TypeError, "q.dtype must be"),
    ("batch mismatch", dict(q=(2, 8, 4, 64), k=(3, 8, 1, 64)), {}, ValueError, "same batch and seq"),
    ("seq mismatch", dict(q=(2, 8, 4, 64), k=(2, 9, 1, 64)), {}, ValueError, "same batch and seq"),
    ("head_dim mismatch", dict(q=(2, 8, 4, 64), k=(2, 8, 1, 32)), {}, ValueError, "k head_dim"),
    ("wrong rank", dict(q=(8, 4, 64), k=(8, 1, 64)), {}, ValueError, "q must have shape"),
    ("positions shape", {}, dict(positions=("int64", (3,))), ValueError, "positions must have shape"),
    ("positions 2-D shape", {}, dict(positions=("int64", (2, 7))), ValueError, "positions must have shape"),
    ("positions dtype", {}, dict(positions=("float32", (2, 8))), TypeError, "positions must be an int32"),
    ("negative offset", {}, dict(positions=-3), ValueError, r"positions offset must be in \[0, 2\*\*31 - 1\]"),
    ("negative ids", {}, dict(positions=("negative", (2, 8))), ValueError, "positions must be ≥ 0"),
    ("scaling_factor 0", {}, dict(scaling_factor=0.0), ValueError, "scaling_factor must be"),
    ("scaling_factor < 0", {}, dict(scaling_factor=-4.0), ValueError, "scaling_factor must be"),
    ("scaling_factor nan", {}, dict(scaling_factor=math.nan), ValueError, "scaling_factor must be"),
    ("base", {}, dict(base=0.0), ValueError, "base must be"),
    ("inv_freq shape", {}, dict(inv_freq=("float32", (16,))), ValueError, "inv_freq must have shape"),
    ("unknown layout", {}, dict(layout="bsd"), ValueError, "layout must be one of"),
    ("thd without cu_seqlens", dict(q=(8, 4, 64), k=(8, 1, 64)), dict(layout="thd"), ValueError,
     "requires cu_seqlens"),
    ("cu_seqlens with bshd", {}, dict(cu_seqlens=("int32", (3,))), ValueError, "only valid with layout='thd'"),
    ("cu_seqlens total", dict(q=(8, 4, 64), k=(8, 1, 64)), dict(layout="thd", cu_seqlens=[0, 3, 7]), ValueError,
     "end at the token count 8"),
    ("cu_seqlens decreasing", dict(q=(8, 4, 64), k=(8, 1, 64)), dict(layout="thd", cu_seqlens=[0, 5, 3, 8]),
     ValueError, "non-decreasing"),
    ("max_seqlen exceeded", dict(q=(8, 4, 64), k=(8, 1, 64)),
     dict(layout="thd", cu_seqlens=[0, 2, 8], max_seqlen=4), ValueError, "exceeds max_seqlen=4"),
    ("thd positions shape", dict(q=(8, 4, 64), k=(8, 1, 64)),
     dict(layout="thd", cu_seqlens=[0, 2, 8], positions=("int64", (5,))), ValueError, "positions for layout='thd'"),
    ("ambiguous 1-D positions", dict(q=(4, 4, 2, 64), k=(4, 4, 1, 64)), dict(positions=("int64", (4,))),
     ValueError, "ambiguous"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_rejected(device, case):
    _, shapes, options, error, match = case
    options = dict(options)
    dtype = shapes.get("dtype", torch.float32)
    q = torch.randn(shapes.get("q", (2, 8, 4, 64)), device=device, dtype=dtype)
    k = torch.randn(shapes.get("k", (2, 8, 1, 64)), device=device, dtype=shapes.get("k_dtype", dtype))
    for name in ("positions", "inv_freq", "cu_seqlens"):
        value = options.get(name)
        if isinstance(value, tuple):
            kind, shape = value
            if kind == "negative":
                options[name] = -torch.ones(shape, device=device, dtype=torch.int64)
            else:
                options[name] = torch.ones(shape, device=device, dtype=getattr(torch, kind))
        elif isinstance(value, list):
            options[name] = torch.tensor(value, device=device, dtype=torch.int32)
    q_before = q.clone()
    with pytest.raises(error, match=match):
        pi_kernels.rotary_interp(q, k, **options)
    assert torch.equal(q, q_before)


def test_device_mismatch_is_rejected(device):
    if device.type != "cuda":
        pytest.skip("needs a second device type")
    q = torch.randn(2, 8, 4, 64, device=device)
    with pytest.raises(ValueError, match="same device"):
        pi_kernels.rotary_interp(q, torch.randn(2, 8, 1, 64))
    with pytest.raises(ValueError, match="positions is on"):
        pi_kernels.rotary_interp(q, torch.randn(2, 8, 1, 64, device=device), torch.zeros(2, 8, dtype=torch.long))


def test_positions_modified_in_place_are_checked_again(device):
    """The positions check is remembered per tensor object, and forgotten when the tensor is modified."""
    q, k = make_qk("bshd", device, torch.float32)
    positions = torch.arange(33, device=device).expand(2, 33).clone()
    pi_kernels.rotary_interp(q, k, positions)
    positions[1, 5] = -7
    with pytest.raises(ValueError, match="minimum of -7"):
        pi_kernels.rotary_interp(q, k, positions)
