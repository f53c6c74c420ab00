"""gpu_check's dry run end to end (every stage it can run without a GPU), and its time boxes.

The dry run is what keeps the one GPU command from dying on a typo: it runs the stages with the interpreter and
tiny shapes (test collection, the every-kernel script, every benchmark script), parses the GPU command lines of
the benchmarks, and writes the same files as on a GPU, ``$OUT`` included.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check, results_io

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module's tests: (return code, stdout, results folder, $OUT folder, seconds).

    Only stdout is kept: gpu_check prints its verdict there last, and warnings on stderr must not come after it.
    """
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "OUT"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TRITON_INTERPRET", None)  # gpu_check sets it for its dry run by itself
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(root / "res")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    folder = root / "res" / results_io.CPU_SLUG
    if result.returncode != 0:
        print(result.stderr[-5000:])
    return result.returncode, result.stdout, folder, out, seconds


def test_dry_run_passes_every_stage(dry_run):
    rc, output, folder, _, seconds = dry_run
    assert rc == 0, output[-5000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["dry_run"] is True and set(summary["stages"]) == set(gpu_check.STAGES)
    for name, stage in summary["stages"].items():
        assert stage["status"] in ("ok", "skipped"), (name, stage)
    assert summary["stages"]["build"]["status"] == "skipped"
    assert summary["stages"]["tests"]["triton"]["collected"] > 100  # every kernel test file collects
    assert "0 failure(s)" in (folder / "logs" / "sanitizer-dry-run.log").read_text()
    bench = summary["stages"]["bench"]
    assert {bench[name]["status"] for name, *_ in gpu_check.BENCHES} <= {"ok", "skipped"}
    assert summary["environment"]["device"].endswith("CPU (Triton interpreter)")
    assert "all stages ok" in output.splitlines()[-1]
    print(f"dry run: {seconds:.0f} s")  # the budget is about a minute on 2 idle cores; see the README


def test_dry_run_writes_every_benchmark_with_parity(dry_run):
    _, _, folder, _, _ = dry_run
    for name, own in (("rotary", "pi_kernels"), ("kv_cache", "fused-triton"), ("qkv_proj", "pi_kernels"),
                      ("attention", "pi_kernels")):
        rows = results_io.read_results(folder / f"{name}.csv")
        mine = [r for r in rows if r["provider"] == own]
        assert mine and all(r["status"] == "ok" and r["parity"] and r["median_ms"] for r in mine), (name, mine)
        assert all(r["device"] and r["commit"] is not None and r["date"] for r in rows)
        assert (folder / f"{name}-summary.md").read_text().startswith("|")
        assert len(list(folder.glob(f"{name}-*T*.json"))) >= 1
    assert [p.name for p in sorted(folder.glob("*.png"))] == sorted(gpu_check.PLOTS)
    summary_md = (folder / "summary.md").read_text()
    assert "DRY RUN" in summary_md and "## Headline figures" in summary_md and "## attention" in summary_md


def test_dry_run_fills_out_with_at_most_eight_safe_names(dry_run):
    _, output, _, out, _ = dry_run
    names = sorted(p.name for p in out.iterdir())
    assert set(names) == set(gpu_check.OUT_FILES) and len(names) <= 8
    assert all(gpu_check.SAFE_NAME.match(name) and (out / name).is_file() for name in names)
    rows = results_io.read_results(out / "bench.csv")
    assert {r["op"] for r in rows} == {"rotary_interp", "rotary_kv_cache_append", "qkv_proj_rotary", "attention_rotary"}
    # The headline table is printed last: target, measured, ratio.
    assert any(line.split()[:1] == ["what"] and "ratio" in line for line in output.splitlines()[-20:])


def test_a_command_past_its_box_is_stopped(tmp_path):
    ctx = gpu_check.Context(dry_run=True, folder=tmp_path, deadline=time.monotonic() + 60, env=dict(os.environ),
                            summary={})
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);" \
            " print('started', flush=True); time.sleep(60)"
    start = time.perf_counter()
    result = gpu_check.run_command(ctx, "sleeper", [sys.executable, "-c", child], box=2.0)
    assert result["timed_out"] and result["rc"] is None and time.perf_counter() - start < 20
    assert "started" in (tmp_path / result["log"]).read_text()


