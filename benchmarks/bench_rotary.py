"""Benchmark interpolated RoPE, ``pi_kernels.rotary_interp``, against references and peer libraries.

Run from the repository root::

    python -m benchmarks.bench_rotary                 # full sweep on a GPU, results under benchmarks/results/
    python -m benchmarks.bench_rotary --quick         # fewer sizes; without a GPU: the interpreter check
    python benchmarks/bench_rotary.py --providers pi_kernels,liger --modes fwd --dtypes bf16
    python -m benchmarks.bench_rotary --cache-append     # rotary + KV-cache append: fused vs rope then copy

Every (shape, dtype, mode, provider) cell is first checked against the float64 reference, then timed; a cell
whose parity fails is reported and not timed. Method, what each provider gets and the expectations written
before measuring are in ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

try:
    from benchmarks import harness
except ImportError:  # run as a script: this folder, not the repository root, is on sys.path
    import harness

OP = "rotary_interp"
SCALING_FACTOR = 4.0
BASE = 10000.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
# Well above the rounding noise of a correct implementation in each dtype (a few units of its last place),
# far below the O(1) error of wrong math (wrong pairing, layout or scaling).
PARITY_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# Heads never interact in RoPE, so the float64 oracle runs on the first few heads only: every position is
# still checked at a fraction of the memory and time of a full float64 copy at 64k tokens.
PARITY_HEADS = 4
TARGET_FRACTION = 0.90
TARGET_MIN_ELEMENTS = 1 << 20
NO_GPU_LINE = "No GPU: running a quick check under Triton's interpreter (timings are NOT GPU performance)"


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


@dataclass(frozen=True)
class Budget:
    """Timing parameters passed to :func:`benchmarks.harness.measure`."""

    warmup_ms: float
    rep_ms: float
    min_reps: int = 3


GPU_BUDGET = Budget(25.0, 100.0)
GPU_QUICK_BUDGET = Budget(10.0, 40.0)
# Interpreted calls take tens of milliseconds: one warm-up call and three timed ones are all we can afford.
CPU_BUDGET = Budget(0.0, 10.0)

FwdFn = Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Provider:
    """One implementation under test.

    ``build(seq, head_dim, dtype, device)`` runs outside the timed region (imports, cos/sin caches) and
    returns ``fwd(q, k) -> (q_out, k_out)`` on bshd tensors.
    """

    name: str
    module: str | None  # import name of an optional peer; None for this repository's own code
    dist: str  # distribution whose version is recorded with each row
    build: Callable[[int, int, torch.dtype, torch.device], FwdFn]
    backward: bool
    note: str
    needs_cuda: bool = False
    dtypes: tuple[torch.dtype, ...] = tuple(DTYPES.values())


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
        Provider("pi_kernels", None, "pi_kernels", _build_pi_kernels, True, "Triton; angles in-kernel from positions"),
        Provider(
            "pi_kernels_cuda",
            "pi_kernels._C",
            "pi_kernels",
            _build_pi_kernels_cuda,
            True,
            "CUDA extension (csrc/); angles in-kernel from positions",
            needs_cuda=True,
        ),
        Provider(
            "eager", None, "torch", _build_eager, True, "pi_kernels.reference in eager PyTorch; fp64 angles per call"
        ),
        Provider(
            "compiled", None, "torch", _build_compiled, True, "torch.compile of the reference; compile time not timed"
        ),
        Provider(
            "liger",
            "liger_kernel",
            "liger-kernel",
            _build_liger,
            True,
            "cos/sin cache precomputed (free); in place on q/k and on the upstream grads",
            needs_cuda=True,
        ),
        Provider(
            "flashinfer",
            "flashinfer",
            "flashinfer-python",
            _build_flashinfer,
            False,
            "angles in-kernel (fp32), rope_scale=PI factor; int32 pos_ids precomputed (free); forward only",
            needs_cuda=True,
            dtypes=(torch.float16, torch.bfloat16),
        ),
        Provider(
            "flash_attn",
            "flash_attn",
            "flash-attn",
            _build_flash_attn,
            True,
            "cos/sin cache precomputed (free); one launch for q, one for k",
            needs_cuda=True,
        ),
    )
}
CPU_DEFAULT_PROVIDERS = ("pi_kernels", "eager")
OWN_PROVIDERS = ("pi_kernels", "pi_kernels_cuda")  # held to the bandwidth target; a failure fails the run
CPU_COMPILED_SKIP = "not run on CPU by default: inductor's C++ compile takes 30-60 s here (ask with --providers)"


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {text!r})")
        return items

    return parse


def _ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"positive integers expected, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    families = [f.name for f in (*GPU_FAMILIES, *CPU_FAMILIES)]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_rotary", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="GPU: two sizes, shorter timing (CPU is always quick)")
    parser.add_argument(
        "--out", metavar="DIR", help="results root (default: benchmarks/results on a GPU; nothing written on CPU)"
    )
    parser.add_argument("--providers", type=_csv(list(PROVIDERS)), help=f"subset of {','.join(PROVIDERS)}")
    parser.add_argument("--modes", type=_csv(MODES), default=list(MODES), help="subset of " + ",".join(MODES))
    parser.add_argument("--dtypes", type=_csv(list(DTYPES)), help="subset of bf16,fp16,fp32 (default bf16,fp32)")
    parser.add_argument("--families", type=_csv(families), help="shape families (default: all for the device)")
    parser.add_argument("--tokens", type=_ints, help="token counts replacing each family's sweep, e.g. 4096,65536")
    parser.add_argument(
        "--cache-append",
        action="store_true",
        help="instead of the rotary sweep: rotary + KV-cache append, fused vs rotary then a copy into the cache",
    )
    return parser.parse_args(argv)


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when out is not finite."""
    out = out.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm())


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
        errors += [_rel_error(out_q[:, :, :hq], ref_q.detach()), _rel_error(out_k[:, :, :hk], ref_k.detach())]
    if need_grad:
        torch.autograd.backward((ref_q, ref_k), (gq[:, :, :hq].double(), gk[:, :, :hk].double()))
        torch.autograd.backward((out_q, out_k), (gq.clone(), gk.clone()))
        errors += [_rel_error(q_in.grad[:, :, :hq], q64.grad), _rel_error(k_in.grad[:, :, :hk], k64.grad)]
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


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    provider: Provider, family: Family, n_tokens: int, dtype_name: str, mode: str, ceiling_gbs: float
) -> dict[str, Any]:
    elements = n_tokens * (family.n_heads + family.n_kv_heads) * family.head_dim  # batch 1
    one_pass = 2 * elements * DTYPES[dtype_name].itemsize  # read q and k once, write q_out and k_out once
    return {
        "op": OP,
        "provider": provider.name,
        "provider_version": harness.package_version(provider.dist),
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
    budget: Budget,
    ceiling_gbs: float,
    on_gpu: bool,
) -> bool:
    """Fill ``row`` with the parity and, if it passes, the timing of one cell; return False on failure."""
    mode, tol = row["mode"], row["parity_tol"]
    try:
        row["parity"] = parity(fwd, *tensors, mode)
        if not row["parity"] <= tol:
            row.update(status="parity-fail", note=f"parity {row['parity']:.2e} > {tol:.0e}: not timed")
            return False
        fn, grads = timed_call(fwd, *tensors, mode)
        timing = harness.measure(
            fn, warmup_ms=budget.warmup_ms, rep_ms=budget.rep_ms, grad_to_none=grads, min_reps=budget.min_reps
        )
    except Exception as exc:  # noqa: BLE001 - a provider's failure (compile error, OOM, ...) is a result
        row.update(status="error", note=_short(exc))
        return False
    gbs = row["bytes"] / (timing.median_ms * 1e-3) / 1e9
    row.update(
        median_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        gbs=gbs,
        frac_ceiling=gbs / ceiling_gbs,
    )
    if on_gpu and row["provider"] in OWN_PROVIDERS and row["elements"] >= TARGET_MIN_ELEMENTS:
        row["target"] = "ok" if gbs / ceiling_gbs >= TARGET_FRACTION else "MISS"
    return True


