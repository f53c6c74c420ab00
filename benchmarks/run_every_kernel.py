"""Run every kernel of pi_kernels once, forward and backward, on odd shapes: the workload of the sanitizer stage.

``gpu_check`` runs it under ``compute-sanitizer`` (memcheck, racecheck, initcheck) with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, so every tensor is its own allocation and an access one element past its end
is caught instead of landing in the caching allocator's slack. Each call's outputs must be finite; any exception
fails the run. Shapes are odd on purpose: 217 tokens, head_dim 80 with a partial rotary_dim of 48, one KV head,
packed sequences of unequal lengths, a paged cache with scattered blocks. Both backends run where the CUDA
extension is built.

    python -m benchmarks.run_every_kernel            # GPU (or the interpreter on CPU, slowly)
    python -m benchmarks.run_every_kernel --tiny     # a few tokens: the interpreter check of gpu_check --dry-run
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

try:
    from benchmarks import harness, timing
except ImportError:  # run as a script: this folder, not the repository root, is on sys.path
    import harness
    import timing

SCALING = {"scaling_factor": 4.0, "base": 10000.0}


def _finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and not torch.isfinite(t.float()).all():
            raise AssertionError(f"non-finite values in an output of shape {tuple(t.shape)}")


def _backward(outputs, inputs) -> None:
    """Backward with random upstream gradients; the input gradients must be finite."""
    outputs = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(outputs, [torch.randn_like(o) for o in outputs])
    _finite(*(x.grad for x in inputs))


def calls(seq: int, device: torch.device, backends: list[str]) -> dict[str, Callable[[], None]]:
    """Every kernel, by name, as a zero-argument call on fresh random inputs of ``seq`` tokens."""
    import pi_kernels
    from pi_kernels import inference

    bf16, heads, kv_heads, head_dim, rotary_dim = torch.bfloat16, 3, 1, 80, 48

    def randn(*shape, dtype=bf16, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    def rotary(backend, interleaved):
        q, k = randn(2, seq, heads, head_dim, grad=True), randn(2, seq, kv_heads, head_dim, grad=True)
        out = pi_kernels.rotary_interp(q, k, rotary_dim=rotary_dim, interleaved=interleaved, backend=backend,
                                       **SCALING)
        _finite(*out)
        _backward(out, (q, k))

    def rotary_packed(backend):
        lengths = [seq, 1, seq // 3 + 2]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
        q, k = randn(sum(lengths), heads, head_dim), randn(sum(lengths), kv_heads, head_dim)
        _finite(*pi_kernels.rotary_interp(q, k, layout="thd", cu_seqlens=cu, max_seqlen=seq, backend=backend,
                                          **SCALING))

    def vllm(backend):
        positions = torch.randint(0, 4 * seq, (seq,), device=device)
        query, key = randn(seq, heads * head_dim), randn(seq, kv_heads * head_dim)
        angles = torch.outer(torch.arange(4 * seq, device=device, dtype=torch.float32),
                             torch.rand(rotary_dim // 2, device=device))
        inference.rotary_embedding(positions, query, key, head_dim, torch.cat((angles.cos(), angles.sin()), -1),
                                   backend=backend)
        inference.rotary_embedding_interp(positions, query, key, head_dim, rotary_dim=rotary_dim, backend=backend,
                                          **SCALING)
        _finite(query, key)

    def cache_append(backend):
        batch, new, max_len = 3, 5, seq + 8
        caches = [torch.zeros(batch, max_len, kv_heads, head_dim, device=device, dtype=bf16) for _ in range(2)]
        seqlens = torch.randint(0, max_len - new + 1, (batch,), device=device)
        q_out = pi_kernels.rotary_kv_cache_append(
            randn(batch, new, heads, head_dim), randn(batch, new, kv_heads, head_dim),
            randn(batch, new, kv_heads, head_dim), *caches, seqlens, rotary_dim=rotary_dim, backend=backend,
            **SCALING)
        _finite(q_out, *caches)

    def paged_append(backend):
        block, n_blocks = 16, seq // 16 + 3
        caches = [torch.zeros(n_blocks, block, kv_heads, head_dim, device=device, dtype=bf16) for _ in range(2)]
        slots = torch.randperm(n_blocks * block, device=device)[:seq]
        slots[::7] = -1  # padding tokens: never written
        q_out = pi_kernels.rotary_paged_kv_cache_append(
            randn(seq, heads, head_dim), randn(seq, kv_heads, head_dim), randn(seq, kv_heads, head_dim), *caches,
            slots, torch.arange(seq, device=device), backend=backend, **SCALING)
        _finite(q_out, *caches)

    def qkv_proj():
        hidden = 96
        x = randn(2, seq, hidden, grad=True)
        weight = (randn((heads + 2 * kv_heads) * head_dim, hidden) / hidden**0.5).requires_grad_()
        bias = randn((heads + 2 * kv_heads) * head_dim, grad=True)
        out = pi_kernels.qkv_proj_rotary(x, weight, bias, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                         rotary_dim=rotary_dim, **SCALING)
        _finite(*out)
        _backward(out, (x, weight, bias))

    def attention(causal):
        q = randn(2, seq, heads, head_dim, grad=True)
        k, v = randn(2, seq, heads, head_dim, grad=True), randn(2, seq, heads, head_dim, grad=True)
        out = pi_kernels.attention_rotary(q, k, v, causal=causal, rotary_dim=rotary_dim, **SCALING)
        _finite(out)
        _backward([out], (q, k, v))

    def attention_decode():
        cache_lens = [seq, 1, seq // 2 + 1]
        cu_k = torch.tensor([0, *torch.tensor(cache_lens).cumsum(0).tolist()], device=device, dtype=torch.int32)
        cu_q = torch.arange(len(cache_lens) + 1, device=device, dtype=torch.int32)
        k, v = randn(sum(cache_lens), heads, head_dim), randn(sum(cache_lens), heads, head_dim)
        _finite(pi_kernels.attention_rotary(randn(len(cache_lens), heads, head_dim), k, v, rotate_k=False,
                                            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **SCALING))

    table: dict[str, Callable[[], None]] = {}
    for backend in backends:
        table |= {
            f"rotary_interp {backend} rotate-half fwd+bwd": lambda b=backend: rotary(b, False),
            f"rotary_interp {backend} interleaved fwd+bwd": lambda b=backend: rotary(b, True),
            f"rotary_interp {backend} packed": lambda b=backend: rotary_packed(b),
            f"rotary_embedding(+_interp) {backend}": lambda b=backend: vllm(b),
            f"rotary_kv_cache_append {backend}": lambda b=backend: cache_append(b),
            f"rotary_paged_kv_cache_append {backend}": lambda b=backend: paged_append(b),
        }
    table |= {
        "qkv_proj_rotary fwd+bwd": qkv_proj,
        "attention_rotary causal fwd+bwd": lambda: attention(True),
        "attention_rotary non-causal fwd+bwd": lambda: attention(False),
        "attention_rotary decode (packed, cache)": attention_decode,
    }
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few tokens (for the interpreter)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not timing.interpreter_mode()
    if not on_gpu:
        print(harness.NO_GPU_LINE, flush=True)
        os.environ["TRITON_INTERPRET"] = "1"  # before pi_kernels defines its kernels
    from pi_kernels import _cuda

    device = torch.device("cuda" if on_gpu else "cpu")
    backends = ["triton"] + (["cuda"] if on_gpu and _cuda.available() else [])
    torch.manual_seed(0)
    started = time.perf_counter()
    failures = 0
    for name, call in calls(7 if args.tiny else 217, device, backends).items():
        start = time.perf_counter()
        try:
            call()
            if on_gpu:
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - every kernel runs; failures are counted and reported
            failures += 1
            print(f"FAIL {name}: {harness.short_error(exc)}", flush=True)
            continue
        print(f"ok   {name} ({time.perf_counter() - start:.2f} s)", flush=True)
    print(f"{failures} failure(s); backends {', '.join(backends)}; {time.perf_counter() - started:.1f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
