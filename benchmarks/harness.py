"""The runner every benchmark script shares: set-up, the parity-then-time step of a cell, and what a run writes.

Every benchmark script (``bench_rotary``, ``bench_kv_cache``, ``bench_qkv_proj``, ``bench_attention``) runs the same
way: the command line of :mod:`benchmarks.cli`, then :func:`start_run` (device, interpreter, budget, shape families,
environment header); :func:`check_then_time` is the step of every cell (parity, then :func:`timing.measure`), and
:func:`check_then_time_modes` that step for one provider in every mode;
:func:`report_group` appends a group's rows as soon as it is measured (:func:`save_rows`) and prints its table;
:func:`finish_run` writes the run's JSON, plot and summary table. The pieces live by concern:

* :mod:`benchmarks.timing`: :func:`~timing.measure`, the budgets, the copy and matmul ceilings;
* :mod:`benchmarks.results_io`: the environment stamp, the results CSV and JSON files;
* :mod:`benchmarks.report`: tables, the README table, the plot;
* :mod:`benchmarks.cli`: the common options;
* :mod:`benchmarks.peers`: the :class:`~peers.Provider` record of every script and the registry of peer libraries.

Nothing here imports ``triton`` at module level, so a script can still set ``TRITON_INTERPRET`` after
importing the harness and before the kernels are defined.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks import report, results_io, timing
except ImportError:  # run as a script: this folder, not the repository root, is on sys.path
    import report
    import results_io
    import timing

# The RoPE every benchmark runs, so that their results compare: Position Interpolation by 4 over Llama's base.
SCALING_FACTOR = 4.0
BASE = 10000.0
NO_GPU_LINE = "No GPU: running a quick check under Triton's interpreter (timings are NOT GPU performance)"
# Plain-PyTorch code timed on CPU runs on one thread, so that a run on a shared machine compares like with like.
CPU_THREADS = 1
CPU_TIMING_LINE = (
    f"No GPU: timing plain-PyTorch code on the CPU, torch.set_num_threads({CPU_THREADS}) (what a CPU user of "
    f"backend='auto' gets, against eager baselines); the Triton kernels are only checked for parity under the "
    f"interpreter, not timed"
)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when ``out`` is not finite."""
    out = out.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm())


def short_error(exc: BaseException) -> str:
    """One line of at most 160 characters naming an exception, for a results row."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def free_memory(device: torch.device) -> None:
    """Drop what the last cell left behind, so the next (larger) one does not run out of memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class BenchRun:
    """What one benchmark invocation runs on, made by :func:`start_run`.

    Attributes
    ----------
    op : str
        The op benchmarked, as printed.
    name : str
        Stem of the results files: ``<name>.csv``, ``<name>-<UTC stamp>.json``, ``<name>.png``,
        ``<name>-summary.md``.
    on_gpu : bool
        Kernels run compiled on a GPU (else under Triton's interpreter on CPU).
    cpu_timing : bool
        No GPU and no ``TRITON_INTERPRET`` from the caller: plain-PyTorch providers are timed on
        :data:`CPU_THREADS` thread(s) over the script's CPU timing families, and Triton kernels only parity-checked.
    device : torch.device
        Where the tensors live.
    budget : timing.Budget
        Timing parameters of every cell.
    families : list
        The shape families to run (the script's own dataclass), filtered by ``--families``.
    env : dict of str to str
        :func:`results_io.environment`, stamped on every row.
    folder : pathlib.Path or None
        Results folder ``<out>/<device slug>/``; None when nothing is written (CPU without ``--out``).
    started : float
        ``time.perf_counter()`` at the start.
    """

    op: str
    name: str
    on_gpu: bool
    cpu_timing: bool
    device: torch.device
    budget: timing.Budget
    families: list[Any]
    env: dict[str, str]
    folder: Path | None
    started: float


