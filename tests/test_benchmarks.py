"""Fast CPU tests of the benchmark harness and the rotary peer adapters (the end-to-end runs of every benchmark
script are in tests/test_gpu_check.py, through gpu_check's dry run).

The peers (Liger, FlashInfer, flash-attn) need a GPU, so their adapters are checked here against small stand-in
modules that implement each library's documented contract (layouts, cache shapes, what ``rope_scale`` means):
a wrong transpose, cache shape or scale in an adapter fails parity on CPU before any GPU run.
"""

import sys
import types

import pytest
import torch

from benchmarks import bench_rotary, cli, harness, peers, report, results_io, timing

ENV = {
    "device": "NVIDIA H100 80GB HBM3",
    "torch": "2.11.0",
    "triton": "3.6.0",
    "python": "3.12.0",
    "commit": "abc",
    "date": "2026-01-01T00:00:00+00:00",
}


@pytest.fixture
def wallclock(monkeypatch):
    """Use the CPU timing path even on a GPU machine: these tests time plain Python and CPU tensors."""
    monkeypatch.setattr(timing, "gpu_available", lambda: False)


def test_measure_returns_ordered_quantiles(wallclock):
    calls = []
    measured = timing.measure(lambda: calls.append(sum(range(2000))), warmup_ms=1.0, rep_ms=5.0)
    assert 0 < measured.p20_ms <= measured.median_ms <= measured.p80_ms
    assert len(calls) >= 4  # one warm-up call and at least min_reps timed ones


def test_measure_resets_grads_before_each_repetition(wallclock):
    x = torch.ones(3, requires_grad=True)
    seen = []

    def backward():
        seen.append(x.grad is None)
        (x * 2).sum().backward()

    timing.measure(backward, warmup_ms=0.0, rep_ms=0.0, grad_to_none=[x])
    assert all(seen)


def test_copy_bandwidth_is_positive(wallclock):
    assert timing.copy_bandwidth_gbs("cpu", size_bytes=1 << 20, warmup_ms=0.0, rep_ms=1.0) > 0


def test_environment_fields_and_slugs():
    env = results_io.environment()
    assert set(results_io.ENV_FIELDS) <= set(env)
    assert env["date"].endswith("+00:00")
    assert results_io.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert results_io.device_slug("x86_64 CPU (Triton interpreter)") == "cpu-interpreter"
    assert results_io.results_dir(ENV, "/r").as_posix() == "/r/h100-80gb-hbm3"


def test_append_results_writes_env_columns_and_widens_header(tmp_path):
    path = tmp_path / "h100" / "op.csv"
    results_io.append_results(path, [{"provider": "a", "median_ms": 1.5, "parity": None}], ENV)
    later = {**ENV, "date": "2026-01-02T00:00:00+00:00"}
    results_io.append_results(path, [{"provider": "b", "median_ms": 2.0, "gbs": 7.0}], later)
    rows = results_io.read_results(path)
    assert list(rows[0])[: len(results_io.ENV_FIELDS)] == list(results_io.ENV_FIELDS)
    assert [r["provider"] for r in rows] == ["a", "b"]
    assert rows[0]["device"] == "NVIDIA H100 80GB HBM3" and rows[0]["parity"] == "" and rows[0]["gbs"] == ""
    assert rows[1]["gbs"] == "7.0" and rows[1]["date"] == later["date"]


def _rows(date, provider, gbs, *, status="ok", tokens=(1024, 4096), **extra):
    return [
        {
            "date": date,
            "op": "rotary_interp",
            "provider": provider,
            "family": "llama7b",
            "mode": "fwd",
            "dtype": "bf16",
            "tokens": t,
            "gbs": gbs * t / tokens[-1] if gbs is not None else None,
            "ceiling_gbs": 3000.0,
            "status": status,
            **extra,
        }
        for t in tokens
    ]


