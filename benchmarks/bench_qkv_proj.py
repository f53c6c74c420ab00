"""Benchmark the fused QKV projection with interpolated RoPE, ``pi_kernels.qkv_proj_rotary``, against bare GEMMs.

Run from the repository root::

    python -m benchmarks.bench_qkv_proj               # full sweep on a GPU, results under benchmarks/results/
    python -m benchmarks.bench_qkv_proj --quick       # two sizes; without a GPU: the interpreter check
    python -m benchmarks.bench_qkv_proj --families gqa --tokens 8192 --modes fwd,bwd

Providers, all on the same x (batch 1, ``tokens`` rows), fused weight and random upstream gradients:

* ``pi_kernels``: ``qkv_proj_rotary`` (Triton GEMM, rotation in its epilogue; backward: rotation pass + GEMMs).
* ``matmul``: ``F.linear(x, weight)`` alone, unrotated: the bare cuBLAS GEMM (fwd) and the bare dgrad + wgrad GEMMs
  (bwd) that the targets are measured against. Not the same function, so it has no parity.
* ``matmul+rotary_interp``: ``F.linear`` then ``pi_kernels.rotary_interp`` on the q/k views of its output.
* ``matmul+eager``: ``F.linear`` then the plain-PyTorch reference rotation (float64 angles) in the input dtype.

Every provider that computes the op is first checked against the float64 reference (outputs for fwd, x and weight
gradients for bwd); a cell whose parity fails is reported and not timed. Modes: ``fwd`` (inputs without grad),
``bwd`` (forward once untimed, then the backward of q, k and v with ``retain_graph``), ``fwd+bwd``. TFLOP/s counts
the GEMM work only: 2·M·N·K per forward, 4·M·N·K per backward. Targets (GPU, pi_kernels): forward ≤ 3% slower
than ``matmul``'s forward, backward ≤ 5% slower than its backward.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

try:
    from benchmarks import cli, harness, peers, report, timing
    from benchmarks.harness import BASE, SCALING_FACTOR
except ImportError:  # run as a script: this folder, not the repository root, is on sys.path
    import cli
    import harness
    import peers
    import report
    import timing
    from harness import BASE, SCALING_FACTOR

OP = "qkv_proj_rotary"
DTYPES = {name: cli.DTYPES[name] for name in ("bf16", "fp16")}
# Relative-norm error against float64: a few units of the dtype's rounding for a correct op (K-long fp32
# accumulations included), far below the O(1) error of a wrong rotation, split or scaling.
PARITY_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
TARGET = {"fwd": 1.03, "bwd": 1.05}  # pi_kernels time / matmul time, at most


@dataclass(frozen=True)
class Family:
    """A model's projection shape, swept over token counts."""

    name: str
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tokens: tuple[int, ...]
    quick_tokens: tuple[int, ...]

    @property
    def rows(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim


_GPU_TOKENS = (2048, 4096, 8192, 16384, 32768)
GPU_FAMILIES = (
    Family("llama7b", 4096, 32, 32, 128, _GPU_TOKENS, (4096, 16384)),
    Family("gqa", 4096, 32, 8, 128, _GPU_TOKENS, (4096, 16384)),
)
# Tiny shapes for the interpreter: head_dim 64 with a K tail, and head_dim 80 with an odd token count.
CPU_FAMILIES = (
    Family("tiny-d64", 96, 2, 1, 64, (32,), (32,)),
    Family("tiny-d80", 160, 2, 1, 80, (37,), (37,)),
)


CPU_BUDGET = timing.Budget(0.0, 0.0, 2)

Outputs = Sequence[torch.Tensor]
FwdFn = Callable[[torch.Tensor, torch.Tensor], Outputs]


def _heads(family: Family) -> dict[str, int]:
    return {"num_heads": family.n_heads, "num_kv_heads": family.n_kv_heads, "head_dim": family.head_dim}


def _split(family: Family, projected: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v as (batch, seq, heads, head_dim) views of the unfused projection's output."""
    sizes = [family.n_heads * family.head_dim] + [family.n_kv_heads * family.head_dim] * 2
    return [part.unflatten(-1, (-1, family.head_dim)) for part in projected.split(sizes, dim=-1)]


def _build_pi_kernels(family: Family) -> FwdFn:
    from pi_kernels import qkv_proj_rotary

    return lambda x, weight: qkv_proj_rotary(x, weight, **_heads(family), scaling_factor=SCALING_FACTOR, base=BASE)


def _build_matmul(family: Family) -> FwdFn:
    return lambda x, weight: (torch.nn.functional.linear(x, weight),)


def _build_matmul_rotary_interp(family: Family) -> FwdFn:
    from pi_kernels import rotary_interp

    def fwd(x: torch.Tensor, weight: torch.Tensor) -> Outputs:
        q, k, v = _split(family, torch.nn.functional.linear(x, weight))
        return (*rotary_interp(q, k, scaling_factor=SCALING_FACTOR, base=BASE), v)

    return fwd


def _build_matmul_eager(family: Family) -> FwdFn:
    from pi_kernels.reference import rotary_interp_reference

    def fwd(x: torch.Tensor, weight: torch.Tensor) -> Outputs:
        q, k, v = _split(family, torch.nn.functional.linear(x, weight))
        return (*rotary_interp_reference(q, k, scaling_factor=SCALING_FACTOR, base=BASE), v)

    return fwd


# A provider's build(family) returns fwd(x, weight); rotates=False: the bare GEMM, another function than the op's,
# so it is not parity-checked and its upstream gradient is the unsplit projection's.
PROVIDERS = {
    p.name: p
    for p in (
        peers.Provider("pi_kernels", _build_pi_kernels, "Triton GEMM + RoPE epilogue; bwd: rotation pass + GEMMs"),
        peers.Provider("matmul", _build_matmul, "F.linear only (no RoPE): the bare GEMMs of the targets",
                       peer="torch", rotates=False),
        peers.Provider("matmul+rotary_interp", _build_matmul_rotary_interp, "F.linear, then rotary_interp on views"),
        peers.Provider("matmul+eager", _build_matmul_eager, "F.linear, then the eager reference rotation",
                       peer="torch"),
    )
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = cli.bench_parser("benchmarks.bench_qkv_proj", __doc__, providers=PROVIDERS,
                              families=(*GPU_FAMILIES, *CPU_FAMILIES), dtypes=DTYPES, dtype_default=("bf16",))
    return parser.parse_args(argv)


@dataclass
class Reference:
    """Float64 outputs and x/weight gradients of one problem, shared by every provider's parity check."""

    outputs: list[torch.Tensor]
    grad_x: torch.Tensor
    grad_weight: torch.Tensor


def reference(family: Family, x: torch.Tensor, weight: torch.Tensor, upstream: Outputs) -> Reference:
    from pi_kernels.reference import qkv_proj_rotary_reference

    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    outs = qkv_proj_rotary_reference(x64, w64, **_heads(family), scaling_factor=SCALING_FACTOR, base=BASE)
    torch.autograd.backward(outs, [g.double() for g in upstream])
    return Reference([o.detach() for o in outs], x64.grad, w64.grad)


def parity(fwd: FwdFn, x: torch.Tensor, weight: torch.Tensor, upstream: Outputs, ref: Reference) -> dict[str, float]:
    """Largest relative error of the outputs ("fwd") and of the x and weight gradients ("bwd")."""
    x_in, w_in = x.clone().requires_grad_(), weight.clone().requires_grad_()
    outs = fwd(x_in, w_in)
    fwd_error = max(harness.rel_error(out, r) for out, r in zip(outs, ref.outputs, strict=True))
    torch.autograd.backward(outs, list(upstream))
    bwd_error = max(harness.rel_error(x_in.grad, ref.grad_x), harness.rel_error(w_in.grad, ref.grad_weight))
    return {"fwd": fwd_error, "bwd": bwd_error, "fwd+bwd": max(fwd_error, bwd_error)}


def timed_call(
    fwd: FwdFn, x: torch.Tensor, weight: torch.Tensor, upstream: Outputs, mode: str
) -> tuple[Callable[[], Any], list[torch.Tensor] | None]:
    """The callable to time for ``mode`` and the tensors whose grads are reset between repetitions."""
    if mode == "fwd":
        return (lambda: fwd(x, weight)), None
    x_in, w_in = x.detach().requires_grad_(), weight.detach().requires_grad_()
    if mode == "bwd":
        outs = fwd(x_in, w_in)
        return (lambda: torch.autograd.backward(outs, list(upstream), retain_graph=True)), [x_in, w_in]
    return (lambda: torch.autograd.backward(fwd(x_in, w_in), list(upstream))), [x_in, w_in]


def _row(family: Family, provider: peers.Provider, mode: str, dtype_name: str, n_tokens: int, ceiling: float | None):
    flops = 2 * n_tokens * family.rows * family.hidden * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
    return {
        "op": OP, "provider": provider.name, "mode": mode, "dtype": dtype_name, "family": family.name,
        "batch": 1, "tokens": n_tokens, "hidden": family.hidden, "n_heads": family.n_heads,
        "n_kv_heads": family.n_kv_heads, "head_dim": family.head_dim, "scaling_factor": SCALING_FACTOR,
        "flops": flops, "median_ms": None, "p20_ms": None, "p80_ms": None, "tflops": None,
        "ceiling_tflops": ceiling, "vs_matmul": None, "target": None, "parity": None, "status": "ok",
        "note": provider.note,
    }


def run_group(
    family: Family,
    tokens: Sequence[int],
    dtype_name: str,
    modes: Sequence[str],
    providers: Sequence[peers.Provider],
    *,
    device: torch.device,
    budget: timing.Budget,
    ceiling_tflops: float | None,
    on_gpu: bool,
) -> list[dict[str, Any]]:
    """Check and time every (tokens, mode, provider) cell of one family and dtype; return the rows."""
    dtype = DTYPES[dtype_name]
    rows: list[dict[str, Any]] = []
    for n_tokens in tokens:
        gen = torch.Generator(device=device).manual_seed(n_tokens)
        x = torch.randn(1, n_tokens, family.hidden, device=device, dtype=dtype, generator=gen)
        weight = (torch.randn(family.rows, family.hidden, device=device, generator=gen) / math.sqrt(family.hidden))
        weight = weight.to(dtype)
        upstream = [
            torch.randn(1, n_tokens, heads, family.head_dim, device=device, dtype=dtype, generator=gen)
            for heads in (family.n_heads, family.n_kv_heads, family.n_kv_heads)
        ]
        projected_grad = torch.cat([g.flatten(-2) for g in upstream], dim=-1)  # the baseline's upstream gradient
        ref = reference(family, x, weight, upstream) if any(p.rotates for p in providers) else None
        for p in providers:
            grads = upstream if p.rotates else [projected_grad]
            rows += _run_provider(p, family, n_tokens, dtype_name, modes, (x, weight, grads), ref,
                                  budget=budget, ceiling_tflops=ceiling_tflops)
        _fill_ratios([r for r in rows if r["tokens"] == n_tokens], on_gpu)
        harness.free_memory(device)
    return rows


def _run_provider(provider: peers.Provider, family: Family, n_tokens: int, dtype_name: str, modes: Sequence[str],
                  inputs: tuple[torch.Tensor, torch.Tensor, Outputs], ref: Reference | None, *,
                  budget: timing.Budget, ceiling_tflops: float | None) -> list[dict[str, Any]]:
    """Check and time one provider in every mode on ``inputs`` (x, weight, upstream gradients)."""
    rows = [_row(family, provider, mode, dtype_name, n_tokens, ceiling_tflops) for mode in modes]
    timings = harness.check_then_time_modes(
        rows,
        lambda: provider.build(family),
        parity=(lambda fwd: parity(fwd, *inputs, ref)) if provider.rotates else None,
        tol=PARITY_TOL[DTYPES[dtype_name]],
        make_call=lambda fwd, mode: timed_call(fwd, *inputs, mode),
        budget=budget,
    )
    for row, measured in zip(rows, timings, strict=True):
        if measured is not None:
            row["tflops"] = row["flops"] / (measured.median_ms * 1e-3) / 1e12
    return rows


def _fill_ratios(rows: list[dict[str, Any]], on_gpu: bool) -> None:
    """Each timed row's time over the bare GEMM's time in the same mode; pi_kernels' target verdict on a GPU."""
    baseline = {r["mode"]: r["median_ms"] for r in rows if r["provider"] == "matmul" and r["median_ms"]}
    for row in rows:
        if row["median_ms"] is None or row["mode"] not in baseline:
            continue
        row["vs_matmul"] = row["median_ms"] / baseline[row["mode"]]
        if on_gpu and row["provider"] == "pi_kernels" and row["mode"] in TARGET:
            row["target"] = "ok" if row["vs_matmul"] <= TARGET[row["mode"]] else "MISS"


TABLE_COLUMNS = (
    *report.CELL_COLUMNS,
    *report.TIMING_COLUMNS,
    ("tflops", "TFLOP/s", ".1f"),
    ("vs_matmul", "/matmul", ".3f"),
    ("target", "target"),
    *report.CHECK_COLUMNS,
)
SUMMARY_COLUMNS = (
    *report.CELL_COLUMNS,
    ("median_ms", "median ms", ".3f"),
    ("tflops", "TFLOP/s", ".0f"),
    ("vs_matmul", "time / bare GEMM", ".3f"),
    ("target", "target"),
)


def _summary(csv_path, latest) -> str:
    """The README table: every provider at the largest size of each family and dtype."""
    return report.format_table(report.largest_rows(latest, ("family", "dtype")), SUMMARY_COLUMNS, markdown=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 1 if pi_kernels failed parity or raised, else 0."""
    args = parse_args(argv)
    run = harness.start_run(
        OP, "qkv_proj", args, gpu_families=GPU_FAMILIES, cpu_families=CPU_FAMILIES, cpu_budget=CPU_BUDGET
    )
    providers = [PROVIDERS[name] for name in (args.providers or list(PROVIDERS))]
    ceiling = timing.matmul_tflops(run.device) if run.on_gpu else None
    if ceiling is not None:
        print(f"bf16 matmul ceiling: {ceiling:.1f} TFLOP/s (8192^3)", flush=True)
    print(f"scaling_factor {SCALING_FACTOR}, base {BASE}, rotate-half, batch 1, fused weight; providers: "
          f"{', '.join(p.name for p in providers)}", flush=True)

    rows: list[dict[str, Any]] = []
    for dtype_name in args.dtypes:
        for family in run.families:
            tokens = cli.sweep(args, family.tokens, family.quick_tokens)
            group = run_group(family, tokens, dtype_name, args.modes, providers, device=run.device,
                              budget=run.budget, ceiling_tflops=ceiling, on_gpu=run.on_gpu)
            rows.extend(group)
            harness.report_group(run, group, f"{family.name} (hidden {family.hidden}, heads "
                                 f"{family.n_heads}/{family.n_kv_heads}, head_dim {family.head_dim}), {dtype_name}",
                                 TABLE_COLUMNS)
    for p in providers:
        print(f"  {p.name}: {p.note}", flush=True)
    misses = [r for r in rows if r["target"] == "MISS"]
    if run.on_gpu:
        print(f"pi_kernels targets (fwd ≤ {TARGET['fwd']:.2f}x, bwd ≤ {TARGET['bwd']:.2f}x the bare GEMMs): "
              f"{'met in every cell' if not misses else f'missed in {len(misses)} cell(s)'}", flush=True)
    harness.finish_run(
        run,
        args,
        rows,
        key_cols=("family", "mode", "dtype", "tokens", "provider"),
        summary=_summary,
        extra={
            "matmul_bf16_tflops": ceiling,
            "pi_kernels_target_misses": [
                {k: r[k] for k in ("family", "tokens", "dtype", "mode", "vs_matmul")} for r in misses
            ],
        },
        plot={"y_col": "tflops", "ceiling_col": "ceiling_tflops", "title": f"{OP} - {run.env['device']}"},
    )
    failed = [r for r in rows if r["provider"] == "pi_kernels" and r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
