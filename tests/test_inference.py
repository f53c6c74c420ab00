"""Parity of the inference-engine ops (vLLM's rotary convention, rotary + KV-cache append) with the float64 reference.

Runs under Triton's interpreter on a CPU machine and compiled on a GPU (see conftest.py). Caches are poisoned with
NaN before a call, so a test sees both that the new tokens' slots hold the reference values and that nothing else
in the cache was written.
"""

import math

import pytest
import torch

import pi_kernels
from pi_kernels import inference
from pi_kernels._positions import POSITIONS_IDS, PositionSpec
from pi_kernels.ops import kv_cache
from pi_kernels.ops._schema import Rope
from pi_kernels.reference import (
    rotary_angles,
    rotary_embedding_reference,
    rotary_kv_cache_append_reference,
    rotary_paged_kv_cache_append_reference,
)

from .tolerances import assert_close, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_POSITION = 300


def make_cos_sin_cache(rot_dim, device, dtype, *, scaling_factor=4.0, max_position=MAX_POSITION):
    """vLLM's (max_position, rot_dim) cache: cos of the rot_dim / 2 angles, then their sin."""
    angles = rotary_angles(torch.arange(max_position, device=device), scaling_factor=scaling_factor,
                           rotary_dim=rot_dim)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


def make_vllm_qk(form, device, dtype, *, tokens=17, batch=2, seq=9, n_heads=4, n_kv_heads=1, head_size=80):
    """(positions, query, key, fused buffer): query and key slices of one fused qkv projection output, as in vLLM.

    form: "flat" (num_tokens, heads · head_size), "split" (num_tokens, heads, head_size), "batched" (batch, seq,
    heads · head_size) with (batch, seq) positions.
    """
    lead = (batch, seq) if form == "batched" else (tokens,)
    fused = torch.randn(*lead, (n_heads + 2 * n_kv_heads) * head_size, device=device, dtype=dtype)
    query = fused[..., :n_heads * head_size]
    key = fused[..., n_heads * head_size:(n_heads + n_kv_heads) * head_size]
    if form == "split":
        query, key = query.unflatten(-1, (n_heads, head_size)), key.unflatten(-1, (n_kv_heads, head_size))
    positions = torch.randint(0, MAX_POSITION, lead, device=device, dtype=torch.int32 if form == "batched" else None)
    return positions, query, key, fused


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [80, 48])
@pytest.mark.parametrize("form", ["flat", "split", "batched"])
def test_rotary_embedding_matches_reference(device, dtype, is_neox, rot_dim, form):
    positions, query, key, fused = make_vllm_qk(form, device, dtype)
    cos_sin_cache = make_cos_sin_cache(rot_dim, device, dtype)
    before = fused.clone()
    q_ref, k_ref = rotary_embedding_reference(positions, query.double(), key.double(), 80, cos_sin_cache,
                                              is_neox=is_neox)
    assert inference.rotary_embedding(positions, query, key, 80, cos_sin_cache, is_neox) is None
    assert_close(query, q_ref, dtype, name="query")
    assert_close(key, k_ref, dtype, name="key")
    v_start = 5 * 80
    assert torch.equal(fused[..., v_start:], before[..., v_start:]), "v was written"
    if rot_dim < 80:
        # Partial rotary: the features past rot_dim of every head keep their bits.
        query_heads = query if form == "split" else query.unflatten(-1, (4, 80))
        assert torch.equal(query_heads[..., rot_dim:], before[..., :4 * 80].unflatten(-1, (4, 80))[..., rot_dim:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotary_embedding_float32_cache_and_no_key(device, dtype):
    positions, query, _, _ = make_vllm_qk("flat", device, dtype, n_heads=3, head_size=64)
    cos_sin_cache = make_cos_sin_cache(64, device, torch.float32)
    q_ref, _ = rotary_embedding_reference(positions, query.double(), None, 64, cos_sin_cache)
    inference.rotary_embedding(positions, query, None, 64, cos_sin_cache)
    assert_close(query, q_ref, dtype, name="query")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [None, 48])
@pytest.mark.parametrize("form", ["flat", "batched"])
def test_rotary_embedding_interp_matches_reference(device, dtype, is_neox, rotary_dim, form):
    positions, query, key, _ = make_vllm_qk(form, device, dtype, n_heads=4, n_kv_heads=2)
    positions = positions * 97  # past any cache: positions have no upper bound here
    options = dict(rotary_dim=rotary_dim, scaling_factor=4.0, base=500000.0, is_neox=is_neox)
    q_ref, k_ref = rotary_embedding_reference(positions, query.double(), key.double(), 80, **options)
    inference.rotary_embedding_interp(positions, query, key, 80, **options)
    assert_close(query, q_ref, dtype, name="query")
    assert_close(key, k_ref, dtype, name="key")


def test_rotary_embedding_interp_precision_and_parity_with_rotary_interp(device):
    """fp32 at positions up to 2**20 with scaling 16 matches float64 to 1e-6, and equals rotary_interp's result."""
    positions = torch.randint(0, 2**20, (64,), device=device)
    positions[0] = 2**20
    query = torch.randn(64, 4 * 128, device=device)
    key = torch.randn(64, 2 * 128, device=device)
    q_ref, k_ref = rotary_embedding_reference(positions, query.double(), key.double(), 128, scaling_factor=16.0)
    q_interp, k_interp = pi_kernels.rotary_interp(query.view(1, 64, 4, 128), key.view(1, 64, 2, 128),
                                                  positions[None], scaling_factor=16.0)
    inference.rotary_embedding_interp(positions, query, key, 128, scaling_factor=16.0)
    assert rel_error(query, q_ref) <= 1e-6 and rel_error(key, k_ref) <= 1e-6
    assert rel_error(query, q_interp.view(64, -1)) <= 1e-7 and rel_error(key, k_interp.view(64, -1)) <= 1e-7


def make_new_tokens(device, dtype, lead, *, n_heads=4, n_kv_heads=2, head_dim=80):
    """q, k, v of the new tokens, sliced out of one fused projection output (non-contiguous, as in a model)."""
    fused = torch.randn(*lead, n_heads + 2 * n_kv_heads, head_dim, device=device, dtype=dtype)
    return fused[..., :n_heads, :], fused[..., n_heads:n_heads + n_kv_heads, :], fused[..., n_heads + n_kv_heads:, :]


def assert_cache_written(cache, ref, dtype, name):
    """The slots the reference wrote match it; every other slot is still NaN (the poison)."""
    written = ~torch.isnan(ref)
    assert torch.equal(~torch.isnan(cache), written), f"{name}: slots outside the new tokens were written or missed"
    assert_close(cache[written], ref[written], dtype, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 48])
