"""Property-based tests (hypothesis): every public op on random shapes, strides, layouts, position forms and dtypes.

Each example is drawn as plain parameters plus a seed for torch's generator, so the tensors are reproducible; the
runs are derandomized (the same examples every time) and bounded, to keep the suite's time on 2 CPU cores under the
interpreter within about two minutes. Every op is compared with the float64 reference on the same inputs; inputs of a
non-in-place call must come back bit for bit, cache slots a call does not address must keep their values, and a call
that raises must leave every tensor as it was.

Tolerances are those of ``tolerances.py``. They hold whether float32 -> bfloat16 rounds to nearest (a GPU) or truncates
(Triton's interpreter): a truncated bf16 value is off by less than one ulp, 2**-7 ≈ 7.8e-3 relative, below the bf16
tolerance 1e-2 even for a single element (and float16's ulp 2**-10 ≈ 9.8e-4 is below its 1e-3).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pi_kernels
from pi_kernels import inference
from pi_kernels.reference import (
    qkv_proj_rotary_reference,
    rotary_angles,
    rotary_embedding_reference,
    rotary_interp_reference,
    rotary_kv_cache_append_reference,
    rotary_paged_kv_cache_append_reference,
)

from .test_attention import check_attention
from .tolerances import assert_close


def bounded(max_examples):
    """Seeded, bounded hypothesis settings (no example database, no deadline: the interpreter is slow). The
    ``device`` fixture is a constant, so sharing it between examples is fine."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [2, 8, 16, 34, 64, 80]
# Positions reach past 2**20 sometimes, where the float64 angle reduction matters.
POSITION_VALUES = st.sampled_from([50, 5000, 2**20 + 7])


def randn(generator, shape, dtype, device):
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def randint(generator, high, shape, dtype, device):
    return torch.randint(0, high, shape, generator=generator, dtype=dtype).to(device)


def permuted_randn(generator, shape, dtype, device, order):
    """A tensor of ``shape`` whose memory is laid out in ``order`` of its dimensions (a transposed view)."""
    inverse = [order.index(i) for i in range(len(shape))]
    return randn(generator, [shape[i] for i in order], dtype, device).permute(inverse)


def expanded_randn(generator, shape, dtype, device, dim):
    """A tensor of ``shape`` with stride 0 along ``dim`` (an expanded view; legal only for inputs that are read)."""
    return randn(generator, [1 if i == dim else n for i, n in enumerate(shape)], dtype, device).expand(shape)


def draw_vector_storage(draw, shape, inplace):
    """How a read or written tensor lies in memory: contiguous, transposed, or an expanded (stride-0) view."""
    kinds = ["contiguous", "permuted"] + ([] if inplace else ["expanded"])
    kind = draw(st.sampled_from(kinds))
    if kind == "permuted":
        return kind, draw(st.permutations(range(len(shape))))
    if kind == "expanded":
        return kind, draw(st.integers(0, len(shape) - 2))
    return kind, None


def make_tensor(generator, shape, dtype, device, storage):
    kind, detail = storage
    if kind == "permuted":
        return permuted_randn(generator, shape, dtype, device, list(detail))
    if kind == "expanded":
        return expanded_randn(generator, shape, dtype, device, detail)
    return randn(generator, shape, dtype, device)


# ---------------------------------------------------------------------------------------------------------------
# rotary_interp


