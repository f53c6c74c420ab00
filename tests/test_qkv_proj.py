"""Parity of the fused QKV projection + interpolated RoPE with the float64 reference, its autograd, module and checks.

The reference is ``x @ weight.T + bias`` → split → ``rotary_interp_reference``, in float64. Runs under Triton's
interpreter on a CPU machine and compiled on a GPU (see conftest.py), with the same code.
"""

import math
import types

import pytest
import torch

import pi_kernels
from pi_kernels import _validation as v
from pi_kernels import scaling
from pi_kernels.ops import qkv_proj as qkv_op
from pi_kernels.ops._schema import Rope
from pi_kernels.reference import qkv_proj_rotary_reference

from .tolerances import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEQLENS = [5, 1, 0, 17, 3]  # packed sequences, an empty and a one-token one among them
# hidden = 80·2: not a multiple of the K tile, so the masked K tail runs; head_dim 80 pads 40 pairs to 64.
SHAPE = dict(batch=2, seq=37, hidden=160, num_heads=4, num_kv_heads=2, head_dim=80)


def make_inputs(device, dtype, *, batch=2, seq=37, hidden=160, num_heads=4, num_kv_heads=2, head_dim=80,
                bias=False, packed_tokens=None, requires_grad=False):
    """Random x, fused weight and bias; weights scaled so outputs stay O(1) in fp16."""
    x_shape = (packed_tokens, hidden) if packed_tokens is not None else (batch, seq, hidden)
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    x = torch.randn(x_shape, device=device, dtype=dtype)
    weight = (torch.randn(rows, hidden, device=device) / math.sqrt(hidden)).to(dtype)
    b = torch.randn(rows, device=device, dtype=dtype) if bias else None
    if requires_grad:
        x, weight = x.requires_grad_(), weight.requires_grad_()
        b = b.requires_grad_() if b is not None else None
    return x, weight, b


def heads(shape):
    return dict(num_heads=shape["num_heads"], num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"])


def make_positions(kind, device, *, batch=2, seq=37, seqlens=None):
    """Positions of each documented form; values reach past a 4k window so interpolation matters."""
    if kind == "none":
        return None
    if kind == "int":
        return 4093
    if seqlens is not None:
        count = len(seqlens) if kind == "offsets" else sum(seqlens)
        return torch.randint(0, 20000, (count,), device=device)
    if kind == "offsets":
        return torch.randint(0, 20000, (batch,), device=device)
    if kind == "ids1d":
        return torch.randint(0, 20000, (seq,), device=device, dtype=torch.int32)
    return torch.randint(0, 20000, (batch, seq), device=device)


def cu_seqlens_for(seqlens, device):
    return torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], device=device, dtype=torch.int32)


def reference(x, weight, bias, **options):
    """The float64 reference on the same (rounded) inputs."""
    return qkv_proj_rotary_reference(x.detach().double(), weight.detach().double(),
                                     None if bias is None else bias.detach().double(), **options)


def check_outputs(outs, refs, dtype):
    for name, out, ref in zip("qkv"[:len(outs)], outs, refs, strict=True):
        assert out.dtype == dtype and out.is_contiguous(), name
        assert_close(out, ref, dtype, name=name)