@pytest.mark.parametrize("new,n_kv_heads", [(1, 1), (17, 2)])  # a decode step with MQA, a prefill chunk with GQA
def test_kv_cache_append_matches_reference(device, dtype, interleaved, rotary_dim, new, n_kv_heads):
    batch, max_len = 3, 40
    q, k, v = make_new_tokens(device, dtype, (batch, new), n_kv_heads=n_kv_heads)
    # The cache as (batch, heads, max_len, d) storage seen through a (batch, max_len, heads, d) view.
    k_cache = torch.full((batch, n_kv_heads, max_len, 80), math.nan, device=device, dtype=dtype).transpose(1, 2)
    v_cache = torch.full_like(k_cache, math.nan)
    cache_seqlens = torch.tensor([0, 23, max_len - new], device=device, dtype=torch.int32)
    inputs_before = [x.clone() for x in (q, k, v, cache_seqlens)]
    options = dict(scaling_factor=4.0, rotary_dim=rotary_dim, interleaved=interleaved)
    q_ref, k_cache_ref, v_cache_ref = rotary_kv_cache_append_reference(
        q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), cache_seqlens, **options)
    q_out = inference.rotary_kv_cache_append(q, k, v, k_cache, v_cache, cache_seqlens, **options)
    assert q_out.shape == q.shape and q_out.dtype == dtype
    assert_close(q_out, q_ref, dtype, name="q")
    assert_cache_written(k_cache, k_cache_ref, dtype, "k_cache")
    assert_cache_written(v_cache, v_cache_ref, dtype, "v_cache")
    assert torch.equal(v_cache[~torch.isnan(v_cache_ref)], v_cache_ref[~torch.isnan(v_cache_ref)].to(dtype)), \
        "v is copied bit for bit"
    assert all(torch.equal(x, before) for x, before in zip((q, k, v, cache_seqlens), inputs_before, strict=True))


