"""Compile every Triton kernel of pi_kernels for sm_90 (H100) and sm_80 (A100) on a machine without a GPU.

Triton's interpreter, which the test suite uses without a GPU, never compiles a kernel, so it misses every error of
a real compile: a non-constexpr module global read in a kernel (``NameError: Cannot access global variable``), an
unsupported op or dtype, a layout conversion the backend refuses, shared memory past the device's limit, spills.
This script finds them without a GPU: ptxas ships inside the triton wheel, and Triton compiles for a named target.

How
---
1. Record. The public ops run on small CPU tensors with ``JITFunction.run`` replaced by a recorder that binds the
   arguments exactly as a launch would (specialization, constexprs, options for the target) and returns without
   launching; ``Autotuner.run`` is replaced so that every config of an autotuned kernel is recorded, not only the
   one the tuner would pick. TRITON_INTERPRET is removed before triton is imported, so each op takes the branch a
   GPU takes (``_interpreting()`` False: GPU tile tables and autotune configs, 16-bit dots, DOT_FP32 off, tf32 when
   torch would use it); :func:`check_gpu_branches` asserts it. Launches write nothing, so the ops' outputs are
   ``torch.empty`` garbage; no op reads its outputs' values, so forward and backward both run through.
2. Compile. Each distinct (target, kernel, specialization) is compiled once with ``triton.compile`` in a pool of
   processes, in a fresh TRITON_CACHE_DIR (a cached kernel would be neither compiled nor checked by ptxas).
3. Report and check, per kernel variant: registers and stack frame (``cuobjdump -res-usage`` from the wheel's
   ``backends/nvidia/bin``), spill stores/loads (the ``ptxas -v`` log Triton writes when asked; cuobjdump has no
   spill figure) and shared memory (``metadata.shared``, Triton's dynamic allocation; cuobjdump's SHARED is the
   static part, 0 for Triton). Failures: a compile error; shared memory above what one block may use on the target
   (:data:`SMEM_LIMITS`); spill stores above the limit of :data:`SPILLS_TODAY`; a ``*_kernel`` of the package that
   no variant compiled.

Variants
--------
:data:`VARIANTS` run the public ops over the constexpr branches of every kernel: layouts, position forms,
interleaved, partial rotary, in place, backward (conjugate), varlen, decode, rotate off, causal or not, bias,
masked K loop, fp32/bf16/fp16, head_dim 64/80/128. By default (the CI set) the autotuned QKV kernel compiles every
config it may tune over for ``qkv bf16 d128`` and ``qkv fp32 d128 ieee`` (what its pruning keeps for a large input:
its 16-bit or its fp32 configs) and, for its other variants, the config its pruning picks for these small inputs (the
one that runs below 1024 tokens); ``--full`` adds variants and compiles every config of every variant.

Usage: ``python tests/gpu_compile_check.py [--arch 90 80] [--full] [--only TEXT] [--jobs N]``; exit status 1 on
any failure. ``benchmarks/static_report.py`` builds on this recorder (and reads the SASS); ``make check-gpu-compile``
(tests/test_gpu_compile.py) runs it in CI.
"""

import os

# Before torch and triton are imported: @triton.jit decides at decoration time whether to interpret, and the ops
# read the variable to pick their GPU or interpreter branch (qkv_proj picks its autotune configs at import).
os.environ.pop("TRITON_INTERPRET", None)
# The tests' single-config switch (conftest.py) would hide the autotune configs a GPU tunes over.
os.environ.pop("PI_KERNELS_AUTOTUNE", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

# The checkout's pi_kernels, installed or not (the script's own directory is what Python puts on sys.path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
CUOBJDUMP = NVIDIA_BIN / "cuobjdump"
PTXAS = NVIDIA_BIN / "ptxas"

# Shared memory one block may use: cudaDevAttrMaxSharedMemoryPerBlockOptin, which Triton compares metadata.shared
# with when it loads a kernel (OutOfResources above it). H100 (sm_90): 227 KiB = 232448 bytes; A100 (sm_80):
# 163 KiB = 166912 bytes (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": 228 KB and
# 164 KB per SM, of which 1 KB is reserved per block). sm_86/sm_89 parts allow 99 KiB; they are not targets here.
SMEM_LIMITS = {90: 232448, 80: 166912}

# Spill stores (bytes per thread, ptxas -v) allowed per kernel variant.
# Memory-bound kernels (rotary, inference, the attention backward's delta pass) and the QKV GEMM (its spilling
# configs are pruned) spill nothing today; any kernel not listed below gets MEMORY_BOUND_SPILL_LIMIT: far above
# today, far below what would cost bandwidth, so a real regression fails. tests/test_gpu_compile.py holds every
# non-attention kernel to 0.
MEMORY_BOUND_SPILL_LIMIT = 1024
# Compute-bound kernels: the largest spill store of each (kernel, input dtype) over all variants and configs of
# ``--full`` (triton 3.6.0); the limit is spill_limit(today): 1.5x rounded up to 256 bytes, at least 256. Growth beyond
# it fails; when a change moves these numbers on purpose, paste the new maxima here. The attention tiles are chosen
# per architecture not to spill (benchmarks/NOTES.md); tests/test_attention_budgets.py holds its shapes to 0.
SPILLS_TODAY = {
    # kernel, dtype                               sm_90   sm_80
    ("_attention_forward_kernel", "bf16"):        (0,     0),
    ("_attention_forward_kernel", "fp16"):        (0,     0),
    ("_attention_forward_kernel", "fp32"):        (0,     0),
    ("_attention_backward_dkdv_kernel", "bf16"):  (0,     0),
    ("_attention_backward_dkdv_kernel", "fp16"):  (0,     0),
    ("_attention_backward_dkdv_kernel", "fp32"):  (0,     0),
    ("_attention_backward_dq_kernel", "bf16"):    (0,     0),
    ("_attention_backward_dq_kernel", "fp16"):    (0,     0),
    ("_attention_backward_dq_kernel", "fp32"):    (0,     0),
}
ARCH_COLUMN = {90: 0, 80: 1}


def spill_limit(kernel, dtype, arch):
    """Spill stores allowed for a variant of ``kernel`` with inputs of ``dtype`` on sm_``arch``."""
    today = SPILLS_TODAY.get((kernel, dtype))
    if today is None:
        return MEMORY_BOUND_SPILL_LIMIT
    return max(256, math.ceil(1.5 * today[ARCH_COLUMN[arch]] / 256) * 256)


# --------------------------------------------------------------------------------------------------------------------
# Recording launches
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One kernel specialization to compile for one target, and the variants that launch it."""

    arch: int
    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str                  # launch parameters shown in the report
    autotuned: bool              # one config of an autotuned kernel
    constants: dict              # constexpr arguments by name, and num_warps
    variants: list = field(default_factory=list)

    @property
    def dtype(self):
        """Element type of the kernel's first pointer argument (its main input), e.g. "bf16"."""
        return next((t[1:] for t in self.signature.values() if isinstance(t, str) and t.startswith("*")), "?")


class Recorder:
    """Replaces ``JITFunction.run`` and ``Autotuner.run`` while active; collects one :class:`Job` per distinct
    compile, and the variants that failed before launching anything."""

    def __init__(self):
        self.jobs = {}
        self.failures = []       # (arch, variant, message)
        self.arch = None
        self.variant = None
        self.phase = "fwd"
        self.every_config = False
        self.tuning = False          # inside Autotuner.run
        self._backends = {}
        self._binders = {}

    def backend(self):
        if self.arch not in self._backends:
            from triton.compiler import make_backend
            self._backends[self.arch] = make_backend(GPUTarget("cuda", self.arch, 32))
        return self._backends[self.arch]

    def record(self, fn, args, kwargs):
        """What ``JITFunction.run`` does before compiling, for the recorder's target instead of the current device."""
        from triton import knobs
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        backend = self.backend()
        binder = self._binders.get((fn, self.arch))
        if binder is None:
            binder = self._binders[(fn, self.arch)] = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        names = [p.name for p in fn.params]
        constants = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        constants["num_warps"] = options.num_warps
        shown = {name: value for name, value in constants.items() if name.startswith("BLOCK")}
        config = " ".join([f"{k[6:] or k}={v}" for k, v in shown.items()]
                          + [f"w{options.num_warps}", f"s{options.num_stages}"])
        key = (self.arch, fn.fn.__module__, fn.fn.__name__, repr(signature), repr(constexprs), repr(attrs),
               repr(sorted(options.__dict__.items())))
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = Job(self.arch, fn.fn.__module__, fn.fn.__name__, signature, constexprs, attrs,
                                       dict(options.__dict__), config, self.tuning,
                                       constants)
        label = f"{self.variant} [{self.phase}]"
        if label not in job.variants:
            job.variants.append(label)

    @contextlib.contextmanager
    def active(self):
        recorder = self
        saved = JITFunction.run, Autotuner.run

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.record(fn, args, kwargs)
            return None

        def autotune(tuner, *args, **kwargs):
            # The library's pruning runs as on a GPU (it must not fail) and picks what is compiled: for a variant
            # that asks for every config, the configs it keeps for a large input (autotuning keys named
            # LARGE_INPUT_KEYS set as for 2**20 tokens), i.e. every config a GPU may tune over and run for these
            # dtypes; otherwise the one it keeps for these small inputs.
            tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
            if recorder.every_config:
                tuner.nargs.update({key: LARGE_INPUT for key in LARGE_INPUT_KEYS if key in tuner.nargs})
            kept = tuner.prune_configs(kwargs)
            assert kept and all(config in tuner.configs for config in kept), "pruning returned no or unknown configs"
            recorder.tuning = True
            try:
                for config in kept:
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                recorder.tuning = False
                tuner.nargs = None
            return None

        # The ops choose their backend from the inputs' device; the recorder's CPU tensors stand for GPU ones, so
        # the choice must be Triton's, as under the interpreter (only the backend choice is told so: the ops' own
        # _interpreting() stays False and they take their GPU branches).
        # Likewise the attention tiles are chosen for the device's architecture: the target's.
        from pi_kernels import _backend
        from pi_kernels.ops import attention
        saved_interpreting, saved_arch = _backend._interpreting, attention._device_arch
        JITFunction.run, Autotuner.run, _backend._interpreting = run, autotune, lambda: True
        attention._device_arch = lambda device: recorder.arch
        try:
            yield
        finally:
            JITFunction.run, Autotuner.run = saved
            _backend._interpreting, attention._device_arch = saved_interpreting, saved_arch

    def run_variant(self, arch, variant, full):
        self.arch, self.variant, self.phase = arch, variant.name, "fwd"
        self.every_config = full or variant.every_config
        try:
            variant.fn(**variant.kwargs)
        except Exception:
            self.failures.append((arch, variant.name, "the op failed before compiling:\n" + traceback.format_exc()))


RECORDER = Recorder()
# Autotuning keys that measure the input size (qkv_proj's token_bucket), and the value they take for "a large input".
LARGE_INPUT_KEYS = ("token_bucket",)
LARGE_INPUT = 2 ** 20


# --------------------------------------------------------------------------------------------------------------------
# Variants: the public ops on small CPU tensors
# --------------------------------------------------------------------------------------------------------------------

def _randn(*shape, dtype, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _backward(outputs):
    RECORDER.phase = "bwd"
    outputs = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(outputs, [torch.randn_like(o) for o in outputs])


def _rotary(dtype, head_dim, layout="bshd", positions=None, n_heads=8, n_kv_heads=8, inplace=False, backward=False,
            **options):
    import pi_kernels
    batch, seq = 2, 64
    if layout == "thd":
        total = 3 * seq
        q = _randn(total, n_heads, head_dim, dtype=dtype, grad=backward)
        k = _randn(total, n_kv_heads, head_dim, dtype=dtype, grad=backward)
        if positions == "ids":
            positions = torch.arange(total, dtype=torch.int64)
        elif positions == "offsets":
            positions = torch.tensor([3, 0, 7], dtype=torch.int32)
        options.update(cu_seqlens=torch.tensor([0, 40, 100, total], dtype=torch.int32), max_seqlen=92)
    else:
        q = _randn(batch, seq, n_heads, head_dim, dtype=dtype, grad=backward)
        k = _randn(batch, seq, n_kv_heads, head_dim, dtype=dtype, grad=backward)
        if positions == "ids":
            positions = torch.randint(0, 4096, (batch, seq), dtype=torch.int64)
        elif positions == "offsets":
            positions = torch.tensor([5, 100], dtype=torch.int64)
    if inplace and backward:
        q, k = q * 1, k * 1  # in place needs non-leaf tensors under autograd
    outs = pi_kernels.rotary_interp(q, k, positions, scaling_factor=4.0, layout=layout, inplace=inplace, **options)
    if backward:
        _backward(outs)


def _qkv(dtype, head_dim, n_heads=4, n_kv_heads=2, hidden=512, bias=False, varlen=False, separate=False,
         matmul_precision="highest", **options):
    import pi_kernels
    rows = (n_heads + 2 * n_kv_heads) * head_dim
    weight = _randn(rows, hidden, dtype=dtype, grad=True)
    b = _randn(rows, dtype=dtype, grad=True) if bias else None
    if separate:
        sizes = [n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim]
        weight = tuple(w.detach().requires_grad_() for w in weight.split(sizes))
        b = tuple(x.detach().requires_grad_() for x in b.split(sizes)) if bias else None
    if varlen:
        x = _randn(96, hidden, dtype=dtype, grad=True)
        options.update(cu_seqlens=torch.tensor([0, 30, 96], dtype=torch.int32),
                       positions=torch.arange(96, dtype=torch.int32))
    else:
        x = _randn(2, 48, hidden, dtype=dtype, grad=True)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)  # fp32 uses tf32 exactly when torch.matmul would
    try:
        outs = pi_kernels.qkv_proj_rotary(x, weight, b, num_heads=n_heads, num_kv_heads=n_kv_heads,
                                          head_dim=head_dim, scaling_factor=4.0, **options)
        _backward(outs)
    finally:
        torch.set_float32_matmul_precision(saved)


def _attention(dtype, head_dim, causal=True, varlen=False, decode=False, rotate=True, backward=True, **options):
    import pi_kernels
    n_heads, n_kv_heads, seq = 8, 2, 256
    if varlen:
        q = _randn(seq, n_heads, head_dim, dtype=dtype, grad=backward)
        k = _randn(seq, n_kv_heads, head_dim, dtype=dtype, grad=backward)
        options.update(cu_seqlens_q=torch.tensor([0, 100, seq], dtype=torch.int32), max_seqlen_q=156)
    else:
        q = _randn(2, 1 if decode else seq, n_heads, head_dim, dtype=dtype, grad=backward)
        k = _randn(2, seq, n_kv_heads, head_dim, dtype=dtype, grad=backward)
    v = _randn(*k.shape, dtype=dtype, grad=backward)
    if decode:
        options.update(positions=seq - 1, rotate_k=False)
    if not rotate:
        options.update(rotate_q=False, rotate_k=False)
    out = pi_kernels.attention_rotary(q, k, v, scaling_factor=4.0, causal=causal, **options)
    if backward:
        _backward([out])


def _rotary_embedding(dtype, head_size, from_cache=True, is_neox=True, rotary_dim=None):
    from pi_kernels import inference
    tokens, n_heads, n_kv_heads = 48, 8, 2
    positions = torch.randint(0, 1000, (tokens,), dtype=torch.int64)
    query = torch.randn(tokens, n_heads * head_size, dtype=dtype)
    key = torch.randn(tokens, n_kv_heads * head_size, dtype=dtype)
    if from_cache:
        angles = torch.arange(1024, dtype=torch.float32)[:, None] * torch.rand((rotary_dim or head_size) // 2)
        cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
        inference.rotary_embedding(positions, query, key, head_size, cache, is_neox, backend="triton")
    else:
        inference.rotary_embedding_interp(positions, query, key, head_size, rotary_dim=rotary_dim, scaling_factor=4.0,
                                          is_neox=is_neox, backend="triton")


def _cache_append(dtype, head_dim, paged=False, kv_layout="nhd", positions=None, **options):
    import pi_kernels
    n_heads, n_kv_heads = 8, 2
    if paged:
        tokens, n_blocks, block_size = 5, 8, 16
        q = torch.randn(tokens, n_heads, head_dim, dtype=dtype)
        k, v = (torch.randn(tokens, n_kv_heads, head_dim, dtype=dtype) for _ in range(2))
        shape = (n_blocks, block_size, n_kv_heads, head_dim) if kv_layout == "nhd" else \
            (n_blocks, n_kv_heads, block_size, head_dim)
        k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        slots = torch.tensor([3, 17, -1, 40, 127], dtype=torch.int64)
        pi_kernels.rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, slots, torch.tensor([3, 17, 0, 8, 15]),
                                                scaling_factor=4.0, kv_layout=kv_layout, backend="triton", **options)
    else:
        batch, new, max_len = 2, 1, 64
        q = torch.randn(batch, new, n_heads, head_dim, dtype=dtype)
        k, v = (torch.randn(batch, new, n_kv_heads, head_dim, dtype=dtype) for _ in range(2))
        k_cache = torch.zeros(batch, max_len, n_kv_heads, head_dim, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        if positions == "ids":
            positions = torch.tensor([[10], [20]])
        pi_kernels.rotary_kv_cache_append(q, k, v, k_cache, v_cache, torch.tensor([10, 20], dtype=torch.int32),
                                          positions=positions, scaling_factor=4.0, backend="triton", **options)


@dataclass
class Variant:
    name: str
    fn: object
    kwargs: dict
    ci: bool = True              # in the default (CI) set; otherwise only with --full
    every_config: bool = False   # compile every autotune config even without --full


bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

VARIANTS = [
    # rotary_interp: the backward is the same kernel with CONJUGATE (and, for qkv_proj's backward, other strides).
    Variant("rotary bshd bf16 d128 arange", _rotary, dict(dtype=bf16, head_dim=128, backward=True)),
    Variant("rotary bshd fp16 d64 ids(b,s) interleaved", _rotary, dict(dtype=fp16, head_dim=64, positions="ids",
                                                                        interleaved=True)),
    Variant("rotary bshd fp32 d128 offsets(b,)", _rotary, dict(dtype=fp32, head_dim=128, positions="offsets")),
    Variant("rotary bshd bf16 d80 rotary_dim=32 copy-tail MQA", _rotary, dict(dtype=bf16, head_dim=80, rotary_dim=32,
                                                                               n_kv_heads=1)),
    Variant("rotary bshd bf16 d128 rotary_dim=64 inplace", _rotary, dict(dtype=bf16, head_dim=128, rotary_dim=64,
                                                                          inplace=True)),
    Variant("rotary thd fp16 d80 ids", _rotary, dict(dtype=fp16, head_dim=80, layout="thd", positions="ids")),
    Variant("rotary thd fp32 d64 offsets(n_seqs,) interleaved", _rotary, dict(dtype=fp32, head_dim=64, layout="thd",
                                                                                positions="offsets", interleaved=True)),
    Variant("rotary thd bf16 d128 arange", _rotary, dict(dtype=bf16, head_dim=128, layout="thd", backward=True),
            ci=False),
    Variant("rotary bshd fp16 d64 ids(b,s) interleaved", _rotary, dict(dtype=fp16, head_dim=64, positions="ids",
                                                                        interleaved=True, backward=True), ci=False),
    Variant("rotary bshd bf16 d128 rotary_dim=64 inplace", _rotary, dict(dtype=bf16, head_dim=128, rotary_dim=64,
                                                                          inplace=True, backward=True), ci=False),

    # qkv_proj_rotary (autotuned GEMM): forward, then the rotary kernel and torch GEMMs in the backward.
    Variant("qkv bf16 d128", _qkv, dict(dtype=bf16, head_dim=128), every_config=True),
    # hidden 528: a masked K loop (528 % BLOCK_K != 0) on a row stride Triton knows divisible by 16, as in real
    # models (hidden 200 made every activation load a 2-byte one, and the tile spilled).
    Variant("qkv fp16 d80 bias separate-weights hidden=528", _qkv, dict(dtype=fp16, head_dim=80, bias=True,
                                                                         separate=True, hidden=528)),
    Variant("qkv fp32 d128 ieee", _qkv, dict(dtype=fp32, head_dim=128), every_config=True),
    Variant("qkv bf16 d128 varlen ids bias", _qkv, dict(dtype=bf16, head_dim=128, bias=True, varlen=True)),
    Variant("qkv fp32 d128 tf32", _qkv, dict(dtype=fp32, head_dim=128, matmul_precision="high"), ci=False),

    # attention_rotary: forward, then the delta, dk/dv and dq kernels.
    Variant("attention bf16 d128 causal", _attention, dict(dtype=bf16, head_dim=128)),
    Variant("attention bf16 d64 non-causal", _attention, dict(dtype=bf16, head_dim=64, causal=False)),
    Variant("attention fp16 d80 interleaved rotary_dim=48 varlen", _attention, dict(dtype=fp16, head_dim=80,
                                                                                     interleaved=True, rotary_dim=48,
                                                                                     varlen=True)),
    Variant("attention bf16 d128 decode rotate_k=False", _attention, dict(dtype=bf16, head_dim=128, decode=True,
                                                                           backward=False)),
    Variant("attention bf16 d128 rotate off", _attention, dict(dtype=bf16, head_dim=128, rotate=False)),
    Variant("attention fp32 d128 causal", _attention, dict(dtype=fp32, head_dim=128)),
    Variant("attention bf16 d128 varlen causal", _attention, dict(dtype=bf16, head_dim=128, varlen=True), ci=False),
    Variant("attention fp16 d80 interleaved rotary_dim=48", _attention, dict(dtype=fp16, head_dim=80,
                                                                              interleaved=True, rotary_dim=48),
            ci=False),

    # pi_kernels.inference (no backward).
    Variant("rotary_embedding bf16 d128 cos_sin_cache neox", _rotary_embedding, dict(dtype=bf16, head_size=128)),
    Variant("rotary_embedding fp16 d64 cos_sin_cache gptj rot=32", _rotary_embedding, dict(dtype=fp16, head_size=64,
                                                                                             is_neox=False,
                                                                                             rotary_dim=32)),
    Variant("rotary_embedding_interp bf16 d128 neox", _rotary_embedding, dict(dtype=bf16, head_size=128,
                                                                               from_cache=False)),
    Variant("rotary_embedding_interp fp32 d80 gptj", _rotary_embedding, dict(dtype=fp32, head_size=80,
                                                                              from_cache=False, is_neox=False)),
    Variant("kv_cache_append bf16 d128", _cache_append, dict(dtype=bf16, head_dim=128)),
    Variant("kv_cache_append fp16 d80 ids rotary_dim=32", _cache_append, dict(dtype=fp16, head_dim=80,
                                                                               positions="ids", rotary_dim=32)),
    Variant("paged_kv_cache_append bf16 d128 nhd", _cache_append, dict(dtype=bf16, head_dim=128, paged=True)),
    Variant("paged_kv_cache_append fp32 d64 hnd interleaved", _cache_append, dict(dtype=fp32, head_dim=64,
                                                                                   paged=True, kv_layout="hnd",
                                                                                   interleaved=True)),
]


def check_gpu_branches():
    """Every op must take the branch a GPU takes; one that still thought it was interpreted would compile the
    interpreter's variant (fp32 dots, small tiles, one autotune config), which is not what runs on a GPU."""
    from pi_kernels.ops import attention, qkv_proj
    assert not attention._interpreting() and not qkv_proj._interpreting(), "TRITON_INTERPRET leaked into the ops"
    assert qkv_proj._qkv_rotary_kernel.configs == qkv_proj._GPU_CONFIGS, "qkv_proj took its interpreter configs"


def package_kernels():
    """(module, name) of every launched kernel of the package: its modules' ``*_kernel`` JIT functions."""
    import pi_kernels  # noqa: F401
    found = set()
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "pi_kernels" or module_name.startswith("pi_kernels.")):
            continue
        for name, obj in vars(module).items():
            while isinstance(obj, Autotuner) or (not isinstance(obj, JITFunction)
                                                 and isinstance(getattr(obj, "fn", None), (JITFunction, Autotuner))):
                obj = obj.fn
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == module_name:
                found.add((module_name, name))
    return found


def selected_variants(full, only):
    return [variant for variant in VARIANTS if (variant.ci or full) and (only is None or only in variant.name)]


def record_all(archs, variants, full):
    check_gpu_branches()
    torch.manual_seed(0)
    with RECORDER.active():
        for arch in archs:
            for variant in variants:
                RECORDER.run_variant(arch, variant, full)
    return RECORDER


# --------------------------------------------------------------------------------------------------------------------
# Compiling (in worker processes)
# --------------------------------------------------------------------------------------------------------------------

def _resolve(module, name):
    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _lines(text, limit):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[:limit] + ([f"... ({len(lines) - limit} more lines)"] if len(lines) > limit else [])


def _short_error(exc):
    """What a compile error says and where: a CompilationError in a @triton.jit helper is wrapped once per call
    level, so show the innermost one (the offending line and its error) and the call sites that led to it."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    compile_errors = [e for e in chain if type(e).__name__ == "CompilationError"]
    if not compile_errors:
        return "\n".join(_lines(f"{type(chain[0]).__name__}: {chain[0]}", 40))
    calls = []
    for outer in compile_errors[:-1]:
        lines = _lines(str(outer), 1000)
        caret = next((i for i, line in enumerate(lines) if line.strip() == "^"), len(lines))
        where = lines[0].removeprefix("at ").rstrip(":")
        calls.append(f"  called at {where}: {lines[caret - 1].strip() if caret else ''}")
    inner = compile_errors[-1]
    root = [] if str(chain[-1]) in str(inner) else [f"{type(chain[-1]).__name__}: {chain[-1]}"]
    return "\n".join(["CompilationError:", *_lines(str(inner), 30), *root, *calls[::-1]])


def compile_job(job):
    """Compile one job; returns a dict of resource usage, or with an "error"."""
    from triton import knobs
    from triton.compiler import ASTSource
    knobs.nvidia.dump_ptxas_log = True   # Triton prints the ptxas -v log (spills) to stdout; captured below
    start = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(_resolve(job.module, job.name), job.signature, job.constexprs, job.attrs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as exc:  # every compile error is a finding: report it, go on with the others
        return {"error": _short_error(exc), "seconds": time.perf_counter() - start}
    result = {"seconds": time.perf_counter() - start, "smem": compiled.metadata.shared,
              "cubin": compiled.asm["cubin"]}
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if spills is None:
        return {"error": "no spill figures in the ptxas -v log (was the kernel taken from a cache?):\n"
                         + log.getvalue()[-2000:], **result}
    result["spill_stores"], result["spill_loads"] = int(spills[1]), int(spills[2])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    if regs is None or stack is None:
        return {"error": f"unexpected cuobjdump -res-usage output:\n{usage}", **result}
    result["regs"], result["stack"] = int(regs[1]), int(stack[1])
    # Tensor-core instruction family of the dots: v2 mma (sm_80), v3 wgmma (sm_90); "-" without tensor-core dots.
    versions = sorted(set(re.findall(r"versionMajor = (\d+)", compiled.asm.get("ttgir", ""))))
    result["mma"] = "v" + "/".join(versions) if versions else "-"
    return result


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------

def check(job, result):
    """The failures of one job, each a message naming the kernel, the target, the launch config and the variants."""
    where = f"{job.name} on sm_{job.arch} [{job.config}], variant(s): {'; '.join(job.variants)}"
    if "error" in result:
        return [f"COMPILE FAILED: {where}\n{result['error']}"]
    failures = []
    if result["smem"] > SMEM_LIMITS[job.arch]:
        consequence = "an autotune config that can never run: tuning skips it as OutOfResources, and a launch " \
                      "that picks it (as the only config left) fails" if job.autotuned else \
            "the launch raises OutOfResources"
        failures.append(f"SHARED MEMORY: {where}: {result['smem']} bytes > {SMEM_LIMITS[job.arch]} that one block "
                        f"may use on sm_{job.arch} ({consequence})")
    limit = spill_limit(job.name, job.dtype, job.arch)
    if result["spill_stores"] > limit:
        failures.append(f"SPILLS: {where}: {result['spill_stores']} bytes of spill stores > {limit} allowed for "
                        f"{job.dtype} on sm_{job.arch} (SPILLS_TODAY / MEMORY_BOUND_SPILL_LIMIT in "
                        f"{Path(__file__).name})")
    return failures


def print_table(jobs, results):
    header = f"{'arch':<5} {'kernel':<32} {'launch config':<30} {'regs':>4} {'stack':>5} {'spill st/ld':>12} " \
             f"{'smem':>6} {'mma':>3} {'sec':>5}  variant(s)"
    print(header)
    print("-" * len(header))
    rows = sorted(zip(jobs, results, strict=True), key=lambda jr: (-jr[0].arch, jr[0].name, jr[0].variants[0]))
    for job, result in rows:
        variants = job.variants[0] + (f" (+{len(job.variants) - 1} more)" if len(job.variants) > 1 else "")
        if "error" in result:
            print(f"sm_{job.arch:<2} {job.name:<32} {job.config:<30} {'COMPILE FAILED':>43}  {variants}")
            continue
        spills = f"{result['spill_stores']}/{result['spill_loads']}"
        print(f"sm_{job.arch:<2} {job.name:<32} {job.config:<30} {result['regs']:>4} {result['stack']:>5} "
              f"{spills:>12} {result['smem']:>6} {result['mma']:>3} {result['seconds']:>5.1f}  {variants}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMITS),
                        help="compute capabilities to compile for (default: 90 80)")
    parser.add_argument("--full", action="store_true", help="every variant, every autotune config of each")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--only", metavar="TEXT", help="only the variants whose name contains TEXT (no coverage check)")
    args = parser.parse_args(argv)
    for tool in (PTXAS, CUOBJDUMP):
        if not tool.exists():
            print(f"error: {tool} is missing from the triton wheel; cannot compile for NVIDIA targets")
            return 2
    start = time.perf_counter()
    variants = selected_variants(args.full, args.only)
    recorder = record_all(args.arch, variants, args.full)
    jobs = list(recorder.jobs.values())
    print(f"recorded {len(jobs)} distinct compiles from {len(variants)} variants x {len(args.arch)} targets in "
          f"{time.perf_counter() - start:.1f}s; compiling with {args.jobs} processes", flush=True)
    # The slow compiles (GEMM, attention) first, so the pool does not finish on one of them alone.
    order = sorted(range(len(jobs)), key=lambda i: not jobs[i].name.startswith(("_qkv", "_attention_forward",
                                                                                   "_attention_backward_d")))
    results = [None] * len(jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for i, result in zip(order, pool.map(compile_job, [jobs[i] for i in order]), strict=True):
            results[i] = result
    print_table(jobs, results)

    failures = [f"OP FAILED: {name} on sm_{arch}: {message}" for arch, name, message in recorder.failures]
    for job, result in zip(jobs, results, strict=True):
        failures += check(job, result)
    compiled = {(job.module, job.name, job.arch) for job in jobs}
    for module, name in sorted(package_kernels()) if args.only is None else []:
        for arch in args.arch:
            if (module, name, arch) not in compiled:
                failures.append(f"NOT COVERED: {module}.{name} was compiled for sm_{arch} by no variant; add one to "
                                f"VARIANTS in {Path(__file__).name}")
    print(f"\n{len(jobs)} kernels compiled in {time.perf_counter() - start:.0f}s")
    if failures:
        print(f"\n{len(failures)} FAILURE(S):")
        for message in failures:
            print(f"\n- {message}")
        return 1
    print("every kernel compiled, within the shared-memory and spill limits")
    return 0


if __name__ == "__main__":
    # A fresh cache: a kernel found in a cache is not compiled again (nor checked by ptxas). Workers inherit it.
    with tempfile.TemporaryDirectory(prefix="pi_kernels_compile_check_") as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        sys.exit(main())
