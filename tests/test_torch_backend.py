"""``backend="torch"`` of every op against the float64 reference, its autograd and torch.compile, and the choice
``backend="auto"`` makes on CPU tensors.

Runs the plain-PyTorch implementations on the test device, whatever conftest.py chose for the Triton kernels.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import pi_kernels
from pi_kernels import _torch_backend, inference
from pi_kernels._positions import POSITIONS_ARANGE, POSITIONS_IDS, PositionSpec
from pi_kernels.ops._schema import Rope
from pi_kernels.reference import (
    attention_rotary_reference,
    qkv_proj_rotary_reference,
    rotary_angles,
    rotary_embedding_reference,
    rotary_interp_reference,
    rotary_kv_cache_append_reference,
    rotary_paged_kv_cache_append_reference,
)

from .tolerances import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["bshd", "bhsd", "sbhd", "thd"]
SEQLENS = [5, 1, 0, 17, 3]  # packed sequences, an empty and a one-token one among them
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cu_seqlens_for(seqlens, device):
    return torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], device=device, dtype=torch.int32)


def make_qk(layout, device, dtype, *, batch=2, seq=33, n_heads=4, n_kv_heads=1, head_dim=80, fused=False):
    """Random q, k in ``layout``; ``fused`` slices them out of one qkv buffer (non-contiguous views)."""
    if layout == "thd":
        lead = (sum(SEQLENS),)
    else:
        lead = {"bshd": (batch, seq), "bhsd": (batch, seq), "sbhd": (seq, batch)}[layout]
    if fused:
        buffer = torch.randn(*lead, n_heads + 2 * n_kv_heads, head_dim + 16, device=device, dtype=dtype)
        q, k = buffer[..., :n_heads, 8:8 + head_dim], buffer[..., n_heads:n_heads + n_kv_heads, 8:8 + head_dim]
    else:
        q = torch.randn(*lead, n_heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(*lead, n_kv_heads, head_dim, device=device, dtype=dtype)
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    return q, k


def make_positions(kind, layout, device, *, batch=2, seq=33):
    """Positions of each documented form; values reach past a 4k window so interpolation matters."""
    if kind == "none":
        return None
    if kind == "int":
        return 4093
    if layout == "thd":
        count = len(SEQLENS) if kind == "offsets" else sum(SEQLENS)
        return torch.randint(0, 20000, (count,), device=device)
    if kind == "offsets":
        return torch.randint(0, 20000, (batch,), device=device)
    return torch.randint(0, 20000, (batch, seq), device=device, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim, inplace", [(None, False), (48, True)])
@pytest.mark.parametrize("position_kind", ["none", "int", "offsets", "ids"])
def test_rotary_matches_reference(device, dtype, layout, interleaved, rotary_dim, position_kind, inplace):
    q, k = make_qk(layout, device, dtype, fused=inplace)
    positions = make_positions(position_kind, layout, device)
    options = dict(scaling_factor=4.0, rotary_dim=rotary_dim, interleaved=interleaved, layout=layout)
    if layout == "thd":
        options["cu_seqlens"] = cu_seqlens_for(SEQLENS, device)
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), positions, **options)
    q_before, k_before = q.clone(), k.clone()
    q_out, k_out = pi_kernels.rotary_interp(q, k, positions, inplace=inplace, backend="torch", **options)
    assert_close(q_out, q_ref, dtype, name="q")
    assert_close(k_out, k_ref, dtype, name="k")
    if inplace:
        assert q_out is q and k_out is k
    else:
        assert torch.equal(q, q_before) and torch.equal(k, k_before), "a non-inplace call modified its inputs"


@pytest.mark.parametrize("seq", [1, 217])
def test_rotary_odd_shapes(device, seq):
    q = torch.randn(3, seq, 5, 80, device=device)
    k = torch.randn(3, seq, 1, 80, device=device)
    q_out, k_out = pi_kernels.rotary_interp(q, k, 7, scaling_factor=2.0, base=500000.0, backend="torch")
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), 7, scaling_factor=2.0, base=500000.0)
    assert_close(q_out, q_ref, torch.float32, name="q")
    assert_close(k_out, k_ref, torch.float32, name="k")


def test_poisoned_outputs_are_fully_written(device):
    """The torch launchers write every element of their outputs (NaN-filled here), the tail past rotary_dim too."""
    q, k = make_qk("bshd", device, torch.float32)
    spec = PositionSpec(POSITIONS_IDS, make_positions("ids", "bshd", device), 0)
    q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    _torch_backend.rotary(q, k, q_out, k_out, Rope(spec, None, 10000.0, 4.0, 48, False))
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), spec.ids, scaling_factor=4.0, rotary_dim=48)
    assert_close(q_out, q_ref, torch.float32, name="q")
    assert_close(k_out, k_ref, torch.float32, name="k")
    x, weight, bias = make_projection(device, torch.float32)
    outs = [torch.full((2, 37, heads, 80), float("nan"), device=device) for heads in (4, 2, 2)]
    rows = weight.split([320, 160, 160])
    _torch_backend.qkv_proj(x, rows, bias.split([320, 160, 160]), outs, 80,
                            Rope(PositionSpec(POSITIONS_ARANGE, None, 5), None, 10000.0, 4.0, 48, False))
    refs = qkv_proj_rotary_reference(x.double(), weight.double(), bias.double(), **HEADS, positions=5,
                                     scaling_factor=4.0, rotary_dim=48)
    for name, out, ref in zip("qkv", outs, refs, strict=True):
        assert_close(out, ref, torch.float32, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("interleaved, inplace", [(False, False), (True, True)])
def test_rotary_in_blocks_of_tokens(device, monkeypatch, dtype, layout, interleaved, inplace):
    """Rotated block by block (q: blocks of 5 of its 33 tokens, k: 20), the result has the same bits as in one block."""
    q, k = make_qk(layout, device, dtype, fused=inplace)
    positions = make_positions("ids", layout, device)
    options = dict(scaling_factor=4.0, rotary_dim=48, interleaved=interleaved, layout=layout, inplace=inplace,
                   backend="torch")
    whole = [out.clone() for out in pi_kernels.rotary_interp(q.clone(), k.clone(), positions, **options)]
    # 5 tokens of q (2 sequences x 4 heads x 48 rotated features each); k has 1 head, so 20 tokens.
    monkeypatch.setattr(_torch_backend, "_BLOCK_ELEMENTS", 5 * 2 * 4 * 48)
    blocked = pi_kernels.rotary_interp(q, k, positions, **options)
    for name, out, expected in zip("qk", blocked, whole, strict=True):
        assert torch.equal(out, expected), f"{name} differs when rotated in blocks of tokens"


def test_blocks_of_tokens_in_the_other_ops(device, monkeypatch):
    """rotary_embedding (in place), the KV-cache append (gathered tokens) and qkv_proj, in blocks of 1-2 tokens."""
    monkeypatch.setattr(_torch_backend, "_BLOCK_ELEMENTS", 200)
    test_rotary_embedding_matches_reference(device, torch.bfloat16, False, 48, False, True)
    test_kv_cache_append_matches_reference(device, torch.float32, 48, "ids")
    test_poisoned_outputs_are_fully_written(device)


def test_rotary_precision_at_a_million_positions(device):
    """The float64 angle reduction: error at position ~2**20 stays at the float32 level."""
    q, k = make_qk("bshd", device, torch.float32, seq=8)
    positions = torch.arange(2**20, 2**20 + 8, device=device).expand(2, 8)
    q_out, _ = pi_kernels.rotary_interp(q, k, positions, scaling_factor=16.0, backend="torch")
    q_ref, _ = rotary_interp_reference(q.double(), k.double(), positions, scaling_factor=16.0)
    assert_close(q_out, q_ref, torch.float32, name="q", scale=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bshd", "thd"])
@pytest.mark.parametrize("inplace", ["no", "non_leaf", "views"])
def test_rotary_gradients(device, dtype, layout, inplace):
    """Gradients with random upstream grads, in place on a non-leaf or on views of one buffer (as a model rotates
    slices of its fused projection), against the float64 reference."""
    q, k = make_qk(layout, device, dtype)
    positions = make_positions("ids", layout, device)
    options = dict(scaling_factor=4.0, rotary_dim=48, layout=layout)
    if layout == "thd":
        options["cu_seqlens"] = cu_seqlens_for(SEQLENS, device)
    q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(k)
    if inplace == "views":
        n_heads = q.shape[-2]
        fused = torch.cat((q_leaf, k_leaf), dim=-2) * 1
        q_in, k_in = fused[..., :n_heads, :], fused[..., n_heads:, :]
    else:
        q_in, k_in = (q_leaf * 1, k_leaf * 1) if inplace == "non_leaf" else (q_leaf, k_leaf)
    q_out, k_out = pi_kernels.rotary_interp(q_in, k_in, positions, inplace=inplace != "no", backend="torch",
                                            **options)
    torch.autograd.backward((q_out, k_out), (grad_q, grad_k))
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    torch.autograd.backward(rotary_interp_reference(q64, k64, positions, **options),
                            (grad_q.double(), grad_k.double()))
    assert_close(q_leaf.grad, q64.grad, dtype, name="dq")
    assert_close(k_leaf.grad, k64.grad, dtype, name="dk")


def test_rotary_expanded_upstream_grads(device):
    """Upstream gradients that are stride-0 views (the gradient of a sum)."""
    q, k = make_qk("bshd", device, torch.float32)
    q, k = q.requires_grad_(), k.requires_grad_()
    q_out, k_out = pi_kernels.rotary_interp(q, k, scaling_factor=2.0, backend="torch")
    (q_out.sum() + k_out.sum()).backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    q_ref, k_ref = rotary_interp_reference(q64, k64, scaling_factor=2.0)
    (q_ref.sum() + k_ref.sum()).backward()
    assert_close(q.grad, q64.grad, torch.float32, name="dq")
    assert_close(k.grad, k64.grad, torch.float32, name="dk")


@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_torch_compile_fullgraph(device, inplace):
    q, k = make_qk("bshd", device, torch.float32)
    positions = make_positions("ids", "bshd", device)

    def step(q, k, positions):
        q, k = q * 1, k * 1
        q_out, k_out = pi_kernels.rotary_interp(q, k, positions, scaling_factor=4.0, inplace=inplace,
                                                backend="torch")
        return q_out.square().sum() + k_out.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    q_leaf, k_leaf = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = compiled(q_leaf, k_leaf, positions)
    loss.backward()
    q_eager, k_eager = q.clone().requires_grad_(), k.clone().requires_grad_()
    step(q_eager, k_eager, positions).backward()
    assert torch.allclose(loss, step(q, k, positions), rtol=1e-6)
    assert torch.allclose(q_leaf.grad, q_eager.grad) and torch.allclose(k_leaf.grad, k_eager.grad)


def make_cos_sin_cache(rot_dim, device, dtype, max_position=300):
    angles = rotary_angles(torch.arange(max_position, device=device), scaling_factor=4.0, rotary_dim=rot_dim)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [80, 48])
@pytest.mark.parametrize("from_cache", [True, False])
@pytest.mark.parametrize("batched", [False, True])  # (tokens,) int64 positions, or (batch, seq) int32
def test_rotary_embedding_matches_reference(device, dtype, is_neox, rot_dim, from_cache, batched):
    lead = (2, 9) if batched else (17,)
    fused = torch.randn(*lead, 6 * 80, device=device, dtype=dtype)
    query, key = fused[..., :4 * 80], fused[..., 4 * 80:5 * 80]
    positions = torch.randint(0, 300, lead, device=device, dtype=torch.int32 if batched else torch.int64)
    before = fused.clone()
    if from_cache:
        cos_sin_cache = make_cos_sin_cache(rot_dim, device, dtype)
        q_ref, k_ref = rotary_embedding_reference(positions, query.double(), key.double(), 80, cos_sin_cache,
                                                  is_neox=is_neox)
        inference.rotary_embedding(positions, query, key, 80, cos_sin_cache, is_neox, backend="torch")
    else:
        options = dict(rotary_dim=rot_dim, scaling_factor=4.0, is_neox=is_neox)
        q_ref, k_ref = rotary_embedding_reference(positions, query.double(), key.double(), 80, **options)
        inference.rotary_embedding_interp(positions, query, key, 80, backend="torch", **options)
    assert_close(query, q_ref, dtype, name="query")
    assert_close(key, k_ref, dtype, name="key")
    assert torch.equal(fused[..., 5 * 80:], before[..., 5 * 80:]), "v was written"


def test_rotary_embedding_outside_the_cache_is_left_alone(device):
    """With the value checks off, a position past the cache rows is not rotated (as in the kernels)."""
    query = torch.randn(4, 2 * 64, device=device)
    before = query.clone()
    pi_kernels.set_value_checks(False)
    try:
        inference.rotary_embedding(torch.tensor([2, 300, 10**6, 5], device=device), query, None, 64,
                                   make_cos_sin_cache(64, device, torch.float32), backend="torch")
    finally:
        pi_kernels.set_value_checks(True)
    assert torch.equal(query[1:3], before[1:3])
    assert not torch.equal(query[0], before[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [None, 48])
@pytest.mark.parametrize("position_kind", ["none", "int", "ids"])
def test_kv_cache_append_matches_reference(device, dtype, rotary_dim, position_kind):
    batch, new, n_heads, n_kv_heads, head_dim, max_len = 3, 5, 4, 2, 80, 16
    q = torch.randn(batch, new, n_heads, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, new, n_kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
    k_cache = torch.full((batch, max_len, n_kv_heads, head_dim), float("nan"), device=device, dtype=dtype)
    v_cache = k_cache.clone()
    cache_seqlens = torch.tensor([0, 7, 11], device=device, dtype=torch.int32)
    positions = {"none": None, "int": 9000, "ids": torch.randint(0, 20000, (batch, new), device=device)}[
        position_kind]
    options = dict(positions=positions, scaling_factor=4.0, rotary_dim=rotary_dim)
    q_ref, k_cache_ref, v_cache_ref = rotary_kv_cache_append_reference(
        q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), cache_seqlens, **options)
    q_out = inference.rotary_kv_cache_append(q, k, v, k_cache, v_cache, cache_seqlens, backend="torch", **options)
    assert_close(q_out, q_ref, dtype, name="q")
    written = ~torch.isnan(k_cache_ref[..., 0, 0])
    assert torch.equal(written, ~torch.isnan(k_cache[..., 0, 0])), "a slot outside the new tokens was written"
    assert_close(k_cache[written], k_cache_ref[written], dtype, name="k_cache")
    assert torch.equal(v_cache[written], v_cache_ref[written].to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_layout", ["nhd", "hnd"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_paged_kv_cache_append_matches_reference(device, dtype, kv_layout, interleaved):
    tokens, n_heads, n_kv_heads, head_dim, num_blocks, block_size = 7, 4, 1, 64, 5, 4
    q = torch.randn(tokens, n_heads, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(tokens, n_kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
    cache_shape = (num_blocks, block_size, n_kv_heads, head_dim) if kv_layout == "nhd" else \
        (num_blocks, n_kv_heads, block_size, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), device=device, dtype=dtype)
    v_cache = k_cache.clone()
    slot_mapping = torch.tensor([3, 17, -1, 0, 8, 19, 12], device=device)  # -1: a padding token
    positions = torch.randint(0, 20000, (tokens,), device=device)
    options = dict(scaling_factor=4.0, rotary_dim=32, interleaved=interleaved, kv_layout=kv_layout)
    q_ref, k_cache_ref, v_cache_ref = rotary_paged_kv_cache_append_reference(
        q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), slot_mapping, positions, **options)
    q_out = inference.rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, slot_mapping, positions,
                                                   backend="torch", **options)
    assert_close(q_out, q_ref, dtype, name="q")
    written = ~torch.isnan(k_cache_ref)
    assert torch.equal(written, ~torch.isnan(k_cache)), "a slot outside slot_mapping was written"
    assert_close(k_cache[written], k_cache_ref[written], dtype, name="k_cache")
    assert torch.equal(v_cache[written], v_cache_ref[written].to(dtype))


def make_projection(device, dtype, *, lead=(2, 37), hidden=160, rows=(4 + 2 * 2) * 80, bias=True):
    x = torch.randn(*lead, hidden, device=device, dtype=dtype)
    weight = (torch.randn(rows, hidden, device=device) / math.sqrt(hidden)).to(dtype)
    return x, weight, torch.randn(rows, device=device, dtype=dtype) if bias else None


HEADS = dict(num_heads=4, num_kv_heads=2, head_dim=80)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 48])
@pytest.mark.parametrize("packed", [False, True])
def test_qkv_proj_matches_reference(device, dtype, interleaved, rotary_dim, packed):
    x, weight, bias = make_projection(device, dtype, lead=(sum(SEQLENS),) if packed else (2, 37))
    positions = torch.randint(0, 20000, (len(SEQLENS),) if packed else (2, 37), device=device)
    options = dict(HEADS, positions=positions, scaling_factor=4.0, rotary_dim=rotary_dim, interleaved=interleaved,
                   cu_seqlens=cu_seqlens_for(SEQLENS, device) if packed else None)
    outs = pi_kernels.qkv_proj_rotary(x, weight, bias, backend="torch", **options)
    refs = qkv_proj_rotary_reference(x.double(), weight.double(), bias.double(), **options)
    for name, out, ref in zip("qkv", outs, refs, strict=True):
        assert out.is_contiguous()
        assert_close(out, ref, dtype, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_v", [False, True])
def test_qkv_proj_gradients(device, dtype, with_v):
    """Separate weights (q, k[, v]) and biases; random upstream grads; against float64 autograd."""
    x, weight, bias = make_projection(device, dtype)
    q_rows, kv_rows = 4 * 80, 2 * 80
    parts = [q_rows, kv_rows] + ([kv_rows] if with_v else [])
    weights = [w.clone().requires_grad_() for w in weight[:sum(parts)].split(parts)]
    biases = [b.clone().requires_grad_() for b in bias[:sum(parts)].split(parts)]
    x = x.requires_grad_()
    options = dict(HEADS, positions=3000, scaling_factor=4.0, rotary_dim=48)
    outs = pi_kernels.qkv_proj_rotary(x, tuple(weights), tuple(biases), backend="torch", **options)
    grads = [torch.randn_like(out) for out in outs]
    torch.autograd.backward(outs, grads)
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in weights]
    b64 = [b.detach().double().requires_grad_() for b in biases]
    # Without v, the reference still needs v rows: the unused rest of the fused weight.
    v_rows = [] if with_v else [weight[sum(parts):].double()]
    v_bias = [] if with_v else [bias[sum(parts):].double()]
    refs = qkv_proj_rotary_reference(x64, torch.cat(w64 + v_rows), torch.cat(b64 + v_bias), **options)
    torch.autograd.backward(refs[:len(parts)], [g.double() for g in grads])
    assert_close(x.grad, x64.grad, dtype, name="dx")
    for i, (w, r, b, rb) in enumerate(zip(weights, w64, biases, b64, strict=True)):
        assert_close(w.grad, r.grad, dtype, name=f"dweight[{i}]")
        assert_close(b.grad, rb.grad, dtype, name=f"dbias[{i}]")


def test_qkv_proj_torch_compile_fullgraph(device):
    x, weight, bias = make_projection(device, torch.float32)
    weight.requires_grad_()

    def step(x, weight, bias):
        q, k, v = pi_kernels.qkv_proj_rotary(x, weight, bias, positions=11, scaling_factor=2.0, backend="torch",
                                             **HEADS)
        return q.square().sum() + k.sum() + v.sum()

    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(x, weight, bias)
    loss.backward()
    grad = weight.grad.clone()
    weight.grad = None
    step(x, weight, bias).backward()
    assert torch.allclose(grad, weight.grad, rtol=1e-5, atol=1e-5)
    assert float(loss.detach()) == pytest.approx(float(step(x, weight, bias).detach()), rel=1e-6)


ATTENTION_CASES = {
    # name: (q, k shapes, keyword arguments); q (batch, seq_q, heads, d) or packed (tokens, heads, d)
    "gqa_ids": ((2, 37, 4, 80), (2, 37, 2, 80), dict(positions="ids", rotary_dim=48, interleaved=True)),
    "fewer_queries": ((2, 5, 4, 64), (2, 37, 1, 64), {}),
    "blind_queries": ((1, 40, 2, 64), (1, 37, 2, 64), {}),
    "not_causal": ((2, 17, 2, 64), (2, 29, 2, 64), dict(causal=False)),
    "decode": ((3, 1, 4, 64), (3, 50, 2, 64), dict(positions=49, rotate_k=False)),
    "packed": ((26, 4, 64), (31, 2, 64), dict(cu_seqlens_q=[0, 5, 6, 6, 23, 26], cu_seqlens_k=[0, 7, 9, 12, 30, 31],
                                              positions="offsets", k_positions="ids")),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_reference(device, dtype, case):
    """Forward, lse and gradients (random upstream grads) against the float64 reference."""
    q_shape, k_shape, options = ATTENTION_CASES[case]
    options = dict(options, scaling_factor=4.0)
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        if name in options:
            options[name] = torch.tensor(options[name], device=device, dtype=torch.int32)
    n_seqs = len(options["cu_seqlens_q"]) - 1 if "cu_seqlens_q" in options else q_shape[0]
    for name, tokens in (("positions", q_shape[:-2]), ("k_positions", k_shape[:-2])):
        if options.get(name) == "ids":
            options[name] = torch.randint(0, 20000, tokens, device=device)
        elif options.get(name) == "offsets":
            options[name] = torch.randint(0, 20000, (n_seqs,), device=device)
    q = torch.randn(q_shape, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(k_shape, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    out, lse = pi_kernels.attention_rotary(q, k, v, return_lse=True, backend="torch", **options)
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = attention_rotary_reference(q64, k64, v64, return_lse=True, **options)
    out_ref.backward(grad.double())
    assert_close(out, out_ref, dtype, name="out")
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)), "lse: a query that sees no key must get -inf"
    finite = torch.isfinite(lse_ref)
    assert_close(lse[finite], lse_ref[finite], dtype, name="lse")
    for name, x, x64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close(x.grad, x64.grad, dtype, name=name)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_q, seq_k", [(23, 31), (40, 37)])  # more queries than keys: the first see none
def test_attention_in_chunks_of_queries(device, monkeypatch, causal, seq_q, seq_k):
    """Scores capped at a few hundred elements: many chunks of queries, each (causal) with its own visible keys."""
    monkeypatch.setattr(_torch_backend, "_CHUNK_ELEMENTS", 300)
    q = torch.randn(2, seq_q, 4, 32, device=device, requires_grad=True)
    k, v = (torch.randn(2, seq_k, 2, 32, device=device, requires_grad=True) for _ in range(2))
    out = pi_kernels.attention_rotary(q, k, v, scaling_factor=2.0, causal=causal, backend="torch")
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out_ref = attention_rotary_reference(q64, k64, v64, scaling_factor=2.0, causal=causal)
    out_ref.backward(grad.double())
    assert_close(out, out_ref, torch.float32, name="out")
    for name, x, x64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close(x.grad, x64.grad, torch.float32, name=name)


def test_attention_torch_compile_fullgraph(device):
    q = torch.randn(2, 33, 4, 64, device=device, requires_grad=True)
    k, v = (torch.randn(2, 33, 2, 64, device=device, requires_grad=True) for _ in range(2))
    positions = torch.randint(0, 20000, (2, 33), device=device)

    def step(q, k, v):
        return pi_kernels.attention_rotary(q, k, v, positions, scaling_factor=4.0, backend="torch").square().sum()

    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v)
    (dq,) = torch.autograd.grad(loss, q)
    (dq_eager,) = torch.autograd.grad(step(q, k, v), q)
    assert torch.allclose(dq, dq_eager, rtol=1e-5, atol=1e-6)


def test_backend_name_is_checked(device):
    q, k = make_qk("bshd", device, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        pi_kernels.rotary_interp(q, k, backend="numpy")
    x, weight, _ = make_projection(device, torch.float32, bias=False)
    with pytest.raises(ValueError, match="backend='cuda' is not available for this op"):
        pi_kernels.qkv_proj_rotary(x, weight, backend="cuda", **HEADS)


def test_backend_modules_import_nothing_from_the_ops():
    """No upward imports: the torch backend and backend resolution sit below ops/ (the torch backend takes the 2π
    split from _angles.py, so it never imports Triton; _backend.py owns _interpreting)."""
    import ast

    for name in ("_torch_backend.py", "_backend.py", "_angles.py"):
        with open(os.path.join(ROOT, "pi_kernels", name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported = [f"{'.' * node.level}{node.module or ''}", *(alias.name for alias in node.names)]
            elif isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            else:
                continue
            assert not any(n.startswith((".ops", "ops", "triton")) for n in imported), (name, imported)


def _run_without_interpreter(code):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_auto_picks_torch_for_cpu_tensors_without_the_interpreter():
    """A fresh process without TRITON_INTERPRET: "auto" runs CPU tensors on the torch backend; "triton" says what
    to do instead of Triton's "0 active drivers"."""
    code = """
import torch, pi_kernels
from pi_kernels import _backend
from pi_kernels.ops.rotary import LAUNCHERS
assert _backend.resolve_backend("auto", torch.device("cpu"), LAUNCHERS) == "torch"
q, k = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 1, 16)
pi_kernels.rotary_interp(q, k, scaling_factor=2.0)
try:
    pi_kernels.rotary_interp(q, k, backend="triton")
except RuntimeError as err:
    print(err)
"""
    result = _run_without_interpreter(code)
    assert result.returncode == 0, result.stderr
    assert "backend='torch'" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, result.stdout