def test_a_stage_gets_no_more_than_the_total_left(tmp_path):
    ctx = gpu_check.Context(dry_run=True, folder=tmp_path, deadline=time.monotonic() + 5, env={}, summary={})
    assert ctx.box(100.0) <= 5.0
    ctx.deadline = time.monotonic() - 1
    assert ctx.box(100.0) == 0.0
    assert gpu_check.run_command(ctx, "late", ["true"], ctx.box(10.0))["timed_out"]


def test_headlines_find_every_target_in_gpu_shaped_rows(tmp_path):
    """Rows shaped like a GPU run's: every headline is measured, and ratios ≥ 1 mean the target is met."""
    env = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-01T00:00:01+00:00"}
    base = {"status": "ok", "dtype": "bf16", "family": "gqa", "tokens": 16384}
    results_io.append_results(tmp_path / "rotary.csv", [
        {**base, "provider": p, "mode": m, "frac_ceiling": f} for p, m, f in
        (("pi_kernels", "fwd", 0.93), ("pi_kernels", "bwd", 0.85), ("pi_kernels_cuda", "fwd", 0.95))], env)
    results_io.append_results(tmp_path / "kv_cache.csv", [
        {**base, "family": "decode", "provider": p, "median_ms": t} for p, t in
        (("fused-triton", 0.010), ("separate-triton", 0.020))], env)
    results_io.append_results(tmp_path / "qkv_proj.csv", [
        {**base, "provider": "pi_kernels", "mode": m, "vs_matmul": r} for m, r in (("fwd", 1.01), ("bwd", 1.10))], env)
    attention = {**base, "provider": "pi_kernels", "family": "d128", "head_dim": 128, "causal": False,
                 "best_sdpa": "rotary_interp+sdpa-flash", "batch": 1}
    results_io.append_results(tmp_path / "attention.csv", [
        {**attention, "mode": "fwd", "tflops": 500.0, "rope_cost": 1.02, "vs_best_sdpa": 1.3},
        {**attention, "mode": "bwd", "tflops": 300.0, "rope_cost": 1.04, "vs_best_sdpa": 1.1},
        {**attention, "mode": "fwd+bwd", "tokens": 32768, "peak_mib": 512.0}], env)
    ctx = gpu_check.Context(dry_run=False, folder=tmp_path, deadline=0.0, env={},
                            summary={"started": "2026-12-01T00:00:00+00:00"})
    lines = {line["what"]: line for line in gpu_check.headlines(ctx)}
    assert all(line["measured"] != "-" for line in lines.values()), lines
    ratio = {what: float(line["ratio"]) for what, line in lines.items() if "KiB" not in line["ratio"]}
    assert ratio["rotary_interp pi_kernels GB/s / copy (worst cell)"] == pytest.approx(0.85 / 0.90, abs=0.01)
    assert ratio["kv cache append: fused time / rope-then-copy time (worst)"] == pytest.approx(2.0)
    assert ratio["qkv_proj_rotary bwd time / bare GEMM (worst)"] == pytest.approx(1.05 / 1.10, abs=0.01)
    assert ratio["attention_rotary fwd TFLOP/s, d128 16k non-causal"] == pytest.approx(500 / 470, abs=0.01)
    assert ratio["attention_rotary time / no-RoPE time (worst)"] == pytest.approx(1.05 / 1.04, abs=0.01)
    assert lines["attention_rotary fwd+bwd peak MiB, d128 32768 tok"]["ratio"] == "16.0 KiB/tok"
    # Rows of an earlier run are not this run's.
    ctx.summary["started"] = "2026-12-02T00:00:00+00:00"
    assert all(line["measured"] == "-" for line in gpu_check.headlines(ctx) if "peak" not in line["what"])


def test_a_test_run_cut_short_is_counted_from_its_log(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("[gw0] [  1%] PASSED tests/test_rotary.py::test_a[x]\n"
                   "[gw1] [  2%] FAILED tests/test_attention.py::test_b \n"
                   "[gw0] [  3%] SKIPPED tests/test_csrc.py::test_c \n"
                   "tests/test_rotary.py::test_d PASSED                [ 4%]\n")  # without xdist
    counts = gpu_check._log_counts(log)
    assert (counts["tests"], counts["failures"], counts["skipped"]) == (4, 1, 1)
    assert counts["failed"] == ["tests/test_attention.py::test_b"]
