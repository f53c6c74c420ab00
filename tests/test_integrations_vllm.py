"""The vLLM plugin (pi_kernels.integrations.vllm) against vLLM's own rotary classes, on CPU tensors.

Needs vLLM, which brings its own torch: ``make check-vllm`` builds that environment once and runs this file; the main
suite skips it. vLLM's layers are built with ``get_rope`` under a CPU ``VllmConfig``, as vLLM builds them; each test
gets a fresh out-of-tree registry and rope cache, so registration never leaks between tests.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (make check-vllm runs this file in its own "
                                          "environment)")

from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor import custom_op  # noqa: E402
from vllm.model_executor.layers import rotary_embedding  # noqa: E402

from benchmarks.vllm_accuracy import pi_layer, position_errors  # noqa: E402
from pi_kernels.integrations import vllm as plugin  # noqa: E402
from pi_kernels.reference import rotary_embedding_reference  # noqa: E402
from pi_kernels.scaling import rope_frequencies  # noqa: E402

from .tolerances import TOLERANCE, rel_error  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_SIZE = 64
MAX_POSITION = 4096
# Rope dicts as models declare them, for each replaced class, and one vLLM keeps (dynamic NTK).
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
}
VLLM_CLASSES = {"default": "RotaryEmbedding", "linear": "LinearScalingRotaryEmbedding",
                "llama3": "Llama3RotaryEmbedding", "yarn": "YaRNScalingRotaryEmbedding"}


@pytest.fixture
def fresh_vllm(monkeypatch):
    """An empty out-of-tree registry and rope cache, the plugin variable unset, and a CPU vLLM config."""
    monkeypatch.setattr(custom_op, "op_registry_oot", {})
    monkeypatch.setattr(rotary_embedding, "_ROPE_DICT", {})
    monkeypatch.delenv(plugin.ENABLE_VARIABLE, raising=False)
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        yield


@pytest.fixture
def enabled(fresh_vllm, monkeypatch):
    monkeypatch.setenv(plugin.ENABLE_VARIABLE, "1")
    plugin.register()


def get_rope(rope, dtype=torch.float32, *, is_neox=True, partial=None, max_position=MAX_POSITION):
    params = dict(ROPES[rope] if isinstance(rope, str) else rope)
    if partial is not None:
        params["partial_rotary_factor"] = partial
    return rotary_embedding.get_rope(HEAD_SIZE, max_position, is_neox, params, dtype)


def reference(rope, positions, query, key, *, is_neox=True, partial=None):
    """Float64 vLLM-convention rotation at the rope dict's frequencies, YaRN's attention factor on rotated features."""
    params = dict(ROPES[rope])
    rotary_dim = HEAD_SIZE if partial is None else int(HEAD_SIZE * partial)
    freqs = rope_frequencies(params, rotary_dim)
    outputs = rotary_embedding_reference(positions, query.double(), None if key is None else key.double(), HEAD_SIZE,
                                         is_neox=is_neox, rotary_dim=rotary_dim, inv_freq=freqs.inv_freq)
    scaled = []
    for x in outputs:
        if x is not None:
            x = x.clone()
            x.view(x.shape[0], -1, HEAD_SIZE)[..., :rotary_dim] *= freqs.attention_factor
        scaled.append(x)
    return scaled


def test_off_without_the_variable(fresh_vllm):
    """Installed but not enabled: register() changes nothing, vLLM builds its own classes."""
    plugin.register()
    assert custom_op.op_registry_oot == {}
    for rope, name in VLLM_CLASSES.items():
        assert type(get_rope(rope)) is getattr(rotary_embedding, name)


def test_get_rope_builds_the_plugin_classes(enabled):
    for rope, name in VLLM_CLASSES.items():
        layer = get_rope(rope)
        assert type(layer) is plugin.replacement_for(getattr(rotary_embedding, name)), rope
        assert isinstance(layer, getattr(rotary_embedding, name)) and layer.pi_kernels_active
    dynamic = get_rope({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert type(dynamic) is rotary_embedding.DynamicNTKScalingRotaryEmbedding, "other rope types stay vLLM's"
    plugin.register()  # vLLM may load plugins more than once
    assert len(custom_op.op_registry_oot) == len(plugin.REPLACED_CLASSES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("is_neox,partial,with_key", [(True, None, True), (False, None, True), (True, 0.5, True),
                                                       (True, None, False)])
def test_parity_with_vllm_at_short_positions(enabled, dtype, rope, is_neox, partial, with_key):
    """Within the dtype's rounding of vLLM's forward_native, and within the dtype's tolerance of float64."""
    layer = get_rope(rope, dtype, is_neox=is_neox, partial=partial)
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 1024, (37,), generator=generator)
    query = torch.randn(37, 4 * HEAD_SIZE, generator=generator).to(dtype)
    key = torch.randn(37, 2 * HEAD_SIZE, generator=generator).to(dtype) if with_key else None
    vllm_class = getattr(rotary_embedding, VLLM_CLASSES[rope])
    vllm_query, vllm_key = vllm_class.forward_native(layer, positions, query.clone(),
                                                     None if key is None else key.clone())
    out_query, out_key = layer(positions, query.clone(), None if key is None else key.clone())
    ref_query, ref_key = reference(rope, positions, query, key, is_neox=is_neox, partial=partial)
    assert out_key is None if key is None else out_key is not None
    for name, out, theirs, ref in (("query", out_query, vllm_query, ref_query), ("key", out_key, vllm_key, ref_key)):
        if ref is None:
            continue
        assert rel_error(out, ref) <= TOLERANCE[dtype], f"{name}: plugin vs float64"
        assert rel_error(out, theirs) <= 2 * rel_error(theirs, ref) + TOLERANCE[dtype], f"{name}: plugin vs vLLM"