@st.composite
def rotary_cases(draw):
    layout = draw(st.sampled_from(["bshd", "bhsd", "sbhd", "thd"]))
    n_heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    case = dict(
        layout=layout, dtype=draw(st.sampled_from(DTYPES)), batch=draw(st.integers(1, 3)),
        seq=draw(st.integers(1, 12)), n_heads=n_heads, n_kv_heads=draw(st.integers(1, n_heads)), head_dim=head_dim,
        seqlens=draw(st.lists(st.integers(0, 6), min_size=1, max_size=4)),
        rotary_dim=draw(st.one_of(st.none(), st.integers(1, head_dim // 2).map(lambda n: 2 * n))),
        interleaved=draw(st.booleans()), inplace=draw(st.booleans()),
        scaling_factor=draw(st.sampled_from([1.0, 2.5, 16.0])), seed=draw(st.integers(0, 2**31 - 1)),
        position_dtype=draw(st.sampled_from([torch.int32, torch.int64])), high=draw(POSITION_VALUES),
    )
    forms = ["none", "int", "offsets", "ids"] + ([] if layout == "thd" else ["ids1d"])
    case["position_form"] = draw(st.sampled_from(forms))
    # q and k as separate tensors, or as disjoint slices of one fused qkv buffer (legal in place too).
    case["fused"] = draw(st.booleans())
    ndim = 3 if layout == "thd" else 4
    case["q_storage"] = draw_vector_storage(draw, [0] * ndim, case["inplace"])
    case["k_storage"] = draw_vector_storage(draw, [0] * ndim, case["inplace"])
    return case


def _rotary_shapes(case):
    layout, h, hk, d = case["layout"], case["n_heads"], case["n_kv_heads"], case["head_dim"]
    if layout == "thd":
        tokens = sum(case["seqlens"])
        return (tokens, h, d), (tokens, hk, d), 1
    lead = {"bshd": (case["batch"], case["seq"]), "sbhd": (case["seq"], case["batch"])}.get(layout)
    if layout == "bhsd":
        return (case["batch"], h, case["seq"], d), (case["batch"], hk, case["seq"], d), 1
    return (*lead, h, d), (*lead, hk, d), 2


def make_rotary_inputs(case, device):
    generator = torch.Generator().manual_seed(case["seed"])
    shape_q, shape_k, heads_dim = _rotary_shapes(case)
    dtype = case["dtype"]
    if case["fused"]:
        # One projection output (..., heads_q + 2 heads_kv, head_dim + 6); q and k are slices of it.
        fused_shape = list(shape_q)
        fused_shape[heads_dim] = case["n_heads"] + 2 * case["n_kv_heads"]
        fused_shape[-1] += 6
        fused = randn(generator, fused_shape, dtype, device)
        d = case["head_dim"]
        q = fused.narrow(heads_dim, 0, case["n_heads"]).narrow(-1, 3, d)
        k = fused.narrow(heads_dim, case["n_heads"], case["n_kv_heads"]).narrow(-1, 3, d)
    else:
        q = make_tensor(generator, shape_q, dtype, device, case["q_storage"])
        k = make_tensor(generator, shape_k, dtype, device, case["k_storage"])
    return q, k, make_rotary_positions(case, generator, device)


def make_rotary_positions(case, generator, device):
    form, high, dtype = case["position_form"], case["high"], case["position_dtype"]
    if form == "none":
        return None
    if form == "int":
        return high
    if case["layout"] == "thd":
        count = len(case["seqlens"]) if form == "offsets" else sum(case["seqlens"])
        return randint(generator, high, (count,), dtype, device)
    batch, seq = case["batch"], case["seq"]
    if form == "offsets":
        return randint(generator, high, (batch,), dtype, device)
    if form == "ids1d" and not (batch == seq > 1):
        return randint(generator, high, (seq,), dtype, device)
    return randint(generator, high, (batch, seq), dtype, device)


def rotary_options(case, device):
    options = dict(layout=case["layout"], rotary_dim=case["rotary_dim"], interleaved=case["interleaved"],
                   scaling_factor=case["scaling_factor"])
    if case["layout"] == "thd":
        seqlens = torch.tensor(case["seqlens"])
        options["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), seqlens.cumsum(0)]).to(device)
    return options


@bounded(40)
@given(case=rotary_cases())
def test_rotary_interp_matches_reference(device, case):
    q, k, positions = make_rotary_inputs(case, device)
    options = rotary_options(case, device)
    q_before, k_before = q.clone(), k.clone()
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), positions, **options)
    q_out, k_out = pi_kernels.rotary_interp(q, k, positions, inplace=case["inplace"], **options)
    if case["inplace"]:
        assert q_out is q and k_out is k
    else:
        assert torch.equal(q, q_before) and torch.equal(k, k_before), "a non-in-place call modified its inputs"
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == case["dtype"]
    assert_close(q_out, q_ref, case["dtype"], name="q")
    assert_close(k_out, k_ref, case["dtype"], name="k")


@bounded(15)
@given(case=rotary_cases(), expanded_grad=st.booleans())
def test_rotary_interp_gradients(device, case, expanded_grad):
    """Gradients in float32 against the float64 reference, with random upstream gradients (or stride-0 ones)."""
    case = dict(case, dtype=torch.float32)
    q, k, positions = make_rotary_inputs(case, device)
    options = rotary_options(case, device)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k)]
    # In place on non-leaf views of the leaves, as inside a model.
    inputs = [leaf.view(leaf.shape) * 1.0 for leaf in leaves] if case["inplace"] else leaves
    outs = pi_kernels.rotary_interp(*inputs, positions, inplace=case["inplace"], **options)
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    if expanded_grad:
        grads = [expanded_randn(generator, out.shape, out.dtype, device, 0) for out in outs]
    else:
        grads = [randn(generator, out.shape, out.dtype, device) for out in outs]
    torch.autograd.backward(outs, grads)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k)]
    torch.autograd.backward(rotary_interp_reference(*leaves64, positions, **options), [g.double() for g in grads])
    assert_close(leaves[0].grad, leaves64[0].grad, torch.float32, name="dq")
    assert_close(leaves[1].grad, leaves64[1].grad, torch.float32, name="dk")


