"""Shared benchmark harness: the runner, timing, hardware ceilings, environment, results files, plots and tables.

Every benchmark script (``bench_rotary``, ``bench_kv_cache``, ``bench_qkv_proj``, ``bench_attention``) and
``gpu_check`` use these helpers, so that all results are measured, stored and reported the same way:

* :func:`bench_parser` and :func:`start_run` are the common command line and set-up (device, interpreter, budget,
  shape families, environment header); :func:`check_then_time` is the parity-then-time step of every cell;
  :func:`report_group` appends a group's rows as soon as it is measured (:func:`save_rows`) and prints its table,
  :func:`finish_run` writes the run's JSON,
  plot and summary table;
* :func:`measure` times a callable (``triton.testing.do_bench`` on a GPU, a wall-clock loop otherwise);
* :func:`copy_bandwidth_gbs` and :func:`matmul_tflops` measure the ceilings in the same run;
* :func:`environment` and :func:`append_results` stamp and store rows under ``benchmarks/results/<slug>/``;
* :func:`plot_bandwidth`, :func:`format_table` and :func:`readme_table` report them.

Nothing here imports ``triton`` at module level, so a script can still set ``TRITON_INTERPRET`` after
importing the harness and before the kernels are defined.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
ENV_FIELDS = ("device", "torch", "triton", "python", "commit", "date")
QUANTILES = (0.5, 0.2, 0.8)
CPU_SLUG = "cpu-interpreter"
_CPU_SUFFIX = "CPU (Triton interpreter)"
# Bounds the wall-clock loop when a call is very cheap; the quantiles are stable long before this.
_MAX_WALLCLOCK_REPS = 1000
NO_GPU_LINE = "No GPU: running a quick check under Triton's interpreter (timings are NOT GPU performance)"
# Plain-PyTorch code timed on CPU runs on one thread, so that a run on a shared machine compares like with like.
CPU_THREADS = 1
CPU_TIMING_LINE = (
    f"No GPU: timing plain-PyTorch code on the CPU, torch.set_num_threads({CPU_THREADS}) (what a CPU user of "
    f"backend='auto' gets, against eager baselines); the Triton kernels are only checked for parity under the "
    f"interpreter, not timed"
)
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Budget:
    """Timing parameters passed to :func:`measure`."""

    warmup_ms: float
    rep_ms: float
    min_reps: int = 3


GPU_BUDGET = Budget(25.0, 100.0)
GPU_QUICK_BUDGET = Budget(10.0, 40.0)
CPU_TIMING_BUDGET = Budget(20.0, 150.0, 5)


@dataclass(frozen=True)
class Timing:
    """Run time of one benchmarked call, in milliseconds.

    Attributes
    ----------
    median_ms : float
        Median over the timed repetitions.
    p20_ms, p80_ms : float
        20th and 80th percentiles, a robust spread that ignores the rare outlier.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float


