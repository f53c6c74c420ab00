"""Tests for pi_kernels.scaling: frequency tables, HF rope schemes and the PI context-extension helper (CPU only).

Expected values are computed independently, element by element with ``math``, or by hand from the formulas in
Hugging Face ``transformers`` (``modeling_rope_utils.py``) and the PI / YaRN papers.
"""

import copy
import math

import numpy as np
import pytest
import torch

from pi_kernels.scaling import (
    DEFAULT_ROPE_THETA,
    SUPPORTED_ROPE_TYPES,
    RopeFrequencies,
    extend_context,
    linear_inv_freq,
    rope_frequencies,
    rope_frequencies_from_config,
    rope_inv_freq,
    scaling_factor_for,
)


class FakeConfig:
    """Duck-typed stand-in for a transformers ``PretrainedConfig``: plain attributes, deep-copyable."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


class FakeV5Config(FakeConfig):
    """transformers 5 style: ``rope_scaling`` is an alias of ``rope_parameters``."""

    @property
    def rope_scaling(self):
        return self.rope_parameters

    @rope_scaling.setter
    def rope_scaling(self, value):
        self.rope_parameters = value


def expected_inv_freq(base, dim):
    return torch.tensor([math.pow(base, -(2 * j) / dim) for j in range(dim // 2)], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# rope_inv_freq / linear_inv_freq
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [10000.0, 500000.0, 1e6, 2])
@pytest.mark.parametrize("rotary_dim", [2, 6, 64, 128, 218])
def test_rope_inv_freq_matches_closed_form(base, rotary_dim):
    inv_freq = rope_inv_freq(base, rotary_dim)
    assert inv_freq.dtype == torch.float64 and inv_freq.shape == (rotary_dim // 2,)
    torch.testing.assert_close(inv_freq, expected_inv_freq(base, rotary_dim), rtol=1e-15, atol=0)
    assert inv_freq[0] == 1.0 and bool((inv_freq[1:] < inv_freq[:-1]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_inv_freq_casts_the_float64_table_once(dtype):
    inv_freq = rope_inv_freq(10000.0, 128, dtype=dtype, device="cpu")
    assert inv_freq.dtype == dtype and inv_freq.device.type == "cpu"
    assert torch.equal(inv_freq, expected_inv_freq(10000.0, 128).to(dtype))


def test_rope_inv_freq_accepts_integer_scalars():
    expected = expected_inv_freq(10000.0, 64)
    torch.testing.assert_close(rope_inv_freq(np.float32(10000.0), np.int64(64)), expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(rope_inv_freq(10000, torch.tensor(64)), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize(("base", "rotary_dim", "match"), [
    (1.0, 64, "base must be > 1"),
    (0.5, 64, "base must be > 1"),
    (-10000.0, 64, "base must be > 1"),
    (math.inf, 64, "base must be finite"),
    (math.nan, 64, "base must be finite"),
    ("10000", 64, "base must be a real number"),
    (True, 64, "base must be a real number"),
    (10000.0, 0, "rotary_dim must be a positive even integer"),
    (10000.0, -2, "rotary_dim must be a positive even integer"),
    (10000.0, 63, "rotary_dim must be a positive even integer"),
    (10000.0, 64.0, "rotary_dim must be an integer"),
    (10000.0, True, "rotary_dim must be an integer"),
])
def test_rope_inv_freq_refuses_bad_arguments(base, rotary_dim, match):
    with pytest.raises(ValueError, match=match):
        rope_inv_freq(base, rotary_dim)


@pytest.mark.parametrize("scaling_factor", [1.0, 2, 4.0, 3.7, 0.5])
def test_linear_inv_freq_is_position_interpolation(scaling_factor):
    inv_freq = rope_inv_freq(10000.0, 64)
    scaled = linear_inv_freq(inv_freq, scaling_factor)
    torch.testing.assert_close(scaled, inv_freq / scaling_factor, rtol=0, atol=0)
    # PI: the angle at position m equals the unscaled angle at the interpolated position m / s.
    positions = torch.arange(0, 20000, 37, dtype=torch.float64)
    torch.testing.assert_close(positions[:, None] * scaled, (positions / scaling_factor)[:, None] * inv_freq,
                               rtol=1e-14, atol=1e-12)


def test_linear_inv_freq_keeps_dtype():
    inv_freq = rope_inv_freq(10000.0, 32, dtype=torch.float32)
    assert linear_inv_freq(inv_freq, 2.0).dtype == torch.float32


@pytest.mark.parametrize(("scaling_factor", "error"), [
    (0.0, ValueError), (-2.0, ValueError), (math.nan, ValueError), (math.inf, ValueError), (None, TypeError),
])
def test_linear_inv_freq_refuses_bad_factor(scaling_factor, error):
    with pytest.raises(error, match="scaling_factor"):
        linear_inv_freq(rope_inv_freq(10000.0, 8), scaling_factor)


# ---------------------------------------------------------------------------------------------------------------------
# rope_frequencies: default, linear, llama3, yarn, longrope
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [None, {}, {"rope_type": "default"}, {"type": "default", "rope_theta": 1e4}])
def test_default_rope(params):
    freqs = rope_frequencies(params, 64)
    assert isinstance(freqs, RopeFrequencies) and freqs.attention_factor == 1.0
    assert torch.equal(freqs.inv_freq, rope_inv_freq(DEFAULT_ROPE_THETA, 64))


def test_rope_theta_precedence_and_partial_rotary_factor():
    # A theta inside the dict wins over the top-level one passed for legacy configs.
    inside = rope_frequencies({"rope_theta": 5e5}, 64, rope_theta=1e4)
    assert torch.equal(inside.inv_freq, rope_inv_freq(5e5, 64))
    legacy = rope_frequencies({"type": "linear", "factor": 2.0}, 64, rope_theta=5e5)
    assert torch.equal(legacy.inv_freq, rope_inv_freq(5e5, 64) / 2.0)
    partial = rope_frequencies({"rope_theta": 1e4, "partial_rotary_factor": 0.25}, 128)
    assert torch.equal(partial.inv_freq, rope_inv_freq(1e4, 32))


@pytest.mark.parametrize("key", ["rope_type", "type"])
@pytest.mark.parametrize("factor", [1.0, 2.0, 8])
def test_linear_rope(key, factor):
    freqs = rope_frequencies({key: "linear", "rope_theta": 10000.0, "factor": factor}, 128)
    assert freqs.attention_factor == 1.0
    torch.testing.assert_close(freqs.inv_freq, expected_inv_freq(10000.0, 128) / factor, rtol=1e-15, atol=0)


LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_llama3_matches_elementwise_formula():
    freqs = rope_frequencies(LLAMA31, 128)
    assert freqs.attention_factor == 1.0
    expected = []
    for j in range(64):
        inv = math.pow(500000.0, -(2 * j) / 128)
        wavelen = 2 * math.pi / inv
        if wavelen < 8192 / 4.0:
            expected.append(inv)
        elif wavelen > 8192 / 1.0:
            expected.append(inv / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * inv / 8.0 + smooth * inv)
    torch.testing.assert_close(freqs.inv_freq, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)


def test_llama3_regions():
    base = rope_inv_freq(500000.0, 128)
    ratio = rope_frequencies(LLAMA31, 128).inv_freq / base
    # By hand: wavelength 2*pi*5e5**(j/64) < 2048 for j <= 28, > 8192 for j >= 35.
    torch.testing.assert_close(ratio[:29], torch.ones(29, dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(ratio[35:], torch.full((29,), 1 / 8, dtype=torch.float64), rtol=1e-14, atol=0)
    blend = ratio[29:35]
    # The blend goes smoothly from "kept" towards "divided by factor" as the wavelength grows.
    assert bool((blend < 1).all() and (blend > 1 / 8).all() and (blend[1:] < blend[:-1]).all())


def test_llama3_falls_back_to_max_position_embeddings():
    params = {key: value for key, value in LLAMA31.items() if key != "original_max_position_embeddings"}
    freqs = rope_frequencies(params, 128, max_position_embeddings=8192)
    assert torch.equal(freqs.inv_freq, rope_frequencies(LLAMA31, 128).inv_freq)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096}


def test_yarn_ramp_and_attention_factor():
    freqs = rope_frequencies(YARN, 64)
    inv = expected_inv_freq(10000.0, 64)
    # Correction range by hand: 64 ln(4096 / (2 pi r)) / (2 ln 1e4) = 10.47 for r = 32, 22.51 for r = 1 -> [10, 23].
    torch.testing.assert_close(freqs.inv_freq[:11], inv[:11], rtol=1e-15, atol=0)
    torch.testing.assert_close(freqs.inv_freq[23:], inv[23:] / 4.0, rtol=1e-15, atol=0)
    for j in (11, 16, 22):
        ramp = (j - 10) / (23 - 10)
        assert math.isclose(freqs.inv_freq[j].item(), inv[j].item() * (1 - ramp) + inv[j].item() / 4.0 * ramp,
                            rel_tol=1e-14)
    assert math.isclose(freqs.inv_freq[16].item(), 1e-2 * (7 / 13 + 6 / 13 / 4), rel_tol=1e-14)
    assert math.isclose(freqs.attention_factor, 0.1 * math.log(4.0) + 1.0, rel_tol=1e-15)


def test_yarn_without_truncation_uses_the_exact_correction_range():
    freqs = rope_frequencies({**YARN, "truncate": False, "beta_fast": 32.0, "beta_slow": 1.0}, 64)
    low = 64 * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(10000.0))
    high = 64 * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(10000.0))
    inv = expected_inv_freq(10000.0, 64)
    for j in range(32):
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        assert math.isclose(freqs.inv_freq[j].item(), inv[j].item() * (1 - ramp + ramp / 4.0), rel_tol=1e-14)


def test_yarn_betas_move_the_ramp():
    freqs = rope_frequencies({**YARN, "beta_fast": 8, "beta_slow": 2}, 64)
    # floor(64 ln(4096 / (16 pi)) / (2 ln 1e4)) = 15 and ceil(64 ln(4096 / (4 pi)) / (2 ln 1e4)) = 21.
    inv = expected_inv_freq(10000.0, 64)
    torch.testing.assert_close(freqs.inv_freq[:16], inv[:16], rtol=1e-15, atol=0)
    torch.testing.assert_close(freqs.inv_freq[21:], inv[21:] / 4.0, rtol=1e-15, atol=0)
    assert math.isclose(freqs.inv_freq[18].item(), inv[18].item() * (1 - 3 / 6 + 3 / 6 / 4.0), rel_tol=1e-14)


@pytest.mark.parametrize(("extra", "expected"), [
    ({"factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0},
     (0.0707 * math.log(40.0) + 1.0) / (0.1 * math.log(40.0) + 1.0)),
    ({"factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0}, 1.0),
    ({"factor": 40.0, "mscale": 1.0}, 0.1 * math.log(40.0) + 1.0),
    ({"attention_factor": 0.8}, 0.8),
    ({"factor": 1.0}, 1.0),
])
def test_yarn_attention_factor_variants(extra, expected):
    assert math.isclose(rope_frequencies({**YARN, **extra}, 64).attention_factor, expected, rel_tol=1e-14)


def test_yarn_factor_from_lengths():
    implied = rope_frequencies({**YARN, "factor": None}, 64, max_position_embeddings=4096 * 40)
    explicit = rope_frequencies({**YARN, "factor": 40.0}, 64)
    assert torch.equal(implied.inv_freq, explicit.inv_freq)
    assert math.isclose(implied.attention_factor, 0.1 * math.log(40.0) + 1.0, rel_tol=1e-15)


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 2.0, 3.0, 4.0],
            "long_factor": [5.0, 6.0, 7.0, 8.0], "original_max_position_embeddings": 4096}


@pytest.mark.parametrize(("seq_len", "factors"), [(None, [1.0, 2.0, 3.0, 4.0]), (4096, [1.0, 2.0, 3.0, 4.0]),
                                                  (4097, [5.0, 6.0, 7.0, 8.0])])
def test_longrope(seq_len, factors):
    freqs = rope_frequencies(LONGROPE, 8, max_position_embeddings=16384, seq_len=seq_len)
    expected = expected_inv_freq(10000.0, 8) / torch.tensor(factors, dtype=torch.float64)
    torch.testing.assert_close(freqs.inv_freq, expected, rtol=1e-15, atol=0)
    # factor = 16384 / 4096 = 4: sqrt(1 + ln 4 / ln 4096) = sqrt(1 + 2 / 12).
    assert math.isclose(freqs.attention_factor, math.sqrt(7 / 6), rel_tol=1e-14)


def test_longrope_explicit_factor_and_attention_factor():
    assert math.isclose(rope_frequencies({**LONGROPE, "factor": 8.0}, 8).attention_factor,
                        math.sqrt(1 + 3 / 12), rel_tol=1e-14)
    assert rope_frequencies({**LONGROPE, "attention_factor": 1.25}, 8, max_position_embeddings=16384) \
        .attention_factor == 1.25


def test_rope_frequencies_device_and_dtype():
    freqs = rope_frequencies(YARN, 64, device="cpu")
    assert freqs.inv_freq.dtype == torch.float64 and freqs.inv_freq.device.type == "cpu"


@pytest.mark.parametrize(("params", "kwargs", "error", "match"), [
    ({"rope_type": "dynamic", "factor": 2.0}, {}, ValueError, "sequence length at run time"),
    ({"type": "dynamic", "factor": 2.0}, {}, ValueError, "dynamic"),
    ({"rope_type": "su", "factor": 2.0}, {}, ValueError, "supported: " + ", ".join(SUPPORTED_ROPE_TYPES)),
    ({"rope_type": 3}, {}, TypeError, "rope_type must be a string"),
    ({"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}, {}, ValueError,
     "per-layer-type"),
    ("linear", {}, TypeError, "rope_parameters must be a dict"),
    ({"rope_type": "linear"}, {}, ValueError, "needs 'factor'"),
    ({"rope_type": "linear", "factor": 0.0}, {}, ValueError, "scaling_factor must be > 0"),
    ({**LLAMA31, "low_freq_factor": 4.0}, {}, ValueError, "high_freq_factor > low_freq_factor"),
    ({**LLAMA31, "high_freq_factor": None}, {}, ValueError, "needs 'high_freq_factor'"),
    ({"rope_type": "yarn", "factor": 4.0}, {}, ValueError, "original_max_position_embeddings"),
    ({**YARN, "factor": None}, {}, ValueError, "needs factor or max_position_embeddings"),
    ({**LONGROPE, "long_factor": [1.0, 2.0]}, {"max_position_embeddings": 16384}, ValueError, "long_factor must hold"),
    ({**LONGROPE, "short_factor": [1.0, 0.0, 1.0, 1.0]}, {"max_position_embeddings": 16384}, ValueError,
     "short_factor must hold"),
    ({"rope_theta": 1.0}, {}, ValueError, "base must be > 1"),
])
def test_rope_frequencies_refusals(params, kwargs, error, match):
    with pytest.raises(error, match=match):
        rope_frequencies(params, 8, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# rope_frequencies_from_config
# ---------------------------------------------------------------------------------------------------------------------


def test_from_config_object_and_dict_agree_with_rope_frequencies():
    attributes = {"max_position_embeddings": 131072, "hidden_size": 4096, "num_attention_heads": 32,
                  "rope_theta": 500000.0, "rope_scaling": {k: v for k, v in LLAMA31.items() if k != "rope_theta"}}
    expected = rope_frequencies(LLAMA31, 128).inv_freq
    assert torch.equal(rope_frequencies_from_config(FakeConfig(**attributes)).inv_freq, expected)
    assert torch.equal(rope_frequencies_from_config(attributes).inv_freq, expected)
    v5 = FakeV5Config(max_position_embeddings=131072, head_dim=128, rope_parameters=dict(LLAMA31))
    assert torch.equal(rope_frequencies_from_config(v5).inv_freq, expected)


def test_from_config_top_level_overrides():
    # Phi-3 keeps its pre-training length at the top level; it overrides the rope dict, as in transformers.
    config = {"max_position_embeddings": 16384, "original_max_position_embeddings": 4096, "head_dim": 8,
              "rope_scaling": {**LONGROPE, "original_max_position_embeddings": 1024}}
    assert math.isclose(rope_frequencies_from_config(config).attention_factor, math.sqrt(7 / 6), rel_tol=1e-14)
    partial = {"head_dim": 128, "partial_rotary_factor": 0.5, "rope_parameters": {"rope_theta": 1e4}}
    assert torch.equal(rope_frequencies_from_config(partial).inv_freq, rope_inv_freq(1e4, 64))


def test_from_config_needs_a_head_dim():
    with pytest.raises(ValueError, match="head_dim, or hidden_size and num_attention_heads"):
        rope_frequencies_from_config({"rope_theta": 1e4, "hidden_size": 4096})


# ---------------------------------------------------------------------------------------------------------------------
# extend_context / scaling_factor_for
# ---------------------------------------------------------------------------------------------------------------------


LEGACY = {"max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None, "hidden_size": 4096,
          "num_attention_heads": 32, "text_config": {"nested": [1, 2]}}
V5 = {"max_position_embeddings": 4096, "hidden_size": 4096, "num_attention_heads": 32,
      "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}


@pytest.mark.parametrize("new_length", [4096, 8192, 16384, 10000])
def test_extend_context_legacy_dict(new_length):
    before = copy.deepcopy(LEGACY)
    out = extend_context(LEGACY, new_length)
    assert LEGACY == before
    assert out is not LEGACY and out["text_config"] is not LEGACY["text_config"]
    assert out["max_position_embeddings"] == new_length and out["rope_theta"] == 10000.0
    assert out["rope_scaling"] == {"rope_type": "linear", "type": "linear", "factor": new_length / 4096,
                                   "original_max_position_embeddings": 4096}
    assert "rope_parameters" not in out
    assert scaling_factor_for(out) == new_length / 4096


def test_extend_context_legacy_without_rope_scaling_key():
    out = extend_context({"max_position_embeddings": 2048, "rope_theta": 1e4}, 8192)
    assert out["rope_scaling"]["type"] == "linear" and out["rope_scaling"]["factor"] == 4.0


def test_extend_context_v5_dict():
    before = copy.deepcopy(V5)
    out = extend_context(V5, 32768)
    assert V5 == before
    assert out["max_position_embeddings"] == 32768
    assert out["rope_parameters"] == {"rope_type": "linear", "rope_theta": 500000.0, "factor": 8.0,
                                      "original_max_position_embeddings": 4096}
    assert "rope_scaling" not in out


def test_extend_context_v5_keeps_partial_rotary_factor_and_top_level_theta():
    config = {"max_position_embeddings": 4096, "rope_theta": 1e6,
              "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}
    entry = extend_context(config, 8192)["rope_parameters"]
    assert entry["partial_rotary_factor"] == 0.5 and entry["rope_theta"] == 1e6 and entry["factor"] == 2.0


@pytest.mark.parametrize("config", [{"max_position_embeddings": 4096}, {"max_position_embeddings": 4096,
                                                                         "rope_parameters": None}])
def test_extend_context_without_rope_fields_uses_v5_style(config):
    out = extend_context(config, 8192)
    assert out["rope_parameters"] == {"rope_type": "linear", "rope_theta": DEFAULT_ROPE_THETA, "factor": 2.0,
                                      "original_max_position_embeddings": 4096}


def test_extend_context_v5_object():
    config = FakeV5Config(max_position_embeddings=4096, head_dim=128,
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    out = extend_context(config, 16384)
    assert type(out) is FakeV5Config and out is not config
    assert config.max_position_embeddings == 4096
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert out.max_position_embeddings == 16384
    assert out.rope_parameters == {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 4096}
    assert out.rope_scaling == out.rope_parameters


def test_extend_context_legacy_object():
    config = FakeConfig(max_position_embeddings=2048, rope_theta=10000.0, rope_scaling=None, hidden_size=4096,
                        num_attention_heads=32)
    out = extend_context(config, 8192)
    assert type(out) is FakeConfig and config.rope_scaling is None and config.max_position_embeddings == 2048
    assert out.max_position_embeddings == 8192 and out.rope_theta == 10000.0
    assert out.rope_scaling == {"rope_type": "linear", "type": "linear", "factor": 4.0,
                                "original_max_position_embeddings": 2048}
    assert not hasattr(out, "rope_parameters")


def test_extend_context_mirrored_rope_scaling_key_follows():
    entry = {"rope_type": "default", "rope_theta": 1e4}
    out = extend_context({"max_position_embeddings": 4096, "rope_parameters": entry, "rope_scaling": dict(entry)}, 8192)
    assert out["rope_scaling"] == out["rope_parameters"] and out["rope_parameters"]["factor"] == 2.0


@pytest.mark.parametrize("make", [dict, lambda **kw: FakeConfig(**kw)])
def test_extend_context_re_extends_from_the_original_length(make):
    once = extend_context(make(max_position_embeddings=4096, rope_theta=1e4, rope_scaling=None), 8192)
    twice = extend_context(once, 32768)
    entry = twice["rope_scaling"] if isinstance(twice, dict) else twice.rope_scaling
    assert entry["factor"] == 8.0 and entry["original_max_position_embeddings"] == 4096
    # Shorter than the current extended length but not than the trained one: still a valid PI extension.
    shorter = extend_context(once, 6144)
    entry = shorter["rope_scaling"] if isinstance(shorter, dict) else shorter.rope_scaling
    assert entry["factor"] == 1.5 and scaling_factor_for(shorter) == 1.5


@pytest.mark.parametrize("new_length", [np.int64(8192), np.int32(8192), torch.tensor(8192)])
def test_extend_context_accepts_integer_scalars(new_length):
    out = extend_context(V5, new_length)
    assert type(out["max_position_embeddings"]) is int and out["max_position_embeddings"] == 8192
    assert out["rope_parameters"]["factor"] == 2.0


def test_extended_config_gives_pi_frequencies():
    out = extend_context(V5, 16384)
    freqs = rope_frequencies_from_config(out)
    torch.testing.assert_close(freqs.inv_freq, expected_inv_freq(500000.0, 128) / 4.0, rtol=1e-15, atol=0)
    # The PI promise: positions m < L' map to m * L / L' < L, inside the range of angles the model was trained on.
    assert bool(((16384 - 1) * freqs.inv_freq < 4096 * rope_inv_freq(500000.0, 128)).all())


@pytest.mark.parametrize("new_length", [True, 8192.0, 8192.5, "8192", None, np.float64(8192), torch.tensor(8192.0),
                                        torch.tensor(True)])
def test_extend_context_refuses_non_integer_length(new_length):
    with pytest.raises(TypeError, match="new_max_position_embeddings must be an integer"):
        extend_context(V5, new_length)


@pytest.mark.parametrize("new_length", [0, -4096])
def test_extend_context_refuses_non_positive_length(new_length):
    with pytest.raises(ValueError, match="new_max_position_embeddings must be a positive integer"):
        extend_context(V5, new_length)


@pytest.mark.parametrize(("config", "new_length", "error", "match"), [
    (V5, 2048, ValueError, r"shorter than the trained context length \(4096\)"),
    (extend_context(LEGACY, 16384), 2048, ValueError, r"shorter than the trained context length \(4096\)"),
    ({"rope_theta": 1e4, "rope_scaling": None}, 8192, ValueError, "no max_position_embeddings"),
    (FakeConfig(rope_theta=1e4, rope_scaling=None), 8192, ValueError, "no max_position_embeddings"),
    ({"max_position_embeddings": 8192, "rope_scaling": {"type": "linear", "factor": 2.0}}, 16384, ValueError,
     "already linearly scaled .* no original_max_position_embeddings"),
    ({"max_position_embeddings": 8192, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, 16384, ValueError,
     "already linearly scaled"),
    ({"max_position_embeddings": 8192, "rope_parameters": {"full_attention": {"rope_type": "default"},
                                                           "sliding_attention": {"rope_type": "default"}}},
     16384, ValueError, "per-layer-type"),
    ({"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default"},
      "rope_scaling": {"type": "linear", "factor": 2.0}}, 8192, ValueError, "different rope_scaling"),
    ({"max_position_embeddings": 4096, "rope_scaling": "linear"}, 8192, TypeError, "rope_scaling must be a dict"),
    ({"max_position_embeddings": 4096.0, "rope_theta": 1e4}, 8192, TypeError, "max_position_embeddings must be"),
])
def test_extend_context_refusals(config, new_length, error, match):
    with pytest.raises(error, match=match):
        extend_context(config, new_length)


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("entry", [
    YARN, LLAMA31, LONGROPE, {"rope_type": "dynamic", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
    {"rope_type": "proportional"},
])
def test_extend_context_refuses_other_rope_types(style, entry):
    rope_type = entry.get("rope_type", entry.get("type"))
    for config in ({"max_position_embeddings": 4096, style: dict(entry)},
                   FakeConfig(max_position_embeddings=4096, **{style: dict(entry)})):
        with pytest.raises(ValueError, match=f"already scaled with rope type '{rope_type}'"):
            extend_context(config, 8192)


def test_scaling_factor_for():
    assert scaling_factor_for(V5) == 1.0 and scaling_factor_for(LEGACY) == 1.0
    assert scaling_factor_for({"max_position_embeddings": 4096}) == 1.0
    assert scaling_factor_for(FakeConfig(rope_scaling={"type": "linear", "factor": 4})) == 4.0
    with pytest.raises(ValueError, match="rope type 'yarn', not linear"):
        scaling_factor_for({"rope_parameters": YARN})
