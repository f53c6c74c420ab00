"""The sm_90 machine code of ``attention_rotary``'s kernels, read without a GPU (issue 11's attention budgets).

Runs ``attention_rotary`` forward and backward on small CPU tensors under the recorder of ``gpu_compile_check.py``
(which binds each launch for the target instead of running it), compiles every recorded attention kernel for sm_90
with the ptxas of the triton wheel, and reads ``cuobjdump -sass``:

* the inner loops: a backward ``BRA`` closes the loop starting at its target; the loops with a tensor-core
  instruction and no such loop inside are inner; for each, its instructions and ``BAR`` barriers (one iteration);
* the tensor-core instructions and their shapes (``HGMMA.64x128x16`` is wgmma M=64, N=128, K=16);
* registers and spill stores (the ``ptxas -v`` log).

Usage: ``python tests/attention_sass.py [--json FILE]``; prints a table (and writes the JSON list of kernels that
``tests/test_attention_budgets.py`` checks). Nothing here runs on a GPU: these are counts read from compiled code.
"""

import os
import sys

# The checkout's tests/ and pi_kernels, before triton is imported (gpu_compile_check removes TRITON_INTERPRET).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import gpu_compile_check as check  # noqa: E402, I001

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ARCH = 90
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
]
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")
_MMA = re.compile(r"\b([HI]G?MMA\.[0-9A-Za-z.]+)")


def inner_loops(sass):
    """[(instructions, barriers, tensor-core instructions)] of the inner loops of one function's SASS, in address
    order: the loops that hold a tensor-core instruction and no other such loop (a loop without one, such as the
    slow path of a sine inside a loop body, is part of its body)."""
    instructions = [(int(address, 16), text) for address, text in _INSTRUCTION.findall(sass)]
    index = {address: i for i, (address, _) in enumerate(instructions)}
    loops = []
    for end, (address, text) in enumerate(instructions):
        branch = _BRANCH.search(text)
        if branch and int(branch[1], 16) < address and int(branch[1], 16) in index:
            start = index[int(branch[1], 16)]
            body = [text for _, text in instructions[start:end + 1]]
            mma = sorted({m for text in body for m in _MMA.findall(text)})
            if mma:
                barriers = sum(bool(re.match(r"(@!?U?P\w+\s+)?BAR\.", text)) for text in body)
                loops.append((start, end, dict(instructions=len(body), barriers=barriers, mma=mma)))
    return [loop for a, b, loop in loops if not any((a, b) != (c, d) and a <= c and d <= b for c, d, _ in loops)]


def compile_sass(job):
    """(SASS, registers, spill store bytes) of one recorded job compiled for its target."""
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    src = ASTSource(check._resolve(job.module, job.name), job.signature, job.constexprs, job.attrs)
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(check.CUOBJDUMP), "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(check.CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    return sass, int(re.search(r"REG:(\d+)", usage)[1]), int(spills[1]) if spills else None


def attention_kernels():
    """One dict per distinct compiled attention kernel: name, dtype, launch config, the variants that launch it,
    constexprs, num_warps, registers, spills, inner loops."""
    recorder = check.RECORDER
    with recorder.active():  # which also makes the ops pick the Triton backend for the recorder's CPU tensors
        for name, options in VARIANTS:
            recorder.run_variant(ARCH, check.Variant(name, check._attention, options), full=False)
    if recorder.failures:
        raise RuntimeError(f"recording failed: {recorder.failures}")
    kernels = []
    for job in recorder.jobs.values():
        if not job.name.startswith("_attention"):
            continue
        params = [p.name for p in check._resolve(job.module, job.name).params]
        sass, registers, spills = compile_sass(job)
        kernels.append(dict(
            name=job.name, dtype=job.dtype, config=job.config, variants=job.variants,
            constexprs={params[path[0]]: value for path, value in job.constexprs.items()
                        if isinstance(value, (bool, int))},
            num_warps=job.options["num_warps"], registers=registers, spills=spills, loops=inner_loops(sass)))
    return kernels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the kernels' figures to this file")
    args = parser.parse_args(argv)
    kernels = attention_kernels()
    for kernel in kernels:
        loops = "; ".join(f"{loop['instructions']} instr, {loop['barriers']} BAR, {' '.join(loop['mma'])}"
                          for loop in kernel["loops"])
        print(f"{kernel['name']} {kernel['dtype']} [{kernel['config']}] regs {kernel['registers']} spills "
              f"{kernel['spills']} | {loops} | {', '.join(kernel['variants'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(kernels, f, indent=1)


if __name__ == "__main__":
    main()
