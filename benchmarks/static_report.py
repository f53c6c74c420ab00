"""Static report: what the sm_90 (and sm_80) machine code of every shipped kernel says, without a GPU.

Every Triton kernel variant that ``tests/gpu_compile_check.py`` records (its recorder runs the public ops and
captures each launch) is compiled for the target, and the CUDA kernels of ``csrc/kernels.cu`` are compiled with nvcc;
``cuobjdump -sass`` of each cubin is then read for:

* registers, spill stores, shared memory (from the compile check);
* the width of every global load and store: counts of ``LDG``/``STG`` by bits (``STG.E.128`` is 128,
  ``STG.E.U16`` 16, ``STG.E`` 32);
* the copies into shared memory: ``LDGSTS`` (cp.async, sm_80 and later) and the tensor memory accelerator's
  ``UTMALDG``/``UTMASTG`` (TMA tile loads and stores, sm_90), whole kernel and per main-loop iteration;
* the tensor-core instructions and their shapes (``HGMMA.64x128x16`` on sm_90, ``HMMA.16816`` on sm_80);
* the main loop: loops are found from backward branches (a ``BRA`` to a lower address closes the loop that starts
  at its target, unless an ``EXIT`` lies between: that is the way back from an out-of-line slow path, such as the
  retry of an mbarrier wait on sm_90); the main loop is the innermost one with the most instructions; its
  instructions and barriers (``BAR.*``) are counted once, i.e. per iteration;
* fp64 instructions (``DADD``, ``DMUL``, ``DFMA``, ``DSETP``, conversions to or from F64) and ``MUFU`` (the special
  function unit), and for the kernels that rotate a tile of known size, both per rotated element: static count ×
  threads / elements per program (every such instruction of these kernels lies outside loops, so it runs once).

Nothing here has run on a GPU: these are counts read from compiled code, not timings.

API: :func:`triton_metrics` and :func:`cuda_metrics` return one :class:`KernelMetrics` per compiled variant;
:func:`sass_metrics` reads one disassembled function. The budget tests (``tests/test_gpu_compile.py``) use them.

Usage: ``python -m benchmarks.static_report [--arch 90 80] [--full] [--only TEXT] [--out DIR] [--json FILE]``
(``make static-report`` writes ``benchmarks/results/static/sm90.md`` and ``sm80.md``); exit status 1 when the
compile check fails.
"""

import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Imported before anything imports triton: the compile check removes TRITON_INTERPRET first.
from tests import gpu_compile_check as check

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "static"
CSRC = ROOT / "csrc"
# The flags torch's CUDAExtension passes to nvcc (as tests/test_csrc.py), so the report reads what the build compiles.
NVCC_FLAGS = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.MULTILINE)
_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.MULTILINE)
_FP64_OPCODES = {"DADD", "DMUL", "DFMA", "DSETP", "DSET", "DMNMX", "DMMA"}
_CONVERSIONS = {"F2F", "I2F", "F2I", "FRND"}
_MMA_OPCODES = {"HGMMA", "HMMA", "IMMA", "DMMA", "IGMMA"}
_TMA_OPCODES = {"UTMALDG", "UTMASTG"}


def _access_bits(modifiers):
    """Bits of one LDG/STG from its modifiers: .128 / .64, .U16 / .S16, .U8 / .S8; 32 without a width."""
    for modifier, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if modifier in modifiers:
            return bits
    return 32


@dataclass
class Loop:
    """One loop of a function: addresses of its first instruction and of its backward branch."""

    start: int
    end: int
    instructions: int = 0
    barriers: int = 0
    mma: list = field(default_factory=list)       # the tensor-core instruction shapes in it
    tma_loads: int = 0                            # UTMALDG in it
    ldgsts: int = 0                               # LDGSTS in it


@dataclass
class SassMetrics:
    """Counts read from one function's SASS."""

    instructions: int = 0                         # without NOPs
    loads: dict = field(default_factory=dict)     # bits -> count of LDG
    stores: dict = field(default_factory=dict)    # bits -> count of STG
    ldgsts: int = 0                               # LDGSTS (cp.async into shared memory)
    tma: dict = field(default_factory=dict)       # "UTMALDG" / "UTMASTG" -> count (TMA tile copies)
    mma: dict = field(default_factory=dict)       # e.g. "HGMMA.64x128x16" -> count
    fp64: int = 0
    mufu: int = 0
    loops: int = 0
    loop_instructions: int = 0                    # in the main loop (innermost, most instructions), per iteration
    loop_barriers: int = 0                        # BAR.* in the main loop
    loop_tma_loads: int = 0                       # UTMALDG in the main loop
    mma_loops: list = field(default_factory=list)  # Loop of each innermost loop with tensor-core instructions


