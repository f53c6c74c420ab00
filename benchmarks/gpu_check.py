"""One command of GPU truth: build, GPU tests, sanitizers and every benchmark, in at most nine minutes.

Run on a GPU machine from the repository root (``make gpu-check``)::

    python -m benchmarks.gpu_check                      # every stage, results under benchmarks/results/<gpu>/
    python -m benchmarks.gpu_check --only bench         # one stage (a second call finishes what the first could not)
    python -m benchmarks.gpu_check --dry-run --out DIR  # no GPU: every stage it can, tiny shapes, the interpreter

Stages run in order of value, correctness first, each in its own processes with a time box (:data:`STAGES`), and
the whole under :data:`TOTAL_BUDGET_S`; whatever a stage finished is written at once, so a run cut short keeps it:

1. ``env``: GPU, driver, torch/triton/CUDA versions, git sha; peer wheels from ``.whl/`` installed with
   ``pip install --no-index --no-deps --target`` (``benchmarks/peers/fetch_wheels.sh`` fetches them).
2. ``build``: the CUDA extension for this GPU's architecture only, ``MAX_JOBS`` = cores, no dependency resolution
   and no network, into :data:`BUILD_DIR`, in the background while the Triton tests compile; installed into
   ``pi_kernels/`` once those are done.
3. ``tests``: the tests of every kernel file (:func:`kernel_tests`) with pytest-xdist (one autotune config:
   ``PI_KERNELS_AUTOTUNE=0``), then ``tests/test_csrc.py`` against the real extension (the test past 2^31 elements
   among them).
4. ``sanitizer``: ``compute-sanitizer`` memcheck, racecheck and, if time allows, initcheck on
   ``benchmarks/run_every_kernel.py`` (every kernel once, odd shapes).
5. ``bench``: every op against its ceiling and its peers in this run: copy bandwidth and the bf16 matmul ceiling,
   ``bench_rotary`` (≥ 1M elements, Llama 32/32 and GQA 32/8, bf16 and fp32, fwd and bwd, Triton and CUDA against
   eager, torch.compile, Liger and FlashInfer where installed), ``bench_kv_cache`` (fused vs rope then copy),
   ``bench_qkv_proj`` (fwd, bwd against the matmul alone and matmul + rotary_interp), ``bench_attention`` (head_dim
   64 and 128, 4k and 16k, causal and not, against the no-RoPE kernel and every SDPA backend after rotary_interp;
   peak memory at 16k and 32k).

Results: ``<out>/<gpu slug>/`` (default out ``benchmarks/results``) gets ``summary.json``, ``summary.md``,
``gpu_check.log``, each benchmark's CSV, JSON, PNG and table, ``tests-junit.xml`` and the logs under ``logs/``.
When ``OUT`` is set, at most eight files are copied flat into it after every stage (:data:`OUT_FILES`). The
headline table (target, measured, ratio) is printed last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from benchmarks import harness, report, results_io
except ImportError:  # run as a script: this folder, not the repository root, is on sys.path
    import harness
    import report
    import results_io

REPO_ROOT = results_io.REPO_ROOT
# Seconds of wall time on one H100 with 16 cores. The stages' boxes add up to the total (the build overlaps the
# Triton tests); each stage also stops at the total's deadline. Written down in the README's GPU section.
TOTAL_BUDGET_S = 540.0
BUDGET_S = {
    "env": 20.0,  # nvidia-smi, versions, wheels
    "build": 150.0,  # in the background, during the Triton tests (23 s on 2 cores for one arch here)
    "tests": 200.0,  # Triton tests in parallel (~450 compiles), then csrc against the real extension (40 s)
    "sanitizer": 90.0,  # memcheck 40, racecheck 30, initcheck 20 if time allows
    "bench": 230.0,  # the boxes of BENCHES: rotary 50 + 45, kv_cache 15, qkv_proj 45, attention 55 + 20
}
STAGES = tuple(BUDGET_S)
EXTENSION_TESTS = ("tests/test_csrc.py",)
# Every other test file runs on the GPU but these: CPU-only checks (the dry run itself, sm_90 compiles without a
# GPU, the benchmark harness, gloo context parallelism, the README's snippets as a CPU user runs them) and the PI
# recipe's training runs, too long for the budget.
NOT_ON_GPU_TESTS = ("tests/test_gpu_check.py", "tests/test_gpu_compile.py", "tests/test_benchmarks.py",
                    "tests/test_parallel.py", "tests/test_readme.py", "tests/test_recipes.py")
SLOW_TEST_S = 30.0  # no test should take longer on the GPU (autotuning is limited in tests)
SANITIZER_TOOLS = (("memcheck", 40.0), ("racecheck", 30.0), ("initcheck", 20.0))
# (name, module, GPU arguments, CPU arguments of the dry run or None (not run there), box in seconds)
BENCHES = (
    # bf16 and fp32 apart: torch.compile of the reference compiles per family, dtype and mode (~10 s each).
    ("rotary-bf16", "benchmarks.bench_rotary",
     ["--quick", "--tokens", "16384", "--modes", "fwd,bwd", "--dtypes", "bf16"], ["--dtypes", "bf16", "--modes", "fwd"],
     50.0),
    ("rotary-fp32", "benchmarks.bench_rotary",
     ["--quick", "--tokens", "16384", "--modes", "fwd,bwd", "--dtypes", "fp32"],
     ["--dtypes", "fp32", "--modes", "fwd,bwd"], 45.0),
    ("kv_cache", "benchmarks.bench_kv_cache", ["--quick"], [], 15.0),
    # One family: the kernel autotunes eight configs per shape (compiles included).
    ("qkv_proj", "benchmarks.bench_qkv_proj",
     ["--quick", "--families", "gqa", "--tokens", "8192", "--modes", "fwd,bwd"],
     ["--families", "tiny-d80", "--modes", "fwd,bwd"], 45.0),
    ("attention", "benchmarks.bench_attention",
     ["--quick", "--tokens", "4096,16384", "--modes", "fwd,bwd", "--providers",
      "pi_kernels,pi_kernels-norope,rotary_interp+sdpa-flash,rotary_interp+sdpa-cudnn,rotary_interp+sdpa-efficient"],
     ["--modes", "fwd,bwd"], 55.0),
    ("attention-memory", "benchmarks.bench_attention",
     ["--quick", "--tokens", "16384,32768", "--modes", "fwd+bwd", "--providers", "pi_kernels", "--causal", "true"],
     None, 20.0),
)
PLOTS = ("rotary.png", "qkv_proj.png", "attention.png")
OUT_FILES = ("summary.json", "summary.md", "gpu_check.log", "bench.csv", *PLOTS, "results.tar.gz")
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
WHEELS = REPO_ROOT / ".whl"
BUILD_DIR = Path(tempfile.gettempdir()) / "pi_kernels_gpu_check_build"  # outside the results, which get committed


@dataclass
class Context:
    """What the stages share: where results go, the deadline, the environment of their processes."""

    dry_run: bool
    folder: Path
    deadline: float
    env: dict[str, str]
    summary: dict[str, Any]
    build: subprocess.Popen | None = None
    build_started: float = 0.0
    log_lines: list[str] = field(default_factory=list)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def box(self, seconds: float) -> float:
        """A stage's or command's time box, cut to what is left of the total."""
        return max(0.0, min(seconds, self.remaining()))

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.log_lines.append(line)


def run_command(ctx: Context, label: str, command: Sequence[str], box: float, extra_env: dict[str, str] | None = None
                ) -> dict[str, Any]:
    """Run ``command`` in its own process group with a time box; its output goes to ``logs/<label>.log``.

    Returns
    -------
    dict
        ``rc`` (None when killed at its box), ``seconds``, ``timed_out``, ``log`` (path relative to the folder)
        and ``tail`` (the last lines of its output).
    """
    log_path = ctx.folder / "logs" / f"{label}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if box <= 1.0:
        return {"rc": None, "seconds": 0.0, "timed_out": True, "log": None, "tail": "no time left"}
    with log_path.open("w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(list(command), cwd=REPO_ROOT, env={**ctx.env, **(extra_env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = process.wait(timeout=box)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(process)
            rc, timed_out = None, True
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    return {"rc": rc, "seconds": round(time.monotonic() - started, 1), "timed_out": timed_out,
            "log": str(log_path.relative_to(ctx.folder)), "tail": "\n".join(tail)}


def _kill_group(process: subprocess.Popen) -> None:
    """Stop a command and the processes it started (pytest-xdist workers, compilers)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _python_json(ctx: Context, code: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=ctx.env, capture_output=True,
                            text=True, timeout=max(ctx.box(60.0), 5.0))
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(result.stdout)