def test_plot_writes_png(tmp_path):
    rows = _rows("d", "pi_kernels", 2800.0) + _rows("d", "eager", 500.0) + _rows("d", "liger", None, status="error")
    path = report.plot_bandwidth(rows, tmp_path / "sub" / "plot.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_format_table_aligns_text_and_markdown():
    rows = [{"name": "a", "ms": 1.23456, "n": 1024}, {"name": "long-name", "ms": None, "n": 8}]
    columns = [("name", "name"), ("ms", "ms", ".2f"), ("n", "n", "d")]
    text = report.format_table(rows, columns).splitlines()
    assert text[0].split() == ["name", "ms", "n"]
    assert text[2].split() == ["a", "1.23", "1024"] and text[3].split() == ["long-name", "-", "8"]
    assert len({len(line) for line in text[:3]}) == 1  # header, rule and full row share the column widths
    md = report.format_table(rows, columns, markdown=True).splitlines()
    assert md[0] == "| name      |   ms |    n |" and md[1] == "| --------- | ---: | ---: |"


def test_readme_table_uses_latest_run_and_largest_size(tmp_path):
    path = tmp_path / "rotary.csv"
    old = _rows("2026-01-01", "pi_kernels", 1000.0, frac_ceiling=0.33, vs_best_other=0.5, best_other="eager")
    new = _rows("2026-01-02", "pi_kernels", 2800.0, frac_ceiling=0.93, vs_best_other=1.25, best_other="liger")
    others = _rows("2026-01-01", "liger", 2240.0) + _rows("2026-01-01", "flashinfer", None, status="unsupported")
    for rows in (old, others, new):
        results_io.append_results(path, rows, {})
    table = report.readme_table(path).splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == [
        "family",
        "mode",
        "dtype",
        "tokens",
        "pi_kernels GB/s",
        "liger GB/s",
        "flashinfer GB/s",
        "pi_kernels / copy",
        "pi_kernels vs best other",
    ]
    assert len(table) == 3  # header, rule, one line for the largest size
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells == ["llama7b", "fwd", "bf16", "4096", "2800", "2240", "unsupported", "93%", "1.25x (liger)"]


# ---- rotary peer adapters against stand-ins for the libraries' documented contracts ----


def _rotate_half(x, cos, sin):
    """NeoX/Llama rotation of x (..., d) by cos/sin broadcast to (..., d / 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _FakeLigerRope(torch.autograd.Function):
    """Liger's contract: q/k (batch, heads, seq, dim) views rotated in place; cos/sin (1, seq, dim), halves equal."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        half = q.shape[-1] // 2
        c, s = cos[:, None, :, :half], sin[:, None, :, :half]
        ctx.save_for_backward(c, s)
        q.copy_(_rotate_half(q, c, s))
        k.copy_(_rotate_half(k, c, s))
        return q, k, cos, sin

    @staticmethod
    def backward(ctx, dq, dk, _dcos, _dsin):
        c, s = ctx.saved_tensors
        return _rotate_half(dq, c, -s), _rotate_half(dk, c, -s), None, None


def _fake_flash_attn_apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False):
    """flash-attn's contract: x (batch, seq, heads, dim), cos/sin (seq_ro >= seq, rotary_dim / 2) in x's dtype."""
    assert not interleaved and not inplace and cos.dtype == x.dtype
    seq = x.shape[1]
    return _rotate_half(x, cos[:seq, None, :], sin[:seq, None, :])


def _fake_flashinfer_apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4):
    """FlashInfer's contract: (nnz, heads, dim), int32 pos_ids (nnz,), angle pos / rope_scale * theta^(-2i/d)."""
    assert q.dim() == 3 and pos_ids.dtype == torch.int32 and pos_ids.shape == (q.shape[0],) and not interleave
    dim = q.shape[-1]
    inv_freq = rope_theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim) / rope_scale
    angles = pos_ids.double()[:, None] * inv_freq
    cos, sin = angles.cos()[:, None, :].float(), angles.sin()[:, None, :].float()
    return _rotate_half(q.float(), cos, sin).to(q.dtype), _rotate_half(k.float(), cos, sin).to(k.dtype)


@pytest.fixture
def fake_peers(monkeypatch):
    """Install the stand-in peer modules for the duration of a test."""
    modules = {
        "liger_kernel": {},
        "liger_kernel.ops": {},
        "liger_kernel.ops.rope": {"LigerRopeFunction": _FakeLigerRope},
        "flash_attn": {},
        "flash_attn.layers": {},
        "flash_attn.layers.rotary": {"apply_rotary_emb": _fake_flash_attn_apply_rotary_emb},
        "flashinfer": {},
        "flashinfer.rope": {"apply_rope_pos_ids": _fake_flashinfer_apply_rope_pos_ids},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


def _inputs(dtype, seq=37, n_heads=4, n_kv_heads=2, head_dim=16):
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, seq, n_heads, head_dim), (1, seq, n_kv_heads, head_dim)] * 2
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def _check_adapter(name, dtype):
    provider = bench_rotary.PROVIDERS[name]
    q, k, gq, gk = _inputs(dtype)
    fwd = provider.build(q.shape[1], q.shape[3], dtype, torch.device("cpu"))
    modes = cli.MODES if provider.backward else ("fwd",)
    for mode in modes:
        err = bench_rotary.parity(fwd, q, k, gq, gk, mode)
        assert err <= bench_rotary.PARITY_TOL[dtype], (name, mode, err)