def reference_grads(x, weight, bias, upstream, **options):
    """Float64 gradients of x, weight and bias for the given upstream gradients of (q, k, v)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    refs = qkv_proj_rotary_reference(*leaves[:2], leaves[2] if bias is not None else None, **options)
    torch.autograd.backward(refs, [g.double() for g in upstream])
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 48])
def test_forward_matches_reference(device, dtype, interleaved, rotary_dim):
    x, weight, b = make_inputs(device, dtype, bias=True, **SHAPE)
    positions = make_positions("ids", device)
    before = [t.clone() for t in (x, weight, b)]
    options = dict(heads(SHAPE), positions=positions, scaling_factor=4.0, rotary_dim=rotary_dim,
                   interleaved=interleaved)
    outs = pi_kernels.qkv_proj_rotary(x, weight, b, **options)
    check_outputs(outs, reference(x, weight, b, **options), dtype)
    assert [o.shape for o in outs] == [(2, 37, 4, 80), (2, 37, 2, 80), (2, 37, 2, 80)]
    for tensor, copy in zip((x, weight, b), before, strict=True):
        assert torch.equal(tensor, copy), "an input was modified"


@pytest.mark.parametrize("position_kind", ["none", "int", "offsets", "ids1d", "ids"])
def test_position_forms(device, position_kind):
    x, weight, _ = make_inputs(device, torch.float32, **SHAPE)
    positions = make_positions(position_kind, device)
    options = dict(heads(SHAPE), positions=positions, scaling_factor=8.0, base=500000.0)
    check_outputs(pi_kernels.qkv_proj_rotary(x, weight, **options), reference(x, weight, None, **options),
                  torch.float32)


@pytest.mark.parametrize("position_kind", ["none", "int", "offsets", "ids"])
def test_packed_sequences(device, position_kind):
    x, weight, _ = make_inputs(device, torch.float32, packed_tokens=sum(SEQLENS), **SHAPE)
    positions = make_positions(position_kind, device, seqlens=SEQLENS)
    options = dict(heads(SHAPE), positions=positions, scaling_factor=3.0, interleaved=position_kind == "ids",
                   cu_seqlens=cu_seqlens_for(SEQLENS, device))
    outs = pi_kernels.qkv_proj_rotary(x, weight, **options)
    assert outs[0].shape == (sum(SEQLENS), 4, 80)
    check_outputs(outs, reference(x, weight, None, **options), torch.float32)


@pytest.mark.parametrize("shape", [
    dict(batch=1, seq=1, hidden=64, num_heads=8, num_kv_heads=1, head_dim=128),     # decode step, MQA, K % tile = 0
    dict(batch=1, seq=217, hidden=240, num_heads=3, num_kv_heads=3, head_dim=80),   # tokens not a multiple of the tile
    dict(batch=3, seq=7, hidden=80, num_heads=16, num_kv_heads=4, head_dim=16),     # GQA 4:1, many heads, d=16
    dict(batch=2, seq=5, hidden=32, num_heads=2, num_kv_heads=2, head_dim=2),       # one pair per head
])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_odd_shapes_and_views(device, shape, noncontiguous):
    x, weight, b = make_inputs(device, torch.float32, bias=True, **shape)
    if noncontiguous:
        # x with a feature stride of 2 (every other column of a wider buffer); weight and bias as strided slices.
        x = torch.stack([x, x], dim=-1).flatten(-2)[..., ::2]
        weight = torch.cat([weight, weight[:, :7]], dim=1)[:, :shape["hidden"]]
        b = torch.stack([b, b], dim=1)[:, 0]
        assert not (x.is_contiguous() or weight.is_contiguous() or b.is_contiguous())
    positions = torch.randint(0, 50000, (shape["batch"], shape["seq"]), device=device)
    options = dict(heads(shape), positions=positions, scaling_factor=2.5, base=500000.0)
    check_outputs(pi_kernels.qkv_proj_rotary(x, weight, b, **options), reference(x, weight, b, **options),
                  torch.float32)


@pytest.mark.parametrize("packed", [False, True])
def test_no_tokens(device, packed):
    """Zero tokens: empty outputs, an empty dx and a zero dweight, and no launch on an empty grid."""
    x, weight, _ = make_inputs(device, torch.float32, seq=0, packed_tokens=0 if packed else None,
                               requires_grad=True, **{name: value for name, value in SHAPE.items() if name != "seq"})
    options = dict(heads(SHAPE), cu_seqlens=cu_seqlens_for([0], device) if packed else None)
    outs = pi_kernels.qkv_proj_rotary(x, weight, **options)
    assert [out.shape[-2:] for out in outs] == [(4, 80), (2, 80), (2, 80)] and all(o.numel() == 0 for o in outs)
    sum(out.sum() for out in outs).backward()
    assert x.grad.shape == x.shape and torch.equal(weight.grad, torch.zeros_like(weight))


def test_poisoned_outputs_are_fully_written(device):
    """Launch into NaN-filled outputs: every element, rotated, passed through or v, must be written."""
    shape = dict(batch=2, seq=37, hidden=96, num_heads=3, num_kv_heads=2, head_dim=80)
    x, weight, b = make_inputs(device, torch.float16, bias=True, **shape)
    outs = [torch.full((2, 37, n, 80), math.nan, device=device, dtype=torch.float16) for n in (3, 2, 2)]
    spec = v.resolve_positions(None, 2, 37, x.device)
    weights, biases = qkv_op._split_heads([weight], [b], 3, 2, 80)
    qkv_op._launch_forward(x, weights, biases, outs, 80, Rope(spec, None, 10000.0, 4.0, 48, False))
    refs = reference(x, weight, b, **heads(shape), scaling_factor=4.0, rotary_dim=48)
    check_outputs(outs, refs, torch.float16)


def _descriptors_expected(device):
    """Whether aligned operands take the tensor-descriptor path: under the interpreter and on sm_90 and later."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