@pytest.mark.parametrize("position_kind", ["int", "offsets", "ids1d", "ids"])
def test_kv_cache_append_positions(device, position_kind):
    """Explicit positions (e.g. a PI model whose positions differ from cache indices) in every documented form."""
    batch, new, max_len = 2, 5, 16
    q, k, v = make_new_tokens(device, torch.float32, (batch, new))
    k_cache = torch.full((batch, max_len, 2, 80), math.nan, device=device)
    v_cache = torch.full_like(k_cache, math.nan)
    cache_seqlens = torch.tensor([3, 11], device=device)
    positions = {"int": 7000, "offsets": torch.tensor([9000, 17], device=device),
                 "ids1d": torch.randint(0, 20000, (new,), device=device),
                 "ids": torch.randint(0, 20000, (batch, new), device=device)}[position_kind]
    q_ref, k_cache_ref, v_cache_ref = rotary_kv_cache_append_reference(
        q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), cache_seqlens, positions,
        scaling_factor=8.0)
    q_out = inference.rotary_kv_cache_append(q, k, v, k_cache, v_cache, cache_seqlens, positions=positions,
                                             scaling_factor=8.0)
    assert_close(q_out, q_ref, torch.float32, name="q")
    assert_cache_written(k_cache, k_cache_ref, torch.float32, "k_cache")
    assert_cache_written(v_cache, v_cache_ref, torch.float32, "v_cache")


def random_slots(num_tokens, n_slots, n_padding, device):
    """Distinct slots in [0, n_slots), the last ``n_padding`` tokens replaced by the padding slot -1."""
    slots = torch.randperm(n_slots, device=device)[:num_tokens]
    slots[num_tokens - n_padding:] = -1
    return slots[torch.randperm(num_tokens, device=device)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 48])
@pytest.mark.parametrize("kv_layout", ["nhd", "hnd"])
def test_paged_kv_cache_append_matches_reference(device, dtype, interleaved, rotary_dim, kv_layout):
    # Two KV heads, so that an HND cache (heads before slots) differs in memory from its NHD reshape.
    num_tokens, num_blocks, block_size, n_kv_heads = 19, 9, 4, 2
    q, k, v = make_new_tokens(device, dtype, (num_tokens,), n_kv_heads=n_kv_heads)
    shape = (num_blocks, block_size, n_kv_heads, 80) if kv_layout == "nhd" else \
        (num_blocks, n_kv_heads, block_size, 80)
    k_cache = torch.full(shape, math.nan, device=device, dtype=dtype)
    v_cache = torch.full_like(k_cache, math.nan)
    slot_mapping = random_slots(num_tokens, num_blocks * block_size, 3, device)
    positions = torch.randint(0, 20000, (num_tokens,), device=device)
    options = dict(scaling_factor=4.0, rotary_dim=rotary_dim, interleaved=interleaved, kv_layout=kv_layout)
    inputs_before = [x.clone() for x in (q, k, v, slot_mapping, positions)]
    q_ref, k_cache_ref, v_cache_ref = rotary_paged_kv_cache_append_reference(
        q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), slot_mapping, positions, **options)
    q_out = inference.rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, slot_mapping, positions, **options)
    assert_close(q_out, q_ref, dtype, name="q")
    assert_cache_written(k_cache, k_cache_ref, dtype, "k_cache")
    assert_cache_written(v_cache, v_cache_ref, dtype, "v_cache")
    assert all(torch.equal(x, before) for x, before in
               zip((q, k, v, slot_mapping, positions), inputs_before, strict=True))