def run_group(
    family: Family,
    tokens: Sequence[int],
    dtype_name: str,
    modes: Sequence[str],
    providers: Sequence[Provider],
    *,
    device: torch.device,
    budget: Budget,
    ceiling_gbs: float,
    on_gpu: bool,
) -> list[dict[str, Any]]:
    """Check and time every (tokens, mode, provider) cell of one family and dtype; return the rows."""
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
            if dtype in p.dtypes:
                try:
                    built[p.name] = p.build(n_tokens, family.head_dim, dtype, device)
                except Exception as exc:  # noqa: BLE001 - any failure of a peer is reported, not raised
                    built[p.name] = f"build failed: {_short(exc)}"
        for mode in modes:
            cell = [_base_row(p, family, n_tokens, dtype_name, mode, ceiling_gbs) for p in providers]
            for p, row in zip(providers, cell, strict=True):
                fwd = built.get(p.name)
                if dtype not in p.dtypes:
                    row.update(status="unsupported", note=f"{dtype_name} not supported")
                elif mode != "fwd" and not p.backward:
                    row.update(status="unsupported", note="forward only (no autograd)")
                elif (p.name, mode) in retired:
                    row.update(status="skipped", note=retired[(p.name, mode)])
                elif isinstance(fwd, str):
                    row.update(status="error", note=fwd)
                elif not _check_and_time(row, fwd, tensors, budget=budget, ceiling_gbs=ceiling_gbs, on_gpu=on_gpu):
                    retired[(p.name, mode)] = f"skipped after {row['status']} at {n_tokens} tokens"
                    _free(device)
            _fill_ratios(cell)
            rows.extend(cell)
        del tensors, built
        _free(device)
    return rows