@pytest.mark.parametrize("layout", ["contiguous", "batch-strided", "x-base-misaligned", "x-rows-misaligned",
                                    "weight-rows-misaligned", "x-features-strided"])
@pytest.mark.parametrize(("head_dim", "interleaved", "rotary_dim"),
                         [(32, False, None), (32, True, None), (32, False, 16), (16, False, None)],
                         ids=["rotate-half", "gptj", "partial", "d16"])
def test_descriptor_path_and_pointer_fallback(device, monkeypatch, layout, head_dim, interleaved, rotary_dim):
    """The GEMM reads x (and the weight, where its rows are taken in order) and writes q, k, v through tensor
    descriptors (TMA on sm_90) when TMA can address every operand, and through masked pointers otherwise (a base or
    a row stride that is not a multiple of 16 bytes, features not contiguous, batch rows not one matrix): both agree
    with the reference, in every pair order (rotate-half in row order, GPT-J, partial rotary) and with a K tail."""
    chosen = []
    use_descriptors = qkv_op._use_descriptors
    monkeypatch.setattr(qkv_op, "_use_descriptors", lambda *args: chosen.append(use_descriptors(*args))
                        or chosen[-1])
    # hidden 80: x's and the weight's rows are 16 elements apart, aligned also for Triton 3.4 and 3.5's interpreter,
    # which checks a descriptor's strides in elements.
    shape = dict(batch=2, seq=21, hidden=80, num_heads=2, num_kv_heads=1, head_dim=head_dim)
    x, weight, b = make_inputs(device, torch.float32, bias=True, **shape)
    pad = {"x-base-misaligned": (1, 0), "x-rows-misaligned": (0, 1)}.get(layout, (0, 0))
    if sum(pad):
        x = torch.cat([x[..., :pad[0]], x, x[..., :pad[1]]], dim=-1)[..., pad[0]:pad[0] + shape["hidden"]]
    elif layout == "x-features-strided":
        x = torch.stack([x, x], dim=-1)[..., 0]
    elif layout == "batch-strided":
        x = torch.cat([x, x[:, :3]], dim=1)[:, :shape["seq"]]   # batch rows 24 tokens apart, 21 used
    elif layout == "weight-rows-misaligned":
        weight = torch.cat([weight, weight[:, :1]], dim=1)[:, :shape["hidden"]]
    options = dict(heads(shape), positions=make_positions("ids", device, seq=shape["seq"]), scaling_factor=4.0,
                   interleaved=interleaved, rotary_dim=rotary_dim)
    check_outputs(pi_kernels.qkv_proj_rotary(x, weight, b, **options), reference(x, weight, b, **options),
                  torch.float32)
    assert chosen == [layout == "contiguous" and _descriptors_expected(device)], chosen