def _tool_version(command: Sequence[str]) -> str:
    if shutil.which(command[0]) is None:
        return ""
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


ENV_SNIPPET = """
import json, torch
from benchmarks import peers, results_io, timing
env = results_io.environment()
env.update(cuda=torch.version.cuda or "", gpu_available=timing.gpu_available(),
           capability=".".join(map(str, torch.cuda.get_device_capability())) if timing.gpu_available() else "",
           peers={dist: results_io.package_version(dist) for dist in peers.gpu_peer_dists()})
print(json.dumps(env))
"""


def stage_env(ctx: Context) -> dict[str, Any]:
    """Versions and the GPU; peer wheels installed where ``.whl/`` holds some."""
    result: dict[str, Any] = {}
    wheels = sorted(WHEELS.glob("*.whl"))
    if wheels and not ctx.dry_run:
        target = Path(os.environ.get("TMPDIR", "/tmp")) / "pi_kernels_peers"
        install = run_command(ctx, "env-wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                                  "--no-deps", "--no-compile", "--upgrade", "--target", str(target),
                                                  *map(str, wheels)], ctx.box(60.0))
        result["wheels"] = {"files": [w.name for w in wheels], "rc": install["rc"]}
        if install["rc"] == 0:
            ctx.env["PYTHONPATH"] = os.pathsep.join(filter(None, [ctx.env.get("PYTHONPATH"), str(target)]))
    result["python"] = _python_json(ctx, ENV_SNIPPET)
    result["nvidia_smi"] = _tool_version(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                                          "--format=csv,noheader"])
    result["nvcc"] = _tool_version(["nvcc", "--version"])
    result["compute_sanitizer"] = _tool_version(["compute-sanitizer", "--version"])
    result["cpus"] = os.cpu_count()
    ctx.summary["environment"] = result["python"]
    ok = "error" not in result["python"] and (ctx.dry_run or bool(result["python"].get("gpu_available")))
    result["status"] = "ok" if ok else "failed"
    return result