def interpreter_mode() -> bool:
    """Return whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def gpu_available() -> bool:
    """Return whether kernels run compiled on a CUDA GPU, i.e. timings mean GPU performance."""
    return torch.cuda.is_available() and not interpreter_mode()


def _clear_grads(tensors: Iterable[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def measure(
    fn: Callable[[], Any],
    *,
    warmup_ms: float,
    rep_ms: float,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    min_reps: int = 3,
) -> Timing:
    """Time ``fn`` and return its median, p20 and p80 in milliseconds.

    Parameters
    ----------
    fn : callable
        Zero-argument callable doing exactly the work to time.
    warmup_ms : float
        Time spent calling ``fn`` before timing starts (at least one call is always made).
    rep_ms : float
        Time budget for the timed repetitions.
    grad_to_none : sequence of torch.Tensor, optional
        Tensors whose ``.grad`` is reset before each repetition, outside the timed region, so that a
        backward pass writes fresh gradients instead of accumulating into old ones.
    min_reps : int, optional
        Fewest timed repetitions of the wall-clock fallback (slow interpreted calls may exceed ``rep_ms``).

    Returns
    -------
    Timing
        Ordered quantiles: ``p20_ms <= median_ms <= p80_ms``.

    Notes
    -----
    On a GPU this is ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flush between repetitions).
    Without one (Triton interpreter) it falls back to a ``time.perf_counter`` loop after one warm-up call;
    those numbers only show that the code runs, not how fast a GPU would run it.
    """
    if gpu_available():
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES)
        )
        return Timing(float(median), float(p20), float(p80))
    return _measure_wallclock(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=grad_to_none, min_reps=min_reps)


def _measure_wallclock(
    fn: Callable[[], Any],
    *,
    warmup_ms: float,
    rep_ms: float,
    grad_to_none: Sequence[torch.Tensor] | None,
    min_reps: int,
) -> Timing:
    # CUDA tensors can still show up here (interpreter forced on a GPU machine): synchronize so the
    # wall clock covers the work and not just the launch.
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def once() -> float:
        _clear_grads(grad_to_none)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1e3

    spent = once()  # first call pays one-off costs (interpreter setup, allocator growth): never timed
    while spent < warmup_ms:
        spent += once()
    times: list[float] = []
    while len(times) < max(min_reps, 1) or (sum(times) < rep_ms and len(times) < _MAX_WALLCLOCK_REPS):
        times.append(once())
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    median, p20, p80 = (float(v) for v in q)
    return Timing(median, p20, p80)


def copy_bandwidth_gbs(
    device: torch.device | str,
    *,
    size_bytes: int | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> float:
    """Measure the device-to-device copy bandwidth, the ceiling of a memory-bound kernel.

    Parameters
    ----------
    device : torch.device or str
        Where to allocate the buffers.
    size_bytes : int, optional
        Size of the source buffer; defaults to 1 GiB on a GPU (far past L2) and 64 MiB on CPU.
    warmup_ms, rep_ms : float, optional
        Passed to :func:`measure`.

    Returns
    -------
    float
        GB/s (1e9 bytes per second), counting ``2 * size_bytes`` moved per copy (one read, one write).
        On CPU this is host memcpy bandwidth, not a GPU figure.
    """
    device = torch.device(device)
    if size_bytes is None:
        size_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), warmup_ms=warmup_ms, rep_ms=rep_ms)
    return 2 * size_bytes / (timing.median_ms * 1e-3) / 1e9


def matmul_tflops(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    n: int = 8192,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> float | None:
    """Measure dense matmul throughput, the ceiling for compute-bound benchmarks.

    Parameters
    ----------
    device : torch.device or str
        Device to measure.
    dtype : torch.dtype, optional
        Operand dtype, bfloat16 by default.
    n : int, optional
        Square problem size ``n x n @ n x n``.
    warmup_ms, rep_ms : float, optional
        Passed to :func:`measure`.

    Returns
    -------
    float or None
        TFLOP/s (``2 * n**3`` flops per call), or ``None`` without a GPU, where it would mean nothing.
    """
    device = torch.device(device)
    if device.type != "cuda" or not gpu_available():
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = measure(lambda: a @ b, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return 2 * n**3 / (timing.median_ms * 1e-3) / 1e12


def package_version(dist: str) -> str:
    """Installed version of the distribution ``dist`` (e.g. ``"liger-kernel"``), or ``""`` if absent."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _git_commit() -> str:
    """Short hash of HEAD, ``-dirty`` when tracked files differ from it; else ``$PI_KERNELS_COMMIT`` (a copy of the
    working tree without ``.git``, as on a lent GPU machine), else ``""``."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12", "--exclude=*"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PI_KERNELS_COMMIT", "")
    return out.stdout.strip()


def environment() -> dict[str, str]:
    """Describe where results come from, without host names.

    Returns
    -------
    dict of str to str
        ``device`` (GPU name, or the CPU with "CPU (Triton interpreter)"), ``torch``, ``triton`` and
        ``python`` versions, ``commit`` (short git hash of this checkout, empty if unavailable) and
        ``date`` (UTC, ISO 8601, seconds). The date doubles as the run id.
    """
    if gpu_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()} {_CPU_SUFFIX}".strip()
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": utc_now(),
    }


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second, the ``date`` of results rows (compares as a string)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def device_slug(device_name: str) -> str:
    """Turn a device name into a results folder name.

    Parameters
    ----------
    device_name : str
        As in :func:`environment`, e.g. ``"NVIDIA H100 80GB HBM3"``.

    Returns
    -------
    str
        E.g. ``"h100-80gb-hbm3"``; every interpreter run on CPU maps to ``"cpu-interpreter"``.
    """
    if device_name.endswith(_CPU_SUFFIX):
        return CPU_SLUG
    name = re.sub(r"^nvidia\s+", "", device_name.strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown-device"


def results_dir(env: Mapping[str, str], root: str | os.PathLike[str] = RESULTS_ROOT) -> Path:
    """Return ``root/<device slug>/`` for the environment ``env`` (not created)."""
    return Path(root) / device_slug(env["device"])


def append_results(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    env: Mapping[str, str] | None = None,
) -> Path:
    """Append result rows to a CSV file, stamping each with the environment.

    Parameters
    ----------
    path : str or path-like
        CSV file, normally ``results_dir(env) / "<op>.csv"``; parent folders are created.
    rows : sequence of mapping
        One dict per measurement (op, provider, mode, dtype, shape fields, timings, ...).
    env : mapping, optional
        Environment fields to add to each row; :func:`environment` when omitted. A row's own value wins.

    Returns
    -------
    pathlib.Path
        The file written.

    Notes
    -----
    The header is the union of the old and new columns (environment first, then in order of first
    appearance). When new columns appear the file is rewritten with the wider header, so files from
    older runs stay readable.
    """
    path = Path(path)
    env = dict(environment() if env is None else env)
    new_rows = [{**env, **row} for row in rows]
    old_rows: list[dict[str, str]] = []
    fields: list[str] = list(ENV_FIELDS)
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or fields)
            old_rows = list(reader)
    old_width = len(fields)
    for row in new_rows:
        fields.extend(key for key in row if key not in fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    rewrite = not path.exists() or len(fields) != old_width
    with path.open("w" if rewrite else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if rewrite:
            writer.writeheader()
            writer.writerows(old_rows)
        writer.writerows(_csv_ready(row) for row in new_rows)
    return path


def _csv_ready(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: "" if value is None else value for key, value in row.items()}


def read_results(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read a results CSV written by :func:`append_results` (all values as strings)."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Write a run summary as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def as_float(value: Any) -> float | None:
    """Return ``value`` as a float, or ``None`` if it is empty or not a number (e.g. a CSV cell)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def latest_rows(rows: Iterable[Mapping[str, Any]], key_cols: Sequence[str]) -> list[Mapping[str, Any]]:
    """Keep, for each value of ``key_cols``, the row with the latest ``date``.

    A sweep split over several invocations, or re-run in part, then reads as one up-to-date result.
    ISO dates compare correctly as strings.
    """
    best: dict[tuple[str, ...], Mapping[str, Any]] = {}
    for row in rows:
        key = tuple(str(row.get(c, "")) for c in key_cols)
        if key not in best or str(row.get("date", "")) >= str(best[key].get("date", "")):
            best[key] = row
    return list(best.values())


