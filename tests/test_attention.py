"""Fused RoPE attention (``attention_rotary``) against the float64 reference: values, lse and the three gradients.

The bar is flash-attention's: error against float64 at most twice that of the same computation in eager PyTorch in
the input dtype (``assert_close_to_eager``). Runs under Triton's interpreter on a CPU machine and compiled on a GPU
(see conftest.py), with the same code; the interpreter's tiles are small, so ~100-token sequences span several.
"""

import math
import os

import pytest
import torch

import pi_kernels
from pi_kernels import scaling
from pi_kernels.reference import attention_rotary_reference, rotary_interp_reference

from .tolerances import assert_close, assert_close_to_eager

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Triton 3.6's interpreter rounds float32 -> bfloat16 toward zero where a GPU rounds to nearest, which doubles each
# bf16 rounding error of the kernel there (measured: ours / eager ≈ 2.0 under the interpreter for out, dq, dk, dv):
# the 2× rule becomes 4× for bf16 under the interpreter only.
EAGER_SCALE = {torch.bfloat16: 4.0 if os.environ.get("TRITON_INTERPRET") == "1" else 2.0}


def tf32_scale(device, dtype=torch.float32):
    """Float32 dots run in TF32 on a GPU (10-bit mantissa, 2^-11 ≈ 5e-4 = 500 × the float32 tolerance 1e-6)."""
    return 1000.0 if device.type == "cuda" and dtype == torch.float32 else 1.0
SEQLENS_Q = [5, 1, 0, 17, 3]     # packed batch with an empty and a one-token sequence
SEQLENS_K = [9, 1, 4, 17, 30]    # keys for SEQLENS_Q: fewer queries than keys, and one sequence the other way


def make_qkv(device, dtype, *, batch=2, seq_q=17, seq_k=None, n_heads=4, n_kv_heads=1, head_dim=32,
             packed=False, noncontiguous=False):
    """Random leaf q, k, v (batch, seq, heads, head_dim), or packed (tokens, heads, head_dim) when ``packed``
    (seq_q and seq_k are then token counts); ``noncontiguous`` slices them out of one fused qkv buffer."""
    seq_k = seq_q if seq_k is None else seq_k
    lead_q, lead_k = ((seq_q,), (seq_k,)) if packed else ((batch, seq_q), (batch, seq_k))
    if noncontiguous:
        assert seq_q == seq_k
        fused = torch.randn(*lead_q, n_heads + 2 * n_kv_heads, head_dim + 8, device=device, dtype=dtype)
        q = fused[..., :n_heads, 4:4 + head_dim]
        k = fused[..., n_heads:n_heads + n_kv_heads, 4:4 + head_dim]
        v = fused[..., n_heads + n_kv_heads:, 4:4 + head_dim]
    else:
        q = torch.randn(*lead_q, n_heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(*lead_k, n_kv_heads, head_dim, device=device, dtype=dtype)
        v = torch.randn(*lead_k, n_kv_heads, head_dim, device=device, dtype=dtype)
    return tuple(x.detach().requires_grad_() for x in (q, k, v))


def cu_seqlens_for(seqlens, device):
    return torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], device=device, dtype=torch.int32)


def reference_and_eager(q, k, v, grad_out, **options):
    """(out, lse, dq, dk, dv) of the float64 reference and of the same eager computation in the input dtype.

    On a GPU float32 runs its dots in TF32 (fp16's 10-bit mantissa), so its eager counterpart runs in float16.
    """
    options = {name: value for name, value in options.items() if name not in ("max_seqlen_q", "max_seqlen_k")}
    eager_dtype = torch.float16 if q.dtype == torch.float32 and q.device.type == "cuda" else q.dtype
    results = []
    for dtype in (torch.float64, eager_dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out, lse = attention_rotary_reference(*leaves, return_lse=True, **options)
        out.backward(grad_out.to(dtype))
        results.append((out.detach(), lse.detach(), *(x.grad for x in leaves)))
    return results


def check_attention(q, k, v, positions=None, *, grad_out=None, **options):
    """Run attention_rotary with return_lse and backward; compare everything with the reference (2× eager rule)."""
    dtype = q.dtype
    inputs_before = [x.detach().clone() for x in (q, k, v)]
    out, lse = pi_kernels.attention_rotary(q, k, v, positions, return_lse=True, **options)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    out.backward(grad_out)
    for x, before in zip((q, k, v), inputs_before, strict=True):
        assert torch.equal(x.detach(), before), "attention_rotary modified its inputs"
    ref, eager = reference_and_eager(q, k, v, grad_out, positions=positions, **options)
    assert lse.shape == ref[1].shape
    # Queries that see no key have lse -inf, exactly; the others are compared.
    blind = torch.isneginf(ref[1])
    assert torch.equal(torch.isneginf(lse), blind), "lse is -inf exactly where a query sees no key"
    scale = EAGER_SCALE.get(dtype, 2.0)
    assert_close_to_eager(lse[~blind], ref[1][~blind], eager[1][~blind].float(), dtype, name="lse", scale=scale)
    for name, ours, expected, baseline in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad),
                                              (ref[0], *ref[2:]), (eager[0], *eager[2:]), strict=True):
        assert_close_to_eager(ours, expected, baseline, dtype, name=name, scale=scale)
    return out, lse


