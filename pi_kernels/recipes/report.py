"""Reports of the Position Interpolation recipe: the summary of every seed, markdown tables, findings, plots.

Every figure comes from :func:`summarize`'s records, one per (method, window, fine-tuning steps, evaluation context,
seed). Across seeds a cell shows the mean and the [min, max] of the seeds; a comparison is called a difference only
where every seed agrees on its sign.
"""

import statistics

__all__ = ["EFFECTIVE_PASSKEY", "effective_window", "findings", "format_tables", "summarize", "write_plots"]

# A context is usable when passkey retrieval reaches this share at every depth (and at every shorter context).
EFFECTIVE_PASSKEY = 0.9


def effective_window(passkey_by_context):
    """The longest evaluated context up to which retrieval is >= EFFECTIVE_PASSKEY at every depth (0 if none).

    ``passkey_by_context``: ``{context: {"by_depth": {depth: share}}}`` (contexts as ints or strings).
    """
    window = 0
    for context in sorted(passkey_by_context, key=int):
        if min(passkey_by_context[context]["by_depth"].values()) < EFFECTIVE_PASSKEY:
            break
        window = int(context)
    return window


def summarize(seeds, probe, *, header):
    """The run in one JSON-ready dict.

    Parameters
    ----------
    seeds : dict
        ``{seed: results}``, each the ``results.json`` of one training seed (may be empty: a probe alone).
    probe : dict or None
        The probe's ``results.json``.
    header : dict
        The run's description (environment, corpus, ...).

    Returns
    -------
    dict
        ``records`` (``method``, ``label``, ``window`` (L'), ``ft_steps``, ``context``, ``seed``, ``passkey`` (0-1),
        ``passkey_by_depth``, ``passkey_trials``, ``perplexity``, ``perplexity_interval``), ``effective_windows``
        (per method, window, steps and seed), ``base_passkey_at_L`` (mean over seeds) and its per-seed detail,
        ``smollm2`` (the probe), ``commands`` and measured ``seconds``.
    """
    records, windows, base, commands, seconds = [], [], {}, [], {}
    context = None
    for seed, results in sorted(seeds.items()):
        context = results["context"]
        commands += [results["command"], *results.get("resumed_with", [])]
        seconds[f"seed {seed}"] = results["seconds"]
        for row in results["rows"]:
            for step, evaluation in sorted(row["evaluations"].items(), key=lambda item: int(item[0])):
                key = {"method": row["scaling"], "label": row["method"], "window": row["context_window"],
                       "ft_steps": int(step)}
                for at, cell in evaluation["perplexity"].items():
                    passkey = evaluation["passkey"][at]
                    records.append({**key, "context": int(at), "seed": seed, "passkey": passkey["accuracy"],
                                    "passkey_by_depth": passkey["by_depth"], "passkey_trials": passkey["trials"],
                                    "perplexity": cell["value"], "perplexity_interval": [cell["low"], cell["high"]]})
                windows.append({**key, "seed": seed, "effective_window": effective_window(evaluation["passkey"])})
                if row["key"] == "base":
                    base[seed] = evaluation["passkey"][str(context)]
    summary = {**header, "context": context, "seeds": sorted(seeds), "commands": commands, "seconds": seconds,
               "effective_passkey": EFFECTIVE_PASSKEY,
               "base_passkey_at_L": statistics.fmean(cell["accuracy"] for cell in base.values()) if base else None,
               "base_passkey_at_L_by_seed": {str(seed): {"accuracy": cell["accuracy"], "by_depth": cell["by_depth"]}
                                             for seed, cell in base.items()},
               "records": records, "effective_windows": windows}
    if probe is not None:
        commands += [probe["command"], *probe.get("resumed_with", [])]
        seconds["SmolLM2 probe"] = probe["seconds"]
        summary["smollm2"] = probe["probe"]
    summary["commands"] = list(dict.fromkeys(commands))  # seeds run together share their commands
    return summary


# ---------------------------------------------------------------------------------------------------- aggregation

