"""Benchmark fused RoPE attention, ``pi_kernels.attention_rotary``, against SDPA after a separate rotation.

Run from the repository root::

    python -m benchmarks.bench_attention               # full sweep on a GPU, results under benchmarks/results/
    python -m benchmarks.bench_attention --quick       # 2k and 16k tokens; without a GPU: the interpreter check
    python -m benchmarks.bench_attention --families d128 --tokens 16384 --causal false --modes fwd,bwd

Providers, all on the same un-rotated q, k, v (bshd, batch · seq = 16k tokens as in flash-attention's benchmarks,
2048 / head_dim heads, MHA) and random upstream gradients:

* ``pi_kernels``: ``attention_rotary``, a rotation pass over q and k (the rotary kernel), then the flash-attention
  core on the rotated q and k (``pi_kernels/ops/attention.py``).
* ``pi_kernels-norope``: the same op with ``rotate_q=False, rotate_k=False`` (the core alone): its inputs stand for
  q and k already rotated. The baseline of the RoPE-cost target; checked against plain (un-rotated) attention.
* ``rotary_interp+pi_kernels-norope``: ``rotary_interp`` then the kernel without RoPE (the unfused alternative).
* ``rotary_interp+sdpa-{flash,cudnn,efficient}``: ``rotary_interp``, then ``scaled_dot_product_attention``
  restricted to one backend; ``eager+sdpa-*``: the same after the eager reference rotation (float64 angles).
  Without a GPU only ``sdpa-math`` exists.

Every cell is checked against the float64 reference before it is timed (forward: the last 256 queries of batch
row 0, heads 0-1, at any size; backward: dq, dk, dv of those heads up to 2k tokens); a cell failing parity is
reported and not timed. TFLOP/s counts 4 · batch · seq² · heads · head_dim per forward (half when causal), 2.5×
that per backward, 3.5× for fwd+bwd. Peak memory is measured on one fwd+bwd call. Targets (GPU, pi_kernels):
forward ≥ 470 and backward ≥ 320 TFLOP/s at head_dim 128, 16k, non-causal; time ≤ 1.05 × ``pi_kernels-norope``'s
in every cell; fwd+bwd faster than the fastest ``rotary_interp+sdpa-*`` at every length ≥ 2k.
"""

from __future__ import annotations

import argparse
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

OP = "attention_rotary"
DTYPES = {name: cli.DTYPES[name] for name in ("bf16", "fp16")}
FLOPS_PER_FORWARD = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # backward: five GEMMs to the forward's two
# Relative-norm error against float64: a few times an attention's own rounding in the dtype (eager bf16 attention
# is ~5e-3 from float64, fp16 ~7e-4), far below the O(1) error of a wrong rotation, mask or scale.
PARITY_TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
PARITY_ROWS = 256            # forward parity: the last queries (they see the most keys), at any size
PARITY_HEADS = 2
PARITY_BWD_MAX_TOKENS = 2048  # backward parity needs every query: a float64 seq² reference, so only up to here
TARGET_TFLOPS = {"fwd": 470.0, "bwd": 320.0}  # at head_dim 128, 16k tokens, non-causal
TARGET_TFLOPS_AT = (128, 16384, False)
TARGET_ROPE_COST = 1.05       # pi_kernels time / pi_kernels-norope time, at most
TARGET_VS_SDPA_FROM = 2048    # fwd+bwd faster than the best rotary_interp+sdpa-* from this length on