TABLE_COLUMNS = (
    ("family", "family"),
    ("tokens", "tokens", "d"),
    ("dtype", "dtype"),
    ("mode", "mode"),
    ("provider", "provider"),
    ("median_ms", "median ms", ".4f"),
    ("p20_ms", "p20", ".4f"),
    ("p80_ms", "p80", ".4f"),
    ("gbs", "GB/s", ".1f"),
    ("frac_ceiling", "/copy", ".2f"),
    ("target", "target"),
    ("vs_best_other", "vs best", ".2f"),
    ("best_other", "best other"),
    ("parity", "parity", ".1e"),
    ("status", "status"),
)


def _print_problems(rows: Sequence[dict[str, Any]]) -> None:
    """Print why cells were not timed, once per distinct (provider, mode, status, reason)."""
    first: dict[tuple[str, ...], int] = {}
    for r in rows:
        if r["status"] != "ok":
            first.setdefault((r["provider"], r["mode"], r["status"], r["note"]), r["tokens"])
    for (provider, mode, status, note), tokens in first.items():
        print(f"  {provider} {mode}: {status} from {tokens} tokens: {note}", flush=True)


def _print_skips(skips: dict[str, str]) -> None:
    for name, reason in skips.items():
        print(f"  skipped provider {name}: {reason}", flush=True)