def _by_seed(records, **where):
    """{seed: record} of the records matching ``where``."""
    return {record["seed"]: record for record in records if all(record[k] == v for k, v in where.items())}


def _spread(values, digits):
    """Mean [min, max] over seeds (a single seed: its value)."""
    if not values:
        return "-"
    fmt = f"{{:.{digits}g}}" if digits else "{:.0f}"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def _percent(values):
    """Shares as percentages: mean [min, max] over seeds (a single seed: its value)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.0f}%"
    return f"{100 * statistics.fmean(values):.0f}% [{100 * min(values):.0f}%, {100 * max(values):.0f}%]"


def _curves(summary):
    """(window, method) -> the sorted fine-tuning steps evaluated."""
    curves = {}
    for record in summary["records"]:
        if record["window"] != summary["context"]:
            curves.setdefault((record["window"], record["method"]), set()).add(record["ft_steps"])
    return {key: sorted(steps) for key, steps in sorted(curves.items())}


def _labels(summary):
    return {record["method"]: record["label"] for record in summary["records"]}


# ----------------------------------------------------------------------------------------------------------- tables

def _table(title, header, lines):
    return "\n".join([f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header))
                      + "|", *("| " + " | ".join(line) + " |" for line in lines)])


def _base_table(summary):
    length = summary["context"]
    depths = list(next(iter(summary["base_passkey_at_L_by_seed"].values()))["by_depth"])
    lines = []
    for seed, cell in summary["base_passkey_at_L_by_seed"].items():
        perplexity = _by_seed(summary["records"], method="extrapolation", window=length, ft_steps=0,
                              context=length)[int(seed)]["perplexity"]
        lines.append([seed, f"{100 * cell['accuracy']:.0f}%", *(f"{100 * cell['by_depth'][d]:.0f}%" for d in depths),
                      f"{perplexity:.3g}"])
    return _table(f"The base model at its own context L = {length}: passkey retrieval by depth of the key "
                  f"(0 start, 1 end) and perplexity", ["Seed", "Passkey", *(f"depth {d}" for d in depths),
                                                       "Perplexity"], lines)


def _curve_tables(summary):
    labels, curves, tables = _labels(summary), _curves(summary), []
    windows = sorted({window for window, _ in curves})
    length = summary["context"]
    for window in windows:
        steps = sorted({step for (w, _), s in curves.items() if w == window for step in s})
        for what, title in (("passkey", f"passkey retrieval at L' = {window}"),
                            ("effective_window", f"effective window (longest context with >= "
                                                 f"{100 * summary['effective_passkey']:.0f}% passkey at every depth)"),
                            ("perplexity", f"perplexity at L' = {window}"),
                            ("perplexity_at_L", f"perplexity at L = {length}")):
            lines = []
            for (w, method), _ in curves.items():
                if w != window:
                    continue
                cells = []
                for step in steps:
                    if what == "effective_window":  # a few discrete values: each seed's, in seed order
                        values = [record["effective_window"] for record in sorted(
                            summary["effective_windows"], key=lambda record: record["seed"])
                                  if record["window"] == window and record["method"] == method
                                  and record["ft_steps"] == step]
                        cells.append(" / ".join(map(str, values)))
                        continue
                    at = length if what == "perplexity_at_L" else window
                    values = [record["passkey" if what == "passkey" else "perplexity"] for record in
                              _by_seed(summary["records"], method=method, window=window, ft_steps=step,
                                       context=at).values()]
                    cells.append(_percent(values) if what == "passkey" else _spread(values, 3))
                lines.append([labels[method], *cells])
            seeds = summary["seeds"]
            spread = ("seeds " + " / ".join(map(str, seeds)) if what == "effective_window" else
                      f"mean [min, max] over {len(seeds)} seeds")
            tables.append(_table(f"L' = {window}: {title}, by fine-tuning steps ({spread})" if len(seeds) > 1 else
                                 f"L' = {window}: {title}, by fine-tuning steps",
                                 ["Method", *(f"{step} steps" for step in steps)], lines))
    return tables


def _probe_tables(probe):
    tables = []
    if probe.get("passkey"):
        contexts = sorted({cell["context"] for cell in probe["passkey"]})
        methods = list(dict.fromkeys(cell["method"] for cell in probe["passkey"]))
        by = {(cell["method"], cell["context"]): cell for cell in probe["passkey"]}
        lines = [[method, *(f"{100 * by[method, c]['accuracy']:.0f}% of {by[method, c]['trials']}"
                            if (method, c) in by else "-" for c in contexts)] for method in methods]
        tables.append(_table(f"{probe['model']}, no fine-tuning: passkey retrieval (the paper's prompt) by context "
                             f"(trained context {probe['context']}; scaling methods at factor {probe['factor']:g})",
                             ["Method", *map(str, contexts)], lines))
        depths = probe["depths"]
        lines = [[method, str(c), *(f"{100 * by[method, c]['by_depth'][str(d)]:.0f}%" for d in depths)]
                 for method in methods for c in contexts if (method, c) in by]
        tables.append(_table(f"{probe['model']}: passkey retrieval by depth of the key (0 start, 1 end), "
                             f"{probe['passkey'][0]['trials'] // len(depths)} documents per depth",
                             ["Method", "Context", *(f"depth {d}" for d in depths)], lines))
    if probe.get("rows"):
        edges = [f"{part['from']}-{part['to']}" for part in probe["rows"][0]["positions"]]
        lines = [[row["method"], *(f"{part['value']:.3g}" for part in row["positions"])] for row in probe["rows"]]
        tables.append(_table(f"{probe['model']}, no fine-tuning: perplexity by token position in {probe['windows']} "
                             f"window(s) of {probe['window']} tokens (trained context {probe['context']})",
                             ["Method", *edges], lines))
    return tables


def format_tables(summary):
    """The base model's retrieval, the paper's two curves per L' (and the effective window), the probe."""
    tables = []
    if summary["records"]:
        tables += [_base_table(summary), *_curve_tables(summary)]
    if summary.get("smollm2"):
        tables += _probe_tables(summary["smollm2"])
    return "\n\n".join(tables)