# float32 runs in most tests below; this grid is for the 16-bit types.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [
    dict(batch=2, seq_q=33, n_heads=3, n_kv_heads=1, head_dim=32),                # MQA: one KV head
    dict(batch=2, seq_q=17, n_heads=4, n_kv_heads=2, head_dim=16),                # GQA 2:1
    dict(batch=1, seq_q=5, seq_k=70, n_heads=4, n_kv_heads=2, head_dim=16),       # seq_q < seq_k
], ids=["mqa-33", "gqa-17", "q5-k70"])
def test_matches_reference(device, dtype, causal, shape):
    q, k, v = make_qkv(device, dtype, **shape)
    check_attention(q, k, v, causal=causal, scaling_factor=4.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token_sequences(device, dtype):
    """One key per query: the output is v, dv the upstream gradient summed over the group, and dq, dk vanish (their
    float64 reference is exactly 0, so a relative error means nothing: only summation-order noise is allowed)."""
    q, k, v = make_qkv(device, dtype, batch=3, seq_q=1, n_heads=4, n_kv_heads=2, head_dim=16)
    grad_out = torch.randn_like(q)
    out, lse = pi_kernels.attention_rotary(q, k, v, 7, scaling_factor=4.0, return_lse=True)
    out.backward(grad_out)
    (ref_out, ref_lse, *_), (eager_out, eager_lse, *_) = reference_and_eager(q, k, v, grad_out, positions=7,
                                                                            scaling_factor=4.0)
    scale = EAGER_SCALE.get(dtype, 2.0)
    assert_close_to_eager(out, ref_out, eager_out, dtype, name="out", scale=scale)
    assert_close_to_eager(lse, ref_lse, eager_lse.float(), dtype, name="lse", scale=scale)
    dv_expected = grad_out.double().unflatten(2, (2, 2)).sum(3)
    assert_close(v.grad, dv_expected, dtype, name="dv", scale=tf32_scale(device, dtype))
    if dtype != torch.float32:
        # p = 1 and p·v are exact in 16-bit; float32 on a GPU rounds v to TF32 in the dot.
        assert torch.equal(out, v.detach().repeat_interleave(2, dim=2))
    # dO·v - rowsum(out·dO): float32 summation order, or TF32 rounding of dO·v on a GPU.
    bound = 1e-2 if dtype == torch.float32 and device.type == "cuda" else 1e-5
    for name, grad in (("dq", q.grad), ("dk", k.grad)):
        assert grad.abs().max() <= bound, f"{name} must vanish, got {grad.abs().max():.1e}"


def test_long_sequence_spans_many_blocks(device):
    """217 tokens: several query and key tiles on both sides of the causal diagonal, a ragged last tile."""
    q, k, v = make_qkv(device, torch.float16, batch=1, seq_q=217, n_heads=2, n_kv_heads=1, head_dim=16)
    check_attention(q, k, v, causal=True, scaling_factor=16.0, base=500000.0)


@pytest.mark.parametrize("causal", [True, False])
def test_more_queries_than_keys(device, causal):
    """Bottom-right causal alignment leaves the first seq_q - seq_k queries blind: output 0, lse -inf."""
    q, k, v = make_qkv(device, torch.float16, batch=2, seq_q=40, seq_k=9, n_heads=2, n_kv_heads=1, head_dim=32)
    out, lse = check_attention(q, k, v, causal=causal)
    if causal:
        assert torch.equal(out[:, :31], torch.zeros_like(out[:, :31]))
        assert torch.isneginf(lse[:, :, :31]).all() and torch.isfinite(lse[:, :, 31:]).all()


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 48])
def test_head_dim_80_partial_rotary_interleaved(device, interleaved, rotary_dim):
    q, k, v = make_qkv(device, torch.float32, batch=1, seq_q=24, n_heads=2, n_kv_heads=1, head_dim=80)
    check_attention(q, k, v, rotary_dim=rotary_dim, interleaved=interleaved, scaling_factor=4.0)


