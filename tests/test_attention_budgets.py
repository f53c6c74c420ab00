"""Issue 11's budgets for attention, read from the compiled code without a GPU (``tests/attention_sass.py``).

On sm_90:

* RoPE costs nothing inside the loops: the instructions per inner-loop iteration of every attention kernel that a
  call with RoPE launches are at most 1.10x those of the same kernel launched without RoPE;
* every 16-bit tile is a wgmma (``HGMMA``) with N >= 64;
* the rows a program owns are 64 per warpgroup: no two warpgroups compute the same rows;
* the tiles come in through the tensor memory accelerator (issue 19; the inputs of these variants are
  TMA-aligned): every inner loop of the forward and dq kernels loads its K and V tiles with ``UTMALDG``, the dk/dv
  kernel its q and dout tiles, none has an ``LDGSTS`` (cp.async) left, and every output tile is stored with
  ``UTMASTG`` (only lse and delta, rows of float32, are plain loads and stores);
* the bf16 head_dim-128 forward stays within 240 registers (it was at 255 on block pointers).

On sm_90 and sm_80: no spills, for bf16/fp16 at head_dim 64, 80 and 128, dense and packed (varlen), and float32.

Marked ``static`` (it compiles for a minute or more): run by ``make check-gpu-compile``, not by ``make test``.
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
RATIO_BUDGET = 1.10
MIN_WGMMA_N = 64
FORWARD_REGISTERS = 240

pytestmark = [
    pytest.mark.static,
    pytest.mark.skipif(bool(MISSING), reason=f"the triton wheel has no {' or '.join(MISSING)} under {NVIDIA_BIN}"),
]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attention-sass")
    # In a subprocess: conftest.py has set TRITON_INTERPRET here, and triton, once imported so, stays interpreting.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # a fresh cache, so ptxas runs and reports spills
    out = tmp / "kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "attention_sass.py"), "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout)
    assert proc.returncode == 0, f"attention_sass.py failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _core(kernels):
    """The compute-bound kernels on sm_90 (the delta pass is a row reduction without dots)."""
    core = [kernel for kernel in kernels if "delta" not in kernel["name"] and kernel["arch"] == 90]
    assert {kernel["name"] for kernel in core} == {"_attention_forward_kernel", "_attention_backward_dkdv_kernel",
                                                   "_attention_backward_dq_kernel"}
    return core


def _launched_by(kernels, variant):
    return [kernel for kernel in _core(kernels)
            if any(label.startswith(variant + " [") for label in kernel["variants"])]


@pytest.mark.parametrize("shapes", ["bf16 d128 causal", "fp16 d128 non-causal", "bf16 d64 non-causal",
                                    "fp16 d80 varlen causal"])
def test_rope_adds_at_most_10_percent_per_iteration(kernels, shapes):
    with_rope = _launched_by(kernels, f"{shapes} rope")
    without = _launched_by(kernels, f"{shapes} no rope")
    assert with_rope and without
    for kernel in with_rope:
        # The same kernel with the same tile and flags (dk-only and dv-only launches are told apart).
        peers = [other for other in without if other["name"] == kernel["name"]
                 and other["constexprs"] == kernel["constexprs"]]
        assert peers, f"{kernel['name']} [{kernel['config']}] has no counterpart without RoPE"
        ours = [loop["instructions"] for loop in kernel["loops"]]
        theirs = [loop["instructions"] for loop in peers[0]["loops"]]
        assert ours and len(ours) == len(theirs), (kernel["name"], ours, theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert a <= RATIO_BUDGET * b, f"{kernel['name']}: {a} vs {b} instructions per iteration with/without RoPE"


def test_every_16_bit_tile_is_a_wgmma_with_n_at_least_64(kernels):
    for kernel in _core(kernels):
        if kernel["dtype"] not in ("bf16", "fp16"):
            continue  # float32 (TF32) takes 16-row backward steps, N = 16, not to spill (benchmarks/NOTES.md)
        shapes = {mma for loop in kernel["loops"] for mma in loop["mma"]}
        assert shapes, f"{kernel['name']} [{kernel['config']}]: no tensor-core instruction in its loops"
        for mma in shapes:
            match = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", mma)
            assert match, f"{kernel['name']} [{kernel['config']}]: {mma} is not a wgmma"
            assert int(match[2]) >= MIN_WGMMA_N, f"{kernel['name']} [{kernel['config']}]: {mma} has N < 64"


def test_each_warpgroup_owns_its_rows(kernels):
    for kernel in _core(kernels):
        # Rows of the program's own tile: keys for dk/dv, queries otherwise; wgmma gives a warpgroup 64 rows.
        rows = kernel["constexprs"]["BLOCK_N" if "dkdv" in kernel["name"] else "BLOCK_M"]
        warps = kernel["constexprs"]["num_warps"]
        assert rows == 64 * warps // 4, f"{kernel['name']} [{kernel['config']}]: {rows} rows"


def test_no_spills(kernels):
    assert {kernel["arch"] for kernel in kernels} == {90, 80}
    assert {kernel["dtype"] for kernel in kernels} == {"bf16", "fp16", "fp32"}
    for kernel in kernels:
        where = f"sm_{kernel['arch']} {kernel['name']} {kernel['dtype']} [{kernel['config']}]"
        assert kernel["spills"] == 0, f"{where}: {kernel['spills']} bytes spilled"


def test_sm90_main_loops_load_through_tma(kernels):
    for kernel in _core(kernels):
        where = f"{kernel['name']} {kernel['dtype']} [{kernel['config']}]"
        assert kernel["loops"], f"{where}: no inner loop with tensor-core instructions"
        for loop in kernel["loops"]:
            # Two tiles per iteration: K and V (forward, dq), or q and dout (dk/dv).
            assert loop["tma_loads"] >= 2, f"{where}: {loop['tma_loads']} UTMALDG per iteration"
            assert loop["ldgsts"] == 0, f"{where}: {loop['ldgsts']} LDGSTS per iteration"
        assert kernel["tma"].get("UTMASTG", 0) >= 1, f"{where}: the output tile is not stored through TMA"


def test_bf16_d128_forward_registers(kernels):
    forward = [kernel for kernel in _core(kernels) if kernel["name"] == "_attention_forward_kernel"
               and kernel["dtype"] == "bf16" and kernel["constexprs"]["HEAD_DIM"] == 128]
    assert forward
    for kernel in forward:
        assert kernel["registers"] <= FORWARD_REGISTERS, f"[{kernel['config']}]: {kernel['registers']} registers"
