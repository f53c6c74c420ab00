"""Benchmark the fused rotary + KV-cache append against rotary then copies into the cache.

Run from the repository root::

    python -m benchmarks.bench_kv_cache                    # GPU: decode and prefill, contiguous and paged
    python -m benchmarks.bench_kv_cache --backends triton  # without a GPU: tiny cases under the interpreter
    python -m benchmarks.bench_kv_cache --families decode-paged --dtypes bf16

Providers, per backend (``triton``, and ``cuda`` where the extension is built and a GPU is present):

* ``fused-<backend>``: ``rotary_kv_cache_append`` / ``rotary_paged_kv_cache_append``, one launch that rotates q and
  the new k and writes k and v into the cache;
* ``separate-<backend>``: ``rotary_interp`` on q and k, then index copies of k and v into the cache (what an engine
  without the fused op does).

Every cell is checked against the float64 reference (q_out and both caches, the caches zeroed first), then timed.
GB/s counts q, k and v read once and q_out and the new k and v slots written once (positions and indices not
counted). Target (GPU): fused faster than separate on the same backend.
"""

from __future__ import annotations

import argparse
import functools
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

OP = "rotary_kv_cache_append"
DTYPES = cli.DTYPES
# As in bench_rotary: well above a correct op's rounding in each dtype, far below the error of wrong math.
PARITY_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
BLOCK_SIZE = 16  # tokens per block of the paged cache
BACKENDS = ("triton", "cuda")
CPU_BUDGET = timing.Budget(0.0, 10.0)


@dataclass(frozen=True)
class CacheCase:
    """A KV-cache append: ``batch`` rows of ``new`` tokens into caches of ``max_len`` per row (paged: in blocks)."""

    name: str
    batch: int
    new: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_len: int
    paged: bool