def start_run(
    op: str,
    name: str,
    args: argparse.Namespace,
    *,
    gpu_families: Sequence[Any],
    cpu_families: Sequence[Any],
    cpu_budget: timing.Budget,
    cpu_timing_families: Sequence[Any] | None = None,
) -> BenchRun:
    """Choose the device, the budget and the families, and print the run's header.

    Without a GPU this sets ``TRITON_INTERPRET=1``, which must happen before ``pi_kernels`` defines its kernels:
    scripts import it lazily, in their providers' builders. If the script gives ``cpu_timing_families`` and the
    caller did not set ``TRITON_INTERPRET``, the run is a CPU timing (:data:`CPU_TIMING_LINE`: one thread,
    :data:`timing.CPU_TIMING_BUDGET`, those families); otherwise an interpreter check (:data:`NO_GPU_LINE`,
    ``cpu_budget``, ``cpu_families``).

    Raises
    ------
    SystemExit
        When no family of this device matches ``--families``.
    """
    on_gpu = torch.cuda.is_available() and not timing.interpreter_mode()
    cpu_timing = not on_gpu and not timing.interpreter_mode() and cpu_timing_families is not None
    if cpu_timing:
        torch.set_num_threads(CPU_THREADS)
    if not on_gpu:
        print(CPU_TIMING_LINE if cpu_timing else NO_GPU_LINE, flush=True)
        os.environ["TRITON_INTERPRET"] = "1"
    available = list(gpu_families if on_gpu else cpu_timing_families if cpu_timing else cpu_families)
    families = [f for f in available if not args.families or f.name in args.families]
    if not families:
        names = ", ".join(f.name for f in available)
        raise SystemExit(f"no shape family of this device matches --families (here: {names})")
    env = results_io.environment()
    if cpu_timing:
        env["device"] = f"{platform.processor() or platform.machine()} CPU, {CPU_THREADS} thread(s)"
    out_root = args.out or (results_io.RESULTS_ROOT if on_gpu else None)
    print(
        f"{op} benchmark on {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"python {env['python']} | commit {env['commit'] or '-'}",
        flush=True,
    )
    return BenchRun(
        op=op,
        name=name,
        on_gpu=on_gpu,
        cpu_timing=cpu_timing,
        device=torch.device("cuda" if on_gpu else "cpu"),
        budget=(timing.GPU_QUICK_BUDGET if args.quick else timing.GPU_BUDGET) if on_gpu else (
            timing.CPU_TIMING_BUDGET if cpu_timing else cpu_budget),
        families=families,
        env=env,
        folder=None if out_root is None else results_io.results_dir(env, out_root),
        started=time.perf_counter(),
    )


def check_then_time(
    row: dict[str, Any],
    *,
    check: Callable[[], float | None] | None,
    tol: float,
    make_call: Callable[[], tuple[Callable[[], Any], Sequence[torch.Tensor] | None]] | None,
    budget: timing.Budget,
    after: Callable[[Callable[[], Any]], None] | None = None,
) -> timing.Timing | None:
    """The step of every cell: parity against the float64 reference, then timing if it passed.

    Parameters
    ----------
    row : dict
        The cell's results row; gets ``parity``, and ``median_ms``, ``p20_ms``, ``p80_ms`` when timed, or
        ``status`` ``"parity-fail"``/``"error"`` and a ``note``.
    check : callable or None
        Returns the relative error of the cell's outputs (None: not checked at this size); None for a baseline
        that computes another function (a bare GEMM).
    tol : float
        Largest relative error that passes.
    make_call : callable or None
        Returns the callable to time and the tensors whose grads are reset between repetitions; None: a parity
        check only (Triton's interpreter in a CPU timing run), the row keeps status ``"ok"`` and no timing.
    budget : timing.Budget
        Passed to :func:`measure`.
    after : callable, optional
        Called with the timed callable after timing (e.g. to measure its peak memory), inside the error handling.

    Returns
    -------
    timing.Timing or None
        None when the cell failed parity, raised (a result to report, never an exception) or was not timed.
    """
    try:
        if check is not None:
            row["parity"] = check()
            if row["parity"] is not None and not row["parity"] <= tol:
                row.update(status="parity-fail", note=f"parity {row['parity']:.2e} > {tol:.0e}: not timed")
                return None
        if make_call is None:
            return None
        fn, grads = make_call()
        measured = timing.measure(
            fn, warmup_ms=budget.warmup_ms, rep_ms=budget.rep_ms, grad_to_none=grads, min_reps=budget.min_reps
        )
        if after is not None:
            after(fn)
    except Exception as exc:  # noqa: BLE001 - a provider's failure (compile error, OOM, ...) is a result
        row.update(status="error", note=short_error(exc))
        return None
    row.update(median_ms=measured.median_ms, p20_ms=measured.p20_ms, p80_ms=measured.p80_ms)
    return measured