def plot_bandwidth(
    rows: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    x_col: str = "tokens",
    y_col: str = "gbs",
    series_col: str = "provider",
    panel_cols: Sequence[str] = ("mode", "dtype", "family"),
    ceiling_col: str = "ceiling_gbs",
    title: str = "",
) -> Path:
    """Plot bandwidth against problem size, one line per provider and one panel per group.

    Parameters
    ----------
    rows : iterable of mapping
        Result rows (dicts from the bench or strings from :func:`read_results`); rows without a
        numeric ``y_col`` (skipped or failed cells) are left out.
    path : str or path-like
        PNG file to write; parent folders are created.
    x_col, y_col, series_col : str, optional
        Columns for the x axis (log2 scale), the y axis and the line grouping.
    panel_cols : sequence of str, optional
        Columns whose distinct values make one panel each, e.g. (mode, dtype, shape family).
    ceiling_col : str, optional
        Column with the copy ceiling measured in the same run, drawn as a dashed line.
    title : str, optional
        Figure title (e.g. the device).

    Returns
    -------
    pathlib.Path
        The PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        if as_float(row.get(y_col)) is not None and as_float(row.get(x_col)) is not None:
            panels.setdefault(tuple(str(row.get(c, "")) for c in panel_cols), []).append(row)
    n = max(len(panels), 1)
    ncols = min(n, 4)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (key, panel_rows) in zip(axes.flat, panels.items(), strict=False):
        series: dict[str, list[tuple[float, float]]] = {}
        for row in panel_rows:
            series.setdefault(str(row[series_col]), []).append((as_float(row[x_col]), as_float(row[y_col])))
        for name, points in series.items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ceilings = [c for c in (as_float(r.get(ceiling_col)) for r in panel_rows) if c is not None]
        if ceilings:
            ax.axhline(max(ceilings), linestyle="--", color="black", linewidth=1, label="copy ceiling")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_col)
        ax.set_ylabel("GB/s" if y_col == "gbs" else y_col)
        ax.set_title(" / ".join(key), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no timed rows", ha="center", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


Column = tuple[str, str] | tuple[str, str, str]
# Table columns of every benchmark: which cell, its timing quantiles, its check against the reference.
CELL_COLUMNS: tuple[Column, ...] = (
    ("family", "family"),
    ("tokens", "tokens", "d"),
    ("dtype", "dtype"),
    ("mode", "mode"),
    ("provider", "provider"),
)
TIMING_COLUMNS: tuple[Column, ...] = (
    ("median_ms", "median ms", ".4f"),
    ("p20_ms", "p20", ".4f"),
    ("p80_ms", "p80", ".4f"),
)
CHECK_COLUMNS: tuple[Column, ...] = (("parity", "parity", ".1e"), ("status", "status"))


def _cell(value: Any, spec: str) -> str:
    if value is None or value == "":
        return "-"
    number = as_float(value) if spec else None
    if number is None:
        return str(value)
    return format(int(number) if spec.endswith("d") else number, spec)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, markdown: bool = False) -> str:
    """Format rows as an aligned plain-text or markdown table.

    Parameters
    ----------
    rows : sequence of mapping
        The rows; a missing or empty value prints as ``-``.
    columns : sequence of tuple
        ``(key, header)`` or ``(key, header, format_spec)``; the spec (e.g. ``".3f"``) applies to values
        that parse as numbers, which are also right-aligned.
    markdown : bool, optional
        Emit a GitHub markdown table instead of space-aligned text.

    Returns
    -------
    str
        The table, without a trailing newline.
    """
    specs = [(col[0], col[1], col[2] if len(col) > 2 else "") for col in columns]
    cells = [[_cell(row.get(key), spec) for key, _, spec in specs] for row in rows]
    right = [bool(spec) for _, _, spec in specs]
    widths = [max([len(header)] + [len(r[i]) for r in cells]) for i, (_, header, _) in enumerate(specs)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return "| " + " | ".join(padded) + " |" if markdown else "  ".join(padded).rstrip()

    out = [line([header for _, header, _ in specs])]
    if markdown:
        out.append(
            "| "
            + " | ".join(("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right, strict=True))
            + " |"
        )
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def readme_table(
    csv_path: str | os.PathLike[str],
    *,
    primary: str = "pi_kernels",
    group_cols: Sequence[str] = ("family", "mode", "dtype"),
    x_col: str = "tokens",
    value_col: str = "gbs",
    series_col: str = "provider",
    largest_only: bool = True,
) -> str:
    """Summarize a results CSV as the markdown table for the README.

    One line per group (and per ``x_col`` value, or only its largest when ``largest_only``), one column
    of ``value_col`` (GB/s) per provider with ``primary`` first, then the primary's fraction of the copy
    ceiling and its speed relative to the fastest other provider. Each cell uses the latest run that
    measured it (see :func:`latest_rows`); a cell that was not timed shows its status.

    Parameters
    ----------
    csv_path : str or path-like
        File written by :func:`append_results`.
    primary : str, optional
        Provider the target columns refer to.
    group_cols, x_col, value_col, series_col : optional
        Column names, matching the rows the bench wrote.
    largest_only : bool, optional
        Keep only the largest ``x_col`` value of each group.

    Returns
    -------
    str
        Markdown table.
    """
    rows = latest_rows(read_results(csv_path), [*group_cols, x_col, series_col])
    providers = [primary] if any(r.get(series_col) == primary for r in rows) else []
    providers += list(dict.fromkeys(str(r[series_col]) for r in rows if r.get(series_col) != primary))
    groups: dict[tuple[str, ...], dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(c, "")) for c in (*group_cols, x_col)), {})[str(row[series_col])] = row
    if largest_only:
        largest: dict[tuple[str, ...], float] = {}
        for key in groups:
            largest[key[:-1]] = max(largest.get(key[:-1], float("-inf")), as_float(key[-1]) or 0.0)
        groups = {k: v for k, v in groups.items() if (as_float(k[-1]) or 0.0) == largest[k[:-1]]}
    table_rows = []
    # Groups in the order the bench ran them; sizes ascending within a group.
    order = {key: i for i, key in enumerate(dict.fromkeys(k[:-1] for k in groups))}
    for key in sorted(groups, key=lambda k: (order[k[:-1]], as_float(k[-1]) or 0.0)):
        by_provider = groups[key]
        line: dict[str, Any] = dict(zip((*group_cols, x_col), key, strict=True))
        for name in providers:
            row = by_provider.get(name)
            value = as_float(row.get(value_col)) if row else None
            if value is not None:
                line[name] = f"{value:.0f}" if value >= 10 else f"{value:.2g}"
            else:
                line[name] = (row.get("status") if row else None) or "-"
        main = by_provider.get(primary, {})
        frac, ratio = as_float(main.get("frac_ceiling")), as_float(main.get("vs_best_other"))
        line["frac"] = f"{frac:.0%}" if frac is not None else "-"
        line["ratio"] = f"{ratio:.2f}x ({main.get('best_other')})" if ratio is not None else "-"
        table_rows.append(line)
    columns: list[Column] = [(c, c) for c in (*group_cols, x_col)]
    columns += [(name, f"{name} GB/s") for name in providers]
    columns += [("frac", f"{primary} / copy"), ("ratio", f"{primary} vs best other")]
    return format_table(table_rows, columns, markdown=True)


# ---- the runner every benchmark script shares ----


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


def csv_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``choices``."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {text!r})")
        return items

    return parse


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"positive integers expected, got {text!r}")
    return values


def bench_parser(
    module: str,
    doc: str,
    *,
    providers: Sequence[str] | None,
    families: Sequence[str],
    dtypes: Sequence[str],
    dtype_default: Sequence[str] | None,
    modes: Sequence[str] | None = MODES,
    sizes: bool = True,
) -> argparse.ArgumentParser:
    """The options every benchmark script takes; a script adds its own to the parser returned.

    Parameters
    ----------
    module : str
        The script's module, e.g. ``"benchmarks.bench_rotary"`` (the usage line).
    doc : str
        The script's docstring; its first line is the description.
    providers, families, dtypes, modes : sequence of str
        The names ``--providers``, ``--families``, ``--dtypes`` and ``--modes`` accept (``providers`` or ``modes``
        None: the script has no such choice, and no option).
    dtype_default : sequence of str or None
        ``--dtypes`` when not given (None: the script decides).
    sizes : bool, optional
        Whether the script takes ``--tokens`` (sizes replacing each family's sweep).

    Returns
    -------
    argparse.ArgumentParser
        With ``--quick``, ``--out``, ``--dtypes``, ``--families`` and, as asked, ``--providers``, ``--modes`` and
        ``--tokens``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="GPU: fewer sizes, shorter timing (CPU is always quick)")
    parser.add_argument(
        "--out", metavar="DIR", help="results root (default: benchmarks/results on a GPU; nothing written on CPU)"
    )
    if providers is not None:
        parser.add_argument("--providers", type=csv_choices(list(providers)), help=f"subset of {','.join(providers)}")
    if modes is not None:
        parser.add_argument(
            "--modes", type=csv_choices(modes), default=list(modes), help="subset of " + ",".join(modes)
        )
    parser.add_argument(
        "--dtypes",
        type=csv_choices(list(dtypes)),
        default=None if dtype_default is None else list(dtype_default),
        help=f"subset of {','.join(dtypes)}" + (f" (default {','.join(dtype_default)})" if dtype_default else ""),
    )
    parser.add_argument("--families", type=csv_choices(list(families)), help="shape families (default: all here)")
    if sizes:
        parser.add_argument("--tokens", type=positive_ints, help="sizes replacing each family's sweep, e.g. 4096,16384")
    return parser


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
    budget : Budget
        Timing parameters of every cell.
    families : list
        The shape families to run (the script's own dataclass), filtered by ``--families``.
    env : dict of str to str
        :func:`environment`, stamped on every row.
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
    budget: Budget
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
    cpu_budget: Budget,
    cpu_timing_families: Sequence[Any] | None = None,
) -> BenchRun:
    """Choose the device, the budget and the families, and print the run's header.

    Without a GPU this sets ``TRITON_INTERPRET=1``, which must happen before ``pi_kernels`` defines its kernels:
    scripts import it lazily, in their providers' builders. If the script gives ``cpu_timing_families`` and the
    caller did not set ``TRITON_INTERPRET``, the run is a CPU timing (:data:`CPU_TIMING_LINE`: one thread,
    :data:`CPU_TIMING_BUDGET`, those families); otherwise an interpreter check (:data:`NO_GPU_LINE`, ``cpu_budget``,
    ``cpu_families``).

    Raises
    ------
    SystemExit
        When no family of this device matches ``--families``.
    """
    on_gpu = torch.cuda.is_available() and not interpreter_mode()
    cpu_timing = not on_gpu and not interpreter_mode() and cpu_timing_families is not None
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
    env = environment()
    if cpu_timing:
        env["device"] = f"{platform.processor() or platform.machine()} CPU, {CPU_THREADS} thread(s)"
    out_root = args.out or (RESULTS_ROOT if on_gpu else None)
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
        budget=(GPU_QUICK_BUDGET if args.quick else GPU_BUDGET) if on_gpu else (
            CPU_TIMING_BUDGET if cpu_timing else cpu_budget),
        families=families,
        env=env,
        folder=None if out_root is None else results_dir(env, out_root),
        started=time.perf_counter(),
    )