def _parse(sass):
    """(address, opcode, modifiers, operands) of each instruction, NOPs left out."""
    out = []
    for address, text in _INSTRUCTION.findall(sass):
        text = re.sub(r"^@!?U?P\w+\s+", "", text)
        mnemonic, _, operands = text.partition(" ")
        opcode, *modifiers = mnemonic.split(".")
        if opcode != "NOP":
            out.append((int(address, 16), opcode, modifiers, operands))
    return out


def sass_metrics(sass):
    """:class:`SassMetrics` of the SASS text of one function (``cuobjdump -sass`` output)."""
    instructions = _parse(sass)
    metrics = SassMetrics(instructions=len(instructions))
    loads, stores, mma, tma = Counter(), Counter(), Counter(), Counter()
    loops = []
    for address, opcode, modifiers, operands in instructions:
        if opcode == "LDG":
            loads[_access_bits(modifiers)] += 1
        elif opcode == "STG":
            stores[_access_bits(modifiers)] += 1
        elif opcode in _MMA_OPCODES:
            mma[".".join([opcode, *modifiers[:1]])] += 1
        elif opcode in _TMA_OPCODES:
            tma[opcode] += 1
        elif opcode == "LDGSTS":
            metrics.ldgsts += 1
        if opcode in _FP64_OPCODES or (opcode in _CONVERSIONS and "F64" in modifiers):
            metrics.fp64 += 1
        elif opcode == "MUFU":
            metrics.mufu += 1
        # The target is the branch's last operand (a predicate may come first: BRA.U !UP0, 0x...).
        target = re.findall(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target[-1], 16) < address:
            loops.append(Loop(int(target[-1], 16), address))
    # A backward branch across an EXIT closes no loop: it returns from an out-of-line slow path placed after the
    # function's end (the retry of an mbarrier wait, sm_90) to the instruction after the one that branched there.
    exits = [address for address, opcode, _, _ in instructions if opcode == "EXIT"]
    loops = [loop for loop in loops if not any(loop.start <= address <= loop.end for address in exits)]
    for loop in loops:
        body = [(opcode, modifiers) for address, opcode, modifiers, _ in instructions
                if loop.start <= address <= loop.end]
        loop.instructions = len(body)
        loop.barriers = sum(opcode == "BAR" for opcode, _ in body)
        loop.tma_loads = sum(opcode == "UTMALDG" for opcode, _ in body)
        loop.ldgsts = sum(opcode == "LDGSTS" for opcode, _ in body)
        loop.mma = sorted({".".join([opcode, *modifiers[:1]]) for opcode, modifiers in body if opcode in _MMA_OPCODES})
    innermost = [loop for loop in loops if not any(other is not loop and loop.start <= other.start and
                                                   other.end <= loop.end for other in loops)]
    if innermost:
        main = max(innermost, key=lambda loop: loop.instructions)
        metrics.loop_instructions, metrics.loop_barriers = main.instructions, main.barriers
        metrics.loop_tma_loads = main.tma_loads
    metrics.loads, metrics.stores, metrics.mma = dict(sorted(loads.items())), dict(sorted(stores.items())), \
        dict(sorted(mma.items()))
    metrics.tma = dict(sorted(tma.items()))
    metrics.loops = len(loops)
    # The loops that hold tensor-core instructions and no other such loop (a loop without them inside one, such as
    # a slow path, is part of its body), in address order.
    with_mma = [loop for loop in loops if loop.mma]
    metrics.mma_loops = sorted((loop for loop in with_mma if not any(
        other is not loop and loop.start <= other.start and other.end <= loop.end for other in with_mma)),
        key=lambda loop: loop.start)
    return metrics


def disassemble(cubin):
    """{function name: SASS text} of a cubin (bytes), with the cuobjdump of the triton wheel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([str(check.CUOBJDUMP), "-sass", file.name], capture_output=True, text=True,
                              check=True).stdout
    starts = list(_FUNCTION.finditer(sass))
    return {match[1]: sass[match.end():starts[i + 1].start() if i + 1 < len(starts) else len(sass)]
            for i, match in enumerate(starts)}


# Elements (of q or k, rotated or copied) one program of a rotating kernel writes, from its constexprs: the
# denominator of the per-element counts. Kernels not listed get no per-element figure.
ELEMENTS_PER_PROGRAM = {
    "_rotary_kernel": lambda c: c["BLOCK_T"] * 2 * c["BLOCK_HALF"] * (c["Q_HEADS"] + c["K_HEADS"]),
}


@dataclass
class KernelMetrics:
    """One compiled kernel variant: where it comes from, its resources and its SASS counts."""

    arch: int
    kernel: str
    source: str                   # "triton" or "cuda"
    config: str                   # launch config (Triton) or template arguments (CUDA)
    dtype: str
    variants: list
    constants: dict = field(default_factory=dict)  # int and bool constexprs by name, and num_warps (Triton)
    regs: int = 0
    spill_stores: int = 0
    smem: int = 0
    sass: SassMetrics = field(default_factory=SassMetrics)
    fp64_per_element: float | None = None
    mufu_per_element: float | None = None
    error: str | None = None

    @property
    def stores_all_128(self):
        """Whether every global store is 128-bit (and there is at least one)."""
        return bool(self.sass.stores) and set(self.sass.stores) == {128}


def _triton_kernel_metrics(job, result):
    constants = {name: value for name, value in job.constants.items() if isinstance(value, (bool, int))}
    metrics = KernelMetrics(job.arch, job.name, "triton", job.config, job.dtype, list(job.variants), constants)
    if "error" in result:
        metrics.error = result["error"]
        return metrics
    metrics.regs, metrics.spill_stores, metrics.smem = result["regs"], result["spill_stores"], result["smem"]
    functions = disassemble(result["cubin"])
    metrics.sass = sass_metrics(functions[job.name])
    elements = ELEMENTS_PER_PROGRAM.get(job.name)
    if elements is not None:
        threads_per_element = 32 * job.constants["num_warps"] / elements(job.constants)
        metrics.fp64_per_element = metrics.sass.fp64 * threads_per_element
        metrics.mufu_per_element = metrics.sass.mufu * threads_per_element
    return metrics


def triton_metrics(archs=(90,), full=False, only=None, jobs=2, variants=None):
    """Compile the recorded Triton kernel variants for ``archs``; returns (list of :class:`KernelMetrics`, list of
    compile-check failure messages). ``variants``: these ``check.Variant``s instead of the compile check's (then
    nothing is reported as not covered)."""
    given = variants is not None
    variants = variants if given else check.selected_variants(full, only)
    recorder = check.record_all(list(archs), variants, full)
    compile_jobs = list(recorder.jobs.values())
    # The slow compiles first, so the pool does not finish on one of them alone.
    compile_jobs.sort(key=lambda job: not job.name.startswith(("_qkv", "_attention_forward", "_attention_backward_d")))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(check.compile_job, compile_jobs))
    failures = [f"OP FAILED: {name} on sm_{arch}: {message}" for arch, name, message in recorder.failures]
    for job, result in zip(compile_jobs, results, strict=True):
        failures += check.check(job, result)
    if only is None and not given:
        compiled = {(job.module, job.name, job.arch) for job in compile_jobs}
        failures += [f"NOT COVERED: {module}.{name} was compiled for sm_{arch} by no variant"
                     for module, name in sorted(check.package_kernels()) for arch in archs
                     if (module, name, arch) not in compiled]
    metrics = [_triton_kernel_metrics(job, result) for job, result in zip(compile_jobs, results, strict=True)]
    return metrics, failures


def _nvcc():
    """Path of nvcc (CUDA_HOME, /usr/local/cuda, PATH) or None."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def _demangled(name):
    """``rotary_kernel<bf16, 8, TurnsSource>`` from a mangled kernel name, via c++filt (binutils) when present."""
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if filt:
        text = subprocess.run([filt, name], capture_output=True, text=True).stdout.strip()
        text = re.sub(r"^void |\(.*\)$|pi_kernels::(detail::)?", "", text)
        return text.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")
    return name


def cuda_metrics(arch=90):
    """Compile ``csrc/kernels.cu`` for sm_``arch`` with nvcc; one :class:`KernelMetrics` per kernel, or None when
    there is no nvcc."""
    nvcc = _nvcc()
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "kernels.cubin")
        subprocess.run([nvcc, f"-arch=sm_{arch}", "-cubin", *NVCC_FLAGS, f"-I{CSRC / 'include'}", "-o", str(cubin),
                        str(CSRC / "kernels.cu")], check=True, capture_output=True, text=True)
        usage = subprocess.run([str(check.CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        functions = disassemble(cubin.read_bytes())
    regs = dict(re.findall(r"Function (\S+):\s*\n?\s*REG:(\d+)", usage))
    out = []
    for name, sass in sorted(functions.items()):
        readable = _demangled(name)
        kernel, _, config = readable.partition("<")
        dtype = config.split(",")[0]
        out.append(KernelMetrics(arch, kernel, "cuda", config.rstrip(">"), dtype, [], regs=int(regs.get(name, 0)),
                                 sass=sass_metrics(sass)))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------------

def _widths(counts):
    return " ".join(f"{count}×{bits}" for bits, count in sorted(counts.items(), key=lambda kv: -int(kv[0]))) or "-"


def _per_element(value):
    return "-" if value is None else f"{value:.3g}"


def markdown(arch, metrics, command):
    """The report for one target as Markdown."""
    lines = [f"# Static report, sm_{arch}", "",
             f"Generated by `{command}` without a GPU: counts read from the compiled machine code "
             "(`cuobjdump -sass`), not timings. See `benchmarks/static_report.py` for what each column means.", "",
             "Columns: registers per thread; spill stores (bytes per thread); shared memory (bytes); global loads "
             "and stores as count×bits; `LDGSTS` (cp.async) and TMA tile loads/stores (`UTMALDG`/`UTMASTG`); "
             "tensor-core instructions; loops; instructions, `BAR` barriers and `UTMALDG` per iteration of the main "
             "loop; fp64 and MUFU instructions (static count, and per rotated element where the tile size is "
             "known).", "",
             "| kernel | config | dtype | regs | spill | smem | LDG | STG | LDGSTS | TMA ld/st | MMA | loops "
             "| loop instr | loop bar | loop TMA | fp64 | fp64/elem | MUFU | MUFU/elem | variants |",
             "|---|---|---|--:|--:|--:|---|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    rows = sorted((m for m in metrics if m.arch == arch), key=lambda m: (m.source != "triton", m.kernel, m.dtype,
                                                                         m.config))
    for m in rows:
        variants = "; ".join(m.variants[:2]) + (f" (+{len(m.variants) - 2})" if len(m.variants) > 2 else "")
        if m.error:
            lines.append(f"| {m.kernel} | {m.config} | {m.dtype} | COMPILE FAILED ||||||||||||||||| {variants} |")
            continue
        s = m.sass
        mma = " ".join(f"{count}×{name}" for name, count in s.mma.items()) or "-"
        lines.append(f"| {m.kernel} | {m.config.replace('|', '/')} | {m.dtype} | {m.regs} | {m.spill_stores} | "
                     f"{m.smem} | {_widths(s.loads)} | {_widths(s.stores)} | {s.ldgsts} | "
                     f"{s.tma.get('UTMALDG', 0)}/{s.tma.get('UTMASTG', 0)} | {mma} | {s.loops} | "
                     f"{s.loop_instructions} | {s.loop_barriers} | {s.loop_tma_loads} | {s.fp64} | "
                     f"{_per_element(m.fp64_per_element)} | "
                     f"{s.mufu} | {_per_element(m.mufu_per_element)} | {variants} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(check.SMEM_LIMITS))
    parser.add_argument("--full", action="store_true", help="every variant of the compile check")
    parser.add_argument("--only", metavar="TEXT", help="only the Triton variants whose name contains TEXT")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--out", type=Path, help="write sm<arch>.md for each target into this directory")
    parser.add_argument("--json", type=Path, help="write every KernelMetrics and the failures as JSON")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    metrics, failures = triton_metrics(args.arch, args.full, args.only, args.jobs)
    for arch in args.arch:
        metrics += cuda_metrics(arch) or []
    shown = [f"--arch {' '.join(map(str, args.arch))}"] + (["--full"] if args.full else []) + \
        ([f"--only {args.only!r}"] if args.only else [])
    command = "python -m benchmarks.static_report " + " ".join(shown)
    for arch in args.arch:
        text = markdown(arch, metrics, command)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"sm{arch}.md").write_text(text)
        else:
            print(text)
    if args.json:
        args.json.write_text(json.dumps({"metrics": [asdict(m) for m in metrics], "failures": failures}))
    print(f"{len(metrics)} kernel variants in {time.perf_counter() - start:.0f}s")
    for message in failures:
        print(f"\n- {message}")
    return 1 if failures else 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="pi_kernels_static_report_") as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir   # a fresh cache: every kernel is compiled and checked by ptxas
        sys.exit(main())