def check_then_time_modes(
    rows: Sequence[dict[str, Any]],
    build: Callable[[], Any],
    *,
    parity: Callable[[Any], Mapping[str, float | None]] | None,
    tol: float,
    make_call: Callable[[Any, str], tuple[Callable[[], Any], Sequence[torch.Tensor] | None]],
    budget: timing.Budget,
    after: Callable[[Callable[[], Any], dict[str, Any]], None] | None = None,
) -> list[timing.Timing | None]:
    """Build one provider, then :func:`check_then_time` it in the mode of each of its rows.

    Parameters
    ----------
    rows : sequence of dict
        The provider's results rows, one per mode (``row["mode"]``); a failure to build marks every one
        ``"error"`` (a result to report, never an exception).
    build : callable
        Returns the provider's callable, ``fn``.
    parity : callable or None
        ``parity(fn)`` maps every mode to its relative error (None: not checked at this size), called once, at the
        first row's check: one forward and backward give every mode's error. None: no check (a baseline that
        computes another function).
    tol : float
        Largest relative error that passes.
    make_call : callable
        ``make_call(fn, mode)`` returns the callable to time and the tensors whose grads are reset between
        repetitions.
    budget : timing.Budget
        Passed to :func:`measure`.
    after : callable, optional
        ``after(timed_callable, row)``, called after timing each row (see :func:`check_then_time`).

    Returns
    -------
    list of timing.Timing or None
        Each row's timing, None where it was not timed.
    """
    try:
        fn = build()
    except Exception as exc:  # noqa: BLE001 - a provider's failure is a result to report
        for row in rows:
            row.update(status="error", note=short_error(exc))
        return [None] * len(rows)
    errors: dict[str, float | None] = {}

    def check(mode: str) -> float | None:
        if not errors:
            errors.update(parity(fn))
        return errors[mode]

    return [
        check_then_time(
            row,
            check=None if parity is None else lambda mode=row["mode"]: check(mode),
            tol=tol,
            make_call=lambda mode=row["mode"]: make_call(fn, mode),
            budget=budget,
            after=None if after is None else lambda timed, row=row: after(timed, row),
        )
        for row in rows
    ]


def save_rows(run: BenchRun, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append a measured group to ``<folder>/<name>.csv`` at once, so a run cut short keeps what finished."""
    if run.folder is not None and rows:
        results_io.append_results(run.folder / f"{run.name}.csv", rows, run.env)


def report_group(run: BenchRun, rows: Sequence[Mapping[str, Any]], title: str | None,
                 columns: Sequence[report.Column]) -> None:
    """Save a measured group (:func:`save_rows`), then print its title, its table and why cells were not timed."""
    save_rows(run, rows)
    if title is not None:
        print(f"\n{title}:", flush=True)
    print(report.format_table(rows, columns), flush=True)
    report.print_problems(rows)



def finish_run(
    run: BenchRun,
    args: argparse.Namespace,
    rows: Sequence[Mapping[str, Any]],
    *,
    key_cols: Sequence[str],
    summary: Callable[[Path, list[Mapping[str, Any]]], str],
    extra: Mapping[str, Any] | None = None,
    plot: Mapping[str, Any] | None = None,
) -> None:
    """Write the run's JSON and rebuild its plot and summary table from the latest cells of the CSV.

    Parameters
    ----------
    run : BenchRun
        The run; nothing is written when its ``folder`` is None.
    args : argparse.Namespace
        The command line, recorded in the JSON.
    rows : sequence of mapping
        This run's rows (already appended by :func:`save_rows`).
    key_cols : sequence of str
        Columns that identify a cell: the plot and summary use each cell's latest measurement, so split runs
        add up.
    summary : callable
        ``summary(csv_path, latest_rows)`` returns the markdown table written to ``<name>-summary.md``.
    extra : mapping, optional
        More fields for the JSON (ceilings, target misses, ...).
    plot : mapping, optional
        Keyword arguments of :func:`plot_bandwidth` for ``<name>.png``; no plot when omitted.
    """
    seconds = time.perf_counter() - run.started
    if run.folder is not None and rows:
        csv_path = run.folder / f"{run.name}.csv"
        stamp = run.env["date"].replace("-", "").replace(":", "").replace("+0000", "Z")
        results_io.write_json(
            run.folder / f"{run.name}-{stamp}.json",
            {"environment": run.env, "args": vars(args), "seconds": seconds, "rows": len(rows), **(extra or {})},
        )
        latest = results_io.latest_rows(results_io.read_results(csv_path), key_cols)
        written = [csv_path]
        if plot is not None:
            stamp_line = (f"torch {run.env['torch']}, triton {run.env['triton']}, commit {run.env['commit'] or '-'}, "
                          f"{run.env['date']}")
            plot = {**plot, "title": f"{plot.get('title', run.op)}\n{stamp_line}"}
            written.append(report.plot_bandwidth(latest, run.folder / f"{run.name}.png", **plot))
        table = summary(csv_path, latest)
        (run.folder / f"{run.name}-summary.md").write_text(table + "\n")
        written.append(run.folder / f"{run.name}-summary.md")
        print(f"\nwrote {', '.join(str(p) for p in written)}:\n{table}", flush=True)
    print(f"done in {time.perf_counter() - run.started:.1f} s", flush=True)
