"""pi_kernels swapped into tiny random-weight transformers models: logits, gradients and generation against the
unpatched model, refusals, and restoring the original.

The oracle is the unpatched model in float64 with its rotary table computed in float64 (transformers computes the
angles in float32, whose error at the positions used here is itself near the float32 tolerance). A whole model's
logits and gradients carry the rounding of every layer, so, as for attention (tests/tolerances.py), the patched model
may be off the oracle by the dtype tolerance or by twice the error of the same model unpatched in the same dtype.
"""

import copy
import re

import pytest
import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import pi_kernels
from pi_kernels import scaling
from pi_kernels.integrations.transformers import (
    SUPPORTED_ATTENTION_CLASSES,
    is_patched,
    patch_model,
    unpatch_model,
)
from pi_kernels.reference import rotary_angles, rotary_interp_reference

from .tolerances import TOLERANCE, assert_close, rel_error

ORIGINAL_WINDOW = 16
LINEAR_4 = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
SEQ = 4 * ORIGINAL_WINDOW  # positions 0..63: four times past the window the model was "trained" on

# Each covered family as (config class, model class, options beyond the shared tiny sizes).
FAMILIES = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "Mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 48}),
    "Ministral": ("MinistralConfig", "MinistralForCausalLM",
                  {"sliding_window": 48, "head_dim": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 48,
                                                  "max_window_layers": 1}),
    "Qwen2Moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                          "moe_intermediate_size": 32,
                                                          "shared_expert_intermediate_size": 32,
                                                          "experts_implementation": "eager"}),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "Qwen3Moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 16, "num_experts": 4,
                                                          "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                                          "experts_implementation": "eager"}),
    "Gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "Granite": ("GraniteConfig", "GraniteForCausalLM", {}),
}


# An attention backend that records what every layer hands it, then runs sdpa: patched and unpatched layers must
# hand it the same query, key, value, mask and options (sliding_window, scaling, dropout, ...).
RECORDER = "pi_kernels_test_recorder"
_recorded_calls = []


def _recording_sdpa(module, query, key, value, attention_mask, **kwargs):
    _recorded_calls.append((query.detach(), key.detach(), value.detach(), attention_mask, kwargs))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


transformers.AttentionInterface.register(RECORDER, _recording_sdpa)


def make_model(family="Llama", rope=LINEAR_4, dtype=torch.float32, device="cpu", attn_implementation=RECORDER,
               **options):
    """A tiny random-weight model: hidden 64, 2 layers, 4 heads over 2 KV heads, a 16-position original window.

    The Triton interpreter's cost grows with the number of programs, i.e. batch rows and head groups; the slow tests
    (compile, generate) use one layer.
    """
    config_class, model_class, family_options = FAMILIES[family]
    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=ORIGINAL_WINDOW)
    config = getattr(transformers, config_class)(rope_parameters=dict(rope), attn_implementation=attn_implementation,
                                                 **{**sizes, **family_options, **options})
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).to(device=device, dtype=dtype)


def exact_oracle(model):
    """Float64 copy of the unpatched model whose rotary table is float64; checks transformers' own table first."""
    oracle = copy.deepcopy(model).double()
    rotary_emb = oracle.model.rotary_emb
    config = model.config
    params = config.rope_parameters
    head_dim = model.model.layers[0].self_attn.head_dim
    if params["rope_type"] in ("default", "linear"):
        # Closed form of PI, independent of pi_kernels.scaling.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        inv_freq = params["rope_theta"] ** -exponents / params.get("factor", 1.0)
        attention_factor = 1.0
    else:
        freqs = scaling.rope_frequencies_from_config(config)
        inv_freq, attention_factor = freqs.inv_freq, freqs.attention_factor
    # A model cast to 16 bits also rounds transformers' table (the patched model keeps exact frequencies).
    table = model.model.rotary_emb.inv_freq
    assert_close(table, inv_freq, table.dtype, name="transformers inv_freq")
    assert abs(model.model.rotary_emb.attention_scaling - attention_factor) <= 1e-6 * attention_factor

    def exact_cos_sin(x, position_ids):
        angles = rotary_angles(position_ids, inv_freq=inv_freq.to(x.device), rotary_dim=head_dim)
        table = torch.cat((angles, angles), dim=-1)
        return table.cos() * attention_factor, table.sin() * attention_factor

    rotary_emb.forward = exact_cos_sin
    return oracle


