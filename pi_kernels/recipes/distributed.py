"""The recipe's training under ``torchrun``: FSDP2, context parallelism and data parallelism.

``torchrun --nproc_per_node N -m pi_kernels.recipes.extend_context --context-parallel C [--fsdp]``: every sequence is
split across a group of C ranks (:mod:`pi_kernels.parallel`: load-balanced shards, positions in the whole
sequence, attention over the whole sequence), the N / C groups each take their share of a step's batch (data
parallel), and with ``--fsdp`` the parameters, gradients and optimizer state are sharded over all N ranks
(``torch.distributed.fsdp.fully_shard``); without it every rank holds the whole model and the gradients are summed
across ranks. Each rank's loss is its tokens' share of the global batch mean, so the summed gradients are those of
the single-process step.

Only training is distributed: a stage trains a sharded copy of the model and copies the trained weights back, so
evaluation and saving see an ordinary model (every rank evaluates it; rank 0 writes the results).
"""

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..integrations.transformers import enable_context_parallel, patch_model, unpatch_model
from ..parallel import context_parallel_positions, context_parallel_shard

__all__ = ["TrainingLayout", "init_training_layout"]


@dataclass(frozen=True)
class TrainingLayout:
    """How the ranks of a torchrun job share the training."""

    world_size: int
    rank: int
    context_parallel: int         # ranks per sequence
    fsdp: bool
    backend: str                  # the torch.distributed backend, "nccl" or "gloo"
    cp_group: object              # this rank's context-parallel group (ranks rank // C * C ...)

    @property
    def data_parallel(self):
        return self.world_size // self.context_parallel

    @property
    def replica(self):
        """This rank's data-parallel index: the ranks of one context-parallel group share a replica."""
        return self.rank // self.context_parallel

    @property
    def is_main(self):
        return self.rank == 0

    def describe(self):
        """How the run ran, for its results."""
        return {"world_size": self.world_size, "context_parallel": self.context_parallel,
                "data_parallel": self.data_parallel, "fsdp": self.fsdp, "backend": self.backend}

    def training_model(self, model):
        """A copy of ``model`` (patched by :func:`patch_model`) laid out for training: context-parallel attention
        across :attr:`cp_group` when C > 1, fully sharded with ``--fsdp``."""
        trained = copy.deepcopy(model)
        if self.context_parallel > 1:
            unpatch_model(trained)
            enable_context_parallel(patch_model(trained, attention=True), self.cp_group)
        if self.fsdp:
            mesh = init_device_mesh(next(trained.parameters()).device.type, (self.world_size,))
            for layer in trained.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(trained, mesh=mesh)
            for module in trained.modules():
                if isinstance(module, FSDPModule):
                    # Losses are shares of the global mean: sum the gradients (with SUM collectives, as gloo needs).
                    module.set_gradient_divide_factor(1.0)
                    module.set_force_sum_reduction_for_comms(True)
        return trained

    def loss(self, trained, tokens):
        """(this rank's loss to backpropagate, the step's mean next-token loss over the whole batch).

        ``tokens`` is the step's whole batch (batch, seq), the same on every rank.
        """
        if tokens.shape[0] % self.data_parallel:
            raise ValueError(f"a batch of {tokens.shape[0]} sequences cannot be split across {self.data_parallel} "
                             f"data-parallel groups; raise batch_tokens or lower the number of groups")
        rows = tokens.tensor_split(self.data_parallel)[self.replica]
        # Shifted on the whole sequence before sharding: a shard's last token predicts the next shard's first.
        labels = F.pad(rows[:, 1:], (0, 1), value=-100)
        inputs = {}
        if self.context_parallel > 1:
            rows, labels = (context_parallel_shard(x, 1, self.cp_group) for x in (rows, labels))
            positions = context_parallel_positions(tokens.shape[1], self.cp_group, device=tokens.device)
            inputs["position_ids"] = positions[None]
        logits = trained(input_ids=rows, use_cache=False, **inputs).logits
        n_tokens = (labels != -100).sum()
        dist.all_reduce(n_tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / n_tokens
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return loss, mean

    def reduce_gradients(self, trained):
        """Sum the gradients across ranks where FSDP does not (every rank holds the whole model)."""
        if self.fsdp:
            return
        for param in trained.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)

    @staticmethod
    def close():
        """Leave the job (destroys the process group)."""
        dist.destroy_process_group()

    @staticmethod
    def copy_back(trained, model):
        """Load the trained copy's weights, gathered whole, into ``model``."""
        state = {name: value.full_tensor() if isinstance(value, DTensor) else value
                 for name, value in trained.state_dict().items()}
        model.load_state_dict(state)


def init_training_layout(*, fsdp, context_parallel, device):
    """Join the torchrun job and build its :class:`TrainingLayout`; None for a single-process run.

    Raises
    ------
    ValueError
        ``--fsdp`` or ``--context-parallel`` outside torchrun, or a world size that is not a multiple of C.
    """
    if isinstance(context_parallel, bool) or not isinstance(context_parallel, int) or context_parallel < 1:
        raise ValueError(f"--context-parallel must be a positive int, got {context_parallel!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ and (fsdp or context_parallel > 1):
        raise ValueError("--fsdp and --context-parallel run under torchrun: torchrun --nproc_per_node N -m "
                         "pi_kernels.recipes.extend_context ...")
    if world_size == 1 and not fsdp and context_parallel == 1:
        return None
    if world_size % context_parallel:
        raise ValueError(f"--context-parallel {context_parallel} must divide the number of ranks {world_size}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    cp_group, _ = dist.new_subgroups(context_parallel)
    return TrainingLayout(world_size, dist.get_rank(), context_parallel, bool(fsdp), backend, cp_group)
