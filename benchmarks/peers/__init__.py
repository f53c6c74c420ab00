"""Who runs in a benchmark: the one registry of peer libraries (:data:`PEERS`) and the :class:`Provider` record in
which every benchmark script lists its implementations under test.

A *peer* is a library the benchmarks compare against (or call for a baseline): its distribution (whose version a
results row records), its import name, whether it runs only on a CUDA GPU, and the pinned wheel the GPU machine gets
from ``.whl/`` (it has no network). What reads the registry: every ``bench_<op>.py`` (a provider names its peer),
``gpu_check`` (the GPU peers' versions in its environment stage) and ``fetch_wheels.sh`` in this folder (the wheels
to download, through :func:`wheel_specs`).

A *provider* is one implementation a script times: this repository's own code (``peer=None``) or an adapter around a
peer's. ``build`` runs outside the timed region, with the script's own arguments (shape, dtype, device, mask, ...),
and returns the callable the script checks and times.

This module imports neither torch nor the peers, so ``fetch_wheels.sh`` can read it anywhere.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["PEERS", "Peer", "Provider", "gpu_peer_dists", "wheel_specs"]


@dataclass(frozen=True)
class Peer:
    """A library the benchmarks run against."""

    dist: str                 # distribution whose version each results row records (package_version)
    module: str | None        # import name looked up before use; None: always importable (torch itself)
    needs_cuda: bool = False  # its kernels run only on a CUDA GPU
    wheel: str | None = None  # pinned wheel fetch_wheels.sh downloads for the GPU machine; None: not shipped there


PEERS = {
    "torch": Peer("torch", None),  # eager PyTorch, torch.compile, scaled_dot_product_attention, F.linear
    "transformers": Peer("transformers", "transformers"),
    "liger": Peer("liger-kernel", "liger_kernel", needs_cuda=True, wheel="liger-kernel==0.8.5"),
    "flashinfer": Peer("flashinfer-python", "flashinfer", needs_cuda=True, wheel="flashinfer-python==0.7.2.post1"),
    "flash_attn": Peer("flash-attn", "flash_attn", needs_cuda=True),
}
OWN_DIST = "pi_kernels"  # the distribution of a provider without a peer: this repository


def gpu_peer_dists() -> list[str]:
    """The distributions of the GPU peers, whose versions ``gpu_check`` records with the environment."""
    return [peer.dist for peer in PEERS.values() if peer.needs_cuda]


def wheel_specs() -> list[str]:
    """The pinned wheels the GPU machine gets (``fetch_wheels.sh``), in the registry's order."""
    return [peer.wheel for peer in PEERS.values() if peer.wheel]


@dataclass(frozen=True)
class Provider:
    """One implementation under test in a benchmark script.

    ``build(...)`` takes the script's own arguments and returns the callable the script checks and times (see each
    script's ``PROVIDERS``). The other fields say what the runner may ask of it.
    """

    name: str
    build: Callable[..., Any]
    note: str = ""                     # what it runs, printed and stored with every row
    peer: str | None = None            # key of PEERS whose library it calls; None: this repository's code
    requires: str | None = None        # a module it needs besides its peer's (pi_kernels._C: the CUDA extension)
    needs_cuda: bool = False           # runs only on a CUDA GPU, whatever its peer (an SDPA GPU backend)
    backward: bool = True              # differentiable (False: forward only)
    rotates: bool = True               # applies RoPE (False: a baseline without it, e.g. the bare GEMM)
    dtypes: tuple[str, ...] | None = None  # dtype names it supports (as in cli.DTYPES); None: all of the script's

    @property
    def dist(self) -> str:
        """The distribution whose version is recorded with its rows."""
        return PEERS[self.peer].dist if self.peer else OWN_DIST

    def supports(self, dtype_name: str) -> bool:
        return self.dtypes is None or dtype_name in self.dtypes

    def unavailable(self, on_gpu: bool) -> str | None:
        """Why it cannot run here (no GPU, a module not installed), or None."""
        peer = PEERS[self.peer] if self.peer else None
        if (self.needs_cuda or (peer is not None and peer.needs_cuda)) and not on_gpu:
            return "needs a CUDA GPU"
        module = self.requires or (peer.module if peer is not None else None)
        if module is not None and importlib.util.find_spec(module) is None:
            return f"not installed (import {module})"
        return None