def assert_within_eager(out, eager, ref, dtype, name):
    """``out`` within the dtype tolerance of ``ref``, or within twice the same-dtype unpatched error (see top)."""
    scale = max(1.0, 2.0 * rel_error(eager, ref) / TOLERANCE[dtype])
    assert_close(out, ref, dtype, name=name, scale=scale)


def logits_and_grads(model, input_ids, upstream):
    """Logits, the flattened parameter gradients for a random upstream gradient, and the recorded attention calls."""
    model.zero_grad(set_to_none=True)
    _recorded_calls.clear()
    logits = model(input_ids).logits
    calls = list(_recorded_calls)
    logits.backward(upstream.to(logits.dtype))
    missing = [name for name, param in model.named_parameters() if param.grad is None]
    assert not missing, f"no gradient for {missing}"
    grads = torch.cat([param.grad.double().flatten() for _, param in model.named_parameters()])
    return logits.detach(), grads, calls


def check_attention_calls(calls, eager_calls, ref_calls, dtype):
    """Each layer handed the attention backend the same tensors (within tolerance) and the same options."""
    assert len(calls) == len(eager_calls) == len(ref_calls) > 0
    for layer, (call, eager_call, ref_call) in enumerate(zip(calls, eager_calls, ref_calls, strict=True)):
        *tensors, mask, options = call
        *eager_tensors, eager_mask, eager_options = eager_call
        for name, out, eager, ref in zip(("query", "key", "value"), tensors, eager_tensors, ref_call[:3], strict=True):
            assert_within_eager(out, eager, ref, dtype, f"layer {layer} {name}")
        assert (mask is None and eager_mask is None) or torch.equal(mask, eager_mask)
        assert options.keys() == eager_options.keys(), f"layer {layer} options {options} != {eager_options}"
        for key, value in options.items():
            same = torch.equal(value, eager_options[key]) if torch.is_tensor(value) else value == eager_options[key]
            assert same, f"layer {layer} option {key}: {value!r} != {eager_options[key]!r}"


def check_against_oracle(model, dtype, input_ids, **patch_options):
    """Patch ``model`` and compare logits and gradients with the oracle, as the unpatched model does."""
    oracle = exact_oracle(model)
    torch.manual_seed(1)
    upstream = torch.randn(*input_ids.shape, model.config.vocab_size, device=input_ids.device)
    ref_logits, ref_grads, ref_calls = logits_and_grads(oracle, input_ids, upstream)
    eager_logits, eager_grads, eager_calls = logits_and_grads(model, input_ids, upstream)
    patch_model(model, **patch_options)
    logits, grads, calls = logits_and_grads(model, input_ids, upstream)
    assert_within_eager(logits, eager_logits, ref_logits, dtype, "logits")
    assert_within_eager(grads, eager_grads, ref_grads, dtype, "parameter gradients")
    if model.config._attn_implementation == RECORDER:
        check_attention_calls(calls, eager_calls, ref_calls, dtype)


def random_tokens(device, batch=1, seq=SEQ):
    torch.manual_seed(2)
    return torch.randint(0, 256, (batch, seq), device=device)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_match_unpatched(device, family):
    model = make_model(family, device=device)
    check_against_oracle(model, torch.float32, random_tokens(device))
    assert is_patched(model)


@pytest.mark.parametrize("family, dtype", [("Llama", torch.bfloat16), ("Llama", torch.float16),
                                           ("Qwen3", torch.bfloat16)])