def test_paged_append_into_flashinfer_combined_cache(device):
    """FlashInfer's (num_pages, 2, page_size, heads, d) cache passes as its k and v halves (strided views)."""
    num_tokens = 6
    q, k, v = make_new_tokens(device, torch.bfloat16, (num_tokens,), n_heads=8, n_kv_heads=2, head_dim=64)
    paged = torch.full((5, 2, 3, 2, 64), math.nan, device=device, dtype=torch.bfloat16)
    slot_mapping = torch.tensor([14, 0, 5, 6, 7, 2], device=device, dtype=torch.int32)
    positions = torch.arange(100, 100 + num_tokens, device=device, dtype=torch.int32)
    q_ref, k_cache_ref, v_cache_ref = rotary_paged_kv_cache_append_reference(
        q.double(), k.double(), v.double(), paged[:, 0].double(), paged[:, 1].double(), slot_mapping, positions,
        base=500000.0)
    inference.rotary_paged_kv_cache_append(q, k, v, paged[:, 0], paged[:, 1], slot_mapping, positions,
                                           base=500000.0)
    assert_cache_written(paged[:, 0], k_cache_ref, torch.bfloat16, "k_cache")
    assert_cache_written(paged[:, 1], v_cache_ref, torch.bfloat16, "v_cache")


def test_cache_append_writes_every_element_of_q_out(device):
    """Launch into a NaN-filled q_out: rotated features and the passed-through tail must all be written."""
    q, k, v = make_new_tokens(device, torch.float16, (2, 7), n_heads=5, n_kv_heads=1)
    q_out = torch.full_like(q, math.nan)
    k_cache = torch.zeros(2, 10, 1, 80, device=device, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    cache_seqlens = torch.tensor([0, 3], device=device)
    spec = PositionSpec(POSITIONS_IDS, torch.randint(0, 5000, (2, 7), device=device), 0)
    kv_cache.launch_cache_append(q, k, v, q_out, k_cache, v_cache, cache_seqlens, False,
                                 Rope(spec, None, 10000.0, 4.0, 48, False))
    q_ref, _, _ = rotary_kv_cache_append_reference(q.double(), k.double(), v.double(), k_cache.double(),
                                                   v_cache.double(), cache_seqlens, spec.ids, scaling_factor=4.0,
                                                   rotary_dim=48)
    assert_close(q_out, q_ref, torch.float16, name="q")


def test_out_of_range_indices_are_masked_in_kernel(device):
    """With the host value checks off, out-of-range slots, cache overflow and cache positions are still never
    written or read: the kernels mask them (the other tokens are processed normally)."""
    q, k, v = make_new_tokens(device, torch.float32, (4,), n_kv_heads=1)
    k_cache = torch.full((2, 4, 1, 80), math.nan, device=device)
    v_cache = torch.full_like(k_cache, math.nan)
    slot_mapping = torch.tensor([8, 3, 1000, -5], device=device)  # past the 8 slots, valid, far past, below -1
    positions = torch.arange(4, device=device)
    positions_past_cache = torch.tensor([2, MAX_POSITION, 10**6, 5], device=device)
    query = torch.randn(4, 2 * 64, device=device)
    query_before = query.clone()
    pi_kernels.set_value_checks(False)
    try:
        inference.rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, slot_mapping, positions)
        dense = torch.full((1, 6, 1, 80), math.nan, device=device)
        q1, k1, v1 = make_new_tokens(device, torch.float32, (1, 4), n_kv_heads=1)
        inference.rotary_kv_cache_append(q1, k1, v1, dense, dense.clone(), torch.tensor([4], device=device))
        inference.rotary_embedding(positions_past_cache, query, None, 64, make_cos_sin_cache(64, device,
                                                                                             torch.float32))
    finally:
        pi_kernels.set_value_checks(True)
    written = ~torch.isnan(k_cache.flatten(0, 1)[:, 0, 0])
    assert written.tolist() == [i == 3 for i in range(8)], "only the one valid slot may be written"
    assert (~torch.isnan(dense[0, :, 0, 0])).tolist() == [False] * 4 + [True] * 2, "writes past max_len"
    assert torch.equal(query[1:3], query_before[1:3]), "tokens past the cos/sin cache must be left as they are"
    assert not torch.equal(query[0], query_before[0]) and not torch.equal(query[3], query_before[3])


def test_slot_mapping_from_block_table(device):
    block_table = torch.tensor([[7, 2, 4], [5, 0, -1]], device=device, dtype=torch.int32)
    cache_positions = torch.tensor([17, 3, -1, 40, 0], device=device)
    seq_ids = torch.tensor([0, 1, 1, 0, 0], device=device)
    slots = inference.slot_mapping_from_block_table(block_table, 16, cache_positions, seq_ids)
    expected = [2 * 16 + 1, 5 * 16 + 3, -1, 4 * 16 + 8, 7 * 16]
    assert slots.dtype == torch.int64 and slots.tolist() == expected
    decode = inference.slot_mapping_from_block_table(block_table, 16, torch.tensor([20, 15], device=device))
    assert decode.tolist() == [2 * 16 + 4, 5 * 16 + 15]
    with pytest.raises(ValueError, match="needs logical block 3"):
        inference.slot_mapping_from_block_table(block_table, 16, torch.tensor([48, 0], device=device))
    with pytest.raises(ValueError, match="negative block"):
        inference.slot_mapping_from_block_table(block_table, 16, torch.tensor([0, 33], device=device))
    with pytest.raises(ValueError, match="seq_ids must index"):
        inference.slot_mapping_from_block_table(block_table, 16, cache_positions, seq_ids + 1)


def test_torch_compile_fullgraph(device):
    """The in-place vLLM op and the cache append trace into one graph (their mutations are declared)."""
    cos_sin_cache = make_cos_sin_cache(64, device, torch.float32)

    def step(positions, query, key, k, v, k_cache, v_cache, cache_seqlens):
        query = query * 1.0
        inference.rotary_embedding(positions, query, key, 64, cos_sin_cache)
        q = inference.rotary_kv_cache_append(query.view(2, 1, 4, 64), k, v, k_cache, v_cache, cache_seqlens,
                                             scaling_factor=4.0)
        return q.sum() + key.sum()

    def inputs():
        generator = torch.Generator(device=device).manual_seed(0)
        positions = torch.tensor([5, 77], device=device)
        tensors = [torch.randn(shape, device=device, generator=generator)
                   for shape in ((2, 256), (2, 64), (2, 1, 1, 64), (2, 1, 1, 64))]
        caches = [torch.zeros(2, 8, 1, 64, device=device) for _ in range(2)]
        return positions, *tensors, *caches, torch.tensor([3, 7], device=device)

    eager_inputs, compiled_inputs = inputs(), inputs()
    eager = step(*eager_inputs)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled_inputs)
    assert rel_error(compiled, eager) <= 1e-6
    for name, index in (("key", 2), ("k_cache", 5), ("v_cache", 6)):
        assert torch.equal(compiled_inputs[index], eager_inputs[index]), f"{name} differs between eager and compiled"


