"""Benchmark interpolated RoPE, ``pi_kernels.rotary_interp``, against references and peer libraries.

Run from the repository root::

    python -m benchmarks.bench_rotary                 # full sweep on a GPU, results under benchmarks/results/
    python -m benchmarks.bench_rotary --quick         # fewer sizes
    python -m benchmarks.bench_rotary                 # no GPU: CPU timing of the torch backend, 1 thread
    TRITON_INTERPRET=1 python -m benchmarks.bench_rotary   # no GPU: the GPU path rehearsed under the interpreter
    python benchmarks/bench_rotary.py --providers pi_kernels,liger --modes fwd --dtypes bf16

Every (shape, dtype, mode, provider) cell is first checked against the float64 reference, then timed; a cell
whose parity fails is reported and not timed (``harness.check_then_time``). Without a GPU (and without
``TRITON_INTERPRET``) the timed providers are the plain-PyTorch ones on one thread, at CPU sizes, and the Triton
kernels run under the interpreter on tiny shapes for parity only. The fused rotary + KV-cache append has
its own script, ``bench_kv_cache.py``. Method, what each provider gets and the expectations written
before measuring are in ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

try:
    from benchmarks import cli, harness, peers, report, results_io, timing
    from benchmarks.harness import BASE, SCALING_FACTOR
except ImportError:  # run as a script: this folder, not the repository root, is on sys.path
    import cli
    import harness
    import peers
    import report
    import results_io
    import timing
    from harness import BASE, SCALING_FACTOR

OP = "rotary_interp"
DTYPES = cli.DTYPES  # bf16, fp16, fp32
# Well above the rounding noise of a correct implementation in each dtype (a few units of its last place),
# far below the O(1) error of wrong math (wrong pairing, layout or scaling).
PARITY_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# Heads never interact in RoPE, so the float64 oracle runs on the first few heads only: every position is
# still checked at a fraction of the memory and time of a full float64 copy at 64k tokens.
PARITY_HEADS = 4
TARGET_FRACTION = 0.90
TARGET_MIN_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Family:
    """Head configuration of a shape family, swept over token counts (batch 1, bshd)."""

    name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tokens: tuple[int, ...]
    quick_tokens: tuple[int, ...]


_GPU_TOKENS = tuple(1024 << i for i in range(7))  # 1k .. 64k
GPU_FAMILIES = (
    Family("llama7b", 32, 32, 128, _GPU_TOKENS, (1024, 16384)),
    Family("gqa", 32, 8, 128, _GPU_TOKENS, (1024, 16384)),
)
# Tiny shapes for the interpreter: a power of two and an odd length with a non-power-of-two head_dim.
CPU_FAMILIES = (
    Family("tiny-d64", 4, 2, 64, (64,), (64,)),
    Family("tiny-d80", 4, 2, 80, (217,), (217,)),
)
# CPU timing of the plain-PyTorch providers: the GPU families' heads at prompt lengths a CPU serves.
CPU_TIMING_FAMILIES = (
    Family("llama7b", 32, 32, 128, (512,), (512,)),
    Family("gqa", 32, 8, 128, (2048,), (2048,)),
)


# Interpreted calls take tens of milliseconds: one warm-up call and three timed ones are all we can afford.
CPU_BUDGET = timing.Budget(0.0, 10.0)

# A provider's ``build(seq, head_dim, dtype, device)`` runs outside the timed region (imports, cos/sin caches) and
# returns ``fwd(q, k) -> (q_out, k_out)`` on bshd tensors.
FwdFn = Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]]


def _angles(seq: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Float64 (seq, head_dim / 2) angles with the reference's math, for the peers' cos/sin caches."""
    from pi_kernels.reference import rotary_angles

    positions = torch.arange(seq, device=device)
    return rotary_angles(positions, scaling_factor=SCALING_FACTOR, base=BASE, rotary_dim=head_dim)


