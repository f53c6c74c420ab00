"""How results read: aligned or markdown tables (:func:`format_table`, :func:`readme_table`), the bandwidth plot
(:func:`plot_bandwidth`), the columns every benchmark's table shares, and what a run prints about cells it did not
time (:func:`print_problems`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    from benchmarks.results_io import as_float, latest_rows, read_results
except ImportError:  # run as a script: this folder, not the repository root, is on sys.path
    from results_io import as_float, latest_rows, read_results

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


def largest_rows(rows: Iterable[Mapping[str, Any]], group_cols: Sequence[str]) -> list[Mapping[str, Any]]:
    """Keep, in each group of ``group_cols``, the rows of its largest ``tokens``."""
    rows = list(rows)
    largest: dict[tuple[str, ...], float] = {}
    for row in rows:
        key = tuple(str(row.get(c, "")) for c in group_cols)
        largest[key] = max(largest.get(key, 0.0), as_float(row["tokens"]) or 0.0)
    return [r for r in rows if (as_float(r["tokens"]) or 0.0) == largest[tuple(str(r.get(c, "")) for c in group_cols)]]


def print_problems(rows: Sequence[Mapping[str, Any]]) -> None:
    """Print why cells were not timed, once per distinct (provider, mode, status, reason)."""
    first: dict[tuple[str, ...], Any] = {}
    for r in rows:
        if r["status"] != "ok":
            first.setdefault((r["provider"], r["mode"], r["status"], r["note"]), r["tokens"])
    for (provider, mode, status, note), tokens in first.items():
        print(f"  {provider} {mode}: {status} from {tokens} tokens: {note}", flush=True)