BAD_VLLM = [
    ("position past the cache", dict(positions=[3, MAX_POSITION]), ValueError, r"positions must be in \[0, 300\)"),
    ("negative position", dict(positions=[3, -1]), ValueError, r"positions must be in \[0, 300\)"),
    ("float positions", dict(positions_dtype=torch.float32), TypeError, "positions must be an int32 or int64"),
    ("3-D positions", dict(positions_shape=(1, 1, 2)), ValueError, "positions must be"),
    ("odd head_size", dict(head_size=63), ValueError, "head_size must be a positive even int"),
    ("query width", dict(query_shape=(2, 200)), ValueError, "query must have shape"),
    ("query tokens", dict(query_shape=(3, 256)), ValueError, "query must have shape"),
    ("key dtype", dict(key_dtype=torch.float16), TypeError, "key.dtype"),
    ("unsupported dtype", dict(query_dtype=torch.float64), TypeError, "query.dtype must be"),
    ("odd rot_dim", dict(cache_shape=(MAX_POSITION, 63)), ValueError, "rot_dim"),
    ("rot_dim > head_size", dict(cache_shape=(MAX_POSITION, 128)), ValueError, "rot_dim"),
    ("1-D cache", dict(cache_shape=(MAX_POSITION,)), ValueError, "cos_sin_cache must be a 2-D"),
    ("cache dtype", dict(cache_dtype=torch.float16), TypeError, "cos_sin_cache.dtype"),
    ("unknown backend", dict(backend="cutlass"), ValueError, "backend must be one of"),
    ("key is query", dict(key="query"), ValueError, "query is written in place but shares memory with key"),
    ("key overlaps query", dict(key="query tail"), ValueError, "query is written in place but shares memory"),
    ("expanded query", dict(query="expanded"), ValueError, "query is written in place but has elements that share"),
]


@pytest.mark.parametrize("case", BAD_VLLM, ids=[case[0] for case in BAD_VLLM])
def test_rotary_embedding_bad_input_is_rejected(device, case):
    _, spec, error, match = case
    positions = torch.tensor(spec.get("positions", [3, 4]), device=device)
    positions = positions.to(spec.get("positions_dtype", torch.int64)).reshape(spec.get("positions_shape", (2,)))
    query = torch.randn(spec.get("query_shape", (2, 256)), device=device, dtype=spec.get("query_dtype", torch.float32))
    key = torch.randn(2, 64, device=device, dtype=spec.get("key_dtype", query.dtype))
    if spec.get("query") == "expanded":
        query = query[:1].expand(query.shape)
    key = {"query": query, "query tail": query[:, 192:]}.get(spec.get("key"), key)
    cos_sin_cache = torch.randn(spec.get("cache_shape", (MAX_POSITION, 64)), device=device,
                                dtype=spec.get("cache_dtype", torch.float32))
    query_before, key_before = query.clone(), key.clone()
    with pytest.raises(error, match=match):
        inference.rotary_embedding(positions, query, key, spec.get("head_size", 64), cos_sin_cache,
                                   backend=spec.get("backend", "auto"))
    assert torch.equal(query, query_before) and torch.equal(key, key_before)


@pytest.mark.parametrize("case", [
    ("negative position", dict(positions=[-1, 2]), ValueError, "positions must be ≥ 0"),
    ("rotary_dim > head_size", dict(rotary_dim=96), ValueError, "rotary_dim must be"),
    ("scaling_factor", dict(scaling_factor=0.0), ValueError, "scaling_factor must be"),
    ("inv_freq shape", dict(inv_freq=torch.ones(5)), ValueError, "inv_freq must have shape"),
], ids=lambda case: case[0])
def test_rotary_embedding_interp_bad_input_is_rejected(device, case):
    _, options, error, match = case
    options = dict(options)
    positions = torch.tensor(options.pop("positions", [1, 2]), device=device)
    if "inv_freq" in options:
        options["inv_freq"] = options["inv_freq"].to(device)
    query = torch.randn(2, 128, device=device)
    query_before = query.clone()
    with pytest.raises(error, match=match):
        inference.rotary_embedding_interp(positions, query, None, 64, **options)
    assert torch.equal(query, query_before)