def _build_pi_kernels(seq: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> FwdFn:
    from pi_kernels import rotary_interp

    return lambda q, k: rotary_interp(q, k, scaling_factor=SCALING_FACTOR, base=BASE, backend="triton")


def _build_pi_kernels_cuda(seq: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> FwdFn:
    from pi_kernels import rotary_interp

    return lambda q, k: rotary_interp(q, k, scaling_factor=SCALING_FACTOR, base=BASE, backend="cuda")


def _build_pi_kernels_torch(seq: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> FwdFn:
    from pi_kernels import rotary_interp

    return lambda q, k: rotary_interp(q, k, scaling_factor=SCALING_FACTOR, base=BASE, backend="torch")


def _build_hf(seq: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> FwdFn:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=head_dim,
        num_attention_heads=1,
        max_position_embeddings=seq,
        rope_parameters={"rope_type": "linear", "factor": SCALING_FACTOR, "rope_theta": BASE},
    )
    # Hugging Face's float32 cos/sin table for these positions, in the input dtype, as its model computes it once
    # per forward and shares it across layers.
    cos, sin = LlamaRotaryEmbedding(config).to(device)(
        torch.empty(0, device=device, dtype=dtype), torch.arange(seq, device=device)[None]
    )
    return lambda q, k: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # bshd: heads at dim 2


def _build_eager(seq: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> FwdFn:
    from pi_kernels.reference import rotary_interp_reference

    return lambda q, k: rotary_interp_reference(q, k, scaling_factor=SCALING_FACTOR, base=BASE)


def _build_compiled(seq: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> FwdFn:
    from pi_kernels.reference import rotary_interp_reference

    compiled = torch.compile(rotary_interp_reference)
    return lambda q, k: compiled(q, k, scaling_factor=SCALING_FACTOR, base=BASE)


def _build_liger(seq: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> FwdFn:
    from liger_kernel.ops.rope import LigerRopeFunction

    angles = _angles(seq, head_dim, device)
    emb = torch.cat((angles, angles), dim=-1)  # Hugging Face layout: the half-size table repeated
    cos, sin = emb.cos().to(dtype)[None], emb.sin().to(dtype)[None]  # (1, seq, head_dim)

    def fwd(q: torch.Tensor, k: torch.Tensor) -> Sequence[torch.Tensor]:
        # Liger takes (batch, heads, seq, dim) views of (batch, seq, heads, dim) storage and rotates it in place.
        out = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return out[0].transpose(1, 2), out[1].transpose(1, 2)

    return fwd


def _build_flashinfer(seq: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> FwdFn:
    from flashinfer.rope import apply_rope_pos_ids

    pos_ids = torch.arange(seq, device=device, dtype=torch.int32)

    def fwd(q: torch.Tensor, k: torch.Tensor) -> Sequence[torch.Tensor]:
        batch, _, n_heads, dim = q.shape
        q_out, k_out = apply_rope_pos_ids(
            q.reshape(batch * seq, n_heads, dim),
            k.reshape(batch * seq, k.shape[2], dim),
            pos_ids.repeat(batch) if batch > 1 else pos_ids,
            interleave=False,
            rope_scale=SCALING_FACTOR,  # FlashInfer divides positions by rope_scale: PI's linear factor
            rope_theta=BASE,
        )
        return q_out.view(q.shape), k_out.view(k.shape)

    return fwd


def _build_flash_attn(seq: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> FwdFn:
    from flash_attn.layers.rotary import apply_rotary_emb

    angles = _angles(seq, head_dim, device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # (seq, head_dim / 2), the input dtype it requires
    return lambda q, k: (apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin))


PROVIDERS = {
    p.name: p
    for p in (
        peers.Provider("pi_kernels", _build_pi_kernels, "Triton; angles in-kernel from positions"),
        peers.Provider("pi_kernels_cuda", _build_pi_kernels_cuda,
                       "CUDA extension (csrc/); angles in-kernel from positions", requires="pi_kernels._C",
                       needs_cuda=True),
        peers.Provider("pi_kernels_torch", _build_pi_kernels_torch,
                       "backend='torch' (plain PyTorch, what 'auto' runs on CPU); angles from positions per call"),
        peers.Provider("hf", _build_hf, "transformers' apply_rotary_pos_emb; float32 cos/sin from "
                       "LlamaRotaryEmbedding (linear) precomputed (free)", peer="transformers"),
        peers.Provider("eager", _build_eager, "pi_kernels.reference in eager PyTorch; fp64 angles per call",
                       peer="torch"),
        peers.Provider("compiled", _build_compiled, "torch.compile of the reference; compile time not timed",
                       peer="torch"),
        peers.Provider("liger", _build_liger,
                       "cos/sin cache precomputed (free); in place on q/k and on the upstream grads", peer="liger"),
        peers.Provider("flashinfer", _build_flashinfer, "angles in-kernel (fp32), rope_scale=PI factor; int32 "
                       "pos_ids precomputed (free); forward only", peer="flashinfer", backward=False,
                       dtypes=("fp16", "bf16")),
        peers.Provider("flash_attn", _build_flash_attn,
                       "cos/sin cache precomputed (free); one launch for q, one for k", peer="flash_attn"),
    )
}
GPU_DEFAULT_PROVIDERS = ("pi_kernels", "pi_kernels_cuda", "eager", "compiled", "liger", "flashinfer", "flash_attn")
CPU_DEFAULT_PROVIDERS = ("pi_kernels", "eager")  # the interpreter check
CPU_TIMING_DEFAULT_PROVIDERS = ("pi_kernels_torch", "hf", "eager", "pi_kernels")
INTERPRETED_PROVIDERS = ("pi_kernels",)  # Triton kernels: in a CPU timing run, parity under the interpreter only
TARGET_PROVIDERS = ("pi_kernels", "pi_kernels_cuda")  # held to the bandwidth target on a GPU
OWN_PROVIDERS = (*TARGET_PROVIDERS, "pi_kernels_torch")  # a failure fails the run
CPU_COMPILED_SKIP = "not run on CPU by default: inductor's C++ compile takes 30-60 s here (ask with --providers)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = cli.bench_parser("benchmarks.bench_rotary", __doc__, providers=PROVIDERS,
                              families=(*GPU_FAMILIES, *CPU_FAMILIES), dtypes=DTYPES, dtype_default=("bf16", "fp32"))
    return parser.parse_args(argv)


def parity(fwd: FwdFn, q: torch.Tensor, k: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor, mode: str) -> float:
    """Largest relative error of a provider against the float64 reference, on what ``mode`` computes.

    Outputs for ``fwd``, input gradients for ``bwd``, both for ``fwd+bwd``. The provider runs on copies of
    the full tensors (it may work in place); the reference on the first :data:`PARITY_HEADS` heads in float64.
    """
    from pi_kernels.reference import rotary_interp_reference

    hq, hk = min(PARITY_HEADS, q.shape[2]), min(PARITY_HEADS, k.shape[2])
    need_grad = mode != "fwd"
    q64 = q[:, :, :hq].double().requires_grad_(need_grad)
    k64 = k[:, :, :hk].double().requires_grad_(need_grad)
    ref_q, ref_k = rotary_interp_reference(q64, k64, scaling_factor=SCALING_FACTOR, base=BASE)
    q_in = q.clone().requires_grad_(need_grad)
    k_in = k.clone().requires_grad_(need_grad)
    with torch.set_grad_enabled(need_grad):
        out_q, out_k = fwd(q_in, k_in)[:2]
    errors = []
    if mode != "bwd":
        errors += [
            harness.rel_error(out_q[:, :, :hq], ref_q.detach()),
            harness.rel_error(out_k[:, :, :hk], ref_k.detach()),
        ]
    if need_grad:
        torch.autograd.backward((ref_q, ref_k), (gq[:, :, :hq].double(), gk[:, :, :hk].double()))
        torch.autograd.backward((out_q, out_k), (gq.clone(), gk.clone()))
        errors += [harness.rel_error(q_in.grad[:, :, :hq], q64.grad), harness.rel_error(k_in.grad[:, :, :hk], k64.grad)]
    return max(errors)


def timed_call(
    fwd: FwdFn, q: torch.Tensor, k: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor, mode: str
) -> tuple[Callable[[], Any], list[torch.Tensor] | None]:
    """Return the callable to time for ``mode`` and the tensors whose grads to reset between repetitions.

    ``fwd`` runs on inputs that do not require grad (inference: nothing is saved for backward). ``bwd`` runs
    the forward once, untimed, and times the backward of both outputs with ``retain_graph``. ``fwd+bwd``
    times both. Gradients are reset outside the timed region so backward writes rather than accumulates.
    """
    if mode == "fwd":
        return (lambda: fwd(q, k)), None
    q_in, k_in = q.detach().requires_grad_(), k.detach().requires_grad_()
    if mode == "bwd":
        outs = fwd(q_in, k_in)[:2]
        return (lambda: torch.autograd.backward(outs, (gq, gk), retain_graph=True)), [q_in, k_in]
    return (lambda: torch.autograd.backward(fwd(q_in, k_in)[:2], (gq, gk))), [q_in, k_in]


def _fill_ratios(cell: list[dict[str, Any]]) -> None:
    """Set each timed row's speed relative to the fastest other timed provider of the same cell."""
    timed = [r for r in cell if r.get("median_ms") is not None]
    for row in timed:
        others = [r for r in timed if r is not row]
        if others:
            best = min(others, key=lambda r: r["median_ms"])
            row["best_other"] = best["provider"]
            row["vs_best_other"] = best["median_ms"] / row["median_ms"]


def _base_row(
    provider: peers.Provider, family: Family, n_tokens: int, dtype_name: str, mode: str, ceiling_gbs: float | None
) -> dict[str, Any]:
    elements = n_tokens * (family.n_heads + family.n_kv_heads) * family.head_dim  # batch 1
    one_pass = 2 * elements * DTYPES[dtype_name].itemsize  # read q and k once, write q_out and k_out once
    return {
        "op": OP,
        "provider": provider.name,
        "provider_version": results_io.package_version(provider.dist),
        "mode": mode,
        "dtype": dtype_name,
        "family": family.name,
        "batch": 1,
        "tokens": n_tokens,
        "seq": n_tokens,
        "n_heads": family.n_heads,
        "n_kv_heads": family.n_kv_heads,
        "head_dim": family.head_dim,
        "scaling_factor": SCALING_FACTOR,
        "elements": elements,
        "bytes": one_pass * (2 if mode == "fwd+bwd" else 1),
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "gbs": None,
        "ceiling_gbs": ceiling_gbs,
        "frac_ceiling": None,
        "vs_best_other": None,
        "best_other": None,
        "target": None,
        "parity": None,
        "parity_tol": PARITY_TOL[DTYPES[dtype_name]],
        "status": "ok",
        "note": provider.note,
    }


def _check_and_time(
    row: dict[str, Any],
    fwd: FwdFn,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    budget: timing.Budget,
    ceiling_gbs: float | None,
    on_gpu: bool,
    timed: bool,
) -> bool:
    """Fill ``row`` with the parity and, if it passes and ``timed``, the timing of one cell; False on failure.

    Without a copy ceiling (``ceiling_gbs`` None: a CPU timing run) no bandwidth is computed.
    """
    mode = row["mode"]
    measured = harness.check_then_time(
        row,
        check=lambda: parity(fwd, *tensors, mode),
        tol=row["parity_tol"],
        make_call=(lambda: timed_call(fwd, *tensors, mode)) if timed else None,
        budget=budget,
    )
    if measured is None or ceiling_gbs is None:
        return row["status"] == "ok"
    gbs = row["bytes"] / (measured.median_ms * 1e-3) / 1e9
    row.update(gbs=gbs, frac_ceiling=gbs / ceiling_gbs)
    if on_gpu and row["provider"] in TARGET_PROVIDERS and row["elements"] >= TARGET_MIN_ELEMENTS:
        row["target"] = "ok" if gbs / ceiling_gbs >= TARGET_FRACTION else "MISS"
    return True


def run_group(
    family: Family,
    tokens: Sequence[int],
    dtype_name: str,
    modes: Sequence[str],
    providers: Sequence[peers.Provider],
    *,
    device: torch.device,
    budget: timing.Budget,
    ceiling_gbs: float | None,
    on_gpu: bool,
    timed: bool = True,
) -> list[dict[str, Any]]:
    """Check and time (``timed``; else check only) every (tokens, mode, provider) cell of one family and dtype.

    Returns the rows.
    """
    dtype = DTYPES[dtype_name]
    rows: list[dict[str, Any]] = []
    # A failure (compile error, OOM, bad output) retires the provider for the rest of the group: larger
    # sizes would only fail again, slowly.
    retired: dict[tuple[str, str], str] = {}
    if any(p.name == "compiled" for p in providers):
        # One dynamo cache per group keeps compiled shapes under the recompile limit (the sweep would
        # otherwise exceed it and silently fall back to eager).
        torch._dynamo.reset()
    for n_tokens in tokens:
        gen = torch.Generator(device=device).manual_seed(n_tokens)
        shape_q = (1, n_tokens, family.n_heads, family.head_dim)
        shape_k = (1, n_tokens, family.n_kv_heads, family.head_dim)
        tensors = tuple(
            torch.randn(shape, device=device, dtype=dtype, generator=gen) for shape in (shape_q, shape_k) * 2
        )  # q, k and the upstream gradients dq_out, dk_out
        built: dict[str, FwdFn | str] = {}
        for p in providers:
            if p.supports(dtype_name):
                try:
                    built[p.name] = p.build(n_tokens, family.head_dim, dtype, device)
                except Exception as exc:  # noqa: BLE001 - any failure of a peer is reported, not raised
                    built[p.name] = f"build failed: {harness.short_error(exc)}"
        for mode in modes:
            cell = [_base_row(p, family, n_tokens, dtype_name, mode, ceiling_gbs) for p in providers]
            for p, row in zip(providers, cell, strict=True):
                fwd = built.get(p.name)
                if not p.supports(dtype_name):
                    row.update(status="unsupported", note=f"{dtype_name} not supported")
                elif mode != "fwd" and not p.backward:
                    row.update(status="unsupported", note="forward only (no autograd)")
                elif (p.name, mode) in retired:
                    row.update(status="skipped", note=retired[(p.name, mode)])
                elif isinstance(fwd, str):
                    row.update(status="error", note=fwd)
                elif not _check_and_time(
                    row, fwd, tensors, budget=budget, ceiling_gbs=ceiling_gbs, on_gpu=on_gpu, timed=timed
                ):
                    retired[(p.name, mode)] = f"skipped after {row['status']} at {n_tokens} tokens"
                    harness.free_memory(device)
            _fill_ratios(cell)
            rows.extend(cell)
        del tensors, built
        harness.free_memory(device)
    return rows


TABLE_COLUMNS = (
    *report.CELL_COLUMNS,
    *report.TIMING_COLUMNS,
    ("gbs", "GB/s", ".1f"),
    ("frac_ceiling", "/copy", ".2f"),
    ("target", "target"),
    ("vs_best_other", "vs best", ".2f"),
    ("best_other", "best other"),
    *report.CHECK_COLUMNS,
)
# A CPU timing run: no bandwidth, ceiling or target (they describe a GPU), the speed ratio stays.
CPU_TIMING_TABLE_COLUMNS = tuple(c for c in TABLE_COLUMNS if c[0] not in ("gbs", "frac_ceiling", "target"))
PARITY_TABLE_COLUMNS = (*report.CELL_COLUMNS, ("parity_tol", "tol", ".1e"), *report.CHECK_COLUMNS)


def _resolve_providers(args: argparse.Namespace, run: harness.BenchRun) -> tuple[list[peers.Provider], dict[str, str]]:
    """Providers to run and, for the others, why not."""
    on_gpu = run.on_gpu
    default = GPU_DEFAULT_PROVIDERS if on_gpu else CPU_TIMING_DEFAULT_PROVIDERS if run.cpu_timing else (
        CPU_DEFAULT_PROVIDERS)
    requested = args.providers or list(default)
    skips: dict[str, str] = {}
    if not on_gpu and args.providers is None:
        skips["compiled"] = CPU_COMPILED_SKIP
    chosen = []
    for name in requested:
        reason = PROVIDERS[name].unavailable(on_gpu)
        if reason is None:
            chosen.append(PROVIDERS[name])
        else:
            skips[name] = reason
    return chosen, skips


def _interpreter_parity(
    args: argparse.Namespace, providers: Sequence[peers.Provider], run: harness.BenchRun
) -> list[dict[str, Any]]:
    """Check ``providers`` (Triton kernels) under the interpreter on the tiny shapes, untimed; print and return rows."""
    rows: list[dict[str, Any]] = []
    if not providers:
        return rows
    print(
        f"\nParity of {', '.join(p.name for p in providers)} under Triton's interpreter (a correctness check, "
        "NOT a timing), tiny shapes:",
        flush=True,
    )
    for dtype_name in args.dtypes:
        for family in CPU_FAMILIES:
            rows += run_group(family, family.tokens, dtype_name, args.modes, providers, device=run.device,
                              budget=run.budget, ceiling_gbs=None, on_gpu=False, timed=False)
    harness.report_group(run, rows, None, PARITY_TABLE_COLUMNS)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 1 if pi_kernels failed parity or raised, else 0."""
    args = parse_args(argv)
    run = harness.start_run(
        OP,
        "rotary",
        args,
        gpu_families=GPU_FAMILIES,
        cpu_families=CPU_FAMILIES,
        cpu_budget=CPU_BUDGET,
        cpu_timing_families=CPU_TIMING_FAMILIES,
    )
    providers, skips = _resolve_providers(args, run)
    checked_only = [p for p in providers if run.cpu_timing and p.name in INTERPRETED_PROVIDERS]
    providers = [p for p in providers if p not in checked_only]
    ceiling = tflops = None
    if not run.cpu_timing:
        ceiling = timing.copy_bandwidth_gbs(run.device, warmup_ms=run.budget.warmup_ms, rep_ms=run.budget.rep_ms)
        tflops = timing.matmul_tflops(run.device) if run.on_gpu else None
        label = "device-to-device copy" if run.on_gpu else "CPU memcpy, NOT a GPU figure"
        print(f"copy ceiling: {ceiling:.1f} GB/s ({label})", flush=True)
    if tflops is not None:
        print(f"bf16 matmul ceiling: {tflops:.1f} TFLOP/s (for compute-bound benchmarks; unused here)", flush=True)
    print(
        f"scaling_factor {SCALING_FACTOR}, base {BASE}, rotate-half, bshd, batch 1; "
        f"providers: {', '.join(p.name for p in providers) or 'none'}",
        flush=True,
    )
    for name, reason in skips.items():
        print(f"  skipped provider {name}: {reason}", flush=True)

    rows: list[dict[str, Any]] = []
    for dtype_name in args.dtypes:
        for family in run.families:
            tokens = cli.sweep(args, family.tokens, family.quick_tokens)
            group = run_group(
                family,
                tokens,
                dtype_name,
                args.modes,
                providers,
                device=run.device,
                budget=run.budget,
                ceiling_gbs=ceiling,
                on_gpu=run.on_gpu,
            )
            rows.extend(group)
            harness.report_group(run, group, f"{family.name} (heads {family.n_heads}/{family.n_kv_heads}, head_dim "
                                 f"{family.head_dim}), {dtype_name}",
                                 CPU_TIMING_TABLE_COLUMNS if run.cpu_timing else TABLE_COLUMNS)
    rows.extend(_interpreter_parity(args, checked_only, run))

    if run.cpu_timing:
        print(
            f"\nNotes: {harness.CPU_THREADS} thread(s), wall clock (median, p20, p80 of at least "
            f"{run.budget.min_reps} calls after {run.budget.warmup_ms:.0f} ms of warm-up); vs best = fastest other "
            "provider's time / this time (> 1: faster). No GB/s or ceiling: they describe a GPU kernel.",
            flush=True,
        )
    else:
        print(
            "\nNotes: GB/s counts one read and one write of q and k per pass (fwd+bwd: two passes); /copy is the "
            "fraction of the copy ceiling above; vs best = fastest other provider's time / this time (> 1: faster). "
            "Peers' cos/sin caches and pos_ids are precomputed outside the timed region (they get them for free).",
            flush=True,
        )
    for p in (*providers, *checked_only):
        print(f"  {p.name} {results_io.package_version(p.dist)}: {p.note}", flush=True)
    misses = [r for r in rows if r["target"] == "MISS"]
    if run.on_gpu:
        print(
            f"pi_kernels target (≥ {TARGET_FRACTION:.0%} of copy at ≥ {TARGET_MIN_ELEMENTS:,} elements): "
            f"{'met in every cell' if not misses else f'missed in {len(misses)} cell(s)'}",
            flush=True,
        )
    harness.finish_run(
        run,
        args,
        rows,
        key_cols=("family", "mode", "dtype", "tokens", "provider"),
        summary=lambda csv_path, latest: (
            report.format_table(latest, CPU_TIMING_TABLE_COLUMNS, markdown=True)
            if run.cpu_timing
            else report.readme_table(csv_path)
        ),
        extra={
            "copy_ceiling_gbs": ceiling,
            "matmul_bf16_tflops": tflops,
            "skipped_providers": skips,
            "pi_kernels_target_misses": [
                {k: r[k] for k in ("family", "tokens", "dtype", "mode", "frac_ceiling")} for r in misses
            ],
        },
        plot=None if run.cpu_timing else {"title": f"{OP} - {run.env['device']}"},
    )
    failed = [r for r in rows if r["provider"] in OWN_PROVIDERS and r["status"] in ("error", "parity-fail")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