@pytest.mark.parametrize("scaling_factor", [1.0, 4.0, 16.0])
def test_interpolation_past_the_original_window(device, scaling_factor):
    """Positions up to scaling_factor × a 4k window; float32 is where an inexact angle would show (floor 1e-6)."""
    q, k, v = make_qkv(device, torch.float32, batch=2, seq_q=20, n_heads=2, n_kv_heads=1, head_dim=32)
    positions = torch.randint(0, int(4096 * scaling_factor), (2, 20), device=device)
    positions[:, -1] = int(4096 * scaling_factor) - 1
    check_attention(q, k, v, positions, scaling_factor=scaling_factor)


@pytest.mark.parametrize("form", ["int", "offsets", "ids1d", "ids", "ids-int32"])
def test_position_forms(device, form):
    batch, seq = 3, 19
    q, k, v = make_qkv(device, torch.float32, batch=batch, seq_q=seq, n_heads=2, n_kv_heads=2, head_dim=16)
    positions = {
        "int": 3000,
        "offsets": torch.randint(0, 9000, (batch,), device=device),
        "ids1d": torch.randint(0, 9000, (seq,), device=device),
        "ids": torch.randint(0, 9000, (batch, seq), device=device),
        "ids-int32": torch.randint(0, 9000, (batch, seq), device=device, dtype=torch.int32),
    }[form]
    check_attention(q, k, v, positions, scaling_factor=2.0)