BAD_DENSE = [
    ("cache overflow", dict(cache_seqlens=[0, 6]), ValueError, r"cache_seqlens must be in \[0, 6\).*max_len = 8"),
    ("negative cache_seqlens", dict(cache_seqlens=[-1, 0]), ValueError, "cache_seqlens must be in"),
    ("cache_seqlens shape", dict(cache_seqlens=[0, 0, 0]), ValueError, r"cache_seqlens must have shape \(2,\)"),
    ("cache_seqlens dtype", dict(cache_seqlens_dtype=torch.float32), TypeError, "cache_seqlens must be an int32"),
    ("negative positions", dict(positions=[-4, 0]), ValueError, "positions must be ≥ 0"),
    ("positions shape", dict(positions=[0, 1, 2, 3]), ValueError, "positions must have shape"),
    ("k/v shape mismatch", dict(v_shape=(2, 3, 1, 64)), ValueError, "k and v must have the same shape"),
    ("q/k tokens mismatch", dict(q_shape=(2, 4, 4, 64)), ValueError, "k and v must have the same shape"),
    ("head_dim mismatch", dict(q_shape=(2, 3, 4, 32)), ValueError, "same head_dim"),
    ("odd head_dim", dict(q_shape=(2, 3, 4, 63), kv_shape=(2, 3, 2, 63), cache_shape=(2, 8, 2, 63)), ValueError,
     "head_dim must be a positive even"),
    ("zero head_dim", dict(q_shape=(2, 3, 4, 0), kv_shape=(2, 3, 2, 0), cache_shape=(2, 8, 2, 0)), ValueError,
     "head_dim must be a positive even"),
    ("v_cache is k_cache", dict(v_cache="k_cache"), ValueError, "k_cache is written in place but shares memory with "
     "v_cache"),
    ("expanded cache", dict(cache="expanded"), ValueError, "k_cache is written in place but has elements that share"),
    ("k is a view of k_cache", dict(k="k_cache"), ValueError, "k_cache is written in place but shares memory with k"),
    ("cache heads", dict(cache_shape=(2, 8, 1, 64)), ValueError, "k_cache and v_cache must have shape"),
    ("cache batch", dict(cache_shape=(3, 8, 2, 64)), ValueError, "k_cache and v_cache must have shape"),
    ("cache shapes differ", dict(v_cache_shape=(2, 9, 2, 64)), ValueError, "k_cache and v_cache must have the same"),
    ("cache dtype", dict(cache_dtype=torch.float16), TypeError, r"k_cache.dtype \(torch.float16\) must match"),
    ("q rank", dict(q_shape=(2, 3, 256)), ValueError, "q must be 4-D"),
    ("rotary_dim", dict(rotary_dim=66), ValueError, "rotary_dim must be"),
]


@pytest.mark.parametrize("case", BAD_DENSE, ids=[case[0] for case in BAD_DENSE])
def test_kv_cache_append_bad_input_is_rejected(device, case):
    _, spec, error, match = case
    q = torch.randn(spec.get("q_shape", (2, 3, 4, 64)), device=device)
    k = torch.randn(spec.get("kv_shape", (2, 3, 2, 64)), device=device)
    v = torch.randn(spec.get("v_shape", k.shape), device=device)
    k_cache = torch.randn(spec.get("cache_shape", (2, 8, 2, 64)), device=device,
                          dtype=spec.get("cache_dtype", torch.float32))
    if spec.get("cache") == "expanded":
        k_cache = k_cache[:1].expand(k_cache.shape)
    v_cache = torch.randn(spec.get("v_cache_shape", k_cache.shape), device=device, dtype=k_cache.dtype)
    if spec.get("v_cache") == "k_cache":
        v_cache = k_cache
    if spec.get("k") == "k_cache":
        k = k_cache[:, :3]
    cache_seqlens = torch.tensor(spec.get("cache_seqlens", [0, 5]), device=device,
                                 dtype=spec.get("cache_seqlens_dtype", torch.int64))
    positions = spec.get("positions")
    positions = None if positions is None else torch.tensor(positions, device=device)
    caches_before = k_cache.clone(), v_cache.clone()
    with pytest.raises(error, match=match):
        inference.rotary_kv_cache_append(q, k, v, k_cache, v_cache, cache_seqlens, positions=positions,
                                         rotary_dim=spec.get("rotary_dim"))
    assert torch.equal(k_cache, caches_before[0]) and torch.equal(v_cache, caches_before[1]), "cache written"


