"""The Position Interpolation recipe: a --smoke run end to end (all variants and contexts, table, JSON, plots,
resume, a --model run on its own checkpoint) and its evaluation pieces against direct computations.

The smoke run's numbers are meaningless; only the pipeline and the formats are checked here.
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
from pi_kernels.recipes import extend_context as recipe

VARIANTS = {"extrapolation", "direct_finetune", "pi", "pi_finetune"}


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


def test_smoke_run_covers_every_variant_and_context(smoke_run):
    out, results = smoke_run
    config = recipe.SMOKE_CONFIG
    contexts = [str(config.context * multiple) for multiple in (1, 2, 4, 8)]
    assert results["eval_contexts"] == [int(c) for c in contexts]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == results["rows"] and on_disk["smoke"] is True and "meaningless" in on_disk["note"]
    assert on_disk["command"] == f"python -m pi_kernels.recipes.extend_context --smoke --out {out}"
    rows = results["rows"]
    assert {row["variant"] for row in rows} == VARIANTS
    # The base row, then FT / PI / PI + FT for each extension factor.
    assert [(row["variant"], row["context_window"]) for row in rows] == [("extrapolation", 32)] + [
        (variant, 32 * factor) for factor in config.factors for variant in ("direct_finetune", "pi", "pi_finetune")]
    for row in rows:
        assert sorted(row["perplexity"], key=int) == contexts and sorted(row["passkey_accuracy"], key=int) == contexts
        assert all(math.isfinite(value) and value > 1.0 for value in row["perplexity"].values())
        assert all(0.0 <= value <= 1.0 for value in row["passkey_accuracy"].values())
        interpolated = row["variant"].startswith("pi")
        assert row["rope"]["rope_type"] == ("linear" if interpolated else "default")
        if interpolated:
            assert row["rope"]["factor"] == row["context_window"] / 32
        assert row["finetune_steps"] == (config.finetune_steps if row["variant"].endswith("finetune") else 0)
    assert set(results["training"]) == {"base", "ft_4", "pi_ft_4", "ft_8", "pi_ft_8"}
    assert len(results["training"]["base"]["losses"]) == config.base_steps
    assert results["environment"]["device"] and results["corpus"]["held_out_tokens"] > 0


def test_smoke_run_writes_tables_and_plots(smoke_run):
    out, results = smoke_run
    table = (out / "table.md").read_text()
    assert table.startswith("> SMOKE RUN")
    header = "| Context window | Method | 32 | 64 | 128 | 256 |"
    assert table.count(header) == 2  # perplexity and passkey
    for row in results["rows"]:
        line = f"| {row['context_window']} | {row['method']} | "
        assert table.count(line) == 2, f"missing row {line}"
    assert "PI + FT perplexity at L=32" in table
    for name in ("perplexity.png", "passkey.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Final models are saved as Hugging Face checkpoints; partial training checkpoints are gone.
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == [
        "base", "ft_4", "ft_8", "pi_ft_4", "pi_ft_8"]


def test_resume_reuses_the_finished_run_and_refuses_a_clobber(smoke_run):
    out, results = smoke_run
    with pytest.raises(FileExistsError, match="--resume"):
        recipe.main(["--smoke", "--out", str(out)])
    with pytest.raises(ValueError, match="other settings"):
        recipe.main(["--smoke", "--out", str(out), "--resume", "--seed", "1"])
    resumed = recipe.main(["--smoke", "--out", str(out), "--resume"])
    assert resumed["rows"] == results["rows"]
    assert resumed["resumed_with"] == [f"python -m pi_kernels.recipes.extend_context --smoke --out {out} --resume"]


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Kill a stage after its step-2 checkpoint; a fresh process resumes there and ends where an uninterrupted run
    ends (batches depend only on the step, and the optimizer and schedule states are restored)."""
    cfg = recipe.dataclasses.replace(recipe.SMOKE_CONFIG, checkpoint_every=2)
    data = {"train": torch.randint(0, 256, (4096,), dtype=torch.uint8), "tokenizer": recipe.ByteTokenizer(),
            "passkey_format": recipe.COMPACT_PASSKEY}
    stage = recipe.Stage("base", seq_len=32, steps=4, lr=1e-3, warmup=1, decay=True, weight_decay=0.1, index=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def fresh_model():
        torch.manual_seed(0)
        return recipe.patch_model(transformers.LlamaForCausalLM(recipe._byte_llama_config(cfg)).to(device))

    for run in ("full", "cut"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
    full = fresh_model()
    recipe.train_stage(full, stage, cfg, data, tmp_path / "full", device)

    batches = []
    real_batch = recipe.training_batch

    def killed_at_step_3(*args, **kwargs):
        if len(batches) == 3:
            raise KeyboardInterrupt
        batches.append(None)
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(recipe, "training_batch", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        recipe.train_stage(fresh_model(), stage, cfg, data, tmp_path / "cut", device)
    monkeypatch.setattr(recipe, "training_batch", real_batch)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "base.pt", weights_only=False)["step"] == 2
    resumed = fresh_model()
    summary = recipe.train_stage(resumed, stage, cfg, data, tmp_path / "cut", device)
    assert len(summary["losses"]) == 4
    for (name, param), expected in zip(resumed.named_parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(param, expected, msg=name)


def test_model_flag_extends_an_existing_checkpoint(smoke_run, tmp_path):
    out, _ = smoke_run
    results = recipe.main(["--smoke", "--model", str(out / "checkpoints" / "base"), "--factors", "4",
                           "--finetune-steps", "1", "--out", str(tmp_path)])
    assert "base" not in results["training"] and set(results["training"]) == {"ft_4", "pi_ft_4"}
    assert {row["variant"] for row in results["rows"]} == VARIANTS
    base_row = next(row for row in results["rows"] if row["key"] == "base")
    # The same base weights, held-out targets and passkey documents give the same base-model numbers.
    first_base_row = next(row for row in smoke_run[1]["rows"] if row["key"] == "base")
    for field in ("perplexity", "passkey_accuracy"):
        for context, value in base_row[field].items():
            assert value == pytest.approx(first_base_row[field][context], rel=1e-5)


def test_sliding_window_perplexity_matches_a_direct_computation(device):
    """Each target is scored once, from the window that ends after it; perplexity = exp(mean NLL)."""
    torch.manual_seed(0)
    config = recipe._byte_llama_config(recipe.SMOKE_CONFIG)
    model = recipe.patch_model(transformers.LlamaForCausalLM(config).to(device).eval())
    held_out = torch.randint(0, 256, (200,), dtype=torch.uint8)
    ppl = recipe.sliding_window_perplexity(model, held_out, 32, start=64, targets=48, stride=16, batch_tokens=64,
                                           device=device)
    nll = []
    with torch.no_grad():
        for end in (80, 96, 112):
            window = held_out[end - 32:end].long()[None].to(device)
            log_probs = model(window).logits[0, -17:-1].double().log_softmax(-1)
            nll.append(-log_probs.gather(-1, window[0, -16:, None]).sum())
    assert ppl == pytest.approx(math.exp(float(sum(nll)) / 48), rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        recipe.sliding_window_perplexity(model, held_out, 32, start=64, targets=40, stride=16, batch_tokens=64,
                                         device=device)


def test_passkey_documents():
    tokenizer = recipe.ByteTokenizer()
    for length in (32, 100):
        generator = torch.Generator().manual_seed(length)
        tokens, answer = recipe.passkey_document(tokenizer, recipe.COMPACT_PASSKEY, length, generator)
        text = bytes(tokens.tolist()).decode()
        key = text[-answer:]
        assert tokens.shape == (length,) and answer == recipe.PASSKEY_DIGITS and key.isdigit()
        assert text.count(f"<key:{key}>") == 1 and text.endswith(f"<key:{key}")
    with pytest.raises(ValueError, match="too short"):
        recipe.passkey_document(tokenizer, recipe.COMPACT_PASSKEY, 20, torch.Generator())


def test_corpus_split_is_deterministic_and_by_file(tmp_path):
    for name in ("b.py", "a.py", "pkg/c.py", "site-packages/x.py", "pkg/__pycache__/d.py", "e.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert [path.relative_to(tmp_path).as_posix() for path in recipe.corpus_files(tmp_path)] == [
        "a.py", "b.py", "pkg/c.py"]
    held_out = [name for name in (f"m{i}.py" for i in range(200)) if recipe._held_out(name)]
    assert 5 <= len(held_out) <= 40 and held_out == [n for n in (f"m{i}.py" for i in range(200)) if recipe._held_out(n)]


def test_text_file_corpus(tmp_path):
    text = "héllo wörld\n" * 100
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    train, held_out, corpus = recipe.load_corpus(recipe.ByteTokenizer(), tmp_path / "corpus.txt")
    data = text.encode("utf-8")
    assert torch.equal(torch.cat([train, held_out]), torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert held_out.numel() == len(text[int(len(text) * 0.9):].encode("utf-8")) == corpus["held_out_tokens"]


def test_learning_rate_schedule():
    assert recipe._lr_factor(0, 10, 100, decay=True) == pytest.approx(0.1)
    assert recipe._lr_factor(10, 10, 100, decay=True) == pytest.approx(1.0)
    assert recipe._lr_factor(100, 10, 100, decay=True) == pytest.approx(0.1)
    assert recipe._lr_factor(5, 10, 100, decay=False) == pytest.approx(0.55)
    assert recipe._lr_factor(50, 10, 100, decay=False) == 1.0


def test_command_line_entry_point():
    """``python -m`` on a machine without a GPU restarts itself under Triton's interpreter before anything runs."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "pi_kernels.recipes.extend_context", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m pi_kernels.recipes.extend_context" in done.stdout and "--resume" in done.stdout
    assert ("re-running under Triton's interpreter" in done.stdout) == (not torch.cuda.is_available())