@pytest.mark.parametrize("name", ["liger", "flash_attn", "flashinfer", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peer_adapter_matches_reference(fake_peers, name, dtype):
    _check_adapter(name, dtype)


# Without the stand-ins: importing transformers' model code looks up the real flash_attn's module spec.
@pytest.mark.parametrize("name", ["hf", "pi_kernels_torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_provider_matches_reference(name, dtype):
    _check_adapter(name, dtype)


def _run_group(providers, dtype_name="fp32", modes=cli.MODES):
    family = bench_rotary.Family("t", 4, 2, 16, (32,), (32,))
    return bench_rotary.run_group(
        family,
        family.tokens,
        dtype_name,
        modes,
        providers,
        device=torch.device("cpu"),
        budget=timing.Budget(0.0, 0.0, 1),
        ceiling_gbs=10.0,
        on_gpu=False,
    )


def test_run_group_reports_unsupported_and_does_not_time_parity_failures(fake_peers):
    def wrong_scale(seq, head_dim, dtype, device):
        from pi_kernels.reference import rotary_interp_reference

        return lambda q, k: rotary_interp_reference(q, k, scaling_factor=1.0)  # plain RoPE: not PI

    wrong = peers.Provider("wrong", wrong_scale, peer="torch")
    providers = [bench_rotary.PROVIDERS["eager"], bench_rotary.PROVIDERS["flashinfer"], wrong]
    rows = {(r["provider"], r["mode"]): r for r in _run_group(providers)}
    assert rows[("eager", "fwd")]["status"] == "ok" and rows[("eager", "fwd")]["median_ms"] > 0
    assert rows[("eager", "fwd+bwd")]["bytes"] == 2 * rows[("eager", "fwd")]["bytes"] == 4 * (32 * 6 * 16) * 4
    assert rows[("flashinfer", "fwd")]["status"] == "unsupported"  # fp32: FlashInfer is fp16/bf16 only
    for mode in cli.MODES:
        assert rows[("wrong", mode)]["status"] == "parity-fail"
        assert rows[("wrong", mode)]["median_ms"] is None and rows[("wrong", mode)]["parity"] > 0.01
    bf16 = _run_group(providers, "bf16")
    by_key = {(r["provider"], r["mode"]): r for r in bf16}
    assert by_key[("flashinfer", "fwd")]["status"] == "ok"
    assert by_key[("flashinfer", "bwd")]["status"] == "unsupported"
    assert by_key[("flashinfer", "bwd")]["note"] == "forward only (no autograd)"
    fwd_cell = [r for r in bf16 if r["mode"] == "fwd" and r["median_ms"] is not None]
    assert {r["best_other"] for r in fwd_cell} == {"eager", "flashinfer"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU timing run is what `make bench` does without a GPU")
def test_cpu_run_times_plain_pytorch_on_one_thread_and_only_checks_the_interpreter(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("TRITON_INTERPRET")  # as `make bench` on a CPU machine; start_run sets it for the parity part
    threads = torch.get_num_threads()
    try:
        rc = bench_rotary.main(["--families", "gqa", "--tokens", "24", "--dtypes", "fp32", "--modes", "fwd",
                                "--out", str(tmp_path)])
        assert torch.get_num_threads() == harness.CPU_THREADS
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    output = capsys.readouterr().out
    assert output.startswith(harness.CPU_TIMING_LINE) and "GB/s" not in output.split("Notes:")[0]
    (folder,) = tmp_path.iterdir()
    rows = {r["provider"]: r for r in results_io.read_results(folder / "rotary.csv")}
    assert set(rows) == {"pi_kernels_torch", "hf", "eager", "pi_kernels"}
    assert rows["pi_kernels_torch"]["device"].endswith(f"CPU, {harness.CPU_THREADS} thread(s)")
    for name in ("pi_kernels_torch", "hf", "eager"):
        assert rows[name]["status"] == "ok" and float(rows[name]["median_ms"]) > 0 and rows[name]["gbs"] == ""
    interpreted = rows["pi_kernels"]
    assert interpreted["status"] == "ok" and float(interpreted["parity"]) <= 1e-5 and interpreted["median_ms"] == ""
    assert "GB/s" not in (folder / "rotary-summary.md").read_text()


def test_providers_name_registered_peers_and_say_why_they_cannot_run():
    """One Provider record and one peer registry: every script's providers name a peer of PEERS (or none: ours);
    gpu_check records the GPU peers' versions and fetch_wheels.sh downloads the registry's wheels."""
    from benchmarks import bench_attention, bench_kv_cache, bench_qkv_proj

    for script in (bench_rotary, bench_attention, bench_qkv_proj, bench_kv_cache):
        for provider in script.PROVIDERS.values():
            assert isinstance(provider, peers.Provider) and (provider.peer is None or provider.peer in peers.PEERS)
    assert peers.gpu_peer_dists() == ["liger-kernel", "flashinfer-python", "flash-attn"]
    assert peers.wheel_specs() == ["liger-kernel==0.8.5", "flashinfer-python==0.7.2.post1"]
    rotary = bench_rotary.PROVIDERS
    assert rotary["liger"].dist == "liger-kernel" and rotary["pi_kernels_torch"].dist == "pi_kernels"
    assert rotary["flashinfer"].unavailable(on_gpu=False) == "needs a CUDA GPU"
    assert rotary["eager"].unavailable(on_gpu=False) is None
    assert peers.Provider("x", None, requires="no_such_module_here").unavailable(True) == (
        "not installed (import no_such_module_here)")
    assert not rotary["flashinfer"].supports("fp32") and rotary["flashinfer"].supports("bf16")