def test_separate_key_positions(device):
    """A chunk of 6 queries at 1000..1005 attending 70 keys from offsets 936 and 940: separate key positions."""
    q, k, v = make_qkv(device, torch.float32, batch=2, seq_q=6, seq_k=70, n_heads=4, n_kv_heads=2, head_dim=32)
    check_attention(q, k, v, 1000, k_positions=torch.tensor([936, 940], device=device), scaling_factor=8.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_self_attention(device, dtype, causal):
    q, k, v = make_qkv(device, dtype, seq_q=sum(SEQLENS_Q), n_heads=2, n_kv_heads=1, head_dim=32, packed=True)
    check_attention(q, k, v, causal=causal, cu_seqlens_q=cu_seqlens_for(SEQLENS_Q, device), scaling_factor=4.0)


@pytest.mark.parametrize("form", ["offsets", "ids-int32"])
def test_packed_position_forms(device, form):
    q, k, v = make_qkv(device, torch.float32, seq_q=sum(SEQLENS_Q), n_heads=2, n_kv_heads=1, head_dim=16,
                       packed=True)
    count, dtype = (len(SEQLENS_Q), torch.int64) if form == "offsets" else (sum(SEQLENS_Q), torch.int32)
    positions = torch.randint(0, 20000, (count,), device=device, dtype=dtype)
    check_attention(q, k, v, positions, cu_seqlens_q=cu_seqlens_for(SEQLENS_Q, device), max_seqlen_q=max(SEQLENS_Q),
                    scaling_factor=4.0)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_queries_and_keys_of_other_lengths(device, causal):
    """Per-sequence bottom-right alignment, including 4 queries without any key; default then explicit positions."""
    seqlens_q, seqlens_k = [3, 1, 4, 17, 2], [9, 1, 0, 30, 2]
    q, k, v = make_qkv(device, torch.float16, seq_q=sum(seqlens_q), seq_k=sum(seqlens_k), n_heads=2, n_kv_heads=1,
                       head_dim=32, packed=True)
    options = dict(cu_seqlens_q=cu_seqlens_for(seqlens_q, device), cu_seqlens_k=cu_seqlens_for(seqlens_k, device),
                   causal=causal, scaling_factor=4.0)
    check_attention(q, k, v, **options)
    if not causal:
        return
    # Keys of each sequence from an offset; its queries are its last positions, as by default.
    k_offsets = torch.tensor([100, 0, 7, 5000, 1], device=device)
    q_offsets = k_offsets + torch.tensor(seqlens_k, device=device) - torch.tensor(seqlens_q, device=device)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    check_attention(q, k, v, q_offsets, k_positions=k_offsets, max_seqlen_q=17, max_seqlen_k=30, **options)


def test_decode_against_a_rotated_cache(device):
    """rotate_k=False: one new query per sequence against a cache of keys rotated when they were appended."""
    cache_lens = [100, 1, 37]
    total = sum(cache_lens)
    k, v = (torch.randn(total, 1, 32, device=device, dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(len(cache_lens), 4, 32, device=device, dtype=torch.bfloat16)
    cu_k = cu_seqlens_for(cache_lens, device)
    cu_q = torch.arange(len(cache_lens) + 1, device=device, dtype=torch.int32)
    rope = dict(scaling_factor=4.0, base=500000.0)
    k_cache, _ = rotary_interp_reference(k.double(), k.double(), layout="thd", cu_seqlens=cu_k, **rope)
    k_cache = k_cache.to(torch.bfloat16)
    # By default the query of each sequence sits at its last cache position.
    q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k_cache, v))
    check_attention(q_, k_, v_, rotate_k=False, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **rope)
    out = pi_kernels.attention_rotary(q, k_cache, v, rotate_k=False, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **rope)
    last = pi_kernels.attention_rotary(q, k_cache, v, torch.tensor(cache_lens, device=device) - 1, rotate_k=False,
                                       cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **rope)
    assert torch.equal(out, last)
    # Same result as rotating the keys in-kernel.
    full = attention_rotary_reference(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      **rope)
    assert_close(out, full, torch.bfloat16, name="decode vs in-kernel rotation")


def test_dense_decode_step(device):
    """A batch of single queries at position 99 against 100 cached keys, dense layout."""
    q = torch.randn(2, 1, 4, 32, device=device, dtype=torch.float16, requires_grad=True)
    _, k, v = make_qkv(device, torch.float16, batch=2, seq_q=100, n_heads=4, n_kv_heads=1, head_dim=32)
    k_cache = rotary_interp_reference(k.detach().double(), k.detach().double(), scaling_factor=2.0)[0].half()
    check_attention(q, k_cache.requires_grad_(), v, 99, rotate_k=False, scaling_factor=2.0)


def test_rope_off_is_plain_attention(device):
    q, k, v = make_qkv(device, torch.float16, batch=2, seq_q=33, n_heads=4, n_kv_heads=2, head_dim=32)
    out, _ = check_attention(q, k, v, rotate_q=False, rotate_k=False)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.detach().double().transpose(1, 2), k.detach().double().repeat_interleave(2, 2).transpose(1, 2),
        v.detach().double().repeat_interleave(2, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    assert_close(out, expected, torch.float16, name="out vs SDPA")


def test_equals_rotary_interp_then_attention(device):
    """The fused op is rotary_interp followed by attention on the rotated q and k, gradients included."""
    q, k, v = make_qkv(device, torch.float32, batch=2, seq_q=37, n_heads=4, n_kv_heads=2, head_dim=48)
    positions = torch.randint(0, 30000, (2, 37), device=device)
    options = dict(scaling_factor=8.0, rotary_dim=32, interleaved=True)
    grad_out = torch.randn_like(q)
    pi_kernels.attention_rotary(q, k, v, positions, **options).backward(grad_out)
    fused = [x.grad for x in (q, k, v)]
    q2, k2, v2 = (x.detach().requires_grad_() for x in (q, k, v))
    q_rot, k_rot = pi_kernels.rotary_interp(q2, k2, positions, **options)
    pi_kernels.attention_rotary(q_rot, k_rot, v2, rotate_q=False, rotate_k=False).backward(grad_out)
    for name, ours, composed in zip(("dq", "dk", "dv"), fused, (q2.grad, k2.grad, v2.grad), strict=True):
        assert_close(ours, composed, torch.float32, name=name, scale=tf32_scale(device))


def test_strided_views_and_expanded_grad(device):
    """q, k, v sliced out of one fused buffer, and the stride-0 upstream gradient of ``.sum()``."""
    q, k, v = make_qkv(device, torch.float32, batch=2, seq_q=21, n_heads=4, n_kv_heads=1, head_dim=32,
                       noncontiguous=True)
    assert not q.is_contiguous()
    grad_of_sum = torch.ones((), device=device).expand(q.shape)
    check_attention(q, k, v, 500, grad_out=grad_of_sum, scaling_factor=4.0)


def _descriptors_expected(device):
    """Whether aligned views take the tensor-descriptor path: under the interpreter and on sm_90 and later."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


@pytest.mark.parametrize("layout", ["contiguous", "base-misaligned", "rows-misaligned", "features-strided"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "packed"])
def test_descriptor_path_and_pointer_fallback(device, monkeypatch, layout, varlen):
    """The kernels read and write through tensor descriptors (TMA on sm_90) where TMA can address every view, and
    through masked pointers otherwise (a base or a row stride that is not a multiple of 16 bytes, features not
    contiguous): both agree with the reference. Rotation off, so the kernels see the caller's views as they are."""
    from pi_kernels.ops import attention

    chosen = []
    use_descriptors = attention._use_descriptors
    monkeypatch.setattr(attention, "_use_descriptors", lambda *args: chosen.append(use_descriptors(*args))
                        or chosen[-1])
    n_heads, head_dim, seq = 2, 16, 40
    lead = (seq + 33,) if varlen else (2, seq)
    pad = {"contiguous": (0, 0), "base-misaligned": (1, 0), "rows-misaligned": (0, 1)}.get(layout, (0, 0))
    width = head_dim + sum(pad)
    views = []
    for _ in range(3):
        if layout == "features-strided":
            x = torch.randn(*lead, n_heads, head_dim, 2, device=device)[..., 0]
        else:
            x = torch.randn(*lead, n_heads, width, device=device)[..., pad[0]:pad[0] + head_dim]
        views.append(x.requires_grad_())
    q, k, v = views
    options = dict(rotate_q=False, rotate_k=False)
    if varlen:
        options.update(cu_seqlens_q=cu_seqlens_for([seq, 33], device), max_seqlen_q=seq)
    check_attention(q, k, v, **options)
    assert chosen and all(use == (layout == "contiguous" and _descriptors_expected(device)) for use in chosen), chosen


def test_no_warning_on_any_supported_triton(device):
    """Triton 3.6-3.8 warn that block pointers are deprecated (3.9 removed them): the kernels use none."""
    import warnings

    q, k, v = make_qkv(device, torch.float32, seq_q=33, n_heads=2, n_kv_heads=1, head_dim=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pi_kernels.attention_rotary(q, k, v, scaling_factor=2.0).sum().backward()


def test_scratch_allocator_is_set_once_and_never_replaces_the_callers():
    """In-kernel descriptors need Triton's scratch allocator: the launcher sets torch's unless one is set."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    from pi_kernels.ops import attention

    def current():
        allocator = _allocation._allocator
        return allocator.get() if hasattr(allocator, "get") else allocator

    def run():
        saved = current()
        try:
            triton.set_allocator(_allocation.NullAllocator())   # none set
            attention._ensure_scratch_allocator()
            assert current() is attention._scratch
            triton.set_allocator(mine := (lambda size, alignment, stream: None))
            attention._ensure_scratch_allocator()
            assert current() is mine
        finally:
            triton.set_allocator(saved)

    contextvars.copy_context().run(run)   # Triton 3.5 on: a ContextVar; 3.4: a module global, restored


def test_every_output_element_is_written_and_memory_is_linear(device, monkeypatch):
    """Outputs allocated by the op are NaN-poisoned before the kernels run; no allocation is seq_q × seq_k."""
    q, k, v = make_qkv(device, torch.float16, batch=1, seq_q=100, n_heads=2, n_kv_heads=1, head_dim=16)
    grad_out = torch.randn_like(q)
    expected = reference_and_eager(q, k, v, grad_out, scaling_factor=4.0)
    sizes = []
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(factory):
        def make(*args, **kwargs):
            x = factory(*args, **kwargs)
            sizes.append(x.numel())
            return x.fill_(math.nan) if x.is_floating_point() else x
        return make

    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    out = pi_kernels.attention_rotary(q, k, v, scaling_factor=4.0)
    out.backward(grad_out)
    monkeypatch.undo()
    (ref, _, *ref_grads), (eager, _, *eager_grads) = expected
    for name, ours, exp, base in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), (ref, *ref_grads),
                                     (eager, *eager_grads), strict=True):
        assert_close_to_eager(ours, exp, base, torch.float16, name=name)
    assert sizes and max(sizes) <= q.numel() < 100 * 100 * 2, f"allocations of {sizes} elements"


def test_gradients_are_deterministic(device):
    q, k, v = make_qkv(device, torch.bfloat16, batch=1, seq_q=70, n_heads=2, n_kv_heads=1, head_dim=16)
    grad_out = torch.randn_like(q)
    grads = []
    for _ in range(2):
        for x in (q, k, v):
            x.grad = None
        pi_kernels.attention_rotary(q, k, v, scaling_factor=4.0).backward(grad_out)
        grads.append([x.grad.clone() for x in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_double_backward_is_refused(device):
    q, k, v = make_qkv(device, torch.float32, batch=1, seq_q=3, n_heads=2, n_kv_heads=1, head_dim=16)
    upstream = torch.randn_like(q, requires_grad=True)
    (dq,) = torch.autograd.grad(pi_kernels.attention_rotary(q, k, v), q, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


def test_torch_compile_fullgraph(device):
    def step(q, k, v, positions):
        out, lse = pi_kernels.attention_rotary(q * 1.0, k, v, positions, scaling_factor=4.0, return_lse=True)
        return (out.float() ** 2).sum() + lse.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    q, k, v = make_qkv(device, torch.float32, batch=2, seq_q=17, n_heads=4, n_kv_heads=2, head_dim=16)
    positions = torch.randint(0, 9000, (2, 17), device=device)
    loss = compiled(q, k, v, positions)
    loss.backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    loss_eager = step(q, k, v, positions)
    loss_eager.backward()
    assert_close(loss, loss_eager, torch.float32, name="loss")
    for name, compiled_grad, x in zip(("dq", "dk", "dv"), grads, (q, k, v), strict=True):
        assert_close(compiled_grad, x.grad, torch.float32, name=name)


def test_module(device):
    inv_freq = scaling.rope_inv_freq(500000.0, 16, device=device)
    attention = pi_kernels.AttentionRotary(16, scaling_factor=8.0, inv_freq=inv_freq, causal=False)
    assert "scaling_factor=8.0" in repr(attention) and "causal=False" in repr(attention)
    q, k, v = make_qkv(device, torch.float32, batch=1, seq_q=9, n_heads=2, n_kv_heads=1, head_dim=32)
    out, lse = attention(q, k, v, 123, return_lse=True)
    expected = pi_kernels.attention_rotary(q, k, v, 123, scaling_factor=8.0, inv_freq=inv_freq, rotary_dim=16,
                                           causal=False, return_lse=True)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


BAD_INPUTS = [
    ("head_dim mismatch", dict(k=(2, 8, 1, 32)), {}, ValueError, "k head_dim"),
    ("v shape", dict(v=(2, 8, 1, 32)), {}, ValueError, "v must have the shape of k"),
    ("heads not a multiple", dict(q=(2, 8, 3, 64), k=(2, 8, 2, 64), v=(2, 8, 2, 64)), {}, ValueError,
     "multiple of n_kv_heads"),
    ("batch mismatch", dict(k=(3, 8, 1, 64), v=(3, 8, 1, 64)), {}, ValueError, "same batch size"),
    ("wrong rank", dict(q=(8, 4, 64)), {}, ValueError, "q must have shape"),
    ("odd head_dim", dict(q=(2, 8, 4, 63), k=(2, 8, 1, 63), v=(2, 8, 1, 63)), {}, ValueError, "head_dim must be"),
    ("head_dim > 256", dict(q=(2, 8, 4, 288), k=(2, 8, 1, 288), v=(2, 8, 1, 288)), {}, ValueError,
     "at most 256"),
    ("k dtype", dict(k_dtype=torch.float16), {}, TypeError, "k.dtype"),
    ("v dtype", dict(v_dtype=torch.bfloat16), {}, TypeError, "v.dtype"),
    ("unsupported dtype", dict(dtype=torch.float64), {}, TypeError, "q.dtype must be"),
    ("softmax_scale", {}, dict(softmax_scale=0.0), ValueError, "softmax_scale must be"),
    ("rotary_dim", {}, dict(rotary_dim=31), ValueError, "rotary_dim must be"),
    ("scaling_factor", {}, dict(scaling_factor=-1.0), ValueError, "scaling_factor must be"),
    ("negative positions", {}, dict(positions=("negative", (2, 8))), ValueError, "positions must be ≥ 0"),
    ("positions shape", {}, dict(positions=("int64", (3,))), ValueError, "positions must have shape"),
    ("keys need k_positions", dict(k=(2, 12, 1, 64), v=(2, 12, 1, 64)), dict(positions=5), ValueError,
     "k_positions is required"),
    ("k_positions alone", {}, dict(k_positions=5), ValueError, "without positions"),
    ("k_positions of cached keys", {}, dict(positions=5, k_positions=5, rotate_k=False), ValueError,
     "rotate_k=False"),
    ("positions with no rotation", {}, dict(positions=5, rotate_q=False, rotate_k=False), ValueError,
     "nothing is rotated"),
    ("cu_seqlens_k alone", {}, dict(cu_seqlens_k=[0, 8]), ValueError, "only valid with cu_seqlens_q"),
    ("cu_seqlens total", dict(q=(8, 4, 64), k=(8, 1, 64), v=(8, 1, 64)), dict(cu_seqlens_q=[0, 3, 7]), ValueError,
     "end at the token count 8"),
    ("cu_seqlens decreasing", dict(q=(8, 4, 64), k=(8, 1, 64), v=(8, 1, 64)), dict(cu_seqlens_q=[0, 5, 3, 8]),
     ValueError, "non-decreasing"),
    ("cu_seqlens_k total", dict(q=(8, 4, 64), k=(6, 1, 64), v=(6, 1, 64)),
     dict(cu_seqlens_q=[0, 3, 8], cu_seqlens_k=[0, 2, 5]), ValueError, "end at the token count 6"),
    ("cu_seqlens count", dict(q=(8, 4, 64), k=(6, 1, 64), v=(6, 1, 64)),
     dict(cu_seqlens_q=[0, 3, 8], cu_seqlens_k=[0, 6]), ValueError, "cu_seqlens_k must have the shape"),
    ("cu_seqlens dtype", dict(q=(8, 4, 64), k=(8, 1, 64), v=(8, 1, 64)), dict(cu_seqlens_q=("float32", (3,))),
     ValueError, "cu_seqlens must be a 1-D int32/int64"),
    ("max_seqlen exceeded", dict(q=(8, 4, 64), k=(8, 1, 64), v=(8, 1, 64)),
     dict(cu_seqlens_q=[0, 2, 8], max_seqlen_q=4), ValueError, "exceeds max_seqlen=4"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_rejected(device, case):
    _, shapes, options, error, match = case
    options = dict(options)
    dtype = shapes.get("dtype", torch.float32)
    q = torch.randn(shapes.get("q", (2, 8, 4, 64)), device=device, dtype=dtype)
    k = torch.randn(shapes.get("k", (2, 8, 1, 64)), device=device, dtype=shapes.get("k_dtype", dtype))
    v = torch.randn(shapes.get("v", k.shape), device=device, dtype=shapes.get("v_dtype", dtype))
    for name in ("positions", "cu_seqlens_q", "cu_seqlens_k"):
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
        pi_kernels.attention_rotary(q, k, v, **options)


def test_device_mismatch_is_rejected(device):
    if device.type != "cuda":
        pytest.skip("needs a second device type")
    q = torch.randn(2, 8, 4, 64, device=device)
    k = torch.randn(2, 8, 1, 64, device=device)
    with pytest.raises(ValueError, match="same device"):
        pi_kernels.attention_rotary(q, k, torch.randn(2, 8, 1, 64))
    with pytest.raises(ValueError, match="positions is on"):
        pi_kernels.attention_rotary(q, k, k, torch.zeros(2, 8, dtype=torch.long))


def test_peak_memory_is_linear_in_sequence_length(device):
    """Forward + backward peak memory grows ~2× from 4k to 8k tokens (a seq² buffer would make it ~4×)."""
    if device.type != "cuda":
        pytest.skip("measures CUDA memory")
    peaks = []
    for seq in (4096, 8192):
        q, k, v = make_qkv(device, torch.bfloat16, batch=1, seq_q=seq, n_heads=8, n_kv_heads=8, head_dim=64)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        pi_kernels.attention_rotary(q, k, v, scaling_factor=4.0).sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del q, k, v
    assert peaks[1] <= 2.5 * peaks[0], f"peak memory {peaks} bytes at 4k and 8k tokens"