# --------------------------------------------------------------------------------------------------------- findings

def _compare(summary, a, b, *, window, step, field, context):
    """``a``'s values against ``b``'s, seed by seed: 'higher in every seed', 'lower in every seed', 'equal in every
    seed' or 'no consistent difference' (ties or opposite signs); with one seed the verdict says so."""
    left = _by_seed(summary["records"], method=a, window=window, ft_steps=step, context=context)
    right = _by_seed(summary["records"], method=b, window=window, ft_steps=step, context=context)
    seeds = [seed for seed in left if seed in right]
    signs = {(left[s][field] > right[s][field]) - (left[s][field] < right[s][field]) for s in seeds}
    scope = "in every seed" if len(seeds) > 1 else "(one seed)"
    if len(signs) == 1:
        return f"{({1: 'higher', -1: 'lower', 0: 'equal'})[signs.pop()]} {scope}"
    return "no consistent difference across seeds"


def findings(summary):
    """The paper's comparisons, stated with this run's numbers whatever they show: each method against no scaling
    (direct fine-tuning) at L' after the same steps, passkey and perplexity, with the verdict of the seeds."""
    if not summary["records"]:
        return []
    labels, curves = _labels(summary), _curves(summary)
    lowest = min(min(cell["by_depth"].values()) for cell in summary["base_passkey_at_L_by_seed"].values())
    lines = [f"Base model at L = {summary['context']}: passkey {100 * summary['base_passkey_at_L']:.0f}% (mean over "
             f"seeds; lowest depth in any seed {100 * lowest:.0f}%)."]
    for (window, method), steps in curves.items():
        if method == "extrapolation" or (window, "extrapolation") not in curves:
            continue
        for step in steps:
            parts = []
            for field, shown in (("passkey", _percent), ("perplexity", lambda values: _spread(values, 3))):
                ours, theirs = ([record[field] for record in _by_seed(summary["records"], method=m, window=window,
                                                                      ft_steps=step, context=window).values()]
                                for m in (method, "extrapolation"))
                verdict = _compare(summary, method, "extrapolation", window=window, step=step, field=field,
                                   context=window)
                parts.append(f"{field} {shown(ours)} vs {shown(theirs)}: {verdict}")
            lines.append(f"L' = {window}, {step} steps, {labels[method]} vs no scaling at {window}: "
                         + "; ".join(parts) + ".")
    return lines