def check_then_time(
    row: dict[str, Any],
    *,
    check: Callable[[], float | None] | None,
    tol: float,
    make_call: Callable[[], tuple[Callable[[], Any], Sequence[torch.Tensor] | None]] | None,
    budget: Budget,
    after: Callable[[Callable[[], Any]], None] | None = None,
) -> Timing | None:
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
    budget : Budget
        Passed to :func:`measure`.
    after : callable, optional
        Called with the timed callable after timing (e.g. to measure its peak memory), inside the error handling.

    Returns
    -------
    Timing or None
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
        timing = measure(
            fn, warmup_ms=budget.warmup_ms, rep_ms=budget.rep_ms, grad_to_none=grads, min_reps=budget.min_reps
        )
        if after is not None:
            after(fn)
    except Exception as exc:  # noqa: BLE001 - a provider's failure (compile error, OOM, ...) is a result
        row.update(status="error", note=short_error(exc))
        return None
    row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)
    return timing


def print_problems(rows: Sequence[Mapping[str, Any]]) -> None:
    """Print why cells were not timed, once per distinct (provider, mode, status, reason)."""
    first: dict[tuple[str, ...], Any] = {}
    for r in rows:
        if r["status"] != "ok":
            first.setdefault((r["provider"], r["mode"], r["status"], r["note"]), r["tokens"])
    for (provider, mode, status, note), tokens in first.items():
        print(f"  {provider} {mode}: {status} from {tokens} tokens: {note}", flush=True)