def test_matches_matmul_then_rotary_interp(device):
    """q and k are rotated exactly as rotary_interp rotates the unfused projection's output."""
    x, weight, b = make_inputs(device, torch.float32, bias=True, **SHAPE)
    positions = make_positions("offsets", device)
    rope = dict(scaling_factor=4.0, rotary_dim=48, interleaved=True)
    q, k, v_out = pi_kernels.qkv_proj_rotary(x, weight, b, **heads(SHAPE), positions=positions, **rope)
    q_rows, q_and_k_rows = 4 * 80, 6 * 80
    projected = torch.nn.functional.linear(x, weight, b)
    q_ref, k_ref = pi_kernels.rotary_interp(projected[..., :q_rows].unflatten(-1, (4, 80)),
                                            projected[..., q_rows:q_and_k_rows].unflatten(-1, (2, 80)),
                                            positions, **rope)
    assert_close(q, q_ref.double(), torch.float32, name="q")
    assert_close(k, k_ref.double(), torch.float32, name="k")
    assert_close(v_out, projected[..., q_and_k_rows:].unflatten(-1, (2, 80)).double(), torch.float32, name="v")


def test_precision_at_a_million_positions(device):
    """fp32 at positions up to 2**20 with scaling_factor 16 stays within 1e-6 of float64, as rotary_interp does."""
    shape = dict(batch=2, seq=64, hidden=64, num_heads=2, num_kv_heads=1, head_dim=128)
    x, weight, _ = make_inputs(device, torch.float32, **shape)
    positions = torch.randint(0, 2**20, (2, 64), device=device)
    positions[0, 0] = 2**20
    options = dict(heads(shape), positions=positions, scaling_factor=16.0)
    check_outputs(pi_kernels.qkv_proj_rotary(x, weight, **options), reference(x, weight, None, **options),
                  torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("interleaved", "rotary_dim"), [(False, None), (True, 48)])
def test_gradients(device, dtype, interleaved, rotary_dim):
    x, weight, b = make_inputs(device, dtype, bias=True, requires_grad=True, **SHAPE)
    options = dict(heads(SHAPE), positions=make_positions("ids", device), scaling_factor=4.0, rotary_dim=rotary_dim,
                   interleaved=interleaved)
    outs = pi_kernels.qkv_proj_rotary(x, weight, b, **options)
    upstream = [torch.randn_like(out) for out in outs]
    torch.autograd.backward(outs, upstream)
    ref_x, ref_weight, ref_bias = reference_grads(x, weight, b, upstream, **options)
    assert_close(x.grad, ref_x, dtype, name="dx")
    assert_close(weight.grad, ref_weight, dtype, name="dweight")
    assert_close(b.grad, ref_bias, dtype, name="dbias")


def test_gradients_packed(device):
    x, weight, b = make_inputs(device, torch.float32, bias=True, packed_tokens=sum(SEQLENS), requires_grad=True,
                               **SHAPE)
    options = dict(heads(SHAPE), positions=make_positions("offsets", device, seqlens=SEQLENS), scaling_factor=4.0,
                   cu_seqlens=cu_seqlens_for(SEQLENS, device))
    outs = pi_kernels.qkv_proj_rotary(x, weight, b, **options)
    upstream = [torch.randn_like(out) for out in outs]
    torch.autograd.backward(outs, upstream)
    for name, grad, ref in zip(("dx", "dweight", "dbias"), (x.grad, weight.grad, b.grad),
                               reference_grads(x, weight, b, upstream, **options), strict=True):
        assert_close(grad, ref, torch.float32, name=name)


def test_gradients_of_expanded_upstream_grads(device):
    """The grad of ``.sum()`` arrives as stride-0 expanded tensors; the backward must honour their strides."""
    x, weight, _ = make_inputs(device, torch.float32, requires_grad=True, **SHAPE)
    options = dict(heads(SHAPE), positions=100, scaling_factor=2.0)
    q, k, v_out = pi_kernels.qkv_proj_rotary(x, weight, **options)
    (q.sum() + 3.0 * k.sum() - v_out.sum()).backward()
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    q_ref, k_ref, v_ref = qkv_proj_rotary_reference(x64, w64, **options)
    (q_ref.sum() + 3.0 * k_ref.sum() - v_ref.sum()).backward()
    assert_close(x.grad, x64.grad, torch.float32, name="dx")
    assert_close(weight.grad, w64.grad, torch.float32, name="dweight")


