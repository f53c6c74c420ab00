"""Every kernel compiles for sm_90 (H100) and sm_80 (A100) without a GPU, and its machine code meets the budgets.

The rest of the suite runs the kernels under Triton's interpreter, which never compiles them, so errors of a real
compile (a non-constexpr global read in a kernel, an op the backend refuses, shared memory past the device's limit)
would first show on a GPU. ``benchmarks/static_report.py`` compiles them with the ptxas of the triton wheel (on the
recorder of ``tests/gpu_compile_check.py``), and ``csrc/kernels.cu`` with nvcc, and reads the SASS; one run serves
every test here. It runs in a subprocess: conftest.py has set TRITON_INTERPRET in this process, and triton, once
imported in interpreter mode, stays there.

Budgets (issue 11): no spills in any shipped config of the non-attention kernels (4 bytes on sm_80); every global
store of the rotary kernels, the cache appends and the QKV epilogue 128-bit on the contiguous path, in Triton and in
CUDA; every QKV tile a wgmma with N >= 64 on sm_90 (attention's budgets: tests/test_attention_budgets.py). Issue 19:
the sm_90 QKV main loop loads x through TMA (UTMALDG), and the weight too where its rows are in order. Marked
``static``: slow (minutes), so ``make check-gpu-compile`` runs these, not ``make test``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parent.parent
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MISSING = [tool for tool in ("ptxas", "cuobjdump") if not (NVIDIA_BIN / tool).exists()]
ARCHS = (90, 80)

pytestmark = [
    pytest.mark.static,
    pytest.mark.skipif(bool(MISSING), reason=f"the triton wheel has no {' or '.join(MISSING)} under {NVIDIA_BIN}, "
                                             "so kernels cannot be compiled for NVIDIA targets here"),
]

# Kernels whose every global store must be 128-bit on the contiguous path: the Triton rotary, cache-append and QKV
# kernels, and the CUDA vector kernels. The contiguous path, in the variants of tests/gpu_compile_check.py: tensors
# contiguous in the feature dim with 16-byte aligned rows, and a tile of at least 8 elements per thread. Left out,
# and narrower today (see benchmarks/results/static/): single-token decode tiles (one token of one or two heads
# spread over 128 threads).
STORE_BUDGET_KERNELS = ("_rotary_kernel", "_rotary_embedding_kernel", "_rotary_cache_append_kernel",
                        "_qkv_rotary_kernel")
STORE_BUDGET_VARIANTS = ("rotary bshd bf16 d128 arange", "rotary bshd fp32 d128 offsets(b,)",
                         "rotary bshd fp16 d64 ids(b,s) interleaved",
                         "rotary thd fp32 d64 offsets(n_seqs,) interleaved",
                         "attention fp16 d80 interleaved rotary_dim=48 varlen",
                         "rotary bshd bf16 d128 rotary_dim=64 inplace", "rotary thd fp16 d80 ids",
                         "rotary bshd bf16 d80 rotary_dim=32 copy-tail MQA",
                         "qkv bf16 d128", "qkv fp16 d80 bias separate-weights hidden=528", "qkv fp32 d128 ieee",
                         "qkv bf16 d128 varlen ids bias",
                         "rotary_embedding bf16 d128 cos_sin_cache neox", "rotary_embedding_interp bf16 d128 neox",
                         "rotary_embedding fp16 d64 cos_sin_cache gptj rot=32", "rotary_embedding_interp fp32 d80 gptj",
                         "paged_kv_cache_append bf16 d128 nhd", "paged_kv_cache_append fp32 d64 hnd interleaved")
ATTENTION = "_attention"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("static")
    env = {name: value for name, value in os.environ.items() if name not in ("TRITON_INTERPRET", "PI_KERNELS_AUTOTUNE")}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")   # a fresh cache: every kernel really compiled
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.static_report", "--arch", *map(str, ARCHS),
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"static_report.py wrote no report (exit {proc.returncode}):\n{proc.stdout[-4000:]}"
                    f"{proc.stderr[-4000:]}")
    data = json.loads(out.read_text())
    return data["failures"], [m for m in data["metrics"] if not m["error"]]


def _where(m):
    return f"{m['kernel']} sm_{m['arch']} [{m['config']}] {m['dtype']} ({'; '.join(m['variants'][:3])})"


def test_every_kernel_compiles_for_sm90_and_sm80(report):
    failures, _ = report
    assert not failures, "\n\n".join(failures)


# Spill stores allowed per thread outside attention: none on sm_90; on sm_80 one 4-byte register of the fp16 GPT-J
# rotary (read from the report: triton 3.6.0), and no more.
SPILL_BUDGET = {90: 0, 80: 4}


def test_no_spills_outside_attention(report):
    # Attention's spills are its redesign's (tests/gpu_compile_check.py keeps them from growing); every other
    # kernel, every dtype and shipped config, stays within SPILL_BUDGET.
    _, metrics = report
    spilling = [f"{_where(m)}: {m['spill_stores']} bytes" for m in metrics
                if m["source"] == "triton" and not m["kernel"].startswith(ATTENTION)
                and m["spill_stores"] > SPILL_BUDGET[m["arch"]]]
    assert not spilling, "spill stores:\n" + "\n".join(spilling)


def test_triton_stores_are_128_bit_on_the_contiguous_path(report):
    _, metrics = report
    checked = [m for m in metrics if m["source"] == "triton" and m["kernel"] in STORE_BUDGET_KERNELS
               and any(label.rsplit(" [", 1)[0] in STORE_BUDGET_VARIANTS for label in m["variants"])]
    assert {m["kernel"] for m in checked} == set(STORE_BUDGET_KERNELS)
    # A kernel that stores its tiles with TMA (the QKV epilogue on sm_90: UTMASTG) may have no STG at all.
    narrow = [f"{_where(m)}: STG {m['sass']['stores']}" for m in checked
              if set(m["sass"]["stores"]) != {"128"}
              and not (not m["sass"]["stores"] and m["sass"]["tma"].get("UTMASTG", 0))]
    assert not narrow, "global stores narrower than 128 bits (bits: count):\n" + "\n".join(narrow)


# The QKV variants whose weight rows are in pair order = row order (rotate-half over the whole head, head_dim a power
# of two): on sm_90 both operands of every K loop come through TMA. Elsewhere the q and k weight rows are gathered
# with pointers and only x (one UTMALDG per iteration) does; fp32 without tf32 (an FMA loop) keeps pointer loads.
QKV_TMA_BOTH = ("qkv bf16 d128", "qkv bf16 d128 varlen ids bias")


def _qkv_16bit_on_sm90(metrics):
    """The sm_90 QKV GEMM variants with 16-bit operands (tensor cores; fp32 without tf32 is an FMA loop)."""
    compiled = [m for m in metrics if m["kernel"] == "_qkv_rotary_kernel" and m["arch"] == 90
                and m["dtype"] in ("bf16", "fp16")]
    assert compiled
    return compiled


def test_qkv_main_loop_loads_through_tma_on_sm90(report):
    _, metrics = report
    compiled = _qkv_16bit_on_sm90(metrics)
    for m in compiled:
        # One K loop per head type (q, k, v: _project_head inlined three times).
        loops = m["sass"]["mma_loops"]
        both = all(label.rsplit(" [", 1)[0] in QKV_TMA_BOTH for label in m["variants"])
        assert loops, f"{_where(m)}: no main loop found"
        assert all(loop["tma_loads"] >= (2 if both else 1) for loop in loops), f"{_where(m)}: {loops}"
        if both:
            assert m["sass"]["ldgsts"] == 0 and not m["sass"]["stores"], f"{_where(m)}: LDGSTS or STG left"
            assert m["sass"]["tma"].get("UTMASTG", 0) >= 1, _where(m)


def test_cuda_vector_path_stores_are_128_bit(report):
    _, metrics = report
    cuda = [m for m in metrics if m["source"] == "cuda"]
    if not cuda:
        pytest.skip("no nvcc: csrc/kernels.cu not compiled")
    # Template argument 2 is VEC: > 1 on the vector path (16 bytes per access), 1 on the scalar fallback.
    vector = [m for m in cuda if int(m["config"].split(",")[1]) > 1]
    assert {m["kernel"] for m in vector} == {"rotary_kernel", "cache_append_kernel"}
    narrow = [f"{_where(m)}: STG {m['sass']['stores']}" for m in vector if set(m["sass"]["stores"]) != {"128"}]
    assert not narrow, "global stores narrower than 128 bits (bits: count):\n" + "\n".join(narrow)


def test_qkv_tiles_use_wgmma_with_n_at_least_64_on_sm90(report):
    # Attention's tiles: tests/test_attention_budgets.py.
    _, metrics = report
    compiled = _qkv_16bit_on_sm90(metrics)
    for m in compiled:
        shapes = [re.fullmatch(r"HGMMA\.64x(\d+)x\d+", name) for name in m["sass"]["mma"]]
        assert shapes and all(shapes), f"{_where(m)}: tensor-core instructions {m['sass']['mma']}, not HGMMA"
        assert min(int(shape[1]) for shape in shapes) >= 64, f"{_where(m)}: {m['sass']['mma']}"