def _resolve_providers(args: argparse.Namespace, on_gpu: bool) -> tuple[list[Provider], dict[str, str]]:
    """Providers to run and, for the others, why not."""
    requested = args.providers or (list(PROVIDERS) if on_gpu else list(CPU_DEFAULT_PROVIDERS))
    skips: dict[str, str] = {}
    if not on_gpu and args.providers is None:
        skips["compiled"] = CPU_COMPILED_SKIP
    chosen = []
    for name in requested:
        p = PROVIDERS[name]
        if p.needs_cuda and not on_gpu:
            skips[name] = "needs a CUDA GPU"
        elif p.module is not None and importlib.util.find_spec(p.module) is None:
            skips[name] = f"not installed (import {p.module})"
        else:
            chosen.append(p)
    return chosen, skips


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 1 if pi_kernels failed parity or raised, else 0."""
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() and not harness.interpreter_mode()
    if not on_gpu:
        print(NO_GPU_LINE, flush=True)
        # Must be set before pi_kernels defines its kernels (its first import happens in a provider's build).
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if on_gpu else "cpu")
    budget = (GPU_QUICK_BUDGET if args.quick else GPU_BUDGET) if on_gpu else CPU_BUDGET
    families = [f for f in (GPU_FAMILIES if on_gpu else CPU_FAMILIES) if not args.families or f.name in args.families]
    if not families:
        available = ", ".join(f.name for f in (GPU_FAMILIES if on_gpu else CPU_FAMILIES))
        raise SystemExit(f"no shape family of this device matches --families (here: {available})")
    dtypes = args.dtypes or ["bf16", "fp32"]
    if args.cache_append:
        return run_cache_append(args, device, on_gpu, budget, dtypes)
    providers, skips = _resolve_providers(args, on_gpu)

    env = harness.environment()
    started = time.perf_counter()
    print(
        f"{OP} benchmark on {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"python {env['python']} | commit {env['commit'] or '-'}",
        flush=True,
    )
    ceiling = harness.copy_bandwidth_gbs(device, warmup_ms=budget.warmup_ms, rep_ms=budget.rep_ms)
    tflops = harness.matmul_tflops(device) if on_gpu else None
    label = "device-to-device copy" if on_gpu else "CPU memcpy, NOT a GPU figure"
    print(f"copy ceiling: {ceiling:.1f} GB/s ({label})", flush=True)
    if tflops is not None:
        print(f"bf16 matmul ceiling: {tflops:.1f} TFLOP/s (for compute-bound benchmarks; unused here)", flush=True)
    print(
        f"scaling_factor {SCALING_FACTOR}, base {BASE}, rotate-half, bshd, batch 1; "
        f"providers: {', '.join(p.name for p in providers) or 'none'}",
        flush=True,
    )
    _print_skips(skips)

    rows: list[dict[str, Any]] = []
    for dtype_name in dtypes:
        for family in families:
            tokens = args.tokens or (family.quick_tokens if args.quick else family.tokens)
            group = run_group(
                family,
                tokens,
                dtype_name,
                args.modes,
                providers,
                device=device,
                budget=budget,
                ceiling_gbs=ceiling,
                on_gpu=on_gpu,
            )
            rows.extend(group)
            print(
                f"\n{family.name} (heads {family.n_heads}/{family.n_kv_heads}, head_dim {family.head_dim}), "
                f"{dtype_name}:",
                flush=True,
            )
            print(harness.format_table(group, TABLE_COLUMNS), flush=True)
            _print_problems(group)

    print(
        "\nNotes: GB/s counts one read and one write of q and k per pass (fwd+bwd: two passes); /copy is the "
        "fraction of the copy ceiling above; vs best = fastest other provider's time / this time (> 1: faster). "
        "Peers' cos/sin caches and pos_ids are precomputed outside the timed region (they get them for free).",
        flush=True,
    )
    for p in providers:
        print(f"  {p.name} {harness.package_version(p.dist)}: {p.note}", flush=True)
    misses = [r for r in rows if r["target"] == "MISS"]
    if on_gpu:
        print(
            f"pi_kernels target (≥ {TARGET_FRACTION:.0%} of copy at ≥ {TARGET_MIN_ELEMENTS:,} elements): "
            f"{'met in every cell' if not misses else f'missed in {len(misses)} cell(s)'}",
            flush=True,
        )
    failed = [r for r in rows if r["provider"] in OWN_PROVIDERS and r["status"] in ("error", "parity-fail")]

    out_root = args.out or (harness.RESULTS_ROOT if on_gpu else None)
    if out_root is not None and rows:
        _write_outputs(out_root, env, rows, skips, args, ceiling, tflops, time.perf_counter() - started)
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)
    return 1 if failed else 0


def _write_outputs(
    out_root: str | os.PathLike[str],
    env: dict[str, str],
    rows: list[dict[str, Any]],
    skips: dict[str, str],
    args: argparse.Namespace,
    ceiling: float,
    tflops: float | None,
    seconds: float,
) -> None:
    folder = harness.results_dir(env, out_root)
    csv_path = harness.append_results(folder / "rotary.csv", rows, env)
    stamp = env["date"].replace("-", "").replace(":", "").replace("+0000", "Z")
    harness.write_json(
        folder / f"rotary-{stamp}.json",
        {
            "environment": env,
            "args": vars(args),
            "copy_ceiling_gbs": ceiling,
            "matmul_bf16_tflops": tflops,
            "skipped_providers": skips,
            "seconds": seconds,
            "rows": len(rows),
            "pi_kernels_target_misses": [
                {k: r[k] for k in ("family", "tokens", "dtype", "mode", "frac_ceiling")}
                for r in rows
                if r["target"] == "MISS"
            ],
        },
    )
    # Plot and summary cover the latest measurement of every cell in the CSV, so split runs add up.
    latest = harness.latest_rows(harness.read_results(csv_path), ("family", "mode", "dtype", "tokens", "provider"))
    png = harness.plot_bandwidth(latest, folder / "rotary.png", title=f"{OP} - {env['device']}")
    summary = harness.readme_table(csv_path)
    (folder / "rotary-summary.md").write_text(summary + "\n")
    print(f"\nwrote {csv_path}, {png} and {folder / 'rotary-summary.md'}:\n{summary}", flush=True)


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


CACHE_APPEND_OP = "rotary_kv_cache_append"
CACHE_BLOCK_SIZE = 16
GPU_CACHE_CASES = (
    CacheCase("decode", 64, 1, 32, 8, 128, 4096, False),
    CacheCase("decode-paged", 64, 1, 32, 8, 128, 4096, True),
    CacheCase("prefill", 1, 4096, 32, 8, 128, 8192, False),
    CacheCase("prefill-paged", 1, 4096, 32, 8, 128, 8192, True),
)
CPU_CACHE_CASES = (
    CacheCase("tiny-decode", 4, 1, 4, 2, 64, 64, False),
    CacheCase("tiny-prefill-paged", 1, 37, 4, 2, 64, 64, True),
)
CACHE_COLUMNS = (
    ("family", "case"),
    ("tokens", "tokens", "d"),
    ("dtype", "dtype"),
    ("provider", "provider"),
    ("median_ms", "median ms", ".4f"),
    ("p20_ms", "p20", ".4f"),
    ("p80_ms", "p80", ".4f"),
    ("gbs", "GB/s", ".1f"),
    ("frac_ceiling", "/copy", ".2f"),
    ("target", "fused<sep"),
    ("parity", "parity", ".1e"),
    ("status", "status"),
)


def _cache_inputs(case: CacheCase, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
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
        blocks_per_row = case.max_len // CACHE_BLOCK_SIZE
        n_blocks = case.batch * blocks_per_row
        block_table = torch.randperm(n_blocks, device=device, generator=gen).view(case.batch, blocks_per_row)
        index = seqlens[:, None] + torch.arange(case.new, device=device)  # (batch, new) cache index per token
        rows = torch.arange(case.batch, device=device)[:, None].expand_as(index)
        slots = block_table[rows, index // CACHE_BLOCK_SIZE] * CACHE_BLOCK_SIZE + index % CACHE_BLOCK_SIZE
        shape = (n_blocks, CACHE_BLOCK_SIZE, case.n_kv_heads, case.head_dim)
        tensors.update(slot_mapping=slots.flatten(), positions=index.flatten())
    else:
        shape = (case.batch, case.max_len, case.n_kv_heads, case.head_dim)
        tensors["cache_seqlens"] = seqlens
    tensors.update(
        k_cache=torch.zeros(shape, device=device, dtype=dtype), v_cache=torch.zeros(shape, device=device, dtype=dtype)
    )
    return tensors


def _cache_providers(case: CacheCase, t: dict[str, torch.Tensor], backends: Sequence[str]) -> dict[str, Callable]:
    """Per backend: the fused op, and rotary_interp followed by index copies of k and v into the cache."""
    from pi_kernels import rotary_interp, rotary_kv_cache_append, rotary_paged_kv_cache_append

    options = {"scaling_factor": SCALING_FACTOR, "base": BASE}
    providers: dict[str, Callable] = {}
    for backend in backends:
        if case.paged:
            k_flat, v_flat = t["k_cache"].flatten(0, 1), t["v_cache"].flatten(0, 1)

            def fused(backend=backend):
                return rotary_paged_kv_cache_append(
                    t["q"],
                    t["k"],
                    t["v"],
                    t["k_cache"],
                    t["v_cache"],
                    t["slot_mapping"],
                    t["positions"],
                    backend=backend,
                    **options,
                )

            def separate(backend=backend, k_flat=k_flat, v_flat=v_flat):
                q_out, k_out = rotary_interp(
                    t["q"][None], t["k"][None], t["positions"][None], backend=backend, **options
                )
                k_flat[t["slot_mapping"]] = k_out[0]
                v_flat[t["slot_mapping"]] = t["v"]
                return q_out[0]
        else:
            index = t["cache_seqlens"][:, None] + torch.arange(case.new, device=t["q"].device)
            rows = torch.arange(case.batch, device=index.device)[:, None].expand_as(index)

            def fused(backend=backend):
                return rotary_kv_cache_append(
                    t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"], t["cache_seqlens"], backend=backend, **options
                )

            def separate(backend=backend, index=index, rows=rows):
                q_out, k_out = rotary_interp(t["q"], t["k"], t["cache_seqlens"], backend=backend, **options)
                t["k_cache"][rows, index] = k_out
                t["v_cache"][rows, index] = t["v"]
                return q_out

        providers[f"fused-{backend}"] = fused
        providers[f"separate-{backend}"] = separate
    return providers


def _cache_parity(case: CacheCase, t: dict[str, torch.Tensor], fn: Callable) -> float:
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
        _rel_error(out, expected) for out, expected in zip((q_out, t["k_cache"], t["v_cache"]), ref, strict=True)
    )


def run_cache_append(
    args: argparse.Namespace, device: torch.device, on_gpu: bool, budget: Budget, dtypes: Sequence[str]
) -> int:
    """Fused rotary + KV-cache append against rotary then index copies, per backend; return 1 if a fused op fails.

    Bytes: q, k and v read once, q_out and the new k and v slots written once (positions and indices not counted).
    """
    from pi_kernels import _cuda

    backends = ["triton"] + (["cuda"] if on_gpu and _cuda.available() else [])
    env = harness.environment()
    started = time.perf_counter()
    print(f"{CACHE_APPEND_OP} benchmark on {env['device']} | backends: {', '.join(backends)}", flush=True)
    ceiling = harness.copy_bandwidth_gbs(device, warmup_ms=budget.warmup_ms, rep_ms=budget.rep_ms)
    print(f"copy ceiling: {ceiling:.1f} GB/s ({'device-to-device copy' if on_gpu else 'CPU memcpy, NOT a GPU figure'})")
    rows: list[dict[str, Any]] = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for case in GPU_CACHE_CASES if on_gpu else CPU_CACHE_CASES:
            t = _cache_inputs(case, dtype, device)
            moved = 2 * sum(t[name].numel() for name in ("q", "k", "v")) * dtype.itemsize
            group = []
            for name, fn in _cache_providers(case, t, backends).items():
                row = {
                    "op": CACHE_APPEND_OP,
                    "provider": name,
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
                    "parity_tol": PARITY_TOL[dtype],
                    "status": "ok",
                    "note": "",
                }
                try:
                    row["parity"] = _cache_parity(case, t, fn)
                    if not row["parity"] <= row["parity_tol"]:
                        row.update(status="parity-fail", note="not timed")
                    else:
                        timing = harness.measure(
                            fn, warmup_ms=budget.warmup_ms, rep_ms=budget.rep_ms, min_reps=budget.min_reps
                        )
                        gbs = moved / (timing.median_ms * 1e-3) / 1e9
                        row.update(
                            median_ms=timing.median_ms,
                            p20_ms=timing.p20_ms,
                            p80_ms=timing.p80_ms,
                            gbs=gbs,
                            frac_ceiling=gbs / ceiling,
                        )
                except Exception as exc:  # noqa: BLE001 - reported as a result, like the rotary sweep
                    row.update(status="error", note=_short(exc))
                group.append(row)
            timed = {r["provider"]: r["median_ms"] for r in group if r["median_ms"] is not None}
            for row in group:
                other = row["provider"].replace("fused-", "separate-")
                if on_gpu and row["provider"].startswith("fused-") and other in timed and row["median_ms"]:
                    row["target"] = "ok" if row["median_ms"] < timed[other] else "MISS"
            rows.extend(group)
            print(
                f"\n{case.name} (batch {case.batch}, {case.new} new, heads {case.n_heads}/{case.n_kv_heads}, "
                f"head_dim {case.head_dim}, max_len {case.max_len}), {dtype_name}:",
                flush=True,
            )
            print(harness.format_table(group, CACHE_COLUMNS), flush=True)
            for row in group:
                if row["status"] != "ok":
                    print(f"  {row['provider']}: {row['status']}: {row['note']}", flush=True)
    out_root = args.out or (harness.RESULTS_ROOT if on_gpu else None)
    if out_root is not None and rows:
        csv_path = harness.append_results(harness.results_dir(env, out_root) / f"{CACHE_APPEND_OP}.csv", rows, env)
        print(f"\nwrote {csv_path}", flush=True)
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)
    failed = [r for r in rows if r["provider"].startswith("fused-") and r["status"] in ("error", "parity-fail")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