@pytest.mark.parametrize("trainable", ["x only", "weight only"])
def test_only_the_needed_gradients(device, trainable):
    """Frozen weights (adapters) skip dweight; a frozen input skips dx; what is computed still matches."""
    x, weight, b = make_inputs(device, torch.float32, bias=True, **SHAPE)
    leaf = x.requires_grad_() if trainable == "x only" else weight.requires_grad_()
    options = dict(heads(SHAPE), scaling_factor=4.0)
    outs = pi_kernels.qkv_proj_rotary(x, weight, b, **options)
    upstream = [torch.randn_like(out) for out in outs]
    torch.autograd.backward(outs, upstream)
    ref_x, ref_weight, _ = reference_grads(x, weight, b, upstream, **options)
    assert_close(leaf.grad, ref_x if trainable == "x only" else ref_weight, torch.float32, name="grad")
    assert (weight.grad if trainable == "x only" else x.grad) is None and b.grad is None


@pytest.mark.parametrize("with_v", [True, False])
def test_separate_weights(device, with_v):
    """(q_weight, k_weight[, v_weight]) without a concatenation gives the fused results and per-weight grads."""
    x, weight, b = make_inputs(device, torch.float32, bias=True, **SHAPE)
    rows = [4 * 80, 2 * 80, 2 * 80]
    pieces = [w.detach().clone().requires_grad_() for w in weight.split(rows)]
    bias_pieces = [p.detach().clone().requires_grad_() for p in b.split(rows)]
    if not with_v:
        pieces, bias_pieces = pieces[:2], bias_pieces[:2]
    x.requires_grad_()
    options = dict(heads(SHAPE), positions=make_positions("ids", device), scaling_factor=4.0, interleaved=True)
    outs = pi_kernels.qkv_proj_rotary(x, tuple(pieces), tuple(bias_pieces), **options)
    assert len(outs) == (3 if with_v else 2)
    refs = reference(x, weight, b, **options)
    check_outputs(outs, refs[:len(outs)], torch.float32)
    upstream = [torch.randn_like(out) for out in refs]
    torch.autograd.backward(outs, upstream[:len(outs)])
    if not with_v:
        upstream[2] = torch.zeros_like(upstream[2])  # no v output: its rows get no gradient
    ref_x, ref_weight, ref_bias = reference_grads(x, weight, b, upstream, **options)
    assert_close(x.grad, ref_x, torch.float32, name="dx")
    for index, (piece, bias_piece) in enumerate(zip(pieces, bias_pieces, strict=True)):
        start = sum(rows[:index])
        assert_close(piece.grad, ref_weight[start:start + rows[index]], torch.float32, name=f"dweight[{index}]")
        assert_close(bias_piece.grad, ref_bias[start:start + rows[index]], torch.float32, name=f"dbias[{index}]")


def test_torch_compile_fullgraph(device):
    def step(x, weight, positions):
        q, k, v_out = pi_kernels.qkv_proj_rotary(x * 1.0, weight, num_heads=4, num_kv_heads=2, head_dim=80,
                                                 positions=positions, scaling_factor=4.0)
        return (q.float() ** 2).sum() + (k * 3.0).sum() + v_out.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x, weight, _ = make_inputs(device, torch.float32, requires_grad=True, **SHAPE)
    positions = make_positions("ids", device)
    loss = compiled(x, weight, positions)
    loss.backward()
    grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    step(x, weight, positions).backward()
    assert_close(loss.detach(), step(x, weight, positions).detach().double(), torch.float32, name="loss")
    assert_close(grads[0], x.grad.double(), torch.float32, name="dx")
    assert_close(grads[1], weight.grad.double(), torch.float32, name="dweight")


