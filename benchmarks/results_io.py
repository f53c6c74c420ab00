"""Where results come from and where they go: :func:`environment` stamps every row, :func:`append_results` and
:func:`read_results` keep them in ``benchmarks/results/<device slug>/<name>.csv``, :func:`write_json` the run
summaries, :func:`latest_rows` reads a sweep split over several runs as one.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks import timing
except ImportError:  # run as a script: this folder, not the repository root, is on sys.path
    import timing

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
ENV_FIELDS = ("device", "torch", "triton", "python", "commit", "date")
CPU_SLUG = "cpu-interpreter"
_CPU_SUFFIX = "CPU (Triton interpreter)"


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
    if timing.gpu_available():
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