def test_half_precision_matches_unpatched(device, family, dtype):
    model = make_model(family, dtype=dtype, device=device)
    check_against_oracle(model, dtype, random_tokens(device, batch=2))


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 2.5, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16},
    {"rope_type": "llama3", "factor": 4.0, "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
], ids=lambda rope: rope["rope_type"])
def test_rope_types(device, rope):
    model = make_model("Llama", rope=rope, device=device)
    check_against_oracle(model, torch.float32, random_tokens(device))


def test_legacy_rope_scaling_config(device):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 4.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device)
    check_against_oracle(model, torch.float32, random_tokens(device))


def test_transformers_older_than_the_floor_is_refused_naming_the_version():
    from pi_kernels.integrations import transformers as integration

    for old in ("5.3.0", "5.0.0", "4.57.6"):
        with pytest.raises(ImportError, match=rf"needs transformers >= 5\.4 \(found {re.escape(old)}\)"):
            integration._check_transformers_version(old)
    for new in ("5.4.0", "5.17.0", "5.25.0.dev0", transformers.__version__):
        integration._check_transformers_version(new)


def set_checkpointing(model, enabled):
    """Activation checkpointing on or off by the name this transformers has: 5.20 renamed
    ``gradient_checkpointing_enable``/``_disable`` to ``activation_checkpointing_*`` (the old names warn since)."""
    kind = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{kind}_checkpointing_{'enable' if enabled else 'disable'}")()


def test_gradient_checkpointing_and_compile(device):
    """Training setups that re-enter or trace the forward: activation checkpointing and torch.compile(fullgraph)."""
    model = make_model(device=device, num_hidden_layers=1)
    input_ids = random_tokens(device)
    upstream = torch.randn(*input_ids.shape, 256, device=device)
    patch_model(model)
    ref_logits, ref_grads, _ = logits_and_grads(model, input_ids, upstream)
    set_checkpointing(model, True)
    model.train()
    logits, grads, _ = logits_and_grads(model, input_ids, upstream)
    assert torch.equal(logits, ref_logits) and torch.equal(grads, ref_grads)
    set_checkpointing(model, False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    logits, grads, _ = logits_and_grads(compiled, input_ids, upstream)
    assert_close(logits, ref_logits.double(), torch.float32, name="compiled logits")
    assert_close(grads, ref_grads, torch.float32, name="compiled gradients")


def test_generate_with_kv_cache(device):
    """Greedy decoding with a KV cache, one row left-padded, past the original window: the same tokens."""
    model = make_model(device=device, num_hidden_layers=1).eval()
    torch.manual_seed(3)
    prompt = torch.randint(3, 256, (2, 14), device=device)
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :3] = 0
    # No end-of-sequence token: every step is decoded, and no score is masked to -inf.
    model.generation_config.eos_token_id = None
    options = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                   output_scores=True, return_dict_in_generate=True)
    expected = model.generate(prompt, **options)
    patch_model(model)
    got = model.generate(prompt, **options)
    assert got.sequences.shape[1] == 14 + 8
    assert torch.equal(got.sequences, expected.sequences)
    # The unpatched model's float32 angles are off by ~1e-6 rad at these positions, hence 10x the fp32 bar.
    assert_close(torch.stack(got.scores), torch.stack(expected.scores).double(), torch.float32, name="scores",
                 scale=10.0)


def test_unpatch_restores_the_model(device):
    model = make_model(device=device).eval()
    input_ids = random_tokens(device, seq=20)
    before = model(input_ids).logits
    patch_model(model)
    assert all("forward" in vars(module) for module in model.modules()
               if type(module).__name__ in SUPPORTED_ATTENTION_CLASSES)
    patched_logits = model(input_ids).logits
    # A deep copy is patched on its own: its layers' forwards are bound to the copy.
    clone = copy.deepcopy(model)
    assert torch.equal(clone(input_ids).logits, patched_logits)
    unpatch_model(clone)
    assert is_patched(model) and torch.equal(clone(input_ids).logits, before)
    unpatch_model(model)
    assert not is_patched(model)
    assert not any("forward" in vars(module) for module in model.modules())
    assert torch.equal(model(input_ids).logits, before)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)
    patch_model(model)  # patchable again
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model)


def test_missing_position_ids_is_an_error(device):
    model = patch_model(make_model(device=device))
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(1, 5, 64, device=device)
    with pytest.raises(ValueError, match="position_ids"):
        attention(hidden, position_embeddings=None, attention_mask=None)


def _set_hook_forward(model):
    attention = model.model.layers[0].self_attn
    attention.forward = attention.forward  # what accelerate's hooks leave behind: an instance-level forward


def _edit_config_after_building(model):
    model.config.rope_parameters = dict(LINEAR_4, factor=8.0)


BAD_MODELS = {
    "dynamic": (dict(rope={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), None, "'dynamic'"),
    "longrope": (dict(rope={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                            "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                            "original_max_position_embeddings": 16}), None, "'longrope'"),
    "config edited": ({}, _edit_config_after_building, "does not match"),
    "hooked forward": ({}, _set_hook_forward, "instance-level forward"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_refused_models_are_left_untouched(device, case):
    options, prepare, match = BAD_MODELS[case]
    model = make_model(device=device, **options)
    if prepare is not None:
        prepare(model)
    with pytest.raises(ValueError, match=match):
        patch_model(model)
    assert not is_patched(model)


def test_unsupported_architectures_are_refused(device):
    config = transformers.Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    with pytest.raises(ValueError, match="unsupported attention classes"):
        patch_model(transformers.Phi3ForCausalLM(config))
    with pytest.raises(ValueError, match="no attention module"):
        patch_model(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch_model(config)


@pytest.mark.parametrize("flags, error, match", [
    (dict(rotary=False), ValueError, "nothing to patch"),
    (dict(attention=True, qkv=True), ValueError, "choose one"),
    (dict(rotary=1), TypeError, "rotary must be a bool"),
])
def test_bad_flags(device, flags, error, match):
    model = make_model(device=device)
    with pytest.raises(error, match=match):
        patch_model(model, **flags)
    assert not is_patched(model)


@pytest.mark.parametrize("flag, op", [("attention", "attention_rotary"), ("qkv", "qkv_proj_rotary")])
def test_fused_op_not_in_this_build_is_a_clear_error(device, flag, op):
    if hasattr(pi_kernels, op):
        pytest.skip(f"pi_kernels.{op} exists; the fused path is tested below")
    with pytest.raises(NotImplementedError, match=op):
        patch_model(make_model(device=device), **{flag: True})


# The fused ops are written against their documented APIs (issues 4 and 5). Until they land, the wiring is tested
# with plain-PyTorch stand-ins of exactly those signatures; once they exist, the same tests run on the real ops.

def qkv_proj_rotary_stand_in(x, weight, bias=None, *, num_heads, num_kv_heads, head_dim, positions=None,
                             scaling_factor=1.0, base=10000.0, inv_freq=None, rotary_dim=None, interleaved=False,
                             cu_seqlens=None):
    qkv = torch.nn.functional.linear(x, weight, bias).unflatten(-1, (num_heads + 2 * num_kv_heads, head_dim))
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=-2)
    q, k = rotary_interp_reference(q, k, positions, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                                   rotary_dim=rotary_dim, interleaved=interleaved)
    return q, k, v


def attention_rotary_stand_in(q, k, v, positions=None, *, scaling_factor=1.0, base=10000.0, inv_freq=None,
                              rotary_dim=None, interleaved=False, causal=True, softmax_scale=None, k_positions=None,
                              cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                              rotate_q=True, rotate_k=True, return_lse=False):
    assert rotate_q and rotate_k and k_positions is None and cu_seqlens_q is None and not return_lse
    q, k = rotary_interp_reference(q, k, positions, scaling_factor=scaling_factor, base=base, inv_freq=inv_freq,
                                   rotary_dim=rotary_dim, interleaved=interleaved)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=causal, scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


def _install(request, monkeypatch, name, stand_in):
    """Make ``pi_kernels.<name>`` the stand-in or the real op (skipping if absent); returns its call counter."""
    if request.param == "pi_kernels" and not hasattr(pi_kernels, name):
        pytest.skip(f"pi_kernels.{name} is not in this build yet")
    op = stand_in if request.param == "stand-in" else getattr(pi_kernels, name)
    calls = {"count": 0}

    def counted(*args, **kwargs):
        calls["count"] += 1
        return op(*args, **kwargs)

    monkeypatch.setattr(pi_kernels, name, counted, raising=False)
    return calls


@pytest.fixture(params=["stand-in", "pi_kernels"])
def qkv_op(request, monkeypatch):
    return _install(request, monkeypatch, "qkv_proj_rotary", qkv_proj_rotary_stand_in)


@pytest.fixture(params=["stand-in", "pi_kernels"])
def attention_op(request, monkeypatch):
    return _install(request, monkeypatch, "attention_rotary", attention_rotary_stand_in)


@pytest.mark.parametrize("family, rope", [("Llama", LINEAR_4), ("Qwen2", LINEAR_4),
                                          ("Llama", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})])
def test_qkv_fused_projection(device, qkv_op, family, rope):
    model = make_model(family, rope=rope, device=device, **({"attention_bias": True} if family == "Llama" else {}))
    check_against_oracle(model, torch.float32, random_tokens(device), qkv=True)
    assert qkv_op["count"] == model.config.num_hidden_layers


@pytest.mark.parametrize("rope, rotary", [(LINEAR_4, True),
                                           ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}, False)],
                         ids=["linear-rotary", "yarn-model_fallback"])
def test_fused_attention(device, attention_op, rope, rotary):
    model = make_model(rope=rope, device=device, attn_implementation="sdpa")
    # Training without a KV cache (transformers builds one whenever use_cache is on, even for a training step).
    model.config.use_cache = False
    check_against_oracle(model, torch.float32, random_tokens(device), attention=True, rotary=rotary)
    assert attention_op["count"] == model.config.num_hidden_layers
    # With a KV cache the fused op does not apply: the layers fall back and still decode the same tokens.
    attention_op["count"] = 0
    model.eval().generation_config.eos_token_id = None
    prompt = random_tokens(device, seq=14)
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
    patched = model.generate(prompt, **options)
    unpatch_model(model)
    assert torch.equal(patched, model.generate(prompt, **options))
    assert attention_op["count"] == 0


def test_qkv_under_autocast(device, qkv_op, monkeypatch):
    """Under autocast the fused projection gets the operands autocast gives nn.Linear (bf16), as unpatched."""
    model = make_model(device=device)
    input_ids = random_tokens(device)
    oracle_logits = exact_oracle(model)(input_ids).logits
    with torch.autocast(device.type, dtype=torch.bfloat16):
        eager_logits = model(input_ids).logits
        patch_model(model, qkv=True)
        seen = []
        op = pi_kernels.qkv_proj_rotary
        monkeypatch.setattr(pi_kernels, "qkv_proj_rotary",
                            lambda x, weight, *args, **kwargs: seen.append((x.dtype, weight.dtype)) or op(
                                x, weight, *args, **kwargs))
        logits = model(input_ids).logits
    assert seen == [(torch.bfloat16, torch.bfloat16)] * model.config.num_hidden_layers
    assert_within_eager(logits, eager_logits, oracle_logits, torch.bfloat16, "logits")


def test_qkv_refuses_per_head_norms(device, qkv_op):
    model = make_model("Qwen3", device=device)
    with pytest.raises(ValueError, match="per-head q/k norms"):
        patch_model(model, qkv=True)
    assert not is_patched(model)
