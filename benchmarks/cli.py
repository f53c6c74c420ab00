"""The command line every benchmark script takes (:func:`bench_parser`), its argparse types, and the sizes it selects
(:func:`sweep`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

# What --modes and --dtypes choose from (a script may offer a subset).
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    providers: Collection[str] | None,
    families: Sequence[Any],
    dtypes: Collection[str],
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
    providers, dtypes, modes : collection of str
        The names ``--providers``, ``--dtypes`` and ``--modes`` accept, e.g. the keys of the script's ``PROVIDERS``
        and ``DTYPES`` (``providers`` or ``modes`` None: the script has no such choice, and no option).
    families : sequence
        The script's shape families, GPU and CPU; ``--families`` accepts their ``name``.
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
    parser.add_argument(
        "--families", type=csv_choices([f.name for f in families]), help="shape families (default: all here)"
    )
    if sizes:
        parser.add_argument("--tokens", type=positive_ints, help="sizes replacing each family's sweep, e.g. 4096,16384")
    return parser


def sweep(args: argparse.Namespace, full: Sequence[int], quick: Sequence[int]) -> Sequence[int]:
    """The sizes a shape family runs: ``--tokens`` when given, else its ``quick`` sweep under ``--quick``, else
    its ``full`` one."""
    return args.tokens or (quick if args.quick else full)
