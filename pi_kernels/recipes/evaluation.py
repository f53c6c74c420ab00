"""Evaluation of the Position Interpolation recipe: perplexity with a bootstrap interval, passkey retrieval.

Perplexity scores the same held-out targets at every context window: the last ``block`` tokens of each of many
held-out documents. At context ``C`` each target is predicted by a window of ``C`` tokens that ends at most
``C / 2`` tokens after it (Press et al.'s sliding window with stride ``C / 2``), so it sees between ``C / 2`` and ``C``
preceding tokens. The interval is a percentile bootstrap over documents, the unit that is sampled.
"""

import contextlib
import math

import torch
from tqdm.auto import tqdm

from .data import passkey_document

__all__ = ["PerplexityTargets", "passkey_accuracy", "perplexity", "position_perplexity"]


def autocast(device):
    """bf16 autocast on a GPU, nothing on the CPU (fp32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PerplexityTargets:
    """Which held-out tokens are scored: the last ``block`` tokens of documents spread over the held-out stream.

    Parameters
    ----------
    held_out : TokenStream
    block : int
        Targets per document.
    targets : int
        At least this many targets in all: ``ceil(targets / block)`` documents, chosen evenly over those long enough
        (``block`` tokens) and late enough in the stream (``max_context`` tokens before their block).
    max_context : int
        The longest evaluation context; every window must fit in the stream before its targets.
    """

    def __init__(self, held_out, *, block, targets, max_context):
        if block < 1 or targets < 1:
            raise ValueError(f"block and targets must be >= 1, got block={block}, targets={targets}")
        eligible = [index for index, (start, length) in enumerate(zip(held_out.starts, held_out.lengths, strict=True))
                    if length >= block and start + length - block >= max_context]
        wanted = math.ceil(targets / block)
        if len(eligible) < wanted:
            raise ValueError(f"{wanted} held-out documents of >= {block} tokens are needed for {targets} targets at "
                             f"context {max_context}; the held-out text has {len(eligible)}")
        picks = [eligible[(i * len(eligible)) // wanted] for i in range(wanted)]
        self.held_out = held_out
        self.block = block
        self.documents = picks
        self.ends = [held_out.starts[doc] + held_out.lengths[doc] for doc in picks]

    @property
    def count(self):
        return self.block * len(self.documents)


@torch.no_grad()
def perplexity(model, targets, context, *, batch_tokens, device, bootstrap=1000, seed=0):
    """Perplexity of ``targets`` at ``context``, with a 95 % bootstrap interval over documents.

    Returns
    -------
    dict
        ``value`` (exp of the mean NLL over all targets), ``low`` and ``high`` (2.5 and 97.5 percentiles of the same
        statistic over ``bootstrap`` resamplings of the documents), ``targets`` and ``documents``.
    """
    stride = max(1, context // 2)
    tokens = targets.held_out.tokens
    # (document, window end, tokens scored at the window's end)
    windows = []
    for doc, end in enumerate(targets.ends):
        first = end - targets.block
        while end > first:
            windows.append((doc, end, min(stride, end - first)))
            end -= stride
    nll = torch.zeros(len(targets.documents), dtype=torch.float64)
    rows = max(1, batch_tokens // context)
    model.eval()
    for begin in tqdm(range(0, len(windows), rows), desc=f"perplexity @ {context}", leave=False, disable=None):
        chunk = windows[begin:begin + rows]
        inputs = torch.stack([tokens[end - context:end] for _, end, _ in chunk]).long().to(device)
        keep = max(scored for _, _, scored in chunk)
        with autocast(device):
            # logits of the last keep + 1 positions; the final one predicts past the window
            logits = model(input_ids=inputs, logits_to_keep=keep + 1).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), inputs[:, -keep:], reduction="none")
        losses = losses.double().cpu()
        for row, (doc, _, scored) in enumerate(chunk):
            nll[doc] += losses[row, keep - scored:].sum()
    counts = torch.full_like(nll, float(targets.block))
    generator = torch.Generator().manual_seed(seed)
    resampled = torch.randint(0, len(nll), (bootstrap, len(nll)), generator=generator)
    boot = (nll[resampled].sum(1) / counts[resampled].sum(1)).exp()
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"value": math.exp(float(nll.sum() / counts.sum())), "low": low, "high": high,
            "targets": targets.count, "documents": len(nll)}


@torch.no_grad()
def passkey_accuracy(model, tokenizer, passkey_format, context, *, depths, trials, seed, batch_tokens, device):
    """Passkey retrieval at ``context`` tokens: ``trials`` documents at each depth, exact match of the greedy answer.

    Parameters
    ----------
    depths : sequence of float
        Where the key sits in the filler, 0 (start) to 1 (end).
    trials : int
        Documents per depth, each with its own random key; the same documents for every model at one ``seed``.

    Returns
    -------
    dict
        ``accuracy`` (share of all documents), ``by_depth`` (``str(depth)`` -> share) and ``trials`` (documents in all).
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed * 7919 + context)
    documents = [(depth, *passkey_document(tokenizer, passkey_format, context, generator, depth=depth))
                 for depth in depths for _ in range(trials)]
    rows = max(1, batch_tokens // context)
    correct = dict.fromkeys(map(str, depths), 0)
    for first in tqdm(range(0, len(documents), rows), desc=f"passkey @ {context}", leave=False, disable=None):
        chunk = documents[first:first + rows]
        tokens = torch.stack([doc for _, doc, _ in chunk]).to(device)
        longest = max(answer for _, _, answer in chunk)
        with autocast(device):
            logits = model(input_ids=tokens, logits_to_keep=longest + 1).logits[:, :-1]
        predicted = logits.argmax(-1)
        for row, (depth, doc, answer) in enumerate(chunk):
            # Teacher-forced argmax over the whole answer == greedy decoding reproduces it.
            correct[str(depth)] += bool(torch.equal(predicted[row, -answer:].cpu(), doc[-answer:]))
    return {"accuracy": sum(correct.values()) / len(documents),
            "by_depth": {depth: hits / trials for depth, hits in correct.items()}, "trials": len(documents)}


@torch.no_grad()
def position_perplexity(model, held_out, window, *, windows, edges, device):
    """Perplexity by position inside long windows: whether a model holds up past its trained context.

    ``windows`` windows of ``window`` tokens, starting at held-out documents spread over the stream, are each run
    once; the next-token NLL of every position is pooled by position range ``[edges[i], edges[i + 1])``.

    Returns
    -------
    list of dict
        One per range: ``from``, ``to``, ``value`` (perplexity) and ``targets``.
    """
    if held_out.numel() < window:
        raise ValueError(f"the held-out text has {held_out.numel()} tokens; a {window}-token window does not fit")
    candidates = [start for start in held_out.starts if start + window <= held_out.numel()]
    if len(candidates) < windows:
        raise ValueError(f"{windows} windows of {window} tokens need as many held-out documents to start at")
    starts = [candidates[(i * len(candidates)) // windows] for i in range(windows)]
    nll = torch.zeros(window - 1, dtype=torch.float64)
    model.eval()
    for start in tqdm(starts, desc=f"positions @ {window}", leave=False, disable=None):
        inputs = held_out.tokens[start:start + window].long()[None].to(device)
        with autocast(device):
            logits = model(input_ids=inputs).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, inputs[0, 1:], reduction="none").double().cpu()
    ranges = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        # position p predicts token p + 1
        part = nll[max(0, low - 1):high - 1]
        ranges.append({"from": low, "to": high, "value": math.exp(float(part.mean()) / windows),
                       "targets": part.numel() * windows})
    return ranges