def _present_arch(ctx: Context) -> str:
    capability = ctx.summary.get("environment", {}).get("capability", "")
    return capability or _tool_version(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])


def start_build(ctx: Context) -> dict[str, Any]:
    """Start building the extension in the background (finished by :func:`finish_build`)."""
    if ctx.dry_run:
        return {"status": "skipped", "note": "dry run: no build"}
    arch = _present_arch(ctx)
    if not arch:
        return {"status": "failed", "note": "no GPU architecture found (nvidia-smi, torch)"}
    build_dir = BUILD_DIR
    log_path = ctx.folder / "logs" / "build.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**ctx.env, "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 1)}
    env.pop("PI_KERNELS_SKIP_CUDA_BUILD", None)
    if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
        # torch guesses the toolkit from the nvcc on PATH, which may be a wrapper outside it (csrc/README.md).
        env["CUDA_HOME"] = "/usr/local/cuda"
    command = [sys.executable, "setup.py", "build_ext", "--build-lib", str(build_dir / "lib"),
               "--build-temp", str(build_dir / "tmp")]
    log = log_path.open("w")
    log.write(f"$ TORCH_CUDA_ARCH_LIST={arch} {' '.join(command)}\n")
    log.flush()
    ctx.build = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    log.close()  # the child holds its own descriptor
    ctx.build_started = time.monotonic()
    return {"status": "running", "arch": arch, "log": "logs/build.log"}


