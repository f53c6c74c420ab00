"""Timing of the benchmarks: :func:`measure` (``triton.testing.do_bench`` on a GPU, a wall-clock loop otherwise),
the timing budgets, and the hardware ceilings measured in the same run (:func:`copy_bandwidth_gbs`,
:func:`matmul_tflops`).

Nothing here imports ``triton`` at module level, so a script can still set ``TRITON_INTERPRET`` after importing it
and before the kernels are defined.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

QUANTILES = (0.5, 0.2, 0.8)
# Bounds the wall-clock loop when a call is very cheap; the quantiles are stable long before this.
_MAX_WALLCLOCK_REPS = 1000


@dataclass(frozen=True)
class Budget:
    """Timing parameters passed to :func:`measure`."""

    warmup_ms: float
    rep_ms: float
    min_reps: int = 3


GPU_BUDGET = Budget(25.0, 100.0)
GPU_QUICK_BUDGET = Budget(10.0, 40.0)
CPU_TIMING_BUDGET = Budget(20.0, 150.0, 5)


@dataclass(frozen=True)
class Timing:
    """Run time of one benchmarked call, in milliseconds.

    Attributes
    ----------
    median_ms : float
        Median over the timed repetitions.
    p20_ms, p80_ms : float
        20th and 80th percentiles, a robust spread that ignores the rare outlier.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float


def interpreter_mode() -> bool:
    """Return whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def gpu_available() -> bool:
    """Return whether kernels run compiled on a CUDA GPU, i.e. timings mean GPU performance."""
    return torch.cuda.is_available() and not interpreter_mode()


def _clear_grads(tensors: Iterable[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def measure(
    fn: Callable[[], Any],
    *,
    warmup_ms: float,
    rep_ms: float,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    min_reps: int = 3,
) -> Timing:
    """Time ``fn`` and return its median, p20 and p80 in milliseconds.

    Parameters
    ----------
    fn : callable
        Zero-argument callable doing exactly the work to time.
    warmup_ms : float
        Time spent calling ``fn`` before timing starts (at least one call is always made).
    rep_ms : float
        Time budget for the timed repetitions.
    grad_to_none : sequence of torch.Tensor, optional
        Tensors whose ``.grad`` is reset before each repetition, outside the timed region, so that a
        backward pass writes fresh gradients instead of accumulating into old ones.
    min_reps : int, optional
        Fewest timed repetitions of the wall-clock fallback (slow interpreted calls may exceed ``rep_ms``).

    Returns
    -------
    Timing
        Ordered quantiles: ``p20_ms <= median_ms <= p80_ms``.

    Notes
    -----
    On a GPU this is ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flush between repetitions).
    Without one (Triton interpreter) it falls back to a ``time.perf_counter`` loop after one warm-up call;
    those numbers only show that the code runs, not how fast a GPU would run it.
    """
    if gpu_available():
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES)
        )
        return Timing(float(median), float(p20), float(p80))
    return _measure_wallclock(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=grad_to_none, min_reps=min_reps)


def _measure_wallclock(
    fn: Callable[[], Any],
    *,
    warmup_ms: float,
    rep_ms: float,
    grad_to_none: Sequence[torch.Tensor] | None,
    min_reps: int,
) -> Timing:
    # CUDA tensors can still show up here (interpreter forced on a GPU machine): synchronize so the
    # wall clock covers the work and not just the launch.
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def once() -> float:
        _clear_grads(grad_to_none)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1e3

    spent = once()  # first call pays one-off costs (interpreter setup, allocator growth): never timed
    while spent < warmup_ms:
        spent += once()
    times: list[float] = []
    while len(times) < max(min_reps, 1) or (sum(times) < rep_ms and len(times) < _MAX_WALLCLOCK_REPS):
        times.append(once())
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    median, p20, p80 = (float(v) for v in q)
    return Timing(median, p20, p80)


def copy_bandwidth_gbs(
    device: torch.device | str,
    *,
    size_bytes: int | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> float:
    """Measure the device-to-device copy bandwidth, the ceiling of a memory-bound kernel.

    Parameters
    ----------
    device : torch.device or str
        Where to allocate the buffers.
    size_bytes : int, optional
        Size of the source buffer; defaults to 1 GiB on a GPU (far past L2) and 64 MiB on CPU.
    warmup_ms, rep_ms : float, optional
        Passed to :func:`measure`.

    Returns
    -------
    float
        GB/s (1e9 bytes per second), counting ``2 * size_bytes`` moved per copy (one read, one write).
        On CPU this is host memcpy bandwidth, not a GPU figure.
    """
    device = torch.device(device)
    if size_bytes is None:
        size_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), warmup_ms=warmup_ms, rep_ms=rep_ms)
    return 2 * size_bytes / (timing.median_ms * 1e-3) / 1e9


def matmul_tflops(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    n: int = 8192,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> float | None:
    """Measure dense matmul throughput, the ceiling for compute-bound benchmarks.

    Parameters
    ----------
    device : torch.device or str
        Device to measure.
    dtype : torch.dtype, optional
        Operand dtype, bfloat16 by default.
    n : int, optional
        Square problem size ``n x n @ n x n``.
    warmup_ms, rep_ms : float, optional
        Passed to :func:`measure`.

    Returns
    -------
    float or None
        TFLOP/s (``2 * n**3`` flops per call), or ``None`` without a GPU, where it would mean nothing.
    """
    device = torch.device(device)
    if device.type != "cuda" or not gpu_available():
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = measure(lambda: a @ b, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return 2 * n**3 / (timing.median_ms * 1e-3) / 1e12
