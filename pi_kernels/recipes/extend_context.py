"""Position Interpolation end to end (Chen et al. 2023, arXiv 2306.15595), trained and evaluated on pi_kernels.

1. A base model at context L: by default a small Llama trained from scratch on byte-level tokens of the Python
   standard library's sources (on every machine; ``--text FILE`` for another corpus), with passkey documents mixed
   in so that it learns the task's format at L; or a local Hugging Face checkpoint (``--model PATH``).
2. Extended to L' = 4L and 8L the paper's ways: plain extrapolation (the base model unchanged), Position
   Interpolation without training (:func:`pi_kernels.extend_context`: linear RoPE scaling by L'/L), PI plus a short
   fine-tune at L' (AdamW, linear warm-up, constant rate), and direct fine-tuning at L' without PI for the same steps.
3. Each evaluated at L, 2L, 4L and 8L: sliding-window perplexity on held-out files (every context scores the same
   target tokens) and passkey retrieval (a random 5-digit key at a random depth in filler text; exact match of the
   greedy answer, chance 1e-5).
4. Tables in the paper's shape are printed and written, with the JSON data and PNG plots, under ``--out``; stages
   checkpoint as they go and ``--resume`` continues an interrupted run.

Every model runs through :func:`pi_kernels.integrations.transformers.patch_model`, so RoPE with PI's scaling is
:func:`pi_kernels.rotary_interp` in training and evaluation. Without a GPU the kernels run under Triton's interpreter
(the command re-executes itself with ``TRITON_INTERPRET=1``), which suits ``--smoke`` only: a tiny model and a few
steps whose numbers mean nothing and only check the pipeline.

Fine-tuning keeps the base training's data mixture (corpus plus passkey documents, now L' long): the toy model's
"pre-training distribution" holds the passkey task, as LLaMA's holds what makes the paper's passkey test solvable.

Examples
--------
    python -m pi_kernels.recipes.extend_context --smoke --out /tmp/pi-smoke      # CPU, a couple of minutes
    python -m pi_kernels.recipes.extend_context --out examples/results/h100       # the GPU configuration
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
import triton
from tqdm.auto import tqdm

import pi_kernels
from pi_kernels.integrations.transformers import patch_model

__all__ = ["GPU_CONFIG", "SMOKE_CONFIG", "RecipeConfig", "main", "passkey_accuracy", "run",
           "sliding_window_perplexity"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
METHODS = {  # variant -> the label of the paper's tables
    "extrapolation": "None (extrapolation)",
    "direct_finetune": "FT, no PI",
    "pi": "PI, no FT",
    "pi_finetune": "PI + FT",
}
PASSKEY_DIGITS = 5


@dataclass(frozen=True)
class RecipeConfig:
    """Sizes and schedule of a run; see :data:`GPU_CONFIG` and :data:`SMOKE_CONFIG`."""

    context: int                  # L, the base model's context window
    factors: tuple                # extension factors s, L' = s * L
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    batch_tokens: int             # tokens per optimizer step; the batch is batch_tokens // sequence length
    base_steps: int
    base_lr: float                # peak; linear warm-up from 10 %, cosine decay to 10 %
    base_warmup: int
    finetune_steps: int
    finetune_lr: float            # constant after a linear warm-up from 10 %, as in the paper
    finetune_warmup: int
    passkey_fraction: float       # share of training sequences that are passkey documents
    eval_targets: int             # held-out tokens scored at every evaluation context
    eval_stride: int              # sliding-window stride: each target sees between C - stride and C tokens
    passkey_trials: int           # passkey documents per evaluation context
    eval_batch_tokens: int
    checkpoint_every: int
    rope_theta: float = 10000.0
    weight_decay: float = 0.1     # base training; fine-tuning uses none, as in the paper
    seed: int = 0

    @property
    def eval_contexts(self):
        return [self.context * multiple for multiple in (1, 2, 4, 8)]


# One H100: a 9.5M-parameter byte-level Llama (6 layers, hidden 384, head_dim 64, GQA 6:2) trained on 82M tokens at
# L = 256, then four fine-tunes of 300 steps at 1024 and 2048 (16k tokens a step) and 28 evaluations.
GPU_CONFIG = RecipeConfig(
    context=256, factors=(4, 8), hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024,
    batch_tokens=16384, base_steps=5000, base_lr=1e-3, base_warmup=200, finetune_steps=300, finetune_lr=1e-4,
    finetune_warmup=20, passkey_fraction=0.2, eval_targets=16384, eval_stride=128, passkey_trials=100,
    eval_batch_tokens=65536, checkpoint_every=500)

# Two CPU cores under Triton's interpreter, in about a minute: the numbers are meaningless.
SMOKE_CONFIG = RecipeConfig(
    context=32, factors=(4, 8), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64,
    batch_tokens=64, base_steps=10, base_lr=3e-3, base_warmup=2, finetune_steps=2, finetune_lr=1e-3,
    finetune_warmup=1, passkey_fraction=0.25, eval_targets=16, eval_stride=16, passkey_trials=1,
    eval_batch_tokens=512, checkpoint_every=5)


# ----------------------------------------------------------------------------------------------------------- data

class ByteTokenizer:
    """Bytes as tokens (vocabulary 256): nothing to download, and every text is representable."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_stream(self, text):
        # uint8 keeps the 30 MB corpus at 30 MB; batches are widened to int64 when drawn.
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