def test_module_from_linear_and_to_dtype(device):
    q_proj, k_proj, v_proj = (torch.nn.Linear(160, rows, bias=True, device=device) for rows in (320, 160, 160))
    inv_freq = scaling.rope_inv_freq(500000.0, 48, device=device)
    proj = pi_kernels.QKVProjRotary.from_linear(q_proj, k_proj, v_proj, **heads(SHAPE), rotary_dim=48,
                                                scaling_factor=8.0, inv_freq=inv_freq)
    assert "scaling_factor=8.0" in repr(proj) and proj.weight.shape == (640, 160)
    x = torch.randn(2, 37, 160, device=device)
    positions = make_positions("ids", device)
    outs = proj(x, positions)
    weight = torch.cat([q_proj.weight, k_proj.weight, v_proj.weight])
    bias = torch.cat([q_proj.bias, k_proj.bias, v_proj.bias])
    options = dict(heads(SHAPE), positions=positions, scaling_factor=8.0, inv_freq=inv_freq, rotary_dim=48)
    check_outputs(outs, reference(x, weight, bias, **options), torch.float32)
    # Casting the module must not round the frequency table with it.
    proj.to(torch.bfloat16)
    assert proj.weight.dtype == torch.bfloat16 and proj.inv_freq.dtype == torch.float64
    outs = proj(x.to(torch.bfloat16), positions)
    check_outputs(outs, reference(x.to(torch.bfloat16), proj.weight, proj.bias, **options), torch.bfloat16)


def test_module_from_hf_attention(device):
    """A Llama-style attention layer with PI ("linear") rope scaling in its config."""
    config = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
              "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "max_position_embeddings": 4096}
    attention = types.SimpleNamespace(
        config=config, q_proj=torch.nn.Linear(128, 128, bias=False, device=device),
        k_proj=torch.nn.Linear(128, 64, bias=False, device=device),
        v_proj=torch.nn.Linear(128, 64, bias=False, device=device))
    proj = pi_kernels.QKVProjRotary.from_hf_attention(attention)
    assert (proj.num_heads, proj.num_kv_heads, proj.head_dim, proj.bias) == (4, 2, 32, None)
    x = torch.randn(2, 37, 128, device=device)
    positions = make_positions("ids", device)
    weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    # PI with factor 4 is plain RoPE at positions / 4.
    refs = reference(x, weight, None, num_heads=4, num_kv_heads=2, head_dim=32, positions=positions,
                     scaling_factor=4.0)
    check_outputs(proj(x, positions), refs, torch.float32)
    yarn = dict(config, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})
    with pytest.raises(ValueError, match="attention_factor"):
        pi_kernels.QKVProjRotary.from_hf_attention(attention, yarn)