BAD_PAGED = [
    ("slot past the cache", dict(slots=[0, 24, 3]), ValueError, r"slot_mapping must be in \[-1, 24\)"),
    ("slot below -1", dict(slots=[0, -2, 3]), ValueError, r"slot_mapping must be in \[-1, 24\)"),
    ("slot_mapping shape", dict(slots=[0, 1]), ValueError, r"slot_mapping must have shape \(3,\)"),
    ("slot_mapping dtype", dict(slots_dtype=torch.float64), TypeError, "slot_mapping must be an int32"),
    ("negative positions", dict(positions=[0, -1, 2]), ValueError, "positions must be ≥ 0"),
    ("positions shape", dict(positions=[0, 1]), ValueError, r"positions must have shape \(3,\)"),
    ("positions missing", dict(positions=None), TypeError, "positions must be an int32"),
    ("kv_layout", dict(kv_layout="nchw"), ValueError, "kv_layout must be one of"),
    ("cache heads", dict(cache_shape=(6, 4, 3, 64)), ValueError, "k_cache and v_cache must have shape"),
    ("hnd cache heads", dict(kv_layout="hnd"), ValueError, r"\(num_blocks, n_kv_heads, block_size, head_dim\)"),
    ("cache head_dim", dict(cache_shape=(6, 4, 2, 32)), ValueError, "k_cache and v_cache must have shape"),
    ("q rank", dict(q_shape=(1, 3, 4, 64)), ValueError, "q must be 3-D"),
    ("zero head_dim", dict(q_shape=(3, 4, 0), kv_shape=(3, 2, 0), cache_shape=(6, 4, 2, 0)), ValueError,
     "head_dim must be a positive even"),
    ("repeated slot", dict(slots=[7, 2, 7]), ValueError, "slot_mapping must not repeat a slot.*got slot 7"),
    ("v_cache overlaps k_cache", dict(v_cache="k_cache"), ValueError, "k_cache is written in place but shares memory"),
]


@pytest.mark.parametrize("case", BAD_PAGED, ids=[case[0] for case in BAD_PAGED])
def test_paged_kv_cache_append_bad_input_is_rejected(device, case):
    _, spec, error, match = case
    q = torch.randn(spec.get("q_shape", (3, 4, 64)), device=device)
    k, v = torch.randn(spec.get("kv_shape", (3, 2, 64)), device=device), torch.randn(spec.get("kv_shape", (3, 2, 64)),
                                                                                     device=device)
    k_cache = torch.randn(spec.get("cache_shape", (6, 4, 2, 64)), device=device)
    v_cache = torch.randn_like(k_cache)
    if spec.get("v_cache") == "k_cache":  # blocks 0-5 and 1-6 of one buffer: overlapping, not identical
        blocks = torch.randn(7, 4, 2, 64, device=device)
        k_cache, v_cache = blocks[:6], blocks[1:]
    slot_mapping = torch.tensor(spec.get("slots", [0, 5, 3]), device=device).to(
        spec.get("slots_dtype", torch.int64))
    positions = spec.get("positions", [0, 1, 2])
    positions = None if positions is None else torch.tensor(positions, device=device)
    caches_before = k_cache.clone(), v_cache.clone()
    with pytest.raises(error, match=match):
        inference.rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, slot_mapping, positions,
                                               kv_layout=spec.get("kv_layout", "nhd"))
    assert torch.equal(k_cache, caches_before[0]) and torch.equal(v_cache, caches_before[1]), "cache written"
