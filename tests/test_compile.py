"""torch.compile of every public op: in-place rotation on views under autograd, recompiles, dynamic shapes and floats.

Each compiled result is compared with eager and with the float64 reference (forward and gradients), with
``aot_eager`` (the graphs autograd and functionalization make) and ``inductor`` (the code that runs). A
``CompileCounterWithBackend`` proves the compiled path ran, and recompiled where a test says so. Runs under
Triton's interpreter on a CPU machine and compiled on a GPU (``make gpu-check`` runs this file), as conftest.py sets.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import pi_kernels
from pi_kernels import inference
from pi_kernels.reference import (
    attention_rotary_reference,
    qkv_proj_rotary_reference,
    rotary_embedding_reference,
    rotary_interp_reference,
    rotary_kv_cache_append_reference,
    rotary_paged_kv_cache_append_reference,
)

from .tolerances import assert_close

BACKENDS = ["aot_eager", "inductor"]
HEAD_DIM = 16
F32 = torch.float32


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with no compiled code, so recompile counts and limits are the test's own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_counted(fn, backend, **options):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True, **options), counter


def cos_sin_cache(max_position, rot_dim, device):
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] \
        * 10000.0 ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(device=device, dtype=F32)


# --------------------------------------------------------------------------------------------------------------------
# In-place rotation of views of a fused buffer, under autograd
# --------------------------------------------------------------------------------------------------------------------

def rotate_fused(entry, qkv, positions, scaling_factor, cache):
    """Rotate the q and k slots of a fused buffer in place with a public entry point; returns the buffer.

    ``rotary_interp``: qkv is (batch, seq, 3, heads, head_dim); the vLLM ops: (tokens, 3 · heads · head_dim).
    """
    if entry == "rotary_interp":
        pi_kernels.rotary_interp(qkv[:, :, 0], qkv[:, :, 1], positions, scaling_factor=scaling_factor, inplace=True)
        return qkv
    width = qkv.shape[1] // 3
    query, key = qkv[:, :width], qkv[:, width:2 * width]
    if entry == "rotary_embedding_interp":
        inference.rotary_embedding_interp(positions, query, key, HEAD_DIM, scaling_factor=scaling_factor)
    else:
        inference.rotary_embedding(positions, query, key, HEAD_DIM, cache)
    return qkv


def rotate_fused_reference(entry, qkv, positions, scaling_factor, cache):
    """rotate_fused out of place on float64, differentiable: the oracle for outputs and gradients."""
    if entry == "rotary_interp":
        q, k = rotary_interp_reference(qkv[:, :, 0], qkv[:, :, 1], positions, scaling_factor=scaling_factor)
        return torch.stack((q, k, qkv[:, :, 2]), dim=2)
    width = qkv.shape[1] // 3
    query, key = qkv[:, :width], qkv[:, width:2 * width]
    if entry == "rotary_embedding_interp":
        query, key = rotary_embedding_reference(positions, query, key, HEAD_DIM, scaling_factor=scaling_factor)
    else:
        query, key = rotary_embedding_reference(positions, query, key, HEAD_DIM, cache.double())
    return torch.cat((query, key, qkv[:, 2 * width:]), dim=1)


def fused_inputs(entry, heads, seq, device, generator):
    if entry == "rotary_interp":
        x = torch.randn(2, seq, 3, heads, HEAD_DIM, device=device, generator=generator)
        positions = torch.randint(0, 3000, (2, seq), device=device, generator=generator)
    else:
        x = torch.randn(seq, 3 * heads * HEAD_DIM, device=device, generator=generator)
        positions = torch.randint(0, 3000, (seq,), device=device, generator=generator)
    return x, positions, torch.randn(x.shape, device=device, generator=generator)


# (heads, seq, scaling_factor) of successive calls: another head count, another length, another factor; each may
# recompile (automatic dynamic shapes and floats).
CALLS = [(4, 8, 2.0), (2, 8, 2.0), (2, 5, 2.0), (2, 5, 3.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry,source", [("rotary_interp", "input"), ("rotary_interp", "intermediate"),
                                          ("rotary_embedding_interp", "input"), ("rotary_embedding", "input")])
def test_inplace_on_views_under_autograd(device, backend, entry, source):
    """Issue 17, cases 1 and 2: the compiled forward and backward equal eager's and the float64 reference's,
    across recompiles; views of a graph input, or of an intermediate."""
    cache = cos_sin_cache(3000, HEAD_DIM, device)

    def step(x, positions, scaling_factor):
        qkv = x.clone() if source == "input" else x * 1.0
        return rotate_fused(entry, qkv, positions, scaling_factor, cache)

    compiled, counter = compile_counted(step, backend)
    generator = torch.Generator(device=device).manual_seed(0)
    for heads, seq, scaling_factor in CALLS:
        x, positions, grad = fused_inputs(entry, heads, seq, device, generator)
        x.requires_grad_()
        results = {}
        for name, fn in (("eager", step), ("compiled", compiled)):
            out = fn(x, positions, scaling_factor)
            results[name] = (out, *torch.autograd.grad(out, x, grad))
        x64 = x.detach().double().requires_grad_()
        ref = rotate_fused_reference(entry, x64, positions, scaling_factor, cache)
        ref_grad, = torch.autograd.grad(ref, x64, grad.double())
        where = f"{entry}, heads={heads}, seq={seq}, scaling_factor={scaling_factor}"
        for name, (out, x_grad) in results.items():
            assert_close(out, ref, F32, name=f"{name} output ({where})")
            assert_close(x_grad, ref_grad, F32, name=f"{name} gradient ({where})")
    assert counter.frame_count >= 2, "the head-count change should have recompiled"


def pytorch_compiles_inplace_on_a_view_after_a_graph_break(backend, device):
    """Whether torch.compile itself handles ``y[:, 0].copy_(...)`` on the output of the graph before a break
    (torch 2.14.1's inductor does not: "Output 0 of Select is a view and is being modified inplace")."""

    def plain(x):
        y = x * 1.0
        torch._dynamo.graph_break()
        y[:, 0].copy_(y[:, 0] * 2.0)
        return y

    try:
        torch.compile(plain, backend=backend)(torch.ones(3, 2, device=device, requires_grad=True))
    except Exception:  # noqa: BLE001 - any failure of PyTorch's own pattern
        return False
    finally:
        torch._dynamo.reset()
    return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_break_before_inplace_call(device, backend):
    """Issue 17, case 3 without fullgraph: a graph break before an in-place call on views, with another scaling
    factor each call (once a Dynamo crash or "marked as dirty ... not returned"). Where PyTorch cannot compile the
    same pattern without pi_kernels, the test says so instead of blaming the op."""
    if not pytorch_compiles_inplace_on_a_view_after_a_graph_break(backend, device):
        pytest.xfail(f"torch {torch.__version__} with {backend} fails on an in-place copy into a view after a graph "
                     f"break, without pi_kernels")

    def step(x, scaling_factor):
        qkv = x * 1.0
        torch._dynamo.graph_break()
        return rotate_fused("rotary_interp", qkv, None, scaling_factor, None)

    compiled = torch.compile(step, backend=backend)
    generator = torch.Generator(device=device).manual_seed(5)
    for scaling_factor in (2.0, 3.0, 4.0):
        x, _, grad = fused_inputs("rotary_interp", 2, 8, device, generator)
        x.requires_grad_()
        eager = step(x, scaling_factor)
        out = compiled(x, scaling_factor)
        assert_close(out, eager, F32, name=f"output, scaling_factor={scaling_factor}")
        assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(eager, x, grad)[0], F32,
                     name=f"gradient, scaling_factor={scaling_factor}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_without_grad_across_recompiles(device, backend):
    """In-place calls with autograd off take the mutating op (one launch), which must stay right when compiled."""
    cache = cos_sin_cache(3000, HEAD_DIM, device)

    def step(x, positions, scaling_factor):
        fused = rotate_fused("rotary_interp", x, positions[0], scaling_factor, cache)
        flat = fused.view(-1, 3 * fused.shape[3] * HEAD_DIM)  # a view of the same buffer, vLLM's flat form
        rotate_fused("rotary_embedding_interp", flat, positions[1], scaling_factor, cache)
        return rotate_fused("rotary_embedding", flat, positions[1], scaling_factor, cache)

    compiled, counter = compile_counted(step, backend)
    generator = torch.Generator(device=device).manual_seed(1)
    for heads, seq, scaling_factor in CALLS:
        x, positions, _ = fused_inputs("rotary_interp", heads, seq, device, generator)
        flat_positions = torch.randint(0, 3000, (2 * seq,), device=device, generator=generator)
        eager_x, compiled_x = x.clone(), x.clone()
        with torch.no_grad():
            step(eager_x, (positions, flat_positions), scaling_factor)
            compiled(compiled_x, (positions, flat_positions), scaling_factor)
        assert_close(compiled_x, eager_x, F32, name=f"heads={heads}, seq={seq}, scaling_factor={scaling_factor}")
        assert not torch.equal(compiled_x, x)
    assert counter.frame_count >= 2


def cache_append(paged, q, k, v, k_cache, v_cache, cache_index, scaling_factor):
    """rotary_kv_cache_append (cache_index: cache_seqlens) or the paged append (slot_mapping; HND caches)."""
    if not paged:
        return pi_kernels.rotary_kv_cache_append(q, k, v, k_cache, v_cache, cache_index,
                                                 scaling_factor=scaling_factor)
    return pi_kernels.rotary_paged_kv_cache_append(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                   k_cache.transpose(1, 2), v_cache.transpose(1, 2), cache_index,
                                                   cache_index.clamp(min=0) + 5, scaling_factor=scaling_factor,
                                                   kv_layout="hnd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_form", ["tensors", "views", "intermediate views"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cache_append_across_recompiles(device, backend, cache_form, paged):
    """The cache appends compiled, called with another head count and token count: q and the caches equal eager's.

    "views": k and v caches sliced out of one buffer (FlashInfer's ``cache[:, 0]``, ``cache[:, 1]``), a graph input;
    their storage offset then depends on the head count, which inductor drops when a custom op mutates such a view.
    "intermediate views": the same of a buffer made inside the compiled function. Paged calls include padding
    tokens (slot -1), which must write nothing.
    """

    def step(q, k, v, kv, cache_index, scaling_factor):
        if cache_form == "intermediate views":
            kv = kv * 1.0
        k_cache, v_cache = kv if cache_form == "tensors" else (kv[:, :, 0], kv[:, :, 1])
        q_out = cache_append(paged, q, k, v, k_cache, v_cache, cache_index, scaling_factor)
        return (q_out, k_cache, v_cache) if cache_form == "intermediate views" else (q_out,)

    compiled, counter = compile_counted(step, backend)
    generator = torch.Generator(device=device).manual_seed(4)
    for heads, new, scaling_factor, all_padding in ((4, 3, 2.0, False), (2, 3, 2.0, False), (2, 1, 3.0, False),
                                                    (3, 2, 3.0, False), (3, 2, 3.0, True)):
        q, k, v = (torch.randn(2, new, heads, HEAD_DIM, device=device, generator=generator) for _ in range(3))
        kv = torch.randn(2, 10, 2, heads, HEAD_DIM, device=device, generator=generator)
        if paged:  # (blocks=2, block_size=10) caches; a padding token among the 2·new
            cache_index = torch.randperm(20, device=device, generator=generator)[:2 * new]
            cache_index[slice(None) if all_padding else new - 1] = -1
        else:
            cache_index = torch.tensor([1, 7 - new], device=device)
        eager_kv, compiled_kv = kv.clone(), kv.clone()
        if cache_form == "tensors":  # two tensors of their own
            eager_kv, compiled_kv = ([x[:, :, 0].clone(), x[:, :, 1].clone()] for x in (kv, kv))
        with torch.no_grad():
            eager = step(q, k, v, eager_kv, cache_index, scaling_factor)
            out = compiled(q, k, v, compiled_kv, cache_index, scaling_factor)
        where = f"heads={heads}, new={new}, scaling_factor={scaling_factor}, all_padding={all_padding}"
        assert_close(out[0], eager[0], F32, name=f"q ({where})")
        written = (out[1:], eager[1:]) if cache_form == "intermediate views" else (compiled_kv, eager_kv)
        for compiled_cache, eager_cache in zip(*written, strict=True):
            assert torch.equal(compiled_cache, eager_cache), f"caches differ from eager ({where})"
    assert counter.frame_count >= 2


# --------------------------------------------------------------------------------------------------------------------
# fullgraph with dynamic shapes and floats: every public op
# --------------------------------------------------------------------------------------------------------------------

def op_cases(device):
    """name -> (function of (tensors, scaling_factor, offset), tensors for (tokens, heads), float64 reference)."""

    def qk(tokens, heads, generator):
        return [torch.randn(2, tokens, heads, HEAD_DIM, device=device, generator=generator),
                torch.randn(2, tokens, 1, HEAD_DIM, device=device, generator=generator)]

    def cache_inputs(tokens, heads, generator):
        q, k = qk(tokens, heads, generator)
        return [q, k, torch.randn_like(k), torch.zeros(2, 16, 1, HEAD_DIM, device=device),
                torch.zeros(2, 16, 1, HEAD_DIM, device=device)]

    def paged_inputs(tokens, heads, generator):
        q, k, v, k_cache, v_cache = cache_inputs(tokens, heads, generator)
        slots = torch.randperm(32, device=device, generator=generator)[:tokens]
        return [q[0], k[0], v[0], k_cache.view(4, 8, 1, HEAD_DIM), v_cache.view(4, 8, 1, HEAD_DIM), slots]

    def vllm_inputs(tokens, heads, generator):
        return [torch.randn(tokens, heads * HEAD_DIM, device=device, generator=generator),
                torch.randn(tokens, HEAD_DIM, device=device, generator=generator)]

    def qkv_inputs(tokens, heads, generator):
        return [torch.randn(2, tokens, 24, device=device, generator=generator),
                torch.randn((heads + 2) * HEAD_DIM, 24, device=device, generator=generator) / 5]

    rotary_module = pi_kernels.RotaryInterp(scaling_factor=2.0)
    offsets = torch.tensor([0, 3], device=device)
    cache_lengths = torch.tensor([2, 5], device=device)
    cache = cos_sin_cache(64, HEAD_DIM, device)

    def vllm_positions(query, offset):
        return torch.arange(query.shape[0], device=device) + offset

    def with_module(t, s, o):
        rotary_module.scaling_factor = s
        return rotary_module(*t, o)

    return {
        "rotary_interp": (lambda t, s, o: pi_kernels.rotary_interp(*t, o, scaling_factor=s), qk,
                          lambda t, s, o: rotary_interp_reference(*t, o, scaling_factor=s)),
        "rotary_interp_inplace": (lambda t, s, o: pi_kernels.rotary_interp(*t, o, scaling_factor=s, inplace=True),
                                  qk, lambda t, s, o: rotary_interp_reference(*t, o, scaling_factor=s)),
        "RotaryInterp": (with_module, qk, lambda t, s, o: rotary_interp_reference(*t, o, scaling_factor=s)),
        "qkv_proj_rotary": (
            lambda t, s, o: pi_kernels.qkv_proj_rotary(*t, num_heads=t[1].shape[0] // HEAD_DIM - 2, num_kv_heads=1,
                                                       head_dim=HEAD_DIM, positions=o, scaling_factor=s),
            qkv_inputs,
            lambda t, s, o: qkv_proj_rotary_reference(*t, num_heads=t[1].shape[0] // HEAD_DIM - 2, num_kv_heads=1,
                                                      head_dim=HEAD_DIM, positions=o, scaling_factor=s)),
        "attention_rotary": (
            lambda t, s, o: pi_kernels.attention_rotary(*t, t[1], o, scaling_factor=s, softmax_scale=s / 8),
            qk, lambda t, s, o: attention_rotary_reference(*t, t[1], o, scaling_factor=s, softmax_scale=s / 8)),
        "attention_rotary_offsets": (
            lambda t, s, o: pi_kernels.attention_rotary(*t, t[1], offsets + o, scaling_factor=s), qk,
            lambda t, s, o: attention_rotary_reference(*t, t[1], offsets + o, scaling_factor=s)),
        "rotary_kv_cache_append": (
            lambda t, s, o: (pi_kernels.rotary_kv_cache_append(*t, cache_lengths, positions=o, scaling_factor=s),
                             *t[3:]),
            cache_inputs,
            lambda t, s, o: rotary_kv_cache_append_reference(*t, cache_lengths, o, scaling_factor=s)),
        "rotary_paged_kv_cache_append": (
            lambda t, s, o: (pi_kernels.rotary_paged_kv_cache_append(*t, o + torch.arange(t[0].shape[0],
                                                                     device=device), scaling_factor=s), *t[3:5]),
            paged_inputs,
            lambda t, s, o: rotary_paged_kv_cache_append_reference(
                *t, o + torch.arange(t[0].shape[0], device=device), scaling_factor=s)),
        "rotary_embedding": (
            lambda t, s, o: (inference.rotary_embedding(vllm_positions(t[0], o), *t, HEAD_DIM, cache), *t)[1:],
            vllm_inputs,
            lambda t, s, o: rotary_embedding_reference(vllm_positions(t[0], o), *t, HEAD_DIM, cache.double())),
        "rotary_embedding_interp": (
            lambda t, s, o: (inference.rotary_embedding_interp(vllm_positions(t[0], o), *t, HEAD_DIM,
                                                               scaling_factor=s), *t)[1:],
            vllm_inputs,
            lambda t, s, o: rotary_embedding_reference(vllm_positions(t[0], o), *t, HEAD_DIM, scaling_factor=s)),
    }


OPS = ["rotary_interp", "rotary_interp_inplace", "RotaryInterp", "qkv_proj_rotary", "attention_rotary",
       "attention_rotary_offsets", "rotary_kv_cache_append", "rotary_paged_kv_cache_append", "rotary_embedding",
       "rotary_embedding_interp"]


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_fullgraph_with_dynamic_shapes_and_floats(device, op, backend, dynamic):
    """Issue 17, case 3: no graph break when the scaling factor, the position offset, the token and head counts
    change; ``dynamic=True`` traces them as symbols from the start, the default does after the first change."""
    fn, make_inputs, reference = op_cases(device)[op]
    compiled, counter = compile_counted(fn, backend, dynamic=dynamic)
    generator = torch.Generator(device=device).manual_seed(2)
    for tokens, heads, scaling_factor, offset in ((5, 2, 2.0, 7), (5, 2, 3.0, 11), (7, 4, 5.0, 0), (3, 4, 1.5, 4)):
        tensors = make_inputs(tokens, heads, generator)
        eager_tensors = [t.clone() for t in tensors]
        with torch.no_grad():
            refs = as_tuple(reference([t.double() for t in tensors], scaling_factor, offset))
            eager = as_tuple(fn(eager_tensors, scaling_factor, offset))
            out = as_tuple(compiled(tensors, scaling_factor, offset))
        where = f"{op}: tokens={tokens}, heads={heads}, scaling_factor={scaling_factor}, offset={offset}"
        for i, (o, e, r) in enumerate(zip(out, eager, refs, strict=True)):
            assert_close(o, r, F32, name=f"compiled output {i} ({where})")
            assert_close(o, e, F32, name=f"compiled vs eager output {i} ({where})")
    # Floats are specialized where they enter a custom op (a schema has no symbolic float), so a new scaling factor
    # may compile once more: never a graph break (fullgraph), never a wrong result.
    assert counter.frame_count >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_checks_of_symbolic_floats_run_at_call_time(device, backend):
    """A scaling factor traced as a symbol is still checked, by the op, before it writes anything."""
    compiled, _ = compile_counted(
        lambda q, k, s: pi_kernels.rotary_interp(q, k, scaling_factor=s, inplace=True), backend, dynamic=True)
    q, k = torch.randn(1, 4, 2, HEAD_DIM, device=device), torch.randn(1, 4, 1, HEAD_DIM, device=device)
    compiled(q.clone(), k.clone(), 2.0)
    q_before = q.clone()
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scaling_factor must be a finite number > 0"):
            compiled(q, k, bad)
    assert torch.equal(q, q_before)


# --------------------------------------------------------------------------------------------------------------------
# Eager autograd of the inference ops
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_key", [True, False])
@pytest.mark.parametrize("variant", ["rotary_embedding", "rotary_embedding_interp"])
@pytest.mark.parametrize("is_neox,rotary_dim", [(True, HEAD_DIM), (False, HEAD_DIM), (True, 10)])
def test_vllm_ops_gradients(device, variant, with_key, is_neox, rotary_dim):
    """Issue 17, case 4: the in-place vLLM-convention ops on tensors that require grad give the reference's
    gradients (they were the upstream gradient, unrotated), double backward included."""
    generator = torch.Generator(device=device).manual_seed(3)
    leaf = torch.randn(9, 5 * HEAD_DIM, device=device, generator=generator, requires_grad=True)
    positions = torch.randint(0, 3000, (9,), device=device, generator=generator)
    cache = cos_sin_cache(3000, rotary_dim, device)
    grad = torch.randn(leaf.shape, device=device, generator=generator, requires_grad=True)
    probe = torch.randn(leaf.shape, device=device, generator=generator)

    def split(x):
        return x[:, :4 * HEAD_DIM], x[:, 4 * HEAD_DIM:] if with_key else None

    x = leaf * 1.0
    query, key = split(x)
    if variant == "rotary_embedding":
        inference.rotary_embedding(positions, query, key, HEAD_DIM, cache, is_neox=is_neox)
    else:
        inference.rotary_embedding_interp(positions, query, key, HEAD_DIM, is_neox=is_neox, rotary_dim=rotary_dim,
                                          scaling_factor=4.0)
    leaf_grad, = torch.autograd.grad(x, leaf, grad, create_graph=True)
    second, = torch.autograd.grad(leaf_grad, grad, probe)

    leaf64, grad64 = leaf.detach().double().requires_grad_(), grad.detach().double().requires_grad_()
    query64, key64 = split(leaf64)
    options = ({"cos_sin_cache": cache.double()} if variant == "rotary_embedding"
               else {"rotary_dim": rotary_dim, "scaling_factor": 4.0})
    query_ref, key_ref = rotary_embedding_reference(positions, query64, key64, HEAD_DIM, is_neox=is_neox, **options)
    ref = torch.cat((query_ref, key_ref if with_key else leaf64[:, 4 * HEAD_DIM:]), dim=1)
    ref_grad, = torch.autograd.grad(ref, leaf64, grad64, create_graph=True)
    ref_second, = torch.autograd.grad(ref_grad, grad64, probe.double())
    assert_close(x, ref, F32, name="output")
    assert_close(leaf_grad, ref_grad, F32, name="gradient")
    assert_close(second, ref_second, F32, name="double backward")


@pytest.mark.parametrize("paged", [False, True])
def test_cache_appends_refuse_inputs_that_require_grad(device, paged):
    """Issue 17, case 4: the cache appends have no backward; asked for one they raise at the call, writing nothing."""
    q = torch.randn(2, 3, 2, HEAD_DIM, device=device)
    k = torch.randn(2, 3, 1, HEAD_DIM, device=device, requires_grad=True)
    v = torch.randn(2, 3, 1, HEAD_DIM, device=device)
    k_cache, v_cache = torch.zeros(2, 8, 1, HEAD_DIM, device=device), torch.zeros(2, 8, 1, HEAD_DIM, device=device)
    name = "rotary_paged_kv_cache_append" if paged else "rotary_kv_cache_append"
    with pytest.raises(RuntimeError, match=f"{name} has no backward .* but k requires grad"):
        if paged:
            pi_kernels.rotary_paged_kv_cache_append(q[0], k[0], v[0], k_cache, v_cache,
                                                    torch.arange(3, device=device), torch.arange(3, device=device))
        else:
            pi_kernels.rotary_kv_cache_append(q, k, v, k_cache, v_cache, torch.tensor([0, 2], device=device))
    assert not k_cache.any() and not v_cache.any()
    with torch.no_grad():
        pi_kernels.rotary_kv_cache_append(q, k, v, k_cache, v_cache, torch.tensor([0, 2], device=device))
    assert k_cache.any()
