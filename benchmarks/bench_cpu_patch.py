"""Training step time of a small CPU Llama patched with pi_kernels, against the same model unpatched.

On CPU tensors ``backend="auto"`` runs pi_kernels' plain-PyTorch implementations (``backend="torch"``), so a patched
model trains at PyTorch speed. This script measures that: two copies of one random-weight ``LlamaForCausalLM``
(PI, linear rope scaling 4), one patched with :func:`pi_kernels.integrations.transformers.patch_model`, take
alternating AdamW steps on the same batch; the per-step wall time of each is reported (median, p20, p80) with the
patched / unpatched ratio, after checking that both give the same first loss.

Usage::

    python -m benchmarks.bench_cpu_patch                          # 4096 tokens a step, 1 thread, 8 timed steps
    python -m benchmarks.bench_cpu_patch --tokens 8192 --threads 2 --steps 12
    python -m benchmarks.bench_cpu_patch --attention                # patch_model(model, attention=True)

Run it without ``TRITON_INTERPRET`` set (with it, "auto" picks Triton's interpreter on CPU; the script refuses).
"""

import argparse
import copy
import statistics
import time

import torch
import transformers

from pi_kernels import _backend
from pi_kernels.integrations.transformers import patch_model
from pi_kernels.ops import rotary

# ~0.43M parameters: 2 layers, hidden 128, 4 query / 2 KV heads of 32, as small as a CPU CI model.
CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=8192,
              rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})


def make_models(seed, attention):
    """(unpatched, patched) copies of one random-weight model, each with its own AdamW."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, attn_implementation="sdpa"))
    patched = patch_model(copy.deepcopy(model), attention=attention)
    return [(m, torch.optim.AdamW(m.parameters(), lr=1e-4)) for m in (model, patched)]


def train_step(model, optimizer, input_ids):
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def quantiles(times):
    ordered = sorted(times)

    def at(q):
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return statistics.median(ordered), at(0.2), at(0.8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch 1)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both models")
    parser.add_argument("--attention", action="store_true",
                        help="patch with attention=True (RoPE fused into attention_rotary) instead of rotary only")
    args = parser.parse_args(argv)
    backend = _backend.resolve_backend("auto", torch.device("cpu"), rotary.LAUNCHERS)
    if backend != "torch":
        raise SystemExit(f"backend='auto' resolves to {backend!r} on CPU here (TRITON_INTERPRET is set?); unset "
                         f"TRITON_INTERPRET to time the torch backend")
    torch.set_num_threads(args.threads)
    (model, model_opt), (patched, patched_opt) = make_models(seed=0, attention=args.attention)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (1, args.tokens))
    first = train_step(model, model_opt, input_ids), train_step(patched, patched_opt, input_ids)
    if abs(first[0] - first[1]) > 1e-4 * abs(first[0]):
        raise SystemExit(f"patched and unpatched losses differ: {first}")
    train_step(model, model_opt, input_ids)
    train_step(patched, patched_opt, input_ids)
    times = {"unpatched": [], "patched": []}
    # Alternating steps, so that load from other processes on a shared machine hits both alike.
    for _ in range(args.steps):
        for name, (m, opt) in (("unpatched", (model, model_opt)), ("patched", (patched, patched_opt))):
            start = time.perf_counter()
            train_step(m, opt, input_ids)
            times[name].append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM, {params / 1e6:.2f}M parameters, {args.tokens} tokens a step, {args.threads} thread(s), "
          f"torch {torch.__version__}, transformers {transformers.__version__}; patched = "
          f"patch_model(attention={args.attention}), pi_kernels backend {backend!r}; first loss {first[0]:.5f} both")
    print(f"{'model':<10} {'median s':>9} {'p20 s':>8} {'p80 s':>8}")
    medians = {}
    for name, values in times.items():
        median, p20, p80 = quantiles(values)
        medians[name] = median
        print(f"{name:<10} {median:9.3f} {p20:8.3f} {p80:8.3f}")
    print(f"patched / unpatched step time: {medians['patched'] / medians['unpatched']:.3f}")


if __name__ == "__main__":
    main()
