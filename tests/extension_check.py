"""Build the real CUDA extension ``pi_kernels._C`` without a GPU, load it, and check that its ops take what
``pi_kernels/_cuda.py`` passes them.

Run with the python of a CUDA build of torch (``make check-extension`` makes one in ``/tmp/venv-cuda``)::

    /tmp/venv-cuda/bin/python tests/extension_check.py [--archs "8.0;9.0"] [--build-dir DIR]

1. ``setup.py build_ext`` builds the extension for every architecture of ``--archs`` (default sm_80 and sm_90)
   into a temporary folder (the checkout is left as it was), with ``MAX_JOBS`` parallel compiles and no network;
2. ``cuobjdump --list-elf`` shows machine code for each of those architectures in the shared library;
3. the library loads and registers ``torch.ops.pi_kernels_cuda.*`` on a machine without a GPU;
4. every registered op is reached through the public API with ``backend="cuda"`` on CPU tensors: the dispatcher
   parses the arguments ``pi_kernels/_cuda.py`` passes against the op's schema (arity, types, names of keyword
   arguments) before it looks for a kernel, so a call that matches ends in "Could not run ... from the 'CPU'
   backend" and one that does not ends in a schema error. Every op must be reached, and nothing else raised.

Exit status 0 when all of it holds; the first failure is printed with what was expected.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = "8.0;9.0"


def build(build_dir: Path, archs: str) -> Path:
    """Build ``pi_kernels._C`` into ``build_dir`` and return the shared library's path."""
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=archs, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)))
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    env.pop("PI_KERNELS_SKIP_CUDA_BUILD", None)
    started = time.perf_counter()
    command = [sys.executable, "setup.py", "build_ext", "--build-lib", str(build_dir / "lib"),
               "--build-temp", str(build_dir / "tmp")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    libraries = sorted((build_dir / "lib" / "pi_kernels").glob("_C*.so"))
    if result.returncode != 0 or not libraries:
        sys.exit(f"FAIL build: `{' '.join(command)}` exited {result.returncode}, library: {libraries}\n"
                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    print(f"ok   build: {libraries[0].name} for TORCH_CUDA_ARCH_LIST={archs} in "
          f"{time.perf_counter() - started:.0f} s (MAX_JOBS={env['MAX_JOBS']})", flush=True)
    return libraries[0]


def check_architectures(library: Path, archs: str) -> None:
    """Every requested architecture has machine code (an sm_XY ELF) in the library."""
    import triton

    # The toolkit's, else the copy Triton's wheel carries (this machine's toolkit ships nvcc without it).
    candidates = [shutil.which("cuobjdump"), Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump",
                  Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"]
    cuobjdump = next((str(c) for c in candidates if c and os.path.exists(c)), None)
    if cuobjdump is None:
        sys.exit("FAIL architectures: no cuobjdump (PATH, CUDA_HOME/bin, triton/backends/nvidia/bin)")
    listing = subprocess.run([cuobjdump, "--list-elf", str(library)], capture_output=True, text=True, check=True)
    found = set(re.findall(r"sm_(\d+)", listing.stdout))
    wanted = {arch.replace(".", "") for arch in archs.split(";") if arch}
    if not wanted <= found:
        sys.exit(f"FAIL architectures: expected machine code for sm_{', sm_'.join(sorted(wanted))}, "
                 f"found sm_{', sm_'.join(sorted(found))}")
    print(f"ok   architectures: sm_{', sm_'.join(sorted(found))}", flush=True)


def _reach_every_op():
    """Call each public entry point that ends in a ``torch.ops.pi_kernels_cuda`` op, on small CPU tensors."""
    import torch

    import pi_kernels
    from pi_kernels import inference

    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8)
    cache = torch.zeros(1, 16, 1, 8), torch.zeros(1, 16, 1, 8)
    paged = torch.zeros(4, 4, 1, 8), torch.zeros(4, 4, 1, 8)
    tokens = torch.arange(5)
    cos_sin_cache = torch.randn(16, 8)
    return {
        "rotary": lambda: pi_kernels.rotary_interp(q, k, scaling_factor=2.0, backend="cuda"),
        "rotary_embedding": lambda: inference.rotary_embedding(
            tokens, q[0].flatten(1), k[0].flatten(1), 8, cos_sin_cache, backend="cuda"),
        "kv_cache_append": lambda: pi_kernels.rotary_kv_cache_append(
            q, k, v, *cache, torch.tensor([3]), scaling_factor=2.0, backend="cuda"),
        "kv_cache_append (paged)": lambda: pi_kernels.rotary_paged_kv_cache_append(
            q[0], k[0], v[0], *paged, tokens + 2, tokens, scaling_factor=2.0, backend="cuda"),
    }


def check_schemas(library: Path) -> None:
    """Load the library, then reach every registered op through the public API with ``backend="cuda"``."""
    import torch

    import pi_kernels
    from pi_kernels import _backend, _cuda

    # The library sits in the build folder: make it a module of the checkout's package.
    pi_kernels.__path__.append(str(library.parent))
    if not _cuda.available():
        sys.exit(f"FAIL load: pi_kernels._C does not import: {_cuda._extension.get('error')}")
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("pi_kernels_cuda::")}
    print(f"ok   load: torch {torch.__version__} (CUDA {torch.version.cuda}), no GPU "
          f"(cuda available: {torch.cuda.is_available()}); ops {', '.join(sorted(registered))}", flush=True)
    # CPU tensors stand in for GPU ones: past backend resolution, the call reaches the op's dispatcher.
    _backend.resolve_backend = lambda backend, device, *implemented: "cuda"
    reached = set()
    for label, call in _reach_every_op().items():
        try:
            call()
        except NotImplementedError as exc:
            match = re.search(r"Could not run 'pi_kernels_cuda::(\w+)' with arguments from the 'CPU' backend", str(exc))
            if match is None:
                sys.exit(f"FAIL {label}: expected the dispatcher's CPU-backend refusal, got {exc}")
            reached.add(match.group(1))
            schema = getattr(torch.ops.pi_kernels_cuda, match.group(1)).default._schema
            print(f"ok   {label}: arguments match {schema}", flush=True)
        except Exception as exc:  # noqa: BLE001 - any other exception is the failure being checked for
            sys.exit(f"FAIL {label}: the call does not match the op's schema or failed before it: "
                     f"{type(exc).__name__}: {exc}")
        else:
            sys.exit(f"FAIL {label}: returned without reaching a pi_kernels_cuda op")
    if reached != registered:
        sys.exit(f"FAIL coverage: ops registered but never called: {sorted(registered - reached)}; "
                 f"called but not registered: {sorted(reached - registered)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default=DEFAULT_ARCHS, help=f"TORCH_CUDA_ARCH_LIST (default {DEFAULT_ARCHS!r})")
    parser.add_argument("--build-dir", type=Path, help="keep the build here (default: a temporary folder)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))  # the checkout's pi_kernels, whatever the current folder
    import torch

    if torch.version.cuda is None:
        sys.exit(f"FAIL: torch {torch.__version__} is not a CUDA build; run this with a CUDA torch's python "
                 "(make check-extension makes one)")
    with tempfile.TemporaryDirectory(prefix="pi_kernels_ext_") as tmp:
        build_dir = args.build_dir or Path(tmp)
        library = build(build_dir, args.archs)
        check_architectures(library, args.archs)
        check_schemas(library)
    print("extension check passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
