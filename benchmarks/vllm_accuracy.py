"""Accuracy of vLLM's Position Interpolation rotary against the pi_kernels vLLM plugin, by position, on CPU tensors.

vLLM's ``LinearScalingRotaryEmbedding`` rotates with a float32 ``(max_position · factor, rotary_dim)`` cos/sin cache;
the plugin (:mod:`pi_kernels.integrations.vllm`) computes the angles in the kernel from float64 turns. Both layers
are built by vLLM's ``get_rope`` (the plugin's through its registration) and compared with the float64 reference
(``pi_kernels.reference``) on N(0, 1) queries at positions just below each checked position: the relative error
‖out − ref‖ / ‖ref‖ and the largest absolute error of each, in float32 and bfloat16. Accuracy, not speed: no GPU
is needed.

Usage (in an environment with vLLM, ``make check-vllm`` builds one)::

    python -m benchmarks.vllm_accuracy --out benchmarks/results/cpu/vllm_accuracy.md
"""

import argparse
import os

import torch
from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
from vllm.model_executor.layers import rotary_embedding

from pi_kernels.integrations import vllm as plugin
from pi_kernels.reference import rotary_embedding_reference

HEAD_SIZE = 64
FACTOR = 16.0
LAST_POSITIONS = (2**12, 2**16, 2**18, 2**20)


def errors(out, ref):
    """(‖out − ref‖ / ‖ref‖, max |out − ref|)."""
    difference = out.double() - ref
    return float(difference.norm() / ref.norm()), float(difference.abs().max())


def position_errors(layer, dtype, below, *, tokens=64, seed=1):
    """(plugin, vLLM) :func:`errors` against float64 for ``tokens`` positions in [below − 4096, below).

    ``layer`` is a plugin layer built for the PI factor :data:`FACTOR` whose vLLM cache reaches ``below``.
    """
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(max(0, below - 4096), below, (tokens,), generator=generator)
    query = torch.randn(tokens, 4 * HEAD_SIZE, generator=generator).to(dtype)
    ref, _ = rotary_embedding_reference(positions, query.double(), None, HEAD_SIZE, scaling_factor=FACTOR)
    theirs, _ = rotary_embedding.LinearScalingRotaryEmbedding.forward_native(layer, positions, query.clone(), None)
    ours, _ = layer(positions, query.clone(), None)
    return errors(ours, ref), errors(theirs, ref)


def pi_layer(dtype, max_position):
    """The plugin's layer for linear scaling by :data:`FACTOR` (the plugin must be registered)."""
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": FACTOR}
    layer = rotary_embedding.get_rope(HEAD_SIZE, max_position, True, rope, dtype)
    if not getattr(layer, "pi_kernels_active", False):
        raise RuntimeError("get_rope did not build the pi_kernels layer: register the plugin first")
    return layer


def table():
    import vllm

    rows = []
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        for dtype in (torch.float32, torch.bfloat16):
            layer = pi_layer(dtype, int(LAST_POSITIONS[-1] / FACTOR))
            for below in LAST_POSITIONS:
                ours, theirs = position_errors(layer, dtype, below)
                rows.append(f"| {str(dtype).removeprefix('torch.')} | 2^{below.bit_length() - 1} | {theirs[0]:.2e} | "
                            f"{ours[0]:.2e} | {theirs[0] / ours[0]:.0f}× | {theirs[1]:.1e} | {ours[1]:.1e} |")
    header = [f"# vLLM {vllm.__version__} PI rotary vs the pi_kernels plugin, torch {torch.__version__}, CPU",
              "",
              f"Relative error against float64 of N(0, 1) queries (64 tokens, head_size {HEAD_SIZE}, PI factor "
              f"{FACTOR:g}) at positions in [p − 4096, p): ‖out − ref‖ / ‖ref‖, and the largest absolute error. "
              "Written by `python -m benchmarks.vllm_accuracy`.",
              "",
              "| dtype | p | vLLM (float32 cos/sin cache) | pi_kernels plugin | vLLM / plugin | vLLM max abs | "
              "plugin max abs |",
              "|---|---|---|---|---|---|---|"]
    return "\n".join(header + rows) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown table here (also printed)")
    args = parser.parse_args()
    os.environ[plugin.ENABLE_VARIABLE] = "1"
    plugin.register()
    text = table()
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(text)


if __name__ == "__main__":
    main()