@dataclass(frozen=True)
class Family:
    """A head shape, swept over sequence lengths at a fixed number of tokens per batch."""

    name: str
    n_heads: int
    head_dim: int
    seqs: tuple[int, ...]
    quick_seqs: tuple[int, ...]
    tokens_per_batch: int

    def batch(self, seq: int) -> int:
        return max(1, self.tokens_per_batch // seq)


_GPU_SEQS = (1024, 2048, 4096, 8192, 16384, 32768)
GPU_FAMILIES = (
    Family("d64", 32, 64, _GPU_SEQS, (2048, 16384), 16384),
    Family("d128", 16, 128, _GPU_SEQS, (2048, 16384), 16384),
)
# The interpreter: one tiny shape, two key tiles long, so both the masked and the unmasked loops run.
CPU_FAMILIES = (Family("tiny-d32", 2, 32, (64,), (64,), 64),)


CPU_BUDGET = timing.Budget(0.0, 0.0, 1)

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa(backend: str | None, causal: bool) -> AttnFn:
    """SDPA on bshd tensors, restricted to ``backend`` (None: PyTorch's choice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backends[backend]):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)

    return attend


def _build_pi_kernels(causal: bool) -> AttnFn:
    from pi_kernels import attention_rotary

    return lambda q, k, v: attention_rotary(q, k, v, scaling_factor=SCALING_FACTOR, base=BASE, causal=causal)


def _build_norope(causal: bool) -> AttnFn:
    from pi_kernels import attention_rotary

    return lambda q, k, v: attention_rotary(q, k, v, causal=causal, rotate_q=False, rotate_k=False)


def _build_rotary_interp_then(attend: AttnFn) -> AttnFn:
    from pi_kernels import rotary_interp

    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(*rotary_interp(q, k, scaling_factor=SCALING_FACTOR, base=BASE), v)

    return fwd


def _build_eager_then(attend: AttnFn) -> AttnFn:
    from pi_kernels.reference import rotary_interp_reference

    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(*rotary_interp_reference(q, k, scaling_factor=SCALING_FACTOR, base=BASE), v)

    return fwd


def _sdpa_providers(backend: str, needs_cuda: bool) -> list[peers.Provider]:
    return [
        peers.Provider(f"rotary_interp+sdpa-{backend}", lambda c: _build_rotary_interp_then(_sdpa(backend, c)),
                       f"rotary_interp, then SDPA ({backend} backend only)", peer="torch", needs_cuda=needs_cuda),
        peers.Provider(f"eager+sdpa-{backend}", lambda c: _build_eager_then(_sdpa(backend, c)),
                       f"eager reference rotation, then SDPA ({backend} backend only)", peer="torch",
                       needs_cuda=needs_cuda),
    ]


# A provider's build(causal) returns attention on un-rotated bshd q, k, v; rotates=False: plain attention of its
# inputs (checked against the reference without RoPE).
PROVIDERS = {
    p.name: p
    for p in (
        peers.Provider("pi_kernels", _build_pi_kernels,
                       "attention_rotary: a rotation pass of q and k, then the flash-attention core"),
        peers.Provider("pi_kernels-norope", _build_norope, "the same kernel, rotate_q=rotate_k=False", rotates=False),
        peers.Provider("rotary_interp+pi_kernels-norope", lambda c: _build_rotary_interp_then(_build_norope(c)),
                       "rotary_interp, then the kernel without RoPE"),
        *_sdpa_providers("flash", True),
        *_sdpa_providers("cudnn", True),
        *_sdpa_providers("efficient", True),
        *_sdpa_providers("math", False),
    )
}
GPU_DEFAULT_PROVIDERS = [name for name in PROVIDERS if not name.endswith("-math")]
CPU_DEFAULT_PROVIDERS = ["pi_kernels", "pi_kernels-norope", "rotary_interp+pi_kernels-norope",
                         "rotary_interp+sdpa-math", "eager+sdpa-math"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = cli.bench_parser("benchmarks.bench_attention", __doc__, providers=PROVIDERS,
                              families=(*GPU_FAMILIES, *CPU_FAMILIES), dtypes=DTYPES, dtype_default=("bf16",))
    parser.add_argument("--causal", type=cli.csv_choices(["true", "false"]),
                        help="true,false on a GPU; true without one")
    return parser.parse_args(argv)


def parity(fwd: AttnFn, provider: peers.Provider, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           grad_out: torch.Tensor, causal: bool, modes: Sequence[str]) -> dict[str, float | None]:
    """Relative errors per mode against the float64 reference (None: not checked at this size)."""
    from pi_kernels.reference import attention_rotary_reference

    options = dict(causal=causal, rotate_q=provider.rotates, rotate_k=provider.rotates)
    if provider.rotates:
        options.update(scaling_factor=SCALING_FACTOR, base=BASE)
    seq, rows = q.shape[1], min(PARITY_ROWS, q.shape[1])
    check_bwd = any(mode != "fwd" for mode in modes) and seq <= PARITY_BWD_MAX_TOKENS
    inputs = [x.detach().clone().requires_grad_(check_bwd) for x in (q, k, v)]
    with torch.set_grad_enabled(check_bwd):
        out = fwd(*inputs)
    heads = slice(0, PARITY_HEADS)
    # The last queries alone: bottom-right alignment and default positions make them the same rows.
    last = [x[:1, -rows:, heads] if i == 0 else x[:1, :, heads] for i, x in enumerate((q, k, v))]
    ref_out = attention_rotary_reference(*(x.double() for x in last), **options)
    fwd_error = harness.rel_error(out[:1, -rows:, heads], ref_out)
    bwd_error = None
    if check_bwd:
        out.backward(grad_out)
        leaves = [x[:1, :, heads].double().requires_grad_() for x in (q, k, v)]
        attention_rotary_reference(*leaves, **options).backward(grad_out[:1, :, heads].double())
        bwd_error = max(harness.rel_error(x.grad[:1, :, heads], leaf.grad)
                        for x, leaf in zip(inputs, leaves, strict=True))
    both = None if bwd_error is None else max(fwd_error, bwd_error)
    return {"fwd": fwd_error, "bwd": bwd_error, "fwd+bwd": both}


def timed_call(fwd: AttnFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
               mode: str) -> tuple[Callable[[], Any], list[torch.Tensor] | None]:
    """The callable to time for ``mode`` and the tensors whose grads are reset between repetitions.

    ``fwd`` runs on inputs without grad (nothing saved for backward); ``bwd`` runs the forward once, untimed,
    and times the backward with ``retain_graph``; ``fwd+bwd`` times both.
    """
    if mode == "fwd":
        return (lambda: fwd(q, k, v)), None
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    if mode == "bwd":
        out = fwd(*leaves)
        return (lambda: out.backward(grad_out, retain_graph=True)), leaves
    return (lambda: fwd(*leaves).backward(grad_out)), leaves


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory allocated by one call of ``fn`` above what was allocated before it, in MiB (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _row(family: Family, provider: peers.Provider, mode: str, dtype_name: str, seq: int,
         causal: bool) -> dict[str, Any]:
    batch = family.batch(seq)
    flops = 4 * batch * seq * seq * family.n_heads * family.head_dim * (0.5 if causal else 1.0)
    return {
        "op": OP, "provider": provider.name, "mode": mode, "dtype": dtype_name, "family": family.name,
        "causal": causal, "batch": batch, "tokens": seq, "n_heads": family.n_heads, "head_dim": family.head_dim,
        "scaling_factor": SCALING_FACTOR, "flops": flops * FLOPS_PER_FORWARD[mode], "median_ms": None,
        "p20_ms": None, "p80_ms": None, "tflops": None, "peak_mib": None, "rope_cost": None, "vs_best_sdpa": None,
        "best_sdpa": None, "target": None, "parity": None, "status": "ok", "note": provider.note,
    }


def _run_provider(provider: peers.Provider, family: Family, seq: int, dtype_name: str, causal: bool,
                  modes: Sequence[str], tensors: tuple[torch.Tensor, ...], *, device: torch.device,
                  budget: timing.Budget) -> list[dict[str, Any]]:
    """Check and time one provider in every mode on ``tensors`` (q, k, v, upstream gradient)."""
    rows = [_row(family, provider, mode, dtype_name, seq, causal) for mode in modes]

    def record_peak(fn: Callable[[], Any], row: dict[str, Any]) -> None:
        if row["mode"] == "fwd+bwd":
            row["peak_mib"] = peak_memory_mib(fn, device)

    timings = harness.check_then_time_modes(
        rows,
        lambda: provider.build(causal),
        parity=lambda fwd: parity(fwd, provider, *tensors, causal, modes),
        tol=PARITY_TOL[DTYPES[dtype_name]],
        make_call=lambda fwd, mode: timed_call(fwd, *tensors, mode),
        budget=budget,
        after=record_peak,
    )
    for row, measured in zip(rows, timings, strict=True):
        if row["parity"] is None and row["status"] == "ok":
            row["note"] = f"{provider.note}; backward parity checked up to {PARITY_BWD_MAX_TOKENS} tokens only"
        if measured is not None:
            row["tflops"] = row["flops"] / (measured.median_ms * 1e-3) / 1e12
    return rows


def run_group(family: Family, seqs: Sequence[int], dtype_name: str, causal: bool, modes: Sequence[str],
              providers: Sequence[peers.Provider], *, device: torch.device, budget: timing.Budget,
              on_gpu: bool) -> list[dict[str, Any]]:
    """Check and time every (length, mode, provider) cell of one family, dtype and mask; return the rows."""
    dtype = DTYPES[dtype_name]
    rows: list[dict[str, Any]] = []
    # A provider that fails (unsupported backend, OOM) is retired for the longer lengths of the group.
    retired: dict[str, str] = {}
    for seq in seqs:
        gen = torch.Generator(device=device).manual_seed(seq)
        shape = (family.batch(seq), seq, family.n_heads, family.head_dim)
        tensors = tuple(torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))
        cells: list[dict[str, Any]] = []
        for p in providers:
            if p.name in retired:
                skip = {"status": "skipped", "note": retired[p.name]}
                cells += [_row(family, p, mode, dtype_name, seq, causal) | skip for mode in modes]
                continue
            provider_rows = _run_provider(p, family, seq, dtype_name, causal, modes, tensors, device=device,
                                          budget=budget)
            cells += provider_rows
            if any(r["status"] == "error" for r in provider_rows):
                retired[p.name] = f"skipped after an error at {seq} tokens"
                harness.free_memory(device)
        _fill_comparisons(cells, on_gpu)
        rows.extend(cells)
        del tensors
        harness.free_memory(device)
    return rows


def _fill_comparisons(cells: list[dict[str, Any]], on_gpu: bool) -> None:
    """RoPE cost and speed against the best rotary_interp+sdpa-* for pi_kernels rows; target verdicts on a GPU."""
    timed = {(r["provider"], r["mode"]): r["median_ms"] for r in cells if r["median_ms"] is not None}
    for row in cells:
        if row["provider"] != "pi_kernels" or row["median_ms"] is None:
            continue
        mode, misses = row["mode"], []
        norope = timed.get(("pi_kernels-norope", mode))
        if norope:
            row["rope_cost"] = row["median_ms"] / norope
            if row["rope_cost"] > TARGET_ROPE_COST:
                misses.append(f"RoPE costs {row['rope_cost'] - 1:.0%}")
        sdpa = {name: ms for (name, m), ms in timed.items() if m == mode and name.startswith("rotary_interp+sdpa-")}
        if sdpa:
            row["best_sdpa"] = min(sdpa, key=sdpa.get)
            row["vs_best_sdpa"] = sdpa[row["best_sdpa"]] / row["median_ms"]
            if mode == "fwd+bwd" and row["tokens"] >= TARGET_VS_SDPA_FROM and row["vs_best_sdpa"] < 1.0:
                misses.append(f"slower than {row['best_sdpa']}")
        if (row["head_dim"], row["tokens"], row["causal"]) == TARGET_TFLOPS_AT and mode in TARGET_TFLOPS \
                and row["tflops"] < TARGET_TFLOPS[mode]:
            misses.append(f"{row['tflops']:.0f} < {TARGET_TFLOPS[mode]:.0f} TFLOP/s")
        if on_gpu:
            row["target"] = "; ".join(misses) if misses else "ok"


TABLE_COLUMNS = (
    ("tokens", "seq", "d"),
    ("batch", "batch", "d"),
    ("mode", "mode"),
    ("provider", "provider"),
    *report.TIMING_COLUMNS,
    ("tflops", "TFLOP/s", ".1f"),
    ("peak_mib", "peak MiB", ".0f"),
    ("rope_cost", "/norope", ".3f"),
    ("vs_best_sdpa", "vs sdpa", ".2f"),
    ("target", "target"),
    *report.CHECK_COLUMNS,
)
SUMMARY_COLUMNS = (
    ("family", "family"),
    ("causal", "causal"),
    ("dtype", "dtype"),
    ("tokens", "seq", "d"),
    ("mode", "mode"),
    ("provider", "provider"),
    ("tflops", "TFLOP/s", ".0f"),
    ("peak_mib", "peak MiB", ".0f"),
    ("rope_cost", "time / no-RoPE", ".3f"),
    ("vs_best_sdpa", "best SDPA time / this", ".2f"),
    ("target", "target"),
)


def memory_scaling(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """pi_kernels' fwd+bwd peak memory per token at each length: flat when memory is linear in seq."""
    points = [r for r in rows if r["provider"] == "pi_kernels" and r["mode"] == "fwd+bwd" and r["peak_mib"]]
    return [{k: r[k] for k in ("family", "dtype", "causal", "tokens", "batch", "peak_mib")}
            | {"kib_per_token": r["peak_mib"] * 1024 / (r["batch"] * r["tokens"])} for r in points]


def _summary(csv_path, latest) -> str:
    """The README table: pi_kernels and its no-RoPE variant at 16k and the largest length of each group."""
    largest = {(r["family"], r["dtype"], r["causal"]): r["tokens"]
               for r in report.largest_rows(latest, ("family", "dtype", "causal"))}
    rows = [r for r in latest if r["provider"] in ("pi_kernels", "pi_kernels-norope")
            and int(r["tokens"]) in (int(largest[(r["family"], r["dtype"], r["causal"])]), 16384)]
    return report.format_table(rows, SUMMARY_COLUMNS, markdown=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 1 if pi_kernels failed parity or raised, else 0."""
    args = parse_args(argv)
    run = harness.start_run(
        OP, "attention", args, gpu_families=GPU_FAMILIES, cpu_families=CPU_FAMILIES, cpu_budget=CPU_BUDGET
    )
    names = args.providers or (GPU_DEFAULT_PROVIDERS if run.on_gpu else CPU_DEFAULT_PROVIDERS)
    providers = [PROVIDERS[name] for name in names if PROVIDERS[name].unavailable(run.on_gpu) is None]
    skipped = [name for name in names if PROVIDERS[name].unavailable(run.on_gpu) is not None]
    causal_values = [c == "true" for c in (args.causal or (["true", "false"] if run.on_gpu else ["true"]))]
    ceiling = timing.matmul_tflops(run.device) if run.on_gpu else None
    if ceiling is not None:
        print(f"bf16 matmul ceiling: {ceiling:.1f} TFLOP/s (8192^3)", flush=True)
    print(f"scaling_factor {SCALING_FACTOR}, base {BASE}, rotate-half, MHA, bshd; providers: "
          f"{', '.join(p.name for p in providers)}" + (f"; needing a GPU: {', '.join(skipped)}" if skipped else ""),
          flush=True)

    rows: list[dict[str, Any]] = []
    for dtype_name in args.dtypes:
        for family in run.families:
            for causal in causal_values:
                seqs = cli.sweep(args, family.seqs, family.quick_seqs)
                group = run_group(family, seqs, dtype_name, causal, args.modes, providers, device=run.device,
                                  budget=run.budget, on_gpu=run.on_gpu)
                rows.extend(group)
                harness.report_group(run, group, f"{family.name} (heads {family.n_heads}, head_dim "
                                     f"{family.head_dim}, {family.tokens_per_batch} tokens per batch), "
                                     f"{dtype_name}, causal={causal}", TABLE_COLUMNS)
    for p in providers:
        print(f"  {p.name}: {p.note}", flush=True)
    for point in memory_scaling(rows):
        print(f"  pi_kernels fwd+bwd peak at {point['family']} seq {point['tokens']} (batch {point['batch']}): "
              f"{point['peak_mib']:.0f} MiB, {point['kib_per_token']:.1f} KiB per token", flush=True)
    misses = [r for r in rows if r["target"] not in (None, "ok")]
    if run.on_gpu:
        print(f"pi_kernels targets: {'met in every cell' if not misses else f'missed in {len(misses)} cell(s)'}",
              flush=True)
    harness.finish_run(
        run,
        args,
        rows,
        key_cols=("family", "causal", "mode", "dtype", "tokens", "provider"),
        summary=_summary,
        extra={
            "matmul_bf16_tflops": ceiling,
            "pi_kernels_target_misses": [
                {k: r[k] for k in ("family", "causal", "dtype", "tokens", "mode", "target")} for r in misses
            ],
            "pi_kernels_memory": memory_scaling(rows),
        },
        plot={"y_col": "tflops", "ceiling_col": "", "panel_cols": ("mode", "dtype", "family", "causal"),
              "title": f"{OP} - {run.env['device']}"},
    )
    failed = [r for r in rows if r["provider"] == "pi_kernels" and r["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
