"""The sm_90 and sm_80 machine code of ``attention_rotary``'s kernels, read without a GPU (issue 11's attention
budgets).

Runs ``attention_rotary`` forward and backward on small CPU tensors under the recorder of ``gpu_compile_check.py``
and compiles every recorded attention kernel for each target with :func:`benchmarks.static_report.triton_metrics`,
which also reads the SASS: per inner loop (an innermost loop holding tensor-core instructions) its instructions
(one iteration, NOPs left out), ``BAR`` barriers, TMA tile loads (``UTMALDG``) and tensor-core shapes
(``HGMMA.64x128x16`` is wgmma M=64, N=128, K=16); registers and spill stores from ptxas.

Usage: ``python tests/attention_sass.py [--json FILE]``; prints a table (and writes the JSON list of kernels that
``tests/test_attention_budgets.py`` checks). Nothing here runs on a GPU: these are counts read from compiled code.
"""

import os
import sys

# The checkout's tests/, benchmarks/ and pi_kernels, before triton is imported (gpu_compile_check removes
# TRITON_INTERPRET).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import gpu_compile_check as check  # noqa: E402, I001

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from benchmarks import static_report  # noqa: E402

ARCHS = (90, 80)
# (name, options of gpu_compile_check._attention). The budgets compare "rope" with "no rope" of the same shapes.
VARIANTS = [
    ("bf16 d128 causal rope", dict(dtype=torch.bfloat16, head_dim=128)),
    ("bf16 d128 causal no rope", dict(dtype=torch.bfloat16, head_dim=128, rotate=False)),
    ("fp16 d128 non-causal rope", dict(dtype=torch.float16, head_dim=128, causal=False)),
    ("fp16 d128 non-causal no rope", dict(dtype=torch.float16, head_dim=128, causal=False, rotate=False)),
    ("bf16 d64 non-causal rope", dict(dtype=torch.bfloat16, head_dim=64, causal=False)),
    ("bf16 d64 non-causal no rope", dict(dtype=torch.bfloat16, head_dim=64, causal=False, rotate=False)),
    # head_dim 80 pads to 128-wide tiles; packed sequences of 100 and 156 tokens: lengths not known to be multiples
    # of 16, which is what made the pipelined dk/dv tiles spill.
    ("fp16 d80 varlen causal rope", dict(dtype=torch.float16, head_dim=80, varlen=True)),
    ("fp16 d80 varlen causal no rope", dict(dtype=torch.float16, head_dim=80, varlen=True, rotate=False)),
    ("fp32 d80 varlen causal rope", dict(dtype=torch.float32, head_dim=80, varlen=True)),
]


def attention_kernels(archs=ARCHS):
    """One dict per distinct compiled attention kernel: arch, name, dtype, launch config, the variants that launch
    it, constexprs (with num_warps), registers, spills, inner loops."""
    variants = [check.Variant(name, check._attention, options) for name, options in VARIANTS]
    metrics, failures = static_report.triton_metrics(archs, variants=variants)
    if failures:
        raise RuntimeError("\n".join(failures))
    return [dict(arch=m.arch, name=m.kernel, dtype=m.dtype, config=m.config, variants=m.variants,
                 constexprs=m.constants, registers=m.regs, spills=m.spill_stores,
                 tma=m.sass.tma, ldgsts=m.sass.ldgsts,
                 loops=[dict(instructions=loop.instructions, barriers=loop.barriers, mma=loop.mma,
                             tma_loads=loop.tma_loads, ldgsts=loop.ldgsts)
                        for loop in m.sass.mma_loops])
            for m in metrics if m.kernel.startswith("_attention")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the kernels' figures to this file")
    args = parser.parse_args(argv)
    kernels = attention_kernels()
    for kernel in kernels:
        loops = "; ".join(f"{loop['instructions']} instr, {loop['barriers']} BAR, {loop['tma_loads']} UTMALDG, "
                          f"{' '.join(loop['mma'])}" for loop in kernel["loops"])
        print(f"sm_{kernel['arch']} {kernel['name']} {kernel['dtype']} [{kernel['config']}] regs "
              f"{kernel['registers']} spills {kernel['spills']} | {loops} | {', '.join(kernel['variants'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(kernels, f, indent=1)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="pi_kernels_attention_sass_") as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir   # a fresh cache: every kernel is compiled and ptxas reports spills
        main()