BAD_INPUTS = [
    ("weight rows vs head counts", dict(weight=(96 * 6, 64)), {}, ValueError, "rows but .* check the head counts"),
    ("weight hidden", dict(weight=(96 * 8, 48)), {}, ValueError, r"weight must have shape \(768, 64\)"),
    ("weight dtype", dict(weight_dtype=torch.float16), {}, TypeError, "weight.dtype"),
    ("bias shape", dict(bias=(100,)), {}, ValueError, "bias must have shape"),
    ("bias dtype", dict(bias=(768,), bias_dtype=torch.bfloat16), {}, TypeError, "bias.dtype"),
    ("x dtype", dict(dtype=torch.float64), {}, TypeError, "x.dtype must be"),
    ("x rank", dict(x=(2, 3, 8, 64)), {}, ValueError, "x must have shape"),
    ("tuple weight rows", dict(weight="tuple_bad"), {}, ValueError, r"weight\[1\] \(k\) must have shape"),
    ("tuple of one weight", dict(weight="tuple_one"), {}, TypeError, "weight must be a tensor"),
    ("bias tensor with tuple weight", dict(weight="tuple", bias=(768,)), {}, TypeError, "bias must be None or a "),
    ("odd head_dim", {}, dict(head_dim=95, num_heads=4, num_kv_heads=4), ValueError, "head_dim must be even"),
    ("num_kv_heads 0", {}, dict(num_kv_heads=0), ValueError, "num_kv_heads must be an int"),
    # The weight has the rows these head counts ask for, so only the grouping is wrong.
    ("heads not a multiple", dict(weight=(96 * 7, 64)), dict(num_heads=3, num_kv_heads=2), ValueError,
     r"num_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
    ("rotary_dim > head_dim", {}, dict(rotary_dim=128), ValueError, "rotary_dim must be"),
    ("scaling_factor", {}, dict(scaling_factor=0.0), ValueError, "scaling_factor must be"),
    ("inv_freq shape", {}, dict(inv_freq=("float32", (16,))), ValueError, "inv_freq must have shape"),
    ("packed without cu_seqlens", dict(x=(10, 64)), {}, ValueError, "requires cu_seqlens"),
    ("cu_seqlens with 3-D x", {}, dict(cu_seqlens=[0, 3, 8]), ValueError, "only valid with packed x"),
    ("cu_seqlens total", dict(x=(10, 64)), dict(cu_seqlens=[0, 3, 8]), ValueError, "end at the token count 10"),
    ("positions shape", {}, dict(positions=("int64", (3,))), ValueError, "positions must have shape"),
    ("positions dtype", {}, dict(positions=("float32", (2, 8))), TypeError, "positions must be an int32"),
    ("negative positions", {}, dict(positions=("negative", (2, 8))), ValueError, "positions must be ≥ 0"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_rejected(device, case):
    _, shapes, options, error, match = case
    options = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 96, **options}
    dtype = shapes.get("dtype", torch.float32)
    x = torch.randn(shapes.get("x", (2, 8, 64)), device=device, dtype=dtype)
    weight_form = shapes.get("weight", (96 * 8, 64))
    if isinstance(weight_form, str):
        k_rows = 100 if weight_form == "tuple_bad" else 192
        weight = tuple(torch.randn(rows, 64, device=device) for rows in (384, k_rows, 192))
        weight = weight[:1] if weight_form == "tuple_one" else weight
    else:
        weight = torch.randn(weight_form, device=device, dtype=shapes.get("weight_dtype", dtype))
    bias = shapes.get("bias")
    if bias is not None:
        bias = torch.randn(bias, device=device, dtype=shapes.get("bias_dtype", dtype))
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
    with pytest.raises(error, match=match):
        pi_kernels.qkv_proj_rotary(x, weight, bias, **options)


def test_device_mismatch_is_rejected(device):
    if device.type != "cuda":
        pytest.skip("needs a second device type")
    x = torch.randn(2, 8, 64, device=device)
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        pi_kernels.qkv_proj_rotary(x, torch.randn(768, 64), num_heads=4, num_kv_heads=2, head_dim=96)
    with pytest.raises(ValueError, match="positions is on"):
        pi_kernels.qkv_proj_rotary(x, torch.randn(768, 64, device=device), num_heads=4, num_kv_heads=2, head_dim=96,
                                   positions=torch.zeros(2, 8, dtype=torch.long))


def test_benchmark_quick_run(device, tmp_path, capsys):
    """The benchmark runs end to end: every provider passes parity, rows and plots are written."""
    from benchmarks import bench_qkv_proj, harness, results_io

    argv = ["--quick", "--out", str(tmp_path)]
    argv += ["--families", "gqa", "--tokens", "2048"] if device.type == "cuda" else ["--families", "tiny-d80"]
    assert bench_qkv_proj.main(argv) == 0
    out = capsys.readouterr().out
    if device.type != "cuda":
        assert harness.NO_GPU_LINE in out
    rows = results_io.read_results(results_io.results_dir(results_io.environment(), tmp_path) / "qkv_proj.csv")
    assert {row["provider"] for row in rows} == set(bench_qkv_proj.PROVIDERS)
    assert all(row["status"] == "ok" and row["median_ms"] for row in rows), [r for r in rows if r["status"] != "ok"]
    assert all(float(row["parity"]) < 1.5e-2 for row in rows if row["provider"] != "matmul")