def finish_build(ctx: Context) -> dict[str, Any]:
    """Wait for the background build (within its box) and install the library into ``pi_kernels/``."""
    result = dict(ctx.summary["stages"].get("build", {}))
    if ctx.build is None:
        return result
    box = ctx.box(BUDGET_S["build"] - (time.monotonic() - ctx.build_started))
    try:
        rc = ctx.build.wait(timeout=max(box, 0.1))
    except subprocess.TimeoutExpired:
        _kill_group(ctx.build)
        rc = None
    result["seconds"] = round(time.monotonic() - ctx.build_started, 1)
    ctx.build = None
    libraries = sorted((BUILD_DIR / "lib" / "pi_kernels").glob("_C*.so"))
    if rc != 0 or not libraries:
        tail = (ctx.folder / "logs" / "build.log").read_text(errors="replace").splitlines()[-15:]
        result.update(status="failed" if rc is not None else "timeout", rc=rc, tail="\n".join(tail))
        return result
    # Copied then renamed: a process loading the extension never sees half a file.
    destination = REPO_ROOT / "pi_kernels" / libraries[0].name
    shutil.copy2(libraries[0], destination.with_suffix(".tmp"))
    os.replace(destination.with_suffix(".tmp"), destination)
    result.update(status="ok", rc=0, installed=str(destination.relative_to(REPO_ROOT)))
    return result


def _extension_present() -> bool:
    return any((REPO_ROOT / "pi_kernels").glob("_C*.so"))


def _junit_counts(path: Path) -> dict[str, Any]:
    """Totals and the failing tests' names from pytest's JUnit XML."""
    if not path.exists():
        return {}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    slow = sorted(((float(case.get("time", 0)), f"{case.get('classname')}::{case.get('name')}")
                   for s in suites for case in s.iter("testcase")), reverse=True)[:5]
    over = [name for s in suites for case in s.iter("testcase") if float(case.get("time", 0)) > SLOW_TEST_S
            for name in [f"{case.get('classname')}::{case.get('name')}"]]
    return {**counts, "failed": failed[:30], "slowest": [{"test": name, "seconds": t} for t, name in slow],
            f"over_{SLOW_TEST_S:.0f}s": over}


def _log_counts(log: Path | None) -> dict[str, Any]:
    """Counts from pytest's ``-v`` lines, for a run stopped at its time box before it wrote its JUnit XML."""
    if log is None or not log.exists():
        return {}
    # pytest-xdist writes "[gw0] [ 1%] PASSED tests/...::test", plain pytest "tests/...::test PASSED [ 1%]".
    outcome = "(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
    found = re.findall(rf"\b{outcome} (tests/.+?)\s*$|^(tests/.+?) {outcome}\b", log.read_text(errors="replace"), re.M)
    outcomes = [(a or d, b or c) for a, b, c, d in found]
    failed = [name for outcome, name in outcomes if outcome in ("FAILED", "ERROR")]
    return {"tests": len(outcomes), "failures": sum(o == "FAILED" for o, _ in outcomes),
            "errors": sum(o == "ERROR" for o, _ in outcomes), "skipped": sum(o == "SKIPPED" for o, _ in outcomes),
            "failed": failed[:30], "slowest": [], f"over_{SLOW_TEST_S:.0f}s": [], "note": "from the log (cut short)"}


def _pytest(ctx: Context, label: str, files: Sequence[str], box: float) -> dict[str, Any]:
    junit = ctx.folder / f"{label}-junit.xml"
    command = [sys.executable, "-m", "pytest", f"--junitxml={junit}", *files]
    if ctx.dry_run:
        command += ["-q", "--collect-only"]  # the interpreter would take ~11 minutes: check that everything collects
    else:
        command += ["--durations=10", "-v"]  # -v: one line per finished test in the log, read if the box ends it
        if _module_available("xdist"):
            command += ["-n", str(min(os.cpu_count() or 1, 16))]
        if _module_available("pytest_timeout"):
            command.append("--timeout=120")  # one hung test must not eat the stage
    result = run_command(ctx, label, command, box, {"PI_KERNELS_AUTOTUNE": "0"})
    collected = re.search(r"(\d+) tests? collected", result["tail"])
    if ctx.dry_run:
        result["collected"] = int(collected.group(1)) if collected else None
    else:
        result.update(_junit_counts(junit) or _log_counts(ctx.folder / result["log"] if result["log"] else None))
    result["status"] = "ok" if result["rc"] == 0 else ("timeout" if result["timed_out"] else "failed")
    return result


def _module_available(name: str) -> bool:
    result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True)
    return result.returncode == 0


def kernel_tests() -> list[str]:
    """The Triton stage's test files: every ``tests/test_*.py`` but the extension's and :data:`NOT_ON_GPU_TESTS`."""
    skip = {*EXTENSION_TESTS, *NOT_ON_GPU_TESTS}
    return [path for path in (p.relative_to(REPO_ROOT).as_posix() for p in sorted((REPO_ROOT / "tests").glob(
        "test_*.py"))) if path not in skip]