GPU_CASES = (
    CacheCase("decode", 64, 1, 32, 8, 128, 4096, False),
    CacheCase("decode-paged", 64, 1, 32, 8, 128, 4096, True),
    CacheCase("prefill", 1, 4096, 32, 8, 128, 8192, False),
    CacheCase("prefill-paged", 1, 4096, 32, 8, 128, 8192, True),
)
CPU_CASES = (
    CacheCase("tiny-decode", 4, 1, 4, 2, 64, 64, False),
    CacheCase("tiny-prefill-paged", 1, 37, 4, 2, 64, 64, True),
)
# Which cell: a case has one mode (fwd), so the table has no mode column.
CASE_COLUMNS = (("family", "case"), ("tokens", "tokens", "d"), ("dtype", "dtype"), ("provider", "provider"))
TABLE_COLUMNS = (
    *CASE_COLUMNS,
    *report.TIMING_COLUMNS,
    ("gbs", "GB/s", ".1f"),
    ("frac_ceiling", "/copy", ".2f"),
    ("target", "fused<sep"),
    *report.CHECK_COLUMNS,
)
SUMMARY_COLUMNS = (
    *CASE_COLUMNS,
    ("median_ms", "median ms", ".4f"),
    ("gbs", "GB/s", ".0f"),
    ("frac_ceiling", "/copy", ".2f"),
    ("target", "fused < separate"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = cli.bench_parser(
        "benchmarks.bench_kv_cache",
        __doc__,
        providers=None,
        families=(*GPU_CASES, *CPU_CASES),
        dtypes=DTYPES,
        dtype_default=("bf16",),
        modes=None,
        sizes=False,
    )
    parser.add_argument(
        "--backends", type=cli.csv_choices(BACKENDS), help="triton,cuda (default: those available here)"
    )
    return parser.parse_args(argv)


def cache_inputs(case: CacheCase, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """New tokens, zeroed caches and where each token goes (cache_seqlens, or slots and positions when paged)."""
    gen = torch.Generator(device=device).manual_seed(case.batch * case.new)
    lead = (case.batch * case.new,) if case.paged else (case.batch, case.new)
    tensors = {
        name: torch.randn(*lead, heads, case.head_dim, device=device, dtype=dtype, generator=gen)
        for name, heads in (("q", case.n_heads), ("k", case.n_kv_heads), ("v", case.n_kv_heads))
    }
    seqlens = torch.randint(0, case.max_len - case.new + 1, (case.batch,), device=device, generator=gen)
    if case.paged:
        # Each row owns max_len / block_size blocks, scattered over the cache as an allocator leaves them.
        blocks_per_row = case.max_len // BLOCK_SIZE
        n_blocks = case.batch * blocks_per_row
        block_table = torch.randperm(n_blocks, device=device, generator=gen).view(case.batch, blocks_per_row)
        index = seqlens[:, None] + torch.arange(case.new, device=device)  # (batch, new) cache index per token
        rows = torch.arange(case.batch, device=device)[:, None].expand_as(index)
        slots = block_table[rows, index // BLOCK_SIZE] * BLOCK_SIZE + index % BLOCK_SIZE
        shape = (n_blocks, BLOCK_SIZE, case.n_kv_heads, case.head_dim)
        tensors.update(slot_mapping=slots.flatten(), positions=index.flatten())
    else:
        shape = (case.batch, case.max_len, case.n_kv_heads, case.head_dim)
        tensors["cache_seqlens"] = seqlens
    tensors.update(
        k_cache=torch.zeros(shape, device=device, dtype=dtype), v_cache=torch.zeros(shape, device=device, dtype=dtype)
    )
    return tensors


def _build_fused(case: CacheCase, t: dict[str, torch.Tensor], backend: str) -> Callable[[], torch.Tensor]:
    """The fused op: one launch rotates q and the new k and writes k and v into the cache; returns q_out."""
    from pi_kernels import rotary_kv_cache_append, rotary_paged_kv_cache_append

    options = {"scaling_factor": SCALING_FACTOR, "base": BASE, "backend": backend}
    if case.paged:
        return lambda: rotary_paged_kv_cache_append(t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"],
                                                    t["slot_mapping"], t["positions"], **options)
    return lambda: rotary_kv_cache_append(t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"], t["cache_seqlens"],
                                          **options)


def _build_separate(case: CacheCase, t: dict[str, torch.Tensor], backend: str) -> Callable[[], torch.Tensor]:
    """rotary_interp on q and k, then index copies of k and v into the cache; returns q_out."""
    from pi_kernels import rotary_interp

    options = {"scaling_factor": SCALING_FACTOR, "base": BASE, "backend": backend}
    if case.paged:
        k_flat, v_flat = t["k_cache"].flatten(0, 1), t["v_cache"].flatten(0, 1)

        def separate():
            q_out, k_out = rotary_interp(t["q"][None], t["k"][None], t["positions"][None], **options)
            k_flat[t["slot_mapping"]] = k_out[0]
            v_flat[t["slot_mapping"]] = t["v"]
            return q_out[0]
    else:
        index = t["cache_seqlens"][:, None] + torch.arange(case.new, device=t["q"].device)
        rows = torch.arange(case.batch, device=index.device)[:, None].expand_as(index)

        def separate():
            q_out, k_out = rotary_interp(t["q"], t["k"], t["cache_seqlens"], **options)
            t["k_cache"][rows, index] = k_out
            t["v_cache"][rows, index] = t["v"]
            return q_out
    return separate


# Per backend, the fused op and the separate rotary + copies; build(case, tensors) returns the call to time.
PROVIDERS = {
    p.name: p
    for backend in BACKENDS
    for p in (
        peers.Provider(f"fused-{backend}", functools.partial(_build_fused, backend=backend),
                       requires="pi_kernels._C" if backend == "cuda" else None, needs_cuda=backend == "cuda"),
        peers.Provider(f"separate-{backend}", functools.partial(_build_separate, backend=backend),
                       requires="pi_kernels._C" if backend == "cuda" else None, needs_cuda=backend == "cuda"),
    )
}


def parity(case: CacheCase, t: dict[str, torch.Tensor], fn: Callable) -> float:
    """Largest relative error of q_out and the caches against the float64 reference (caches zeroed first)."""
    from pi_kernels.reference import rotary_kv_cache_append_reference, rotary_paged_kv_cache_append_reference

    t["k_cache"].zero_()
    t["v_cache"].zero_()
    q_out = fn()
    new = [t[name].double() for name in ("q", "k", "v")]
    caches = [torch.zeros_like(t["k_cache"], dtype=torch.float64) for _ in range(2)]
    options = {"scaling_factor": SCALING_FACTOR, "base": BASE}
    if case.paged:
        ref = rotary_paged_kv_cache_append_reference(*new, *caches, t["slot_mapping"], t["positions"], **options)
    else:
        ref = rotary_kv_cache_append_reference(*new, *caches, t["cache_seqlens"], **options)
    return max(
        harness.rel_error(out, expected) for out, expected in zip((q_out, t["k_cache"], t["v_cache"]), ref, strict=True)
    )


def _row(case: CacheCase, provider: peers.Provider, dtype_name: str, moved: int, ceiling: float) -> dict[str, Any]:
    return {
        "op": OP,
        "provider": provider.name,
        "mode": "fwd",
        "dtype": dtype_name,
        "family": case.name,
        "batch": case.batch,
        "tokens": case.batch * case.new,
        "seq": case.new,
        "n_heads": case.n_heads,
        "n_kv_heads": case.n_kv_heads,
        "head_dim": case.head_dim,
        "max_len": case.max_len,
        "paged": case.paged,
        "scaling_factor": SCALING_FACTOR,
        "bytes": moved,
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "gbs": None,
        "ceiling_gbs": ceiling,
        "frac_ceiling": None,
        "target": None,
        "parity": None,
        "parity_tol": PARITY_TOL[DTYPES[dtype_name]],
        "status": "ok",
        "note": provider.note,
    }


def run_case(
    case: CacheCase, dtype_name: str, backends: Sequence[str], run: harness.BenchRun, ceiling: float
) -> list[dict[str, Any]]:
    """Check and time the fused and separate providers of every backend on one case; return the rows."""
    dtype = DTYPES[dtype_name]
    t = cache_inputs(case, dtype, run.device)
    moved = 2 * sum(t[name].numel() for name in ("q", "k", "v")) * dtype.itemsize
    rows = []
    for provider in (PROVIDERS[f"{kind}-{backend}"] for backend in backends for kind in ("fused", "separate")):
        fn = provider.build(case, t)
        row = _row(case, provider, dtype_name, moved, ceiling)
        measured = harness.check_then_time(
            row,
            check=lambda fn=fn: parity(case, t, fn),
            tol=row["parity_tol"],
            make_call=lambda fn=fn: (fn, None),
            budget=run.budget,
        )
        if measured is not None:
            gbs = moved / (measured.median_ms * 1e-3) / 1e9
            row.update(gbs=gbs, frac_ceiling=gbs / ceiling)
        rows.append(row)
    timed = {r["provider"]: r["median_ms"] for r in rows if r["median_ms"] is not None}
    for row in rows:
        separate = row["provider"].replace("fused-", "separate-")
        if run.on_gpu and row["provider"].startswith("fused-") and separate in timed and row["median_ms"]:
            row["target"] = "ok" if row["median_ms"] < timed[separate] else "MISS"
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 1 if a fused op failed parity or raised, else 0."""
    args = parse_args(argv)
    run = harness.start_run(OP, "kv_cache", args, gpu_families=GPU_CASES, cpu_families=CPU_CASES, cpu_budget=CPU_BUDGET)
    from pi_kernels import _cuda

    backends = args.backends or ["triton"] + (["cuda"] if run.on_gpu and _cuda.available() else [])
    ceiling = timing.copy_bandwidth_gbs(run.device, warmup_ms=run.budget.warmup_ms, rep_ms=run.budget.rep_ms)
    label = "device-to-device copy" if run.on_gpu else "CPU memcpy, NOT a GPU figure"
    print(f"copy ceiling: {ceiling:.1f} GB/s ({label}); backends: {', '.join(backends)}", flush=True)
    rows: list[dict[str, Any]] = []
    for dtype_name in args.dtypes:
        for case in run.families:
            group = run_case(case, dtype_name, backends, run, ceiling)
            harness.free_memory(run.device)
            rows.extend(group)
            harness.report_group(run, group, f"{case.name} (batch {case.batch}, {case.new} new, heads "
                                 f"{case.n_heads}/{case.n_kv_heads}, head_dim {case.head_dim}, max_len "
                                 f"{case.max_len}), {dtype_name}", TABLE_COLUMNS)
    misses = [r for r in rows if r["target"] == "MISS"]
    harness.finish_run(
        run,
        args,
        rows,
        key_cols=("family", "dtype", "provider"),
        summary=lambda csv_path, latest: report.format_table(latest, SUMMARY_COLUMNS, markdown=True),
        extra={
            "copy_ceiling_gbs": ceiling,
            "backends": backends,
            "fused_target_misses": [{k: r[k] for k in ("family", "dtype", "provider")} for r in misses],
        },
    )
    failed = [r for r in rows if r["provider"].startswith("fused-") and r["status"] in ("error", "parity-fail")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