class CheckpointTokenizer:
    """The tokenizer saved with a Hugging Face checkpoint."""

    def __init__(self, path):
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.name = f"{type(self._tokenizer).__name__} from {path}"
        self.vocab_size = len(self._tokenizer)

    def encode(self, text):
        return self._tokenizer.encode(text, add_special_tokens=False)

    def encode_stream(self, text):
        return torch.tensor(self.encode(text), dtype=torch.int32 if self.vocab_size < 2**31 else torch.int64)


@dataclass(frozen=True)
class PasskeyFormat:
    """Text around the key. Byte-level models learn a compact one; pretrained ones get the paper's prompt.

    As in the paper, the query ends with the very words that precede the key where it is hidden ("The pass key is"),
    so retrieving it is finding that earlier occurrence and copying what followed it.
    """

    prefix: str
    hidden: str
    query: str


COMPACT_PASSKEY = PasskeyFormat(prefix="", hidden="<key:{key}>", query="<key:")
PAPER_PASSKEY = PasskeyFormat(
    prefix="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz "
           "you about the important information there. ",
    hidden=" The pass key is {key}. Remember it. {key} is the pass key. ",
    query=" What is the pass key? The pass key is ")


def corpus_files(root):
    """The standard library's .py files in a fixed order, without installed packages or caches."""
    root = Path(root)
    skipped = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in skipped]  # prune: never walk installed packages
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _held_out(relative_path):
    # By a hash of the path, so the split does not depend on which other files a Python version ships.
    return hashlib.sha1(relative_path.encode()).digest()[0] % 10 == 0


def load_corpus(tokenizer, text_file=None):
    """Train and held-out token streams (1-D integer tensors) and a description of where they come from."""
    if text_file is not None:
        text = Path(text_file).read_text(encoding="utf-8", errors="replace")
        cut = int(len(text) * 0.9)
        parts, source = (text[:cut], text[cut:]), f"{text_file} (last 10 % held out)"
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = corpus_files(root)
        split = {False: [], True: []}
        for path in files:
            split[_held_out(path.relative_to(root).as_posix())].append(path.read_text("utf-8", errors="replace"))
        parts = ("\n".join(split[False]), "\n".join(split[True]))
        source = (f"Python {platform.python_version()} standard library, {len(files)} .py files under {root} "
                  f"(files with sha1(path)[0] % 10 == 0 held out)")
    train, held_out = (tokenizer.encode_stream(part) for part in parts)
    return train, held_out, {"source": source, "tokenizer": tokenizer.name, "train_tokens": train.numel(),
                             "held_out_tokens": held_out.numel()}