def stage_tests(ctx: Context) -> dict[str, Any]:
    """Triton tests in parallel (the extension builds meanwhile), then the csrc tests against the extension."""
    box = ctx.box(BUDGET_S["tests"])
    started = time.monotonic()
    triton_tests = _pytest(ctx, "tests-triton", kernel_tests(), box - 40.0 if not ctx.dry_run else box)
    result: dict[str, Any] = {"triton": triton_tests}
    if ctx.build is not None:
        ctx.summary["stages"]["build"] = finish_build(ctx)
        write_summary(ctx)
    if ctx.dry_run:
        result["extension"] = {"status": "skipped", "note": "dry run: no extension"}
    elif not _extension_present():
        result["extension"] = {"status": "skipped", "note": "the CUDA extension is not built (see the build stage)"}
    else:
        result["extension"] = _pytest(ctx, "tests-extension", EXTENSION_TESTS,
                                      ctx.box(box - (time.monotonic() - started)))
    statuses = [part["status"] for part in result.values()]
    result["status"] = next((s for s in ("failed", "timeout") if s in statuses), "ok")
    return result


def stage_sanitizer(ctx: Context) -> dict[str, Any]:
    """compute-sanitizer tools on the every-kernel script (the script alone, tiny, in a dry run)."""
    workload = [sys.executable, "-m", "benchmarks.run_every_kernel"]
    if ctx.dry_run:
        run = run_command(ctx, "sanitizer-dry-run", [*workload, "--tiny"], ctx.box(BUDGET_S["sanitizer"]))
        run["status"] = "ok" if run["rc"] == 0 else "failed"
        return {"workload": run, "status": run["status"], "note": "dry run: the workload without compute-sanitizer"}
    if shutil.which("compute-sanitizer") is None:
        return {"status": "skipped", "note": "compute-sanitizer not found"}
    result: dict[str, Any] = {}
    stage_end = time.monotonic() + BUDGET_S["sanitizer"]
    for tool, box in SANITIZER_TOOLS:
        left = ctx.box(min(box, stage_end - time.monotonic()))
        if left < 10.0:
            result[tool] = {"status": "skipped", "note": "no time left in the stage"}
            continue
        command = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=99", "--print-limit=20", *workload]
        run = run_command(ctx, f"sanitizer-{tool}", command, left, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
        text = (ctx.folder / run["log"]).read_text(errors="replace") if run["log"] else ""
        errors = re.search(r"ERROR SUMMARY: (\d+) error", text)
        run["errors"] = int(errors.group(1)) if errors else None
        run["status"] = ("timeout" if run["timed_out"] else
                         "ok" if run["rc"] == 0 and not run["errors"] else "failed")
        result[tool] = run
    statuses = [part["status"] for part in result.values()]
    result["status"] = next((s for s in ("failed", "timeout") if s in statuses), "ok")
    return result


def stage_bench(ctx: Context) -> dict[str, Any]:
    """Every benchmark, each in its own process and time box, into the same results folder."""
    out_root = str(ctx.folder.parent)
    ctx.summary["bench_started"] = results_io.utc_now()
    result: dict[str, Any] = {}
    stage_end = time.monotonic() + BUDGET_S["bench"]
    for name, module, gpu_args, cpu_args, box in BENCHES:
        if ctx.dry_run:
            # The GPU command lines never run here: parse them at least, so a typo fails now and not on the GPU.
            try:
                importlib.import_module(module).parse_args(["--out", out_root, *gpu_args])
            except SystemExit as exc:
                result[name] = {"status": "failed", "note": f"GPU arguments do not parse: {gpu_args} ({exc})"}
                continue
            if cpu_args is None:
                result[name] = {"status": "skipped", "note": "dry run: GPU arguments parsed, nothing to run on CPU"}
                continue
        left = ctx.box(min(box, stage_end - time.monotonic()))
        command = [sys.executable, "-m", module, "--out", out_root, *(cpu_args if ctx.dry_run else gpu_args)]
        run = run_command(ctx, f"bench-{name}", command, left)
        run["status"] = "ok" if run["rc"] == 0 else ("timeout" if run["timed_out"] else "failed")
        result[name] = run
        ctx.log(f"  bench {name}: {run['status']} in {run['seconds']} s")
    statuses = [part["status"] for part in result.values()]
    result["status"] = next((s for s in ("failed", "timeout") if s in statuses), "ok")
    return result


# ---- the report ----


def _this_run_rows(ctx: Context, csv_name: str) -> list[dict[str, str]]:
    path = ctx.folder / csv_name
    if not path.exists():
        return []
    started = ctx.summary.get("bench_started", ctx.summary["started"])
    return [r for r in results_io.read_results(path) if r.get("date", "") >= started]


def _worst(rows: list[dict[str, str]], column: str, *, lowest: bool) -> tuple[float, dict[str, str]] | None:
    values = [(results_io.as_float(r.get(column)), r) for r in rows]
    values = [(v, r) for v, r in values if v is not None]
    if not values:
        return None
    return (min if lowest else max)(values, key=lambda item: item[0])


def headlines(ctx: Context) -> list[dict[str, Any]]:
    """The figures the targets are about: (what, target, measured, ratio, where), from this run's rows only.

    ``ratio`` is measured / target for "at least" targets and target / measured for "at most" ones, so a ratio
    ≥ 1 meets the target in both cases.
    """
    lines: list[dict[str, Any]] = []

    def add(what: str, target: float, found: tuple[float, dict[str, str]] | None, at_least: bool, unit: str,
            where: Callable[[dict[str, str]], str]) -> None:
        if found is None:
            lines.append({"what": what, "target": f"{'≥' if at_least else '≤'} {target:g}{unit}", "measured": "-",
                          "ratio": "-", "where": "not measured"})
            return
        value, row = found
        ratio = value / target if at_least else target / value
        lines.append({"what": what, "target": f"{'≥' if at_least else '≤'} {target:g}{unit}",
                      "measured": f"{value:.3g}{unit}", "ratio": f"{ratio:.2f}", "where": where(row)})

    rotary = _this_run_rows(ctx, "rotary.csv")
    for provider in ("pi_kernels", "pi_kernels_cuda"):
        own = [r for r in rotary if r["provider"] == provider and r["status"] == "ok"]
        add(f"rotary_interp {provider} GB/s / copy (worst cell)", 0.90, _worst(own, "frac_ceiling", lowest=True),
            True, "", lambda r: f"{r['family']} {r['dtype']} {r['mode']} {r['tokens']} tok")
    cache = [r for r in _this_run_rows(ctx, "kv_cache.csv") if r["status"] == "ok"]
    times = {(r["family"], r["dtype"], r["provider"]): results_io.as_float(r["median_ms"]) for r in cache}
    ratios = [(times[key] / times[(key[0], key[1], key[2].replace("fused-", "separate-"))], dict(zip(
        ("family", "dtype", "provider"), key, strict=True))) for key in times if key[2].startswith("fused-")
        and (key[0], key[1], key[2].replace("fused-", "separate-")) in times]
    add("kv cache append: fused time / rope-then-copy time (worst)", 1.0, max(ratios, default=None,
        key=lambda item: item[0]), False, "", lambda r: f"{r['family']} {r['dtype']} {r['provider']}")
    qkv = [r for r in _this_run_rows(ctx, "qkv_proj.csv") if r["provider"] == "pi_kernels" and r["status"] == "ok"]
    for mode, target in (("fwd", 1.03), ("bwd", 1.05)):
        add(f"qkv_proj_rotary {mode} time / bare GEMM (worst)", target,
            _worst([r for r in qkv if r["mode"] == mode], "vs_matmul", lowest=False), False, "",
            lambda r: f"{r['family']} {r['dtype']} {r['tokens']} tok")
    attention = [r for r in _this_run_rows(ctx, "attention.csv") if r["status"] == "ok"]
    own = [r for r in attention if r["provider"] == "pi_kernels"]
    for mode, target in (("fwd", 470.0), ("bwd", 320.0)):
        cells = [r for r in own if r["mode"] == mode and r["head_dim"] == "128" and r["tokens"] == "16384"
                 and r["causal"] == "False"]
        add(f"attention_rotary {mode} TFLOP/s, d128 16k non-causal", target, _worst(cells, "tflops", lowest=True),
            True, "", lambda r: f"{r['family']} {r['dtype']}")
    add("attention_rotary time / no-RoPE time (worst)", 1.05, _worst(own, "rope_cost", lowest=False), False, "",
        lambda r: f"{r['family']} causal={r['causal']} {r['mode']} {r['tokens']}")
    add("attention_rotary: best SDPA time / this (worst)", 1.0, _worst(own, "vs_best_sdpa", lowest=True), True, "",
        lambda r: f"{r['family']} causal={r['causal']} {r['mode']} {r['tokens']} vs {r['best_sdpa']}")
    memory = [r for r in own if r["mode"] == "fwd+bwd" and results_io.as_float(r.get("peak_mib"))]
    for row in sorted(memory, key=lambda r: (r["family"], int(r["tokens"]))):
        peak = results_io.as_float(row["peak_mib"])
        lines.append({"what": f"attention_rotary fwd+bwd peak MiB, {row['family']} {row['tokens']} tok",
                      "target": "linear in seq", "measured": f"{peak:.0f} MiB",
                      "ratio": f"{peak * 1024 / (int(row['batch']) * int(row['tokens'])):.1f} KiB/tok",
                      "where": f"causal={row['causal']}"})
    return lines


HEADLINE_COLUMNS = (("what", "what"), ("target", "target"), ("measured", "measured"), ("ratio", "ratio"),
                    ("where", "where"))


def _stage_line(name: str, stage: dict[str, Any]) -> str:
    parts = [f"{name}: {stage.get('status', '-')}"]
    if "seconds" in stage:
        parts.append(f"{stage['seconds']} s")
    for key in ("note", "installed"):
        if stage.get(key):
            parts.append(str(stage[key]))
    for part_name, part in stage.items():
        if isinstance(part, dict) and "status" in part:
            detail = f"{part_name} {part['status']}"
            if "tests" in part:
                detail += (f" ({part['tests']} tests, {part['failures']} failures, {part['errors']} errors, "
                           f"{part['skipped']} skipped, {len(part[f'over_{SLOW_TEST_S:.0f}s'])} over "
                           f"{SLOW_TEST_S:.0f} s)")
            elif "collected" in part:
                detail += f" ({part['collected']} collected)"
            if part.get("errors") is not None and "tests" not in part:
                detail += f" ({part['errors']} sanitizer errors)"
            if part.get("seconds") is not None:
                detail += f" {part['seconds']} s"
            parts.append(detail)
    return "; ".join(parts)


def write_summary(ctx: Context) -> None:
    """summary.json and summary.md in the folder, and the files of :data:`OUT_FILES` in ``$OUT``."""
    ctx.summary["headlines"] = headlines(ctx)
    ctx.summary["seconds"] = round(time.monotonic() - ctx.summary["_t0"], 1)
    results_io.write_json(ctx.folder / "summary.json", {k: v for k, v in ctx.summary.items() if not k.startswith("_")})
    env = ctx.summary.get("environment", {})
    lines = [
        f"# gpu_check on {env.get('device', '?')}",
        "",
        f"{'DRY RUN (no GPU: interpreter, tiny shapes; timings mean nothing). ' if ctx.dry_run else ''}"
        f"torch {env.get('torch', '?')} (CUDA {env.get('cuda') or '-'}), triton {env.get('triton', '?')}, "
        f"python {env.get('python', '?')}, commit {env.get('commit') or '-'}, started {ctx.summary['started']}, "
        f"{ctx.summary['seconds']} s of a {TOTAL_BUDGET_S:.0f} s budget.",
        "",
        "## Stages",
        "",
        *(f"- {_stage_line(name, stage)}" for name, stage in ctx.summary["stages"].items()),
        "",
        "## Headline figures (ratio ≥ 1 meets the target)",
        "",
        report.format_table(ctx.summary["headlines"], HEADLINE_COLUMNS, markdown=True),
        "",
    ]
    for name in ("rotary", "kv_cache", "qkv_proj", "attention"):
        table = ctx.folder / f"{name}-summary.md"
        if table.exists():
            lines += [f"## {name}", "", table.read_text().strip(), ""]
    (ctx.folder / "summary.md").write_text("\n".join(lines))
    (ctx.folder / "gpu_check.log").write_text(_combined_log(ctx))
    if os.environ.get("OUT"):
        copy_to_out(ctx, Path(os.environ["OUT"]))


def _combined_log(ctx: Context) -> str:
    parts = ["\n".join(ctx.log_lines)]
    for log in sorted((ctx.folder / "logs").glob("*.log")):
        text = log.read_text(errors="replace")
        if len(text) > 200_000:  # keep the start (the command) and the end (the verdict)
            text = text[:20_000] + "\n[... cut ...]\n" + text[-180_000:]
        parts.append(f"\n===== {log.name} =====\n{text}")
    return "\n".join(parts)


def copy_to_out(ctx: Context, out: Path) -> None:
    """Copy :data:`OUT_FILES` flat into ``out``: this run's bench rows as one CSV, the rest as a tarball."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ("rotary", "kv_cache", "qkv_proj", "attention"):
        rows += _this_run_rows(ctx, f"{name}.csv")
    if rows:
        (out / "bench.csv").unlink(missing_ok=True)
        results_io.append_results(out / "bench.csv", rows, {})
    for name in ("summary.json", "summary.md", "gpu_check.log", *PLOTS):
        if (ctx.folder / name).exists():
            shutil.copy2(ctx.folder / name, out / name)
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for path in sorted(ctx.folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(ctx.folder.parent)))
    unexpected = [p.name for p in out.iterdir() if p.name not in OUT_FILES or not SAFE_NAME.match(p.name)]
    if unexpected:
        raise RuntimeError(f"$OUT holds files gpu_check did not write: {unexpected}")


def _load_summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=STAGES, help="run one stage (its results are merged into summary.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: the interpreter, tiny shapes, no build, no sanitizer; the same files")
    parser.add_argument("--out", metavar="DIR", help="results root (default benchmarks/results)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="total seconds (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stages; return 0 when every stage that ran is ok (or skipped), else 1."""
    args = parse_args(argv)
    t0 = time.monotonic()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["PI_KERNELS_TEST_DEVICE"] = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # results_io.environment() below describes the interpreter run
    device = results_io.environment()["device"] if args.dry_run else _tool_version(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) or "unknown GPU"
    folder = results_io.results_dir({"device": device}, args.out or results_io.RESULTS_ROOT)
    folder.mkdir(parents=True, exist_ok=True)
    summary = _load_summary(folder) if args.only else {}
    summary.setdefault("stages", {})
    summary.update(dry_run=args.dry_run, budget_s=args.budget, stage_budgets_s=BUDGET_S, _t0=t0,
                   started=results_io.utc_now())
    ctx = Context(dry_run=args.dry_run, folder=folder, deadline=t0 + args.budget, env=env, summary=summary)
    stages: dict[str, Callable[[Context], dict[str, Any]]] = {
        "env": stage_env, "build": start_build, "tests": stage_tests, "sanitizer": stage_sanitizer,
        "bench": stage_bench}
    ctx.log(f"gpu_check{' --dry-run' if args.dry_run else ''} on {device}: results in {folder}, budget "
            f"{args.budget:.0f} s")
    for name in ([args.only] if args.only else STAGES):
        if args.only and name != "env":  # versions for the summary, and the peer wheels on the path
            summary["stages"]["env"] = stage_env(ctx)
        started = time.monotonic()
        if ctx.remaining() <= 1.0:
            summary["stages"][name] = {"status": "timeout", "note": "no time left in the total budget"}
        else:
            try:
                summary["stages"][name] = stages[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one broken stage must not cost the others
                summary["stages"][name] = {"status": "failed", "note": harness.short_error(exc)}
        summary["stages"][name].setdefault("seconds", round(time.monotonic() - started, 1))
        ctx.log(f"[{time.monotonic() - t0:5.0f} s] {_stage_line(name, summary['stages'][name])}")
        write_summary(ctx)
    if ctx.build is not None:  # --only build: wait for it here
        summary["stages"]["build"] = finish_build(ctx)
        write_summary(ctx)
    print("\n" + report.format_table(summary["headlines"], HEADLINE_COLUMNS), flush=True)
    bad = {name: s["status"] for name, s in summary["stages"].items() if s.get("status") not in ("ok", "skipped")}
    print(f"\ngpu_check: {'all stages ok' if not bad else f'not ok: {bad}'}; {folder}; "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
