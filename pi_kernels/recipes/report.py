"""Reports of the Position Interpolation recipe: markdown tables, findings stated with the run's numbers, plots."""

__all__ = ["findings", "format_tables", "write_plots"]


def _perplexity_cell(cell):
    if cell is None:
        return "-"
    value, low, high = cell["value"], cell["low"], cell["high"]
    if value >= 1000:
        return f"{value:.2e}"
    return f"{value:.3g} [{low:.3g}, {high:.3g}]"


def _passkey_cell(cell):
    return "-" if cell is None else f"{100 * cell:.0f}%"


def format_tables(results):
    """The perplexity and passkey tables in the paper's shape (rows: method and window; columns: eval context)."""
    contexts = results["eval_contexts"]
    tables = []
    for field, title, cell in () if not results["rows"] else (
            ("perplexity", "Perplexity on held-out documents, 95% bootstrap interval over documents (lower is "
                           "better)", _perplexity_cell),
            ("passkey_accuracy", "Passkey retrieval accuracy (chance: 0%)", _passkey_cell)):
        header = ["Context window", "Method", "FT steps", *[str(c) for c in contexts]]
        lines = [f"**{title}**, by evaluation context", "",
                 "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for row in results["rows"]:
            values = [cell(row[field].get(str(c))) for c in contexts]
            lines.append("| " + " | ".join([str(row["context_window"]), row["method"], str(row["finetune_steps"]),
                                            *values]) + " |")
        tables.append("\n".join(lines))
    probe = results.get("probe")
    if probe:
        edges = [f"{part['from']}-{part['to']}" for part in probe["rows"][0]["positions"]]
        lines = [f"**{probe['model']}, no fine-tuning: perplexity by token position in {probe['windows']} "
                 f"window(s) of {probe['window']} tokens** (trained context {probe['context']})", "",
                 "| Method | " + " | ".join(edges) + " |", "|" + "|".join(["---"] * (len(edges) + 1)) + "|"]
        for row in probe["rows"]:
            lines.append(f"| {row['method']} | " + " | ".join(f"{part['value']:.3g}" for part in row["positions"])
                         + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _interval(cell):
    return f"{cell['value']:.3g} [{cell['low']:.3g}, {cell['high']:.3g}]"


def findings(results):
    """The comparisons the paper makes, stated with this run's numbers whatever they show."""
    by_key = {row["key"]: row for row in results["rows"]}
    length = results["context"]
    base = by_key["base"]
    lines = []
    for factor in results["config"]["factors"]:
        extended = str(factor * length)
        at = {key: row["perplexity"].get(extended) for key, row in by_key.items()}
        if f"pi_ft_{factor}" in by_key and f"direct_ft_{factor}" in by_key:
            pi_ft, direct = at[f"pi_ft_{factor}"], at[f"direct_ft_{factor}"]
            if pi_ft["low"] <= direct["high"] and direct["low"] <= pi_ft["high"]:
                verdict = "the intervals overlap"
            else:
                verdict = "PI + FT is lower" if pi_ft["value"] < direct["value"] else "FT without PI is lower"
            lines.append(f"L'={extended}: PI + FT {_interval(pi_ft)} vs FT without PI {_interval(direct)} at "
                         f"{extended}: {verdict}.")
            change = by_key[f"pi_ft_{factor}"]["perplexity"][str(length)]["value"] / base["perplexity"][
                str(length)]["value"] - 1
            lines.append(f"L'={extended}: at the original window {length}, PI + FT is {100 * change:+.1f}% vs the "
                         f"base model.")
        no_ft = [(by_key[key]["method"], at[key]) for key in (f"pi_{factor}", f"ntk_{factor}", f"yarn_{factor}")
                 if key in by_key]
        lines.append(f"L'={extended} without fine-tuning, at {extended}: extrapolation {_interval(at['base'])}; "
                     + "; ".join(f"{method} {_interval(cell)}" for method, cell in no_ft) + ".")
        tuned = [(by_key[key]["method"], at[key]) for key in (f"ntk_ft_{factor}", f"yarn_ft_{factor}")
                 if key in by_key]
        if tuned:
            lines.append(f"L'={extended} after the same fine-tune, at {extended}: "
                         + "; ".join(f"{method} {_interval(cell)}" for method, cell in tuned) + ".")
        passkey = [f"{row['method']} {100 * row['passkey_accuracy'][extended]:.0f}%" for row in results["rows"]
                   if row["key"] == "base" or row["key"].endswith(f"_{factor}")]
        lines.append(f"L'={extended}: passkey accuracy at {extended}: " + ", ".join(passkey) + ".")
    return lines


def write_plots(results, out):
    """perplexity.png and passkey.png (one line per row, against the evaluation context), probe.png (by position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = results["eval_contexts"]
    paths = []
    for name, field, ylabel in () if not results["rows"] else (
            ("perplexity", "perplexity", "perplexity (log scale), 95% interval"),
                                ("passkey", "passkey_accuracy", "passkey accuracy")):
        figure, axis = plt.subplots(figsize=(8, 5))
        for row in results["rows"]:
            label = f"{row['method']} (window {row['context_window']})"
            style = "-" if row["finetune_steps"] else "--"
            if field == "perplexity":
                cells = [row[field][str(c)] for c in contexts]
                values = [cell["value"] for cell in cells]
                errors = [[v - cell["low"] for v, cell in zip(values, cells, strict=True)],
                          [cell["high"] - v for v, cell in zip(values, cells, strict=True)]]
                axis.errorbar(contexts, values, yerr=errors, marker="o", linestyle=style, capsize=2, label=label)
            else:
                axis.plot(contexts, [row[field][str(c)] for c in contexts], marker="o", linestyle=style, label=label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [str(c) for c in contexts])
        if name == "perplexity":
            axis.set_yscale("log")
        axis.set_xlabel("evaluation context (tokens)")
        axis.set_ylabel(ylabel)
        axis.set_title(f"{name}: {results['model']}, L={results['context']}"
                       + (" (SMOKE: meaningless)" if results["preset"] == "smoke" else ""))
        axis.legend(fontsize=6, ncol=2)
        figure.tight_layout()
        path = out / f"{name}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    probe = results.get("probe")
    if probe:
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for row in probe["rows"]:
            parts = row["positions"]
            axis.step([part["from"] for part in parts] + [parts[-1]["to"]],
                      [part["value"] for part in parts] + [parts[-1]["value"]], where="post", label=row["method"])
        axis.axvline(probe["context"], color="grey", linestyle=":", label=f"trained context {probe['context']}")
        axis.set_yscale("log")
        axis.set_xlabel("token position in the window")
        axis.set_ylabel("perplexity (log scale)")
        axis.set_title(f"{probe['model']}, no fine-tuning")
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = out / "probe.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths
