"""The CUDA extension's sources, and the CUDA backend against the float64 reference and the Triton backend.

On any machine with the CUDA toolkit (CI: no GPU):

* ``csrc/kernels.cu`` (every kernel variant of ``csrc/include``) compiles with nvcc for sm_80 and sm_90, with the
  flags torch's build uses, and ``csrc/bindings.cpp`` compiles (syntax only) against the installed torch headers;
* ``rope_math.cuh``'s angle math, compiled for the host, matches float64 cos/sin to 1e-6 at positions up to 2**20;
* the kernels of ``csrc/include``, compiled for the host and run in emulated blocks (``csrc/tests/emulate.cpp``),
  stand in for the extension's ops, so every ``backend="cuda"`` test below runs on CPU through the real Python
  path (custom ops, ``_cuda`` callers, op schemas) and the real kernel source.

On a GPU machine with the extension built, the same ``backend="cuda"`` tests run on the extension itself; without
the extension they are skipped, not failed. The GPU session also runs them under compute-sanitizer.
"""

import ctypes
import math
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import pi_kernels
from pi_kernels import _backend, _cuda, inference
from pi_kernels._positions import POSITIONS_ARANGE, PositionSpec
from pi_kernels.ops._schema import Rope
from pi_kernels.ops.rotary import LAUNCHERS as ROTARY_LAUNCHERS
from pi_kernels.reference import (
    rotary_angles,
    rotary_embedding_reference,
    rotary_interp_reference,
    rotary_kv_cache_append_reference,
    rotary_paged_kv_cache_append_reference,
)

from .test_all_paths import check_every_path
from .test_inference import assert_cache_written, make_cos_sin_cache, make_new_tokens, make_vllm_qk, random_slots
from .test_rotary import SEQLENS_THD, cu_seqlens_for, make_positions, make_qk
from .tolerances import assert_close, rel_error

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["bshd", "bhsd", "sbhd", "thd"]
# Two implementations of the same float32 math (fused multiply-adds may differ): far below any dtype's tolerance.
BACKEND_AGREEMENT = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# The flags torch's CUDAExtension passes to nvcc (see setup.py), so CI compiles what the real build compiles.
TORCH_NVCC_FLAGS = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
                    "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                    "-D__CUDA_NO_HALF2_OPERATORS__"]


def _find_toolkit():
    """(nvcc, CUDA include dir) or (None, None); nvcc may be a wrapper script, so the headers are looked for."""
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    on_path = shutil.which("nvcc")
    if on_path:
        homes.append(str(Path(on_path).resolve().parent.parent))
    nvcc = next((str(Path(home, "bin", "nvcc")) for home in homes if home and Path(home, "bin", "nvcc").is_file()),
                on_path)
    include = next((str(Path(home, "include")) for home in homes
                    if home and Path(home, "include", "cuda_runtime.h").is_file()), None)
    return (nvcc, include) if nvcc and include else (None, None)


NVCC, CUDA_INCLUDE = _find_toolkit()
CXX = shutil.which("g++") or shutil.which("c++")
needs_toolkit = pytest.mark.skipif(NVCC is None or CXX is None,
                                   reason="needs the CUDA toolkit (nvcc and its headers) and a host C++ compiler")


class _Build:
    """A compile command started at once, so the module's builds run side by side."""

    def __init__(self, command, output=None):
        self.command, self.output = command, output
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self._log = None

    def result(self):
        """(return code, compiler output)."""
        if self._log is None:
            self._log, _ = self.process.communicate(timeout=600)
        return self.process.returncode, self._log


def _bindings_command(tmp):
    """g++ -fsyntax-only of bindings.cpp with torch's headers, or None when this torch ships no CUDA headers."""
    from torch.utils.cpp_extension import include_paths

    torch_includes = include_paths()
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "CUDAGuard.h")) for p in torch_includes):
        return None
    # CPU builds of torch ship the c10/cuda headers but not this generated one; for a syntax check it may be empty.
    stub = tmp / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("")
    system = [str(stub), *torch_includes, sysconfig.get_paths()["include"], CUDA_INCLUDE]
    return [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{CSRC / 'include'}",
            *(flag for p in system for flag in ("-isystem", p)), "-DTORCH_EXTENSION_NAME=_C",
            str(CSRC / "bindings.cpp")]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The three compiles of this module, started together: kernels (nvcc), emulator and bindings (host)."""
    if NVCC is None or CXX is None:
        pytest.skip("needs the CUDA toolkit (nvcc and its headers) and a host C++ compiler")
    tmp = tmp_path_factory.mktemp("csrc")
    kernels = _Build([NVCC, *TORCH_NVCC_FLAGS, "-Werror", "all-warnings", f"-I{CSRC / 'include'}",
                      "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                      "-c", str(CSRC / "kernels.cu"), "-o", str(tmp / "kernels.o")])
    emulator = _Build([CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra",
                       "-Wno-unknown-pragmas", "-Werror", f"-I{CSRC / 'include'}", f"-I{CUDA_INCLUDE}",
                       str(CSRC / "tests" / "emulate.cpp"), "-o", str(tmp / "emulate.so")], tmp / "emulate.so")
    command = _bindings_command(tmp)
    bindings = _Build(command) if command else None
    return {"kernels": kernels, "emulator": emulator, "bindings": bindings}


def _assert_built(build, what):
    code, log = build.result()
    assert code == 0, f"{what} failed to compile:\n{' '.join(build.command)}\n{log[-6000:]}"


@needs_toolkit
def test_kernels_compile_for_sm80_and_sm90(builds):
    _assert_built(builds["kernels"], "csrc/kernels.cu (nvcc, sm_80 + sm_90)")


@needs_toolkit
def test_bindings_compile_against_torch_headers(builds):
    if builds["bindings"] is None:
        pytest.skip("this torch ships no c10/cuda headers")
    _assert_built(builds["bindings"], "csrc/bindings.cpp (syntax check)")


# ctypes mirror of csrc/include/params.h; test_params_layout_matches checks it field by field against the C++.
class Strides4(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("b", "s", "h", "d")]


class IndexArray(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("is_int64", ctypes.c_bool)]


class Positions(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int), ("offset", ctypes.c_int64), ("ids", IndexArray),
                ("stride_b", ctypes.c_int64), ("stride_s", ctypes.c_int64)]


class RotaryParams(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_void_p) for name in ("q", "k", "q_out", "k_out")),
                *((name, Strides4) for name in ("q_strides", "k_strides", "q_out_strides", "k_out_strides")),
                *((name, ctypes.c_int64) for name in ("batch", "seq_len", "n_q_heads", "n_k_heads", "head_dim",
                                                      "rotary_dim")),
                ("turns", ctypes.c_void_p), ("cos_sin_cache", ctypes.c_void_p), ("cache_dtype", ctypes.c_int),
                ("cache_rows", ctypes.c_int64), ("cache_stride_p", ctypes.c_int64), ("cache_stride_d", ctypes.c_int64),
                ("positions", Positions), ("cu_seqlens", IndexArray), ("n_seqs", ctypes.c_int64),
                ("interleaved", ctypes.c_bool), ("conjugate", ctypes.c_bool)]


class CacheAppendParams(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_void_p) for name in ("q", "k", "v", "q_out", "k_cache", "v_cache")),
                *((name, Strides4) for name in ("q_strides", "k_strides", "v_strides", "q_out_strides",
                                                "k_cache_strides", "v_cache_strides")),
                *((name, ctypes.c_int64) for name in ("batch", "seq_len", "n_q_heads", "n_kv_heads", "head_dim",
                                                      "rotary_dim")),
                ("turns", ctypes.c_void_p), ("positions", Positions), ("cache_index", IndexArray),
                ("cache_index_stride", ctypes.c_int64), ("paged", ctypes.c_bool), ("cache_slots", ctypes.c_int64),
                ("block_size", ctypes.c_int64), ("interleaved", ctypes.c_bool)]


DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # pi_kernels::DType


def _strides(x):
    return Strides4(*x.stride())


def _index_array(x):
    return IndexArray(x.data_ptr(), x.dtype == torch.int64) if x is not None else IndexArray(None, True)


def _positions(ids, mode, offset, stride_b, stride_s):
    return Positions(mode, offset, _index_array(ids), stride_b, stride_s)


class Emulator:
    """The emulated kernels as implementations of the ``pi_kernels_cuda`` ops for CPU tensors.

    Each implementation fills the params struct from tensors as ``csrc/bindings.cpp`` does, then runs the kernel
    source in emulated blocks; ``last_plan`` tells which variant ran (vector or scalar chunks).
    """

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        for name in ("pi_emulate_rotary", "pi_emulate_kv_cache_append"):
            getattr(self.lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.lib.pi_last_plan.argtypes = [ctypes.c_void_p]
        self.lib.pi_rope_cos_sin.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                             ctypes.c_void_p]
        self.lib.pi_params_layout.argtypes = [ctypes.c_void_p, ctypes.c_void_p]

    def last_plan(self):
        """(blocks, tokens_per_block, rot_chunks, chunks_per_head, v_chunks) of the last launch."""
        out = (ctypes.c_int64 * 5)()
        self.lib.pi_last_plan(out)
        return tuple(out)

    def _run(self, function, params, dtype):
        error = function(ctypes.byref(params), DTYPE_CODES[dtype])
        assert error == 0, f"emulated launch failed with cudaError_t {error}"

    def rotary(self, q, k, q_out, k_out, turns, positions, position_mode, position_offset, position_stride_b,
               position_stride_s, cu_seqlens, rotary_dim, interleaved, conjugate):
        p = RotaryParams(q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), _strides(q), _strides(k),
                         _strides(q_out), _strides(k_out), *q.shape[:3], k.shape[2], q.shape[3], rotary_dim,
                         turns.data_ptr())
        p.positions = _positions(positions, position_mode, position_offset, position_stride_b, position_stride_s)
        if cu_seqlens is not None:
            p.cu_seqlens, p.n_seqs = _index_array(cu_seqlens), cu_seqlens.numel() - 1
        p.interleaved, p.conjugate = interleaved, conjugate
        self._run(self.lib.pi_emulate_rotary, p, q.dtype)

    def rotary_embedding(self, query, key, positions, cos_sin_cache, turns, rotary_dim, interleaved):
        p = RotaryParams(query.data_ptr(), key.data_ptr(), query.data_ptr(), key.data_ptr(), _strides(query),
                         _strides(key), _strides(query), _strides(key), *query.shape[:3], key.shape[2],
                         query.shape[3], rotary_dim)
        p.positions = _positions(positions, 2, 0, positions.stride(0) if positions.shape[0] > 1 else 0,
                                 positions.stride(1))
        if cos_sin_cache is None:
            p.turns = turns.data_ptr()
        else:
            p.cos_sin_cache, p.cache_dtype = cos_sin_cache.data_ptr(), DTYPE_CODES[cos_sin_cache.dtype]
            p.cache_rows, (p.cache_stride_p, p.cache_stride_d) = cos_sin_cache.shape[0], cos_sin_cache.stride()
        p.interleaved = interleaved
        self._run(self.lib.pi_emulate_rotary, p, query.dtype)

    def kv_cache_append(self, q, k, v, q_out, k_cache, v_cache, turns, positions, position_mode, position_offset,
                        position_stride_b, position_stride_s, cache_index, paged, rotary_dim, interleaved):
        p = CacheAppendParams(*(x.data_ptr() for x in (q, k, v, q_out, k_cache, v_cache)),
                              *(_strides(x) for x in (q, k, v, q_out, k_cache, v_cache)),
                              *q.shape[:3], k.shape[2], q.shape[3], rotary_dim, turns.data_ptr())
        p.positions = _positions(positions, position_mode, position_offset, position_stride_b, position_stride_s)
        p.cache_index, p.cache_index_stride = _index_array(cache_index), cache_index.stride(0)
        p.paged = paged
        p.cache_slots = k_cache.shape[0] * k_cache.shape[1] if paged else k_cache.shape[1]
        p.block_size = k_cache.shape[1] if paged else 1
        p.interleaved = interleaved
        self._run(self.lib.pi_emulate_kv_cache_append, p, q.dtype)


def _op_schemas():
    """The op schemas registered by csrc/bindings.cpp, read from its source so the emulation cannot drift."""
    source = (CSRC / "bindings.cpp").read_text()
    block = source[source.index("TORCH_LIBRARY(pi_kernels_cuda"):source.index("TORCH_LIBRARY_IMPL")]
    return ["".join(re.findall(r'"([^"]*)"', call)) for call in re.findall(r"m\.def\((.*?)\);", block, re.S)]


@pytest.fixture(scope="module")
def emulator(builds):
    """The emulator library, with its ops registered as the CPU implementation of ``torch.ops.pi_kernels_cuda``."""
    _assert_built(builds["emulator"], "csrc/tests/emulate.cpp (host emulation of the kernels)")
    emulated = Emulator(builds["emulator"].output)
    # Load the real extension first where it is built: its TORCH_LIBRARY must be the namespace's first definition.
    _cuda.available()
    library = torch.library.Library("pi_kernels_cuda", "FRAGMENT")
    for schema in _op_schemas():
        name = schema.split("(", 1)[0]
        if not hasattr(torch.ops.pi_kernels_cuda, name):  # defined already when the real extension is loaded
            library.define(schema)
        library.impl(name, getattr(emulated, name), "CPU")
    yield emulated  # the registrations live as long as `library`, i.e. until the module's tests are done


@pytest.fixture
def cuda_backend(device, request, monkeypatch):
    """Where ``backend="cuda"`` runs: the real extension on a GPU machine, the emulated kernels on CPU."""
    if device.type == "cuda":
        if not _cuda.available():
            pytest.skip(f"the CUDA extension is not built: {_cuda.BUILD_HINT}")
        return None
    emulated = request.getfixturevalue("emulator")
    resolve = _backend.resolve_backend
    monkeypatch.setattr(_backend, "resolve_backend",
                        lambda backend, dev, *rest: "cuda" if backend == "cuda" else resolve(backend, dev, *rest))
    return emulated


@needs_toolkit
def test_params_layout_matches(emulator):
    rotary, cache_append = (ctypes.c_int64 * 64)(), (ctypes.c_int64 * 64)()
    emulator.lib.pi_params_layout(rotary, cache_append)
    for struct, layout in ((RotaryParams, rotary), (CacheAppendParams, cache_append)):
        expected = [ctypes.sizeof(struct), *(getattr(struct, name).offset for name, _ in struct._fields_)]
        assert list(layout[:len(expected)]) == expected, f"{struct.__name__} differs from params.h"


@needs_toolkit
def test_rope_math_matches_float64(emulator):
    """rope_math.cuh's reduction, on the host: cos/sin within 1e-6 of float64 at positions up to 2**20, scaling 16,
    where a float32 angle is off by ~4e-3."""
    positions = torch.cat((torch.randint(0, 2**20, (61,)), torch.tensor([0, 2**20 - 1, 2**20])))
    turns = Rope(PositionSpec(POSITIONS_ARANGE), None, 10000.0, 16.0, 128, False).turns("cpu")
    out = torch.empty(positions.numel(), 64, 2, dtype=torch.float32)
    emulator.lib.pi_rope_cos_sin(positions.data_ptr(), positions.numel(), turns.data_ptr(), 64, out.data_ptr())
    angles = rotary_angles(positions, scaling_factor=16.0, rotary_dim=128)
    error = max(float((out[..., 0] - angles.cos()).abs().max()), float((out[..., 1] - angles.sin()).abs().max()))
    assert error <= 1e-6, f"cos/sin off by {error:.2e}"
    float32_angles = (positions.float() / 16.0)[:, None] * (turns * 2 * math.pi * 16.0).float()
    assert float((float32_angles.cos() - angles.cos()).abs().max()) > 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 48])
def test_rotary_interp_cuda_matches_reference_and_triton(device, cuda_backend, dtype, layout, interleaved,
                                                         rotary_dim):
    # Every position form and in-place or not meet every layout across the cases, without multiplying them.
    variant = DTYPES.index(dtype) + LAYOUTS.index(layout) + 2 * interleaved + (rotary_dim is None)
    position_kind = ["none", "int", "offsets", "ids"][variant % 4]
    inplace = variant % 2 == 1
    q, k = make_qk(layout, device, dtype, n_heads=4, n_kv_heads=2 if interleaved else 1, head_dim=96)
    positions = make_positions(position_kind, layout, device)
    options = dict(scaling_factor=4.0, rotary_dim=rotary_dim, interleaved=interleaved, layout=layout)
    if layout == "thd":
        options["cu_seqlens"] = cu_seqlens_for(SEQLENS_THD, device)
    q_before, k_before = q.clone(), k.clone()
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), positions, **options)
    q_triton, k_triton = pi_kernels.rotary_interp(q, k, positions, backend="triton", **options)
    q_out, k_out = pi_kernels.rotary_interp(q, k, positions, inplace=inplace, backend="cuda", **options)
    assert_close(q_out, q_ref, dtype, name="q")
    assert_close(k_out, k_ref, dtype, name="k")
    assert rel_error(q_out, q_triton) <= BACKEND_AGREEMENT[dtype] and rel_error(k_out, k_triton) <= \
        BACKEND_AGREEMENT[dtype], "CUDA and Triton backends disagree"
    if inplace:
        assert q_out is q and k_out is k
    else:
        assert torch.equal(q, q_before) and torch.equal(k, k_before), "a non-inplace call modified its inputs"
    if rotary_dim is not None:
        assert torch.equal(q_out[..., rotary_dim:], q_before[..., rotary_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_vector_and_scalar_paths(device, cuda_backend, dtype, aligned):
    """Heads sliced at a 16-byte boundary of a fused buffer take 16-byte chunks; heads starting one element off
    take the scalar path. Both match the reference."""
    start = 8 if aligned else 1
    fused = torch.randn(2, 19, 4, 128 + 16, device=device, dtype=dtype)
    q, k = fused[:, :, :3, start:start + 128], fused[:, :, 3:, start:start + 128]
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), 7, scaling_factor=2.0, rotary_dim=64)
    q_out, k_out = pi_kernels.rotary_interp(q, k, 7, scaling_factor=2.0, rotary_dim=64, backend="cuda")
    assert_close(q_out, q_ref, dtype, name="q")
    assert_close(k_out, k_ref, dtype, name="k")
    if cuda_backend is not None:
        rot_chunks = cuda_backend.last_plan()[2]
        assert rot_chunks == (32 * q.element_size() // 16 if aligned else 32), "unexpected kernel variant"


@pytest.mark.parametrize("seqlens", [[1, 1, 1, 1], [0, 4, 0, 9, 1, 30, 2, 2, 5], [70]])
def test_packed_sequences_token_linear(device, cuda_backend, seqlens):
    q, k = make_qk("thd", device, torch.float32, seqlens=seqlens, n_heads=2, n_kv_heads=1, head_dim=64)
    cu_seqlens = cu_seqlens_for(seqlens, device).long()
    offsets = torch.randint(0, 9000, (len(seqlens),), device=device)
    q_out, k_out = pi_kernels.rotary_interp(q, k, offsets, layout="thd", cu_seqlens=cu_seqlens, scaling_factor=3.0,
                                            backend="cuda")
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), offsets, layout="thd", cu_seqlens=cu_seqlens,
                                           scaling_factor=3.0)
    assert_close(q_out, q_ref, torch.float32, name="q")
    assert_close(k_out, k_ref, torch.float32, name="k")


def test_poisoned_outputs_are_fully_written(device, cuda_backend):
    q, k = make_qk("bshd", device, torch.float16, batch=2, seq=37, n_heads=5, n_kv_heads=3, head_dim=80)
    q_out, k_out = torch.full_like(q, math.nan), torch.full_like(k, math.nan)
    _cuda.rotary(q, k, q_out, k_out, Rope(PositionSpec(POSITIONS_ARANGE, None, 0), None, 10000.0, 4.0, 48, False))
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), scaling_factor=4.0, rotary_dim=48)
    assert_close(q_out, q_ref, torch.float16, name="q")
    assert_close(k_out, k_ref, torch.float16, name="k")


def test_precision_at_a_million_positions(device, cuda_backend):
    positions = torch.randint(0, 2**20, (2, 64), device=device)
    positions[0, 0] = 2**20
    q, k = make_qk("bshd", device, torch.float32, batch=2, seq=64, n_heads=4, n_kv_heads=2, head_dim=128)
    q_out, k_out = pi_kernels.rotary_interp(q, k, positions, scaling_factor=16.0, backend="cuda")
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), positions, scaling_factor=16.0)
    assert rel_error(q_out, q_ref) <= 1e-6 and rel_error(k_out, k_ref) <= 1e-6


@pytest.mark.parametrize("highest", [2**20, 2**24])
def test_every_path_rotates_alike(device, cuda_backend, highest):
    """tests/test_all_paths.py's check through ``backend="cuda"``: rotary_interp, the vLLM-convention ops and both
    cache appends agree with the float64 reference and with each other at positions up to 2**20 and 2**24."""
    check_every_path(device, highest, "cuda", projection_and_attention=False)


@pytest.mark.parametrize("layout", ["bshd", "thd"])
@pytest.mark.parametrize("inplace", [False, True])
def test_gradients(device, cuda_backend, layout, inplace):
    """The backward runs the CUDA kernel with the conjugate rotation; upstream grads include a stride-0 one."""
    leaf_q, leaf_k = make_qk(layout, device, torch.float32, n_heads=4, n_kv_heads=2, requires_grad=True)
    positions = make_positions("ids", layout, device)
    options = dict(scaling_factor=4.0, rotary_dim=48, layout=layout)
    if layout == "thd":
        options["cu_seqlens"] = cu_seqlens_for(SEQLENS_THD, device)
    q, k = (leaf_q * 1.0, leaf_k * 1.0) if inplace else (leaf_q, leaf_k)
    q_out, k_out = pi_kernels.rotary_interp(q, k, positions, inplace=inplace, backend="cuda", **options)
    grad_q = torch.randn_like(q_out)
    (q_out * grad_q).sum().backward(retain_graph=True)
    k_out.sum().backward()
    q64, k64 = leaf_q.detach().double().requires_grad_(), leaf_k.detach().double().requires_grad_()
    q_ref, k_ref = rotary_interp_reference(q64, k64, positions, **options)
    ((q_ref * grad_q.double()).sum() + k_ref.sum()).backward()
    assert_close(leaf_q.grad, q64.grad, torch.float32, name="dq")
    assert_close(leaf_k.grad, k64.grad, torch.float32, name="dk")


def test_torch_compile_fullgraph(device, cuda_backend):
    def step(q, k, positions):
        q, k = pi_kernels.rotary_interp(q * 1.0, k * 1.0, positions, scaling_factor=4.0, inplace=True,
                                        backend="cuda")
        return (q.float() ** 2).sum() + (k * 3.0).sum()

    q, k = make_qk("bshd", device, torch.float32, requires_grad=True)
    positions = torch.randint(0, 9000, (2, 33), device=device)
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, positions)
    loss.backward()
    grads = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    loss_eager = step(q, k, positions)
    loss_eager.backward()
    assert rel_error(loss, loss_eager) <= 1e-6
    assert_close(grads[0], q.grad, torch.float32, name="dq")
    assert_close(grads[1], k.grad, torch.float32, name="dk")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("cache_dtype", ["same", "float32"])
def test_rotary_embedding_cuda(device, cuda_backend, dtype, is_neox, cache_dtype):
    positions, query, key, fused = make_vllm_qk("flat", device, dtype, head_size=128)
    cos_sin_cache = make_cos_sin_cache(96, device, dtype if cache_dtype == "same" else torch.float32)
    before = fused.clone()
    q_ref, k_ref = rotary_embedding_reference(positions, query.double(), key.double(), 128, cos_sin_cache,
                                              is_neox=is_neox)
    inference.rotary_embedding(positions, query, key, 128, cos_sin_cache, is_neox, backend="cuda")
    assert_close(query, q_ref, dtype, name="query")
    assert_close(key, k_ref, dtype, name="key")
    assert torch.equal(fused[:, 5 * 128:], before[:, 5 * 128:]), "v was written"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_interp_cuda(device, cuda_backend, dtype):
    positions, query, _, _ = make_vllm_qk("batched", device, dtype, head_size=64)
    positions = positions * 1000
    options = dict(rotary_dim=32, scaling_factor=8.0, base=500000.0, is_neox=False)
    q_ref, _ = rotary_embedding_reference(positions, query.double(), None, 64, **options)
    q_triton = query.clone()
    inference.rotary_embedding_interp(positions, q_triton, None, 64, backend="triton", **options)
    inference.rotary_embedding_interp(positions, query, None, 64, backend="cuda", **options)
    assert_close(query, q_ref, dtype, name="query")
    assert rel_error(query, q_triton) <= BACKEND_AGREEMENT[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 48])
def test_kv_cache_append_cuda(device, cuda_backend, dtype, interleaved, rotary_dim):
    batch, new, max_len = 3, 9, 24
    q, k, v = make_new_tokens(device, dtype, (batch, new), n_kv_heads=2)
    k_cache = torch.full((batch, 2, max_len, 80), math.nan, device=device, dtype=dtype).transpose(1, 2)
    v_cache = torch.full((batch, max_len, 2, 80), math.nan, device=device, dtype=dtype)
    cache_seqlens = torch.tensor([0, 11, max_len - new], device=device, dtype=torch.int32)
    options = dict(scaling_factor=4.0, rotary_dim=rotary_dim, interleaved=interleaved)
    q_ref, k_cache_ref, v_cache_ref = rotary_kv_cache_append_reference(
        q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), cache_seqlens, **options)
    q_out = inference.rotary_kv_cache_append(q, k, v, k_cache, v_cache, cache_seqlens, backend="cuda", **options)
    assert_close(q_out, q_ref, dtype, name="q")
    assert_cache_written(k_cache, k_cache_ref, dtype, "k_cache")
    assert_cache_written(v_cache, v_cache_ref, dtype, "v_cache")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_layout", ["nhd", "hnd"])
@pytest.mark.parametrize("head_dim", [128, 80])
def test_paged_kv_cache_append_cuda(device, cuda_backend, dtype, kv_layout, head_dim):
    num_tokens, num_blocks, block_size = 21, 8, 4
    q, k, v = make_new_tokens(device, dtype, (num_tokens,), n_kv_heads=1, head_dim=head_dim)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # aligned: the vector path where head_dim allows
    shape = (num_blocks, block_size, 1, head_dim) if kv_layout == "nhd" else (num_blocks, 1, block_size, head_dim)
    k_cache = torch.full(shape, math.nan, device=device, dtype=dtype)
    v_cache = torch.full_like(k_cache, math.nan)
    slot_mapping = random_slots(num_tokens, num_blocks * block_size, 4, device)
    positions = torch.randint(0, 30000, (num_tokens,), device=device)
    options = dict(scaling_factor=8.0, kv_layout=kv_layout)
    q_ref, k_cache_ref, v_cache_ref = rotary_paged_kv_cache_append_reference(
        q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), slot_mapping, positions, **options)
    q_out = inference.rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, slot_mapping, positions,
                                                   backend="cuda", **options)
    assert_close(q_out, q_ref, dtype, name="q")
    assert_cache_written(k_cache, k_cache_ref, dtype, "k_cache")
    assert_cache_written(v_cache, v_cache_ref, dtype, "v_cache")


def test_out_of_range_indices_are_masked_in_kernel(device, cuda_backend):
    q, k, v = make_new_tokens(device, torch.float32, (4,), n_kv_heads=1)
    k_cache = torch.full((2, 4, 1, 80), math.nan, device=device)
    v_cache = torch.full_like(k_cache, math.nan)
    query = torch.randn(4, 2 * 64, device=device)
    query_before = query.clone()
    pi_kernels.set_value_checks(False)
    try:
        inference.rotary_paged_kv_cache_append(q, k, v, k_cache, v_cache, torch.tensor([8, 3, 1000, -5], device=device),
                                               torch.arange(4, device=device), backend="cuda")
        dense = torch.full((1, 6, 1, 80), math.nan, device=device)
        q1, k1, v1 = make_new_tokens(device, torch.float32, (1, 4), n_kv_heads=1)
        inference.rotary_kv_cache_append(q1, k1, v1, dense, dense.clone(), torch.tensor([4], device=device),
                                         backend="cuda")
        inference.rotary_embedding(torch.tensor([2, 300, 10**6, 5], device=device), query, None, 64,
                                   make_cos_sin_cache(64, device, torch.float32), backend="cuda")
    finally:
        pi_kernels.set_value_checks(True)
    assert (~torch.isnan(k_cache.flatten(0, 1)[:, 0, 0])).tolist() == [i == 3 for i in range(8)]
    assert (~torch.isnan(dense[0, :, 0, 0])).tolist() == [False] * 4 + [True] * 2
    assert torch.equal(query[1:3], query_before[1:3])


def test_backend_choice(device):
    """Auto takes CUDA only for GPU inputs with the extension; asking for a missing CUDA backend says how to build."""
    assert _backend.resolve_backend("triton", device, ROTARY_LAUNCHERS) == "triton"
    expected_auto = "cuda" if device.type == "cuda" and _cuda.available() else "triton"
    assert _backend.resolve_backend("auto", device, ROTARY_LAUNCHERS) == expected_auto
    with pytest.raises(ValueError, match="backend must be one of"):
        pi_kernels.rotary_interp(*make_qk("bshd", device, torch.float32), backend="cutlass")
    if not _cuda.available():
        q, k = make_qk("bshd", device, torch.float32)
        with pytest.raises(RuntimeError, match=r"pip install -e \. --no-build-isolation"):
            pi_kernels.rotary_interp(q, k, backend="cuda")
        with pytest.raises(RuntimeError, match="CUDA extension pi_kernels._C is not available"):
            inference.rotary_kv_cache_append(*make_new_tokens(device, torch.float32, (1, 1)),
                                             torch.zeros(1, 4, 2, 80, device=device),
                                             torch.zeros(1, 4, 2, 80, device=device),
                                             torch.zeros(1, dtype=torch.int64, device=device), backend="cuda")
    elif device.type == "cpu":
        with pytest.raises(ValueError, match="needs tensors on a CUDA device"):
            _backend.resolve_backend("cuda", device, ROTARY_LAUNCHERS)


def test_int64_offsets_past_2_31_elements(device, cuda_backend):
    """Views that start past element 2**31 of their storage: every offset must be computed in int64."""
    if device.type != "cuda":
        pytest.skip("needs 4 GiB of device memory; the emulated kernels use the same int64 arithmetic")
    storage = torch.empty(2**31 + 2**21, device=device, dtype=torch.bfloat16)
    q = storage[-2**20:].view(1, 1024, 8, 128).normal_()
    k = storage[-2**21:-2**20].view(1, 1024, 8, 128).normal_()
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), scaling_factor=2.0)
    for backend in ("cuda", "triton"):
        q_out, k_out = pi_kernels.rotary_interp(q, k, scaling_factor=2.0, backend=backend)
        assert_close(q_out, q_ref, torch.bfloat16, name=f"q ({backend})")
        assert_close(k_out, k_ref, torch.bfloat16, name=f"k ({backend})")
    pi_kernels.rotary_interp(q, k, scaling_factor=2.0, inplace=True, backend="cuda")  # writes past 2**31 too
    assert_close(q, q_ref, torch.bfloat16, name="q (cuda, in place)")
    assert_close(k, k_ref, torch.bfloat16, name="k (cuda, in place)")