def save_rows(run: BenchRun, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append a measured group to ``<folder>/<name>.csv`` at once, so a run cut short keeps what finished."""
    if run.folder is not None and rows:
        append_results(run.folder / f"{run.name}.csv", rows, run.env)


def report_group(run: BenchRun, rows: Sequence[Mapping[str, Any]], title: str | None,
                 columns: Sequence[Column]) -> None:
    """Save a measured group (:func:`save_rows`), then print its title, its table and why cells were not timed."""
    save_rows(run, rows)
    if title is not None:
        print(f"\n{title}:", flush=True)
    print(format_table(rows, columns), flush=True)
    print_problems(rows)


def largest_rows(rows: Iterable[Mapping[str, Any]], group_cols: Sequence[str]) -> list[Mapping[str, Any]]:
    """Keep, in each group of ``group_cols``, the rows of its largest ``tokens``."""
    rows = list(rows)
    largest: dict[tuple[str, ...], float] = {}
    for row in rows:
        key = tuple(str(row.get(c, "")) for c in group_cols)
        largest[key] = max(largest.get(key, 0.0), as_float(row["tokens"]) or 0.0)
    return [r for r in rows if (as_float(r["tokens"]) or 0.0) == largest[tuple(str(r.get(c, "")) for c in group_cols)]]


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
        write_json(
            run.folder / f"{run.name}-{stamp}.json",
            {"environment": run.env, "args": vars(args), "seconds": seconds, "rows": len(rows), **(extra or {})},
        )
        latest = latest_rows(read_results(csv_path), key_cols)
        written = [csv_path]
        if plot is not None:
            stamp_line = (f"torch {run.env['torch']}, triton {run.env['triton']}, commit {run.env['commit'] or '-'}, "
                          f"{run.env['date']}")
            plot = {**plot, "title": f"{plot.get('title', run.op)}\n{stamp_line}"}
            written.append(plot_bandwidth(latest, run.folder / f"{run.name}.png", **plot))
        table = summary(csv_path, latest)
        (run.folder / f"{run.name}-summary.md").write_text(table + "\n")
        written.append(run.folder / f"{run.name}-summary.md")
        print(f"\nwrote {', '.join(str(p) for p in written)}:\n{table}", flush=True)
    print(f"done in {time.perf_counter() - run.started:.1f} s", flush=True)