def test_shapes_vllm_passes(enabled):
    """(tokens, heads, head_size) and (batch, seq, heads · head_size) with (batch, seq) positions, in place."""
    layer = get_rope("linear")
    positions = torch.randint(0, 4096, (2, 5))
    query = torch.randn(2, 5, 4 * HEAD_SIZE)
    flat_query, flat_key = layer(positions.flatten(), query.reshape(10, 4 * HEAD_SIZE).clone(), None)
    in_place = query.clone()
    out, _ = layer(positions, in_place, None)
    assert out is in_place and torch.equal(out.reshape(10, -1), flat_query)
    split = query.reshape(10, 4, HEAD_SIZE).clone()
    layer(positions.flatten(), split, None)
    assert torch.equal(split.reshape(10, -1), flat_query)


def test_compiled_as_vllm_compiles_models(enabled):
    """torch.compile(fullgraph=True, dynamic=True) of the layer's forward, as vLLM compiles a model: the same result
    as eager for every token count."""
    layer = get_rope("yarn")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    generator = torch.Generator().manual_seed(2)
    for tokens in (5, 17, 3):
        positions = torch.randint(0, 4096, (tokens,), generator=generator)
        query, key = torch.randn(tokens, 4 * HEAD_SIZE, generator=generator), torch.randn(tokens, HEAD_SIZE)
        with torch.no_grad():
            eager = layer(positions, query.clone(), key.clone())
            out = compiled(positions, query.clone(), key.clone())
        for name, a, b in zip(("query", "key"), out, eager, strict=True):
            assert rel_error(a, b) <= TOLERANCE[torch.float32], f"{name}, {tokens} tokens"


def test_several_linear_factors_stay_vllm(enabled):
    """A linear layer holding several factors (multi-LoRA offsets into one cache) is computed by vLLM."""
    layer = rotary_embedding.LinearScalingRotaryEmbedding(HEAD_SIZE, HEAD_SIZE, 256, 10000.0, True, [1.0, 4.0],
                                                          torch.float32)
    assert not layer.pi_kernels_active
    positions, query = torch.randint(0, 1024, (9,)), torch.randn(9, HEAD_SIZE)
    ours, _ = layer.forward_native(positions, query.clone(), None)
    theirs, _ = rotary_embedding.RotaryEmbedding.forward_native(layer, positions, query.clone(), None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accuracy_at_long_positions(enabled, dtype):
    """Near 2**20 with factor 16, vLLM's float32 cache is measurably worse than the dtype; the plugin is not."""
    (ours, _), (theirs, _) = position_errors(pi_layer(dtype, 2**16), dtype, 2**20)  # vLLM's cache: 2**16 · 16
    assert ours <= TOLERANCE[dtype], f"plugin error {ours:.2e}"
    if dtype == torch.float32:
        assert theirs > 100 * ours, f"vLLM {theirs:.2e} vs plugin {ours:.2e}"


def test_readme_snippet(tmp_path):
    """The README's vLLM block runs as written and prints its line: a fresh interpreter of this environment, in a
    scratch directory (so vLLM's own plugin loader finds the entry point of the installed pi_kernels)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    match = re.search(r"<!-- readme-test: skip: needs vLLM[^>]*-->\s*\n```python\n(?P<code>.*?)```\n\s*[^\n]*prints:"
                      r"\n+```text\n(?P<output>.*?)```", text, re.DOTALL)
    assert match, "README.md has no vLLM block followed by what it prints"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", plugin.ENABLE_VARIABLE)}
    done = subprocess.run([sys.executable, "-c", match.group("code")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == match.group("output").strip()