def passkey_document(tokenizer, passkey_format, length, generator):
    """A ``length``-token passkey document ending with its answer; returns (tokens, answer length)."""
    key = str(int(torch.randint(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS, (), generator=generator)))
    prefix = tokenizer.encode(passkey_format.prefix)
    hidden = tokenizer.encode(passkey_format.hidden.format(key=key))
    query = tokenizer.encode(passkey_format.query)
    answer = tokenizer.encode(key)
    n_filler = length - len(prefix) - len(hidden) - len(query) - len(answer)
    if n_filler < 0:
        raise ValueError(f"a passkey document needs {length - n_filler} tokens; the context {length} is too short")
    filler_text = FILLER * (n_filler // max(1, len(tokenizer.encode(FILLER))) + 1)
    filler = tokenizer.encode(filler_text)[:n_filler]
    depth = int(torch.randint(0, n_filler + 1, (), generator=generator))
    tokens = prefix + filler[:depth] + hidden + filler[depth:] + query + answer
    return torch.tensor(tokens, dtype=torch.int64), len(answer)


def training_batch(stream, tokenizer, passkey_format, seq_len, batch, passkey_fraction, generator):
    """Random corpus windows and passkey documents, all ``seq_len`` tokens: (batch, seq_len) int64."""
    rows = []
    for _ in range(batch):
        if float(torch.rand((), generator=generator)) < passkey_fraction:
            rows.append(passkey_document(tokenizer, passkey_format, seq_len, generator)[0])
        else:
            start = int(torch.randint(0, stream.numel() - seq_len, (), generator=generator))
            rows.append(stream[start:start + seq_len].long())
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------------ training

def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    index: int                    # seeds the stage's batches, distinct per stage


def _save_atomically(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_stage(model, stage, cfg, data, out, device):
    """Train ``model`` in place for ``stage``; resumes from ``out/checkpoints/<stage>.pt``. Returns a summary."""
    checkpoint_path = out / "checkpoints" / f"{stage.name}.pt"
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.95),
                                  weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, stage.warmup, stage.steps, stage.decay))
    start, losses, seconds = 0, [], 0.0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses, seconds = state["step"], state["losses"], state["seconds"]
        print(f"[{stage.name}] resuming at step {start} of {stage.steps}")
    batch = max(1, cfg.batch_tokens // stage.seq_len)
    model.train()
    began = time.perf_counter() - seconds
    progress = tqdm(range(start, stage.steps), desc=stage.name, initial=start, total=stage.steps, disable=None)
    for step in progress:
        # Each step's batch depends only on (seed, stage, step), so a resumed run sees the batches it would have.
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage.index * 100_003 + step)
        tokens = training_batch(data["train"], data["tokenizer"], data["passkey_format"], stage.seq_len, batch,
                                cfg.passkey_fraction, generator).to(device)
        with _autocast(device):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < stage.steps:
            _save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "step": step + 1, "losses": losses,
                              "seconds": time.perf_counter() - began}, checkpoint_path)
    seconds = time.perf_counter() - began
    tail = losses[-max(1, len(losses) // 20):]
    summary = {"steps": stage.steps, "sequence_length": stage.seq_len, "batch": batch, "peak_lr": stage.lr,
               "final_loss": sum(tail) / len(tail) if tail else None, "seconds": round(seconds, 1),
               "losses": losses}
    print(f"[{stage.name}] {stage.steps} steps at {stage.seq_len} tokens, final loss "
          f"{summary['final_loss'] if tail else float('nan'):.4f}, {seconds:.0f} s")
    return summary


# ---------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def sliding_window_perplexity(model, held_out, context, *, start, targets, stride, batch_tokens, device):
    """Perplexity of ``held_out[start : start + targets]`` scored with ``context``-token windows.

    Windows end every ``stride`` tokens; only their last ``stride`` predictions count, so each target is predicted
    from between ``context - stride`` and ``context`` preceding tokens (Press et al.'s sliding window, used by the
    paper). Every context scores the same targets when ``start >= max context``.
    """
    if not 0 < stride < context or targets % stride or start < context:
        raise ValueError(f"need 0 < stride < context, targets a multiple of stride and start >= context; got "
                         f"stride={stride}, context={context}, targets={targets}, start={start}")
    if held_out.numel() < start + targets:
        raise ValueError(f"held-out text has {held_out.numel()} tokens; {start + targets} are needed")
    model.eval()
    ends = list(range(start + stride, start + targets + 1, stride))
    rows = max(1, batch_tokens // context)
    nll, count = 0.0, 0
    for first in tqdm(range(0, len(ends), rows), desc=f"perplexity @ {context}", leave=False, disable=None):
        windows = torch.stack([held_out[end - context:end] for end in ends[first:first + rows]]).long().to(device)
        with _autocast(device):
            # Logits of the last stride + 1 positions; the final one predicts past the window.
            logits = model(input_ids=windows, logits_to_keep=stride + 1).logits[:, :-1]
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), windows[:, -stride:].flatten(),
                                                   reduction="sum")
        nll += float(losses)
        count += windows.shape[0] * stride
    return math.exp(nll / count)


@torch.no_grad()
def passkey_accuracy(model, tokenizer, passkey_format, context, *, trials, seed, batch_tokens, device):
    """Share of ``trials`` documents of ``context`` tokens whose key the model reproduces exactly (greedy)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed * 7919 + context)
    documents = [passkey_document(tokenizer, passkey_format, context, generator) for _ in range(trials)]
    rows = max(1, batch_tokens // context)
    correct = 0
    for first in tqdm(range(0, trials, rows), desc=f"passkey @ {context}", leave=False, disable=None):
        chunk = documents[first:first + rows]
        tokens = torch.stack([doc for doc, _ in chunk]).to(device)
        longest = max(answer for _, answer in chunk)
        with _autocast(device):
            logits = model(input_ids=tokens, logits_to_keep=longest + 1).logits[:, :-1]
        predicted = logits.argmax(-1)
        for row, (doc, answer) in enumerate(chunk):
            # Teacher-forced argmax over the whole answer == greedy decoding reproduces it.
            correct += bool(torch.equal(predicted[row, -answer:].cpu(), doc[-answer:]))
    return correct / trials


# ------------------------------------------------------------------------------------------------------ variants

def _build(config, state_dict, device):
    """A model of ``config`` with ``state_dict``, its RoPE on pi_kernels."""
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state_dict)
    return patch_model(model.to(device))


def _byte_llama_config(cfg):
    return transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.context, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False)


def variants(cfg, base_config):
    """The table's rows: (key, variant, context window, config, fine-tune stage or None)."""
    rows = [("base", "extrapolation", cfg.context, base_config, None)]
    for index, factor in enumerate(cfg.factors):
        length = factor * cfg.context
        direct = copy.deepcopy(base_config)
        direct.max_position_embeddings = length
        interpolated = pi_kernels.extend_context(base_config, length)
        finetune = dict(seq_len=length, steps=cfg.finetune_steps, lr=cfg.finetune_lr, warmup=cfg.finetune_warmup,
                        decay=False, weight_decay=0.0)
        rows += [(f"ft_{factor}", "direct_finetune", length, direct, Stage(f"ft_{factor}", index=2 * index + 1,
                                                                           **finetune)),
                 (f"pi_{factor}", "pi", length, interpolated, None),
                 (f"pi_ft_{factor}", "pi_finetune", length, interpolated, Stage(f"pi_ft_{factor}",
                                                                               index=2 * index + 2, **finetune))]
    return rows


# ------------------------------------------------------------------------------------------------------- reports

def _format_number(value, kind):
    if value is None:
        return "-"
    if kind == "passkey":
        return f"{100 * value:.0f}%"
    return f"{value:.3g}" if value < 1000 else f"{value:.2e}"


def format_tables(results):
    """The two tables in the paper's shape (Table 1 / the passkey table), as markdown."""
    contexts = results["eval_contexts"]
    tables = []
    for kind, title in (("perplexity", "Perplexity on held-out text (lower is better)"),
                        ("passkey", "Passkey retrieval accuracy (chance: 0%)")):
        header = ["Context window", "Method", *[str(c) for c in contexts]]
        lines = [f"**{title}**, by evaluation context window", "",
                 "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for row in results["rows"]:
            cells = row["perplexity" if kind == "perplexity" else "passkey_accuracy"]
            values = [_format_number(cells.get(str(c)), kind) for c in contexts]
            lines.append("| " + " | ".join([str(row["context_window"]), row["method"], *values]) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def findings(results):
    """The comparisons the paper makes, stated with this run's numbers (whatever they show)."""
    by_key = {row["key"]: row for row in results["rows"]}
    length = results["config"]["context"]
    base = by_key["base"]
    lines = []
    for factor in results["config"]["factors"]:
        extended = str(factor * length)
        pi_ft, pi, ft = by_key[f"pi_ft_{factor}"], by_key[f"pi_{factor}"], by_key[f"ft_{factor}"]
        at_length = pi_ft["perplexity"][str(length)] / base["perplexity"][str(length)] - 1
        lines.append(f"L'={extended}: PI + FT perplexity at L={length} is {100 * at_length:+.1f}% vs the base model; "
                     f"at L' it is {pi_ft['perplexity'][extended]:.3g} (PI alone {pi['perplexity'][extended]:.3g}, "
                     f"FT without PI {ft['perplexity'][extended]:.3g}, extrapolation "
                     f"{base['perplexity'][extended]:.3g}).")
        lines.append(f"L'={extended}: passkey accuracy at L' is {100 * pi_ft['passkey_accuracy'][extended]:.0f}% with "
                     f"PI + FT, {100 * pi['passkey_accuracy'][extended]:.0f}% with PI alone, "
                     f"{100 * ft['passkey_accuracy'][extended]:.0f}% with FT without PI and "
                     f"{100 * base['passkey_accuracy'][extended]:.0f}% by extrapolation.")
    return lines


def write_plots(results, out):
    """perplexity.png and passkey.png: one line per row of the tables, against the evaluation context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = results["eval_contexts"]
    paths = []
    for kind, field, ylabel in (("perplexity", "perplexity", "perplexity (log scale)"),
                                ("passkey", "passkey_accuracy", "passkey accuracy")):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for row in results["rows"]:
            axis.plot(contexts, [row[field][str(c)] for c in contexts], marker="o",
                      label=f"{row['method']} (window {row['context_window']})")
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [str(c) for c in contexts])
        if kind == "perplexity":
            axis.set_yscale("log")
        axis.set_xlabel("evaluation context (tokens)")
        axis.set_ylabel(ylabel)
        axis.set_title(f"{kind}: L={results['config']['context']}" + (" (SMOKE: meaningless)"
                                                                      if results["smoke"] else ""))
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = out / f"{kind}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def _environment(device):
    import importlib.metadata as metadata

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "pi_kernels": pi_kernels.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)",
            "tqdm": metadata.version("tqdm")}


# ------------------------------------------------------------------------------------------------------- the run

def _write_json(path, data):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _save_stage(model, out, name, results, results_path):
    """Keep a finished stage as a Hugging Face checkpoint; its partial training checkpoint is no longer needed."""
    model.save_pretrained(out / "checkpoints" / name)
    (out / "checkpoints" / f"{name}.pt").unlink(missing_ok=True)
    _write_json(results_path, results)


def _base_model_state(cfg, base_config, data, out, device, results, results_path):
    """Weights of the base model trained at L (trained now, or read back from a finished stage)."""
    base_dir = out / "checkpoints" / "base"
    if (base_dir / "config.json").exists():
        return transformers.AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    torch.manual_seed(cfg.seed)
    model = patch_model(transformers.LlamaForCausalLM(base_config).to(device))
    stage = Stage("base", seq_len=cfg.context, steps=cfg.base_steps, lr=cfg.base_lr, warmup=cfg.base_warmup,
                  decay=True, weight_decay=cfg.weight_decay, index=0)
    results["training"]["base"] = train_stage(model, stage, cfg, data, out, device)
    _save_stage(model, out, "base", results, results_path)
    return model.state_dict()


def run(cfg, *, out, smoke=False, model_path=None, text_file=None, resume=False, device=None, command=None):
    """Run the recipe into ``out``; returns the results dict (also ``out/results.json``)."""
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("on the CPU pi_kernels runs under Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "importing pi_kernels (python -m pi_kernels.recipes.extend_context does it itself)")
    results_path = out / "results.json"
    settings = {"config": dataclasses.asdict(cfg), "smoke": smoke, "model": model_path, "text": text_file}
    if results_path.exists() and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    previous = json.loads(results_path.read_text()) if results_path.exists() else None
    if previous is not None and {key: previous.get(key) for key in settings} != json.loads(json.dumps(settings)):
        raise ValueError(f"{out} holds a run with other settings; it cannot be resumed with these")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if smoke:
        print("SMOKE RUN: a tiny model trained for a few steps; the numbers below are meaningless and only show that "
              "the pipeline works.")
    if device.type == "cpu":
        print("No GPU: the kernels run under Triton's interpreter; timings are not GPU measurements.")

    if model_path is None:
        tokenizer, passkey_format = ByteTokenizer(), COMPACT_PASSKEY
        base_config = _byte_llama_config(cfg)
    else:
        has_tokenizer = any((Path(model_path) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = CheckpointTokenizer(model_path) if has_tokenizer else ByteTokenizer()
        passkey_format = PAPER_PASSKEY if has_tokenizer else COMPACT_PASSKEY
        base_config = transformers.AutoConfig.from_pretrained(model_path, local_files_only=True)
        base_config.use_cache = False
        scaled = pi_kernels.scaling.scaling_factor_for(base_config) != 1.0
        if scaled or base_config.max_position_embeddings != cfg.context:
            raise ValueError(f"--model must be an unscaled model with context {cfg.context} (max_position_embeddings "
                             f"{base_config.max_position_embeddings}, rope {base_config.rope_parameters})")
    train, held_out, corpus = load_corpus(tokenizer, text_file)
    data = {"train": train, "tokenizer": tokenizer, "passkey_format": passkey_format}
    results = previous or {**settings, "recipe": "pi_kernels.recipes.extend_context", "paper": "arXiv 2306.15595",
                           "eval_contexts": cfg.eval_contexts, "rows": [], "training": {}}
    if previous is None:
        results["command"] = command
    else:
        results.setdefault("resumed_with", []).append(command)
    results.update(environment=_environment(device), corpus=corpus,
                   note=("SMOKE RUN: tiny model, few steps; the numbers are meaningless." if smoke else
                         "Numbers as measured by this run; nothing is tuned to the expected outcome."),
                   passkey_format=dataclasses.asdict(passkey_format))

    if model_path is not None:
        base_state = transformers.AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).state_dict()
    else:
        base_state = _base_model_state(cfg, base_config, data, out, device, results, results_path)

    start = max(cfg.eval_contexts)  # every context scores the same held-out targets
    rows = {row["key"]: row for row in results["rows"]}
    for key, variant, window, config, stage in variants(cfg, base_config):
        row = rows.setdefault(key, {"key": key, "variant": variant, "method": METHODS[variant],
                                    "context_window": window, "perplexity": {}, "passkey_accuracy": {},
                                    "rope": dict(config.rope_parameters),
                                    "finetune_steps": stage.steps if stage else 0})
        pending = [c for c in cfg.eval_contexts if str(c) not in row["perplexity"] or str(c) not in
                   row["passkey_accuracy"]]
        stage_dir = out / "checkpoints" / key
        trained = stage is None or (stage_dir / "config.json").exists()
        if not pending and trained:
            continue
        model = _build(config, base_state, device)
        if stage is not None:
            if trained:
                model.load_state_dict(transformers.AutoModelForCausalLM.from_pretrained(stage_dir).state_dict())
            else:
                results["training"][key] = train_stage(model, stage, cfg, data, out, device)
                _save_stage(model, out, key, results, results_path)
        for context in pending:
            row["perplexity"][str(context)] = sliding_window_perplexity(
                model, held_out, context, start=start, targets=cfg.eval_targets, stride=cfg.eval_stride,
                batch_tokens=cfg.eval_batch_tokens, device=device)
            row["passkey_accuracy"][str(context)] = passkey_accuracy(
                model, tokenizer, passkey_format, context, trials=cfg.passkey_trials, seed=cfg.seed,
                batch_tokens=cfg.eval_batch_tokens, device=device)
            results["rows"] = list(rows.values())
            _write_json(results_path, results)
        print(f"[{key}] {METHODS[variant]}, window {window}: perplexity "
              + ", ".join(f"{c}: {row['perplexity'][str(c)]:.3g}" for c in cfg.eval_contexts))
        del model

    results["rows"] = list(rows.values())
    tables = format_tables(results)
    notes = findings(results)
    _write_json(results_path, results)
    (out / "table.md").write_text(
        ("> SMOKE RUN: tiny model, few steps; the numbers are meaningless.\n\n" if smoke else "")
        + f"Command: `{command}`\n\n{tables}\n\n" + "\n".join(f"- {line}" for line in notes) + "\n")
    write_plots(results, out)
    print("\n" + tables + "\n\n" + "\n".join(notes))
    print(f"\nResults: {results_path}, {out / 'table.md'}, {out / 'perplexity.png'}, {out / 'passkey.png'}")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pi_kernels.recipes.extend_context",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU-sized run that checks the pipeline only")
    parser.add_argument("--out", type=Path, help="results folder (default examples/results/<smoke|gpu>)")
    parser.add_argument("--resume", action="store_true", help="continue the run already in --out")
    parser.add_argument("--model", help="local Hugging Face checkpoint to extend instead of training a base model")
    parser.add_argument("--text", help="text file to train and evaluate on instead of the standard library")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--context", type=int, help="L, the base context window")
    parser.add_argument("--factors", type=int, nargs="+", help="extension factors (default 4 8)")
    parser.add_argument("--base-steps", type=int)
    parser.add_argument("--finetune-steps", type=int)
    parser.add_argument("--passkey-trials", type=int)
    parser.add_argument("--passkey-fraction", type=float, help="share of training sequences that are passkey documents")
    parser.add_argument("--seed", type=int)
    return parser.parse_args(argv)


def config_from_args(args):
    """The preset (smoke or GPU) with the command line's overrides; ``--model`` brings its own context window."""
    cfg = SMOKE_CONFIG if args.smoke else GPU_CONFIG
    context = args.context
    if args.model is not None and context is None:
        context = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True).max_position_embeddings
    overrides = {"context": context, "factors": tuple(args.factors) if args.factors else None,
                 "base_steps": args.base_steps, "finetune_steps": args.finetune_steps,
                 "passkey_trials": args.passkey_trials, "passkey_fraction": args.passkey_fraction, "seed": args.seed}
    return dataclasses.replace(cfg, **{key: value for key, value in overrides.items() if value is not None})


def main(argv=None):
    """The command line; returns the results dict."""
    args = parse_args(argv)
    # Positions come from transformers' own arange: skip the host sync per layer that checks them (process-wide).
    pi_kernels.set_value_checks(False)
    out = args.out or Path("examples/results") / ("smoke" if args.smoke else "gpu")
    command = "python -m pi_kernels.recipes.extend_context " + " ".join(sys.argv[1:] if argv is None else argv)
    return run(config_from_args(args), out=out, smoke=args.smoke, model_path=args.model, text_file=args.text,
               resume=args.resume, device=args.device, command=command.strip())


if __name__ == "__main__":
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton chose its backend when pi_kernels was imported; run again with the interpreter from the start.
        print("No GPU: re-running under Triton's interpreter (TRITON_INTERPRET=1).", flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "pi_kernels.recipes.extend_context", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    main()