@bounded(15)
@given(case=rotary_cases(), fault=st.sampled_from(["negative ids", "overlap", "rotary_dim", "inv_freq"]))
def test_rotary_interp_errors_leave_tensors_unchanged(device, case, fault):
    # At least one token, so that there is something to overlap or to refuse.
    case = dict(case, inplace=True, position_form="ids", fused=False, seqlens=case["seqlens"] + [2])
    q, k, positions = make_rotary_inputs(case, device)
    options = rotary_options(case, device)
    if fault == "negative ids":
        positions.view(-1)[-1] = -1
    elif fault == "overlap":
        k = q.narrow(_rotary_shapes(case)[2], 0, case["n_kv_heads"])
    elif fault == "rotary_dim":
        options["rotary_dim"] = case["head_dim"] + 2
    else:
        options["inv_freq"] = torch.ones(case["head_dim"] + 2, device=device)
    before = q.clone(), k.clone(), None if positions is None else positions.clone()
    with pytest.raises((ValueError, TypeError)):
        pi_kernels.rotary_interp(q, k, positions, inplace=True, **options)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1]), "a call that raised modified q or k"
    assert before[2] is None or torch.equal(positions, before[2])


# ---------------------------------------------------------------------------------------------------------------
# qkv_proj_rotary


@st.composite
def qkv_cases(draw):
    n_kv_heads = draw(st.integers(1, 4))
    n_heads = n_kv_heads * draw(st.integers(1, 4 // n_kv_heads))  # whole groups of query heads per kv head
    head_dim = draw(st.sampled_from([2, 8, 16, 34]))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), batch=draw(st.integers(1, 2)), seq=draw(st.integers(1, 9)),
        packed=draw(st.booleans()), seqlens=draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)),
        hidden=draw(st.sampled_from([8, 24, 40])), n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, rotary_dim=draw(st.one_of(st.none(), st.integers(1, head_dim // 2).map(lambda n: 2 * n))),
        interleaved=draw(st.booleans()), weights=draw(st.sampled_from(["fused", "qkv", "qk"])),
        bias=draw(st.booleans()), x_storage=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        position_form=draw(st.sampled_from(["none", "int", "offsets", "ids"])), high=draw(POSITION_VALUES),
        scaling_factor=draw(st.sampled_from([1.0, 4.0, 16.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


@bounded(20)
@given(case=qkv_cases())
def test_qkv_proj_rotary_matches_reference(device, case):
    generator = torch.Generator().manual_seed(case["seed"])
    dtype, hidden = case["dtype"], case["hidden"]
    lead = (sum(case["seqlens"]),) if case["packed"] else (case["batch"], case["seq"])
    if case["x_storage"] == "transposed" and not case["packed"]:
        x = randn(generator, (lead[1], lead[0], hidden), dtype, device).transpose(0, 1)
    elif case["x_storage"] == "sliced":
        x = randn(generator, (*lead, hidden + 8), dtype, device)[..., 4:4 + hidden]
    else:
        x = randn(generator, (*lead, hidden), dtype, device)
    rows = [case["n_heads"] * case["head_dim"], case["n_kv_heads"] * case["head_dim"],
            case["n_kv_heads"] * case["head_dim"]]
    rows = rows[:2] if case["weights"] == "qk" else rows
    # Scaled like nn.Linear so 16-bit outputs stay O(1).
    weights = [randn(generator, (n, hidden), torch.float32, device).div(math.sqrt(hidden)).to(dtype) for n in rows]
    biases = [randn(generator, (n,), dtype, device) for n in rows] if case["bias"] else None
    weight, bias = (torch.cat(weights), None if biases is None else torch.cat(biases)) if case["weights"] == "fused" \
        else (tuple(weights), None if biases is None else tuple(biases))
    options = dict(num_heads=case["n_heads"], num_kv_heads=case["n_kv_heads"], head_dim=case["head_dim"],
                   rotary_dim=case["rotary_dim"], interleaved=case["interleaved"],
                   scaling_factor=case["scaling_factor"])
    form, high = case["position_form"], case["high"]
    if case["packed"]:
        seqlens = torch.tensor(case["seqlens"])
        options["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), seqlens.cumsum(0)]).to(device)
    offsets_shape = (len(case["seqlens"]),) if case["packed"] else (case["batch"],)
    options["positions"] = {"none": None, "int": high,
                            "offsets": randint(generator, high, offsets_shape, torch.int64, device),
                            "ids": randint(generator, high, lead, torch.int64, device)}[form]
    tensors = [x, *weights, *(biases or [])]
    before = [t.clone() for t in tensors]
    outs = pi_kernels.qkv_proj_rotary(x, weight, bias, **options)

    # The reference takes the fused layout; a (q, k) pair gets zero v rows, whose v is not compared.
    padding = [torch.zeros_like(weights[1])] if case["weights"] == "qk" else []
    bias_padding = [torch.zeros_like(biases[1])] if biases and case["weights"] == "qk" else []
    refs = qkv_proj_rotary_reference(x.double(), torch.cat(weights + padding).double(),
                                     None if biases is None else torch.cat(biases + bias_padding).double(), **options)
    assert len(outs) == len(rows)
    for name, out, ref in zip("qkv", outs, refs, strict=False):
        assert_close(out, ref, dtype, name=name)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True)), "an input was modified"


# ---------------------------------------------------------------------------------------------------------------
# vLLM's convention: rotary_embedding (cos/sin cache) and rotary_embedding_interp


@st.composite
def vllm_cases(draw):
    head_size = draw(st.sampled_from([8, 16, 34, 64]))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), tokens=draw(st.integers(1, 12)), batched=draw(st.booleans()),
        batch=draw(st.integers(1, 3)), seq=draw(st.integers(1, 5)), n_heads=draw(st.integers(1, 4)),
        n_kv_heads=draw(st.integers(0, 3)), head_size=head_size,
        rot_dim=draw(st.integers(1, head_size // 2).map(lambda n: 2 * n)), is_neox=draw(st.booleans()),
        from_cache=draw(st.booleans()), cache_float32=draw(st.booleans()), split_heads=draw(st.booleans()),
        fused=draw(st.booleans()), high=draw(st.sampled_from([40, 5000])),
        scaling_factor=draw(st.sampled_from([1.0, 4.0, 16.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


@bounded(30)
@given(case=vllm_cases())
def test_rotary_embedding_matches_reference(device, case):
    generator = torch.Generator().manual_seed(case["seed"])
    dtype, hs = case["dtype"], case["head_size"]
    lead = (case["batch"], case["seq"]) if case["batched"] else (case["tokens"],)
    positions = randint(generator, case["high"], lead, torch.int64, device)
    h, hk = case["n_heads"], case["n_kv_heads"]
    if case["fused"]:
        # vLLM splits one qkv projection output: query and key are column slices of it.
        qkv = randn(generator, (*lead, (h + 2 * max(hk, 1)) * hs), dtype, device)
        query, key = qkv[..., :h * hs], qkv[..., h * hs:(h + hk) * hs]
    else:
        query, key = randn(generator, (*lead, h * hs), dtype, device), randn(generator, (*lead, hk * hs), dtype, device)
    if case["split_heads"] and not case["batched"]:
        query, key = query.unflatten(-1, (h, hs)), key.unflatten(-1, (hk, hs))
    key = key if hk else None
    if case["from_cache"]:
        angles = rotary_angles(torch.arange(case["high"], device=device), scaling_factor=case["scaling_factor"],
                               rotary_dim=case["rot_dim"])
        cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1).to(
            torch.float32 if case["cache_float32"] else dtype)
        options = dict(cos_sin_cache=cos_sin_cache)
    else:
        options = dict(rotary_dim=case["rot_dim"], scaling_factor=case["scaling_factor"])
    q_ref, k_ref = rotary_embedding_reference(positions, query.double(), None if key is None else key.double(), hs,
                                              is_neox=case["is_neox"], **options)
    if case["from_cache"]:
        inference.rotary_embedding(positions, query, key, hs, options["cos_sin_cache"], case["is_neox"])
    else:
        inference.rotary_embedding_interp(positions, query, key, hs, is_neox=case["is_neox"], **options)
    assert_close(query, q_ref, dtype, name="query")
    if key is not None:
        assert_close(key, k_ref, dtype, name="key")


# ---------------------------------------------------------------------------------------------------------------
# KV-cache appends


@st.composite
def dense_cache_cases(draw):
    n_heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([8, 16, 34]))
    new = draw(st.integers(1, 5))
    max_len = draw(st.integers(new, 10))
    batch = draw(st.integers(1, 3))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), batch=batch, new=new, max_len=max_len, n_heads=n_heads,
        n_kv_heads=draw(st.integers(1, n_heads)), head_dim=head_dim,
        rotary_dim=draw(st.one_of(st.none(), st.integers(1, head_dim // 2).map(lambda n: 2 * n))),
        interleaved=draw(st.booleans()), cache_seqlens=draw(st.lists(st.integers(0, max_len - new), min_size=batch,
                                                                     max_size=batch)),
        cache_heads_first=draw(st.booleans()), fused=draw(st.booleans()),
        position_form=draw(st.sampled_from(["none", "int", "offsets", "ids"])), high=draw(POSITION_VALUES),
        scaling_factor=draw(st.sampled_from([1.0, 4.0, 16.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_new_tokens(generator, case, lead, device):
    """q, k, v of the new tokens: separate tensors, or slices of one fused projection output."""
    h, hk, d, dtype = case["n_heads"], case["n_kv_heads"], case["head_dim"], case["dtype"]
    if case["fused"]:
        fused = randn(generator, (*lead, h + 2 * hk, d), dtype, device)
        return fused[..., :h, :], fused[..., h:h + hk, :], fused[..., h + hk:, :]
    return (randn(generator, (*lead, h, d), dtype, device), randn(generator, (*lead, hk, d), dtype, device),
            randn(generator, (*lead, hk, d), dtype, device))


def check_cache(cache, before, ref, ref_written, dtype, name):
    """Slots the reference wrote match it; every other slot holds its old value, bit for bit."""
    assert torch.equal(cache[~ref_written], before[~ref_written]), f"{name}: a slot not addressed was modified"
    assert_close(cache[ref_written], ref[ref_written], dtype, name=name)


@bounded(25)
@given(case=dense_cache_cases())
def test_kv_cache_append_matches_reference(device, case):
    generator = torch.Generator().manual_seed(case["seed"])
    batch, new, dtype = case["batch"], case["new"], case["dtype"]
    q, k, v = make_new_tokens(generator, case, (batch, new), device)
    shape = (batch, case["max_len"], case["n_kv_heads"], case["head_dim"])
    order = [0, 2, 1, 3] if case["cache_heads_first"] else [0, 1, 2, 3]
    k_cache, v_cache = (permuted_randn(generator, shape, dtype, device, order) for _ in range(2))
    cache_seqlens = torch.tensor(case["cache_seqlens"], device=device, dtype=torch.int32)
    form, high = case["position_form"], case["high"]
    positions = {"none": None, "int": high, "offsets": randint(generator, high, (batch,), torch.int64, device),
                 "ids": randint(generator, high, (batch, new), torch.int64, device)}[form]
    options = dict(scaling_factor=case["scaling_factor"], rotary_dim=case["rotary_dim"],
                   interleaved=case["interleaved"])
    before = [x.clone() for x in (q, k, v, k_cache, v_cache, cache_seqlens)]
    nan_cache = torch.full(shape, math.nan, dtype=torch.float64, device=device)
    q_ref, k_cache_ref, v_cache_ref = rotary_kv_cache_append_reference(
        q.double(), k.double(), v.double(), nan_cache, nan_cache.clone(), cache_seqlens, positions, **options)
    q_out = pi_kernels.rotary_kv_cache_append(q, k, v, k_cache, v_cache, cache_seqlens, positions=positions,
                                              **options)
    assert_close(q_out, q_ref, dtype, name="q")
    written = ~torch.isnan(k_cache_ref)
    check_cache(k_cache, before[3], k_cache_ref, written, dtype, "k_cache")
    check_cache(v_cache, before[4], v_cache_ref, written, dtype, "v_cache")
    assert all(torch.equal(x, b) for x, b in zip((q, k, v, cache_seqlens), before[:3] + before[5:], strict=True))


@st.composite
def paged_cache_cases(draw):
    n_heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([8, 16, 34]))
    num_blocks, block_size = draw(st.integers(1, 5)), draw(st.sampled_from([1, 2, 4]))
    num_tokens = draw(st.integers(1, min(8, num_blocks * block_size)))
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), num_tokens=num_tokens, num_blocks=num_blocks, block_size=block_size,
        n_heads=n_heads, n_kv_heads=draw(st.integers(1, n_heads)), head_dim=head_dim,
        rotary_dim=draw(st.one_of(st.none(), st.integers(1, head_dim // 2).map(lambda n: 2 * n))),
        interleaved=draw(st.booleans()), kv_layout=draw(st.sampled_from(["nhd", "hnd"])),
        combined=draw(st.booleans()), fused=draw(st.booleans()), n_padding=draw(st.integers(0, num_tokens)),
        position_dtype=draw(st.sampled_from([torch.int32, torch.int64])), high=draw(POSITION_VALUES),
        scaling_factor=draw(st.sampled_from([1.0, 4.0, 16.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_paged_inputs(case, device):
    generator = torch.Generator().manual_seed(case["seed"])
    n = case["num_tokens"]
    q, k, v = make_new_tokens(generator, case, (n,), device)
    hk, d, dtype = case["n_kv_heads"], case["head_dim"], case["dtype"]
    shape = (case["num_blocks"], case["block_size"], hk, d) if case["kv_layout"] == "nhd" else \
        (case["num_blocks"], hk, case["block_size"], d)
    if case["combined"]:
        # FlashInfer's (pages, 2, ...) cache: k and v are the halves of one buffer.
        paged = randn(generator, (shape[0], 2, *shape[1:]), dtype, device)
        k_cache, v_cache = paged[:, 0], paged[:, 1]
    else:
        k_cache, v_cache = randn(generator, shape, dtype, device), randn(generator, shape, dtype, device)
    slots = torch.randperm(case["num_blocks"] * case["block_size"], generator=generator)[:n]
    slots[n - case["n_padding"]:] = -1
    positions = randint(generator, case["high"], (n,), case["position_dtype"], device)
    return q, k, v, k_cache, v_cache, slots.to(device), positions


def paged_options(case):
    return dict(scaling_factor=case["scaling_factor"], rotary_dim=case["rotary_dim"],
                interleaved=case["interleaved"], kv_layout=case["kv_layout"])


@bounded(25)
@given(case=paged_cache_cases())
def test_paged_kv_cache_append_matches_reference(device, case):
    q, k, v, k_cache, v_cache, slots, positions = make_paged_inputs(case, device)
    options = paged_options(case)
    before = [x.clone() for x in (q, k, v, k_cache, v_cache, slots, positions)]
    nan_cache = torch.full(k_cache.shape, math.nan, dtype=torch.float64, device=device)
    q_ref, k_cache_ref, v_cache_ref = rotary_paged_kv_cache_append_reference(
        q.double(), k.double(), v.double(), nan_cache, nan_cache.clone(), slots, positions, **options)
    q_out = pi_kernels.rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, slots, positions, **options)
    assert_close(q_out, q_ref, case["dtype"], name="q")
    written = ~torch.isnan(k_cache_ref)
    check_cache(k_cache, before[3], k_cache_ref, written, case["dtype"], "k_cache")
    check_cache(v_cache, before[4], v_cache_ref, written, case["dtype"], "v_cache")
    assert all(torch.equal(x, b) for x, b in zip((q, k, v, slots, positions), before[:3] + before[5:], strict=True))


@bounded(15)
@given(case=paged_cache_cases(), fault=st.sampled_from(["repeated slot", "slot past the cache", "negative position",
                                                         "v_cache is k_cache"]))
def test_paged_kv_cache_append_errors_leave_tensors_unchanged(device, case, fault):
    case = dict(case, n_padding=0, num_tokens=max(case["num_tokens"], 2), num_blocks=max(case["num_blocks"], 2))
    q, k, v, k_cache, v_cache, slots, positions = make_paged_inputs(case, device)
    if fault == "repeated slot":
        slots[-1] = slots[0]
    elif fault == "slot past the cache":
        slots[-1] = k_cache.shape[0] * case["block_size"]
    elif fault == "negative position":
        positions[0] = -1
    else:
        v_cache = k_cache
    before = [x.clone() for x in (q, k, v, k_cache, v_cache, slots, positions)]
    with pytest.raises(ValueError):
        pi_kernels.rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, slots, positions, **paged_options(case))
    assert all(torch.equal(x, b) for x, b in zip((q, k, v, k_cache, v_cache, slots, positions), before, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# attention_rotary (tiny shapes: the interpreter runs the forward and both backward kernels)


@st.composite
def attention_cases(draw):
    seq_q = draw(st.integers(1, 6))
    n_kv_heads = draw(st.integers(1, 2))
    seqlens_q = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    return dict(
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), batch=draw(st.integers(1, 2)), seq_q=seq_q,
        # Two keys at least: with one, dq is exactly 0 and a relative error means nothing.
        seq_k=draw(st.integers(max(seq_q, 2), 8)), n_kv_heads=n_kv_heads, n_heads=n_kv_heads * draw(st.integers(1, 2)),
        packed=draw(st.booleans()), seqlens_q=seqlens_q,
        seqlens_k=[n + draw(st.integers(max(0, 2 - n), 3)) for n in seqlens_q],
        head_dim=draw(st.sampled_from([8, 16])), causal=draw(st.booleans()), interleaved=draw(st.booleans()),
        position_form=draw(st.sampled_from(["none", "int", "ids"])), scaling_factor=draw(st.sampled_from([1.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def cumulative(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)


@bounded(10)
@given(case=attention_cases())
def test_attention_rotary_matches_reference(device, case):
    generator = torch.Generator().manual_seed(case["seed"])
    dtype, heads, head_dim = case["dtype"], (case["n_heads"], case["n_kv_heads"]), case["head_dim"]
    if case["packed"]:
        lead_q, lead_k = (sum(case["seqlens_q"]),), (sum(case["seqlens_k"]),)
        options = dict(cu_seqlens_q=cumulative(case["seqlens_q"], device),
                       cu_seqlens_k=cumulative(case["seqlens_k"], device))
    else:
        lead_q, lead_k, options = (case["batch"], case["seq_q"]), (case["batch"], case["seq_k"]), {}
    q = randn(generator, (*lead_q, heads[0], head_dim), dtype, device)
    k, v = (randn(generator, (*lead_k, heads[1], head_dim), dtype, device) for _ in range(2))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    positions = None
    if case["position_form"] == "int":
        positions = options["k_positions"] = 3000
    elif case["position_form"] == "ids":
        positions = randint(generator, 9000, lead_q, torch.int64, device)
        options["k_positions"] = randint(generator, 9000, lead_k, torch.int64, device)
    check_attention(q, k, v, positions, causal=case["causal"], interleaved=case["interleaved"],
                    scaling_factor=case["scaling_factor"], **options)


# ---------------------------------------------------------------------------------------------------------------
# slot_mapping_from_block_table


@bounded(30)
@given(block_size=st.integers(1, 5), n_seqs=st.integers(1, 4), blocks_per_seq=st.integers(1, 4),
       data=st.data())
def test_slot_mapping_from_block_table(device, block_size, n_seqs, blocks_per_seq, data):
    """Every token's slot is its sequence's physical block times block_size plus its offset; padding gets -1."""
    physical = data.draw(st.permutations(range(n_seqs * blocks_per_seq)))
    block_table = torch.tensor(physical, device=device).view(n_seqs, blocks_per_seq)
    tokens = data.draw(st.lists(st.tuples(st.integers(0, n_seqs - 1), st.integers(-1, blocks_per_seq * block_size - 1)),
                                min_size=1, max_size=8))
    seq_ids = torch.tensor([seq for seq, _ in tokens], device=device)
    cache_positions = torch.tensor([position for _, position in tokens], device=device)
    slots = inference.slot_mapping_from_block_table(block_table, block_size, cache_positions, seq_ids)
    expected = [-1 if position < 0 else physical[seq * blocks_per_seq + position // block_size] * block_size
                + position % block_size for seq, position in tokens]
    assert slots.tolist() == expected