# ------------------------------------------------------------------------------------------------------------ plots

def write_plots(summary, out):
    """curves.png (passkey, effective window and perplexity against fine-tuning steps, a band over seeds) and, with a
    probe, probe.png (SmolLM2: passkey by context, perplexity by position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    curves = _curves(summary) if summary["records"] else {}
    labels = _labels(summary)
    windows = sorted({window for window, _ in curves})
    smoke = summary.get("preset") == "smoke" or "SMOKE" in summary.get("note", "")
    if windows:
        figure, axes = plt.subplots(3, len(windows), figsize=(5.5 * len(windows), 11), squeeze=False)
        for column, window in enumerate(windows):
            for (w, method), steps in curves.items():
                if w != window:
                    continue
                x = [max(step, 1) for step in steps]  # step 0 drawn at 1 on the log axis
                for row, (field, source) in enumerate((("passkey", "records"), ("effective_window",
                                                                                "effective_windows"),
                                                       ("perplexity", "records"))):
                    series = []
                    for step in steps:
                        values = [record[field] for record in summary[source]
                                  if record["method"] == method and record["window"] == window
                                  and record["ft_steps"] == step and record.get("context", window) == window]
                        series.append(values)
                    mean = [statistics.fmean(values) for values in series]
                    axis = axes[row][column]
                    line, = axis.plot(x, mean, marker="o", label=labels[method])
                    axis.fill_between(x, [min(v) for v in series], [max(v) for v in series], alpha=0.2,
                                      color=line.get_color())
            for row, ylabel in enumerate((f"passkey at {window}", f"effective window (>= "
                                          f"{100 * summary['effective_passkey']:.0f}% every depth)",
                                          f"perplexity at {window}")):
                axis = axes[row][column]
                axis.set_xscale("log")
                axis.set_xlabel("fine-tuning steps (0 drawn at 1)")
                axis.set_ylabel(ylabel)
                axis.set_title(f"L' = {window} (L = {summary['context']})" + (" SMOKE" if smoke else ""))
                if row == 2:
                    axis.set_yscale("log")
            axes[0][column].legend(fontsize=7)
        figure.suptitle(f"{summary['model']}: mean and min-max band over seeds {summary['seeds']}")
        figure.tight_layout()
        path = out / "curves.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    probe = summary.get("smollm2")
    if probe and (probe.get("passkey") or probe.get("rows")):
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        methods = list(dict.fromkeys(cell["method"] for cell in probe.get("passkey", [])))
        for method in methods:
            cells = sorted((cell for cell in probe["passkey"] if cell["method"] == method), key=lambda c: c["context"])
            axes[0].plot([cell["context"] for cell in cells], [cell["accuracy"] for cell in cells], marker="o",
                         label=method)
        axes[0].axvline(probe["context"], color="grey", linestyle=":")
        axes[0].set_xlabel("context (tokens)")
        axes[0].set_ylabel("passkey accuracy")
        axes[0].set_title(f"{probe['model']}, no fine-tuning: passkey")
        axes[0].legend(fontsize=7)
        for row in probe.get("rows", []):
            parts = row["positions"]
            axes[1].step([part["from"] for part in parts] + [parts[-1]["to"]],
                         [part["value"] for part in parts] + [parts[-1]["value"]], where="post", label=row["method"])
        axes[1].axvline(probe["context"], color="grey", linestyle=":", label=f"trained context {probe['context']}")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("token position in the window")
        axes[1].set_ylabel("perplexity (log scale)")
        axes[1].set_title(f"{probe['model']}: perplexity by position, {probe['windows']} window(s)")
        axes[1].legend(fontsize=7)
        figure.tight_layout()
        path = out / "probe.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths
