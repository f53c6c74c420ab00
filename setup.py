"""Build script for pi_kernels.

The Triton package installs everywhere. The CUDA extension (``pi_kernels._C``, sources in ``csrc/``) is added only
when a CUDA build of torch and ``nvcc`` are present and ``PI_KERNELS_SKIP_CUDA_BUILD`` is unset; the build never
touches git or the network. Install with ``pip install -e . --no-build-isolation`` so this script sees the
installed torch (under pip's build isolation it sees none and installs the Triton package alone).

``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``"8.0;9.0"``: A100 and H100); ``MAX_JOBS`` caps the
parallel compile jobs (ninja builds, which torch uses when ninja is installed).
"""

import os

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cuda_extension():
    """(ext_modules, cmdclass, why it is skipped or None) for the CUDA extension."""
    if os.environ.get("PI_KERNELS_SKIP_CUDA_BUILD"):
        return [], {}, "PI_KERNELS_SKIP_CUDA_BUILD is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not importable (build isolation? use --no-build-isolation)"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return [], {}, "nvcc not found (set CUDA_HOME)"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    root = os.path.dirname(os.path.abspath(__file__))
    extension = CUDAExtension(
        name="pi_kernels._C",
        sources=["csrc/bindings.cpp", "csrc/kernels.cu"],
        include_dirs=[os.path.join(root, "csrc", "include")],
        # No --use_fast_math: the kernels need the accurate sinf/cosf (csrc/include/rope_math.cuh).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [extension], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, skipped = cuda_extension()
if skipped:
    print(f"pi_kernels: building without the CUDA extension ({skipped}); the Triton kernels need none")

setup(
    name="pi_kernels",
    version="0.1.0",
    description="Fused GPU kernels for RoPE models extended by Position Interpolation",
    packages=find_packages(include=["pi_kernels", "pi_kernels.*"]),
    # The tested range (README, "Versions"; CI runs each end in a virtual environment of its own: `make
    # check-oldest`, `make check-gpu-image`, `make check-newest`). The floors are where every feature works:
    # Python 3.10 (transformers 5's own floor); torch 2.8 (torch.library.custom_op/register_fake/register_autograd
    # came in 2.4 and FSDP2's public torch.distributed.fsdp.fully_shard in 2.6, but torch 2.6 and 2.7 pin Triton 3.2
    # and 3.3, whose autotuner asks for a GPU driver at import, so `import pi_kernels` fails on a CPU machine there);
    # Triton 3.4 (the first whose autotuner waits for a launch); transformers 5.4 (rope_parameters came in 5.0, but
    # pi_kernels.integrations.transformers mirrors the attention forward of 5.4 on, which hands the KV cache no
    # cache_position, and refuses an older one at import).
    # triton < 3.10: 3.9 is the newest tested (`make check-triton-newest`: every kernel's float32 cases under its
    # interpreter; the static report compiles under it too), though no torch up to 2.14 pins it (2.14: 3.8). The
    # attention kernels use tensor descriptors (tl.make_tensor_descriptor, Triton 3.4 on), not the block pointers
    # 3.9 removed.
    # numpy: Triton's interpreter (TRITON_INTERPRET=1, how the kernels run and are tested on a CPU) imports it, and
    # Triton does not declare it; it is small, so it is required rather than an extra a user finds missing later.
    python_requires=">=3.10",
    install_requires=["torch>=2.8", "triton>=3.4,<3.10", "numpy"],
    # pi_kernels.integrations.transformers (patch_model) and the PI recipe (pi_kernels.recipes, whose plots need
    # matplotlib); the core ops need neither.
    extras_require={"transformers": ["transformers>=5.4,<6"],
                    "recipes": ["transformers>=5.4,<6", "matplotlib"]},
    # vLLM loads general plugins from this group in every process; pi_kernels.integrations.vllm.register does
    # nothing unless PI_KERNELS_VLLM=1, so installing pi_kernels never changes a vLLM model silently.
    entry_points={"vllm.general_plugins": ["pi_kernels = pi_kernels.integrations.vllm:register"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
