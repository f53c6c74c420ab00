"""Context parallelism (``pi_kernels.parallel``) on real process groups: gloo ranks spawned from the test.

One run per world size spawns W processes (``torch.multiprocessing``, rendezvous through a file) that run every
check of :data:`CHECKS_BY_WORLD_SIZE` in order and report each check's traceback, if any; each test asserts one
check's outcome. Every rank builds the same inputs from one seed, so each can compare its shard with the
single-process result on the unsharded sequence. Shapes are tiny: under Triton's interpreter every attention launch
costs seconds, and starting the processes costs more than the checks.
"""

import datetime
import json
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException

from pi_kernels import attention_rotary, parallel

from .tolerances import TOLERANCE, assert_close

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")


def _run_ranks(world_size, checks, tmp_path):
    """Run the named checks, in order, on ``world_size`` gloo ranks spawned once (importing is the slow part).

    Returns {check: failure report or None}; a check that raised on any rank fails, and the checks after it do not
    run (its peers may be stuck in a collective).
    """
    # The ranks compute on CPU tensors with backend="auto" and inherit this process's environment: Triton's
    # interpreter where conftest.py set it (no GPU), else the torch backend.
    try:
        torch.multiprocessing.start_processes(_rank_main, args=(world_size, str(tmp_path), checks),
                                              nprocs=world_size, start_method="spawn")
    except ProcessException as err:
        pytest.fail(f"the spawned ranks did not finish: {err}", pytrace=False)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    outcome = {}
    for check in checks:
        failures = [f"rank {rank}:\n{report[check]}" for rank, report in enumerate(reports) if report.get(check)]
        missing = [rank for rank, report in enumerate(reports) if check not in report]
        outcome[check] = "\n".join(failures) or (f"not run on ranks {missing}: an earlier check failed"
                                                  if missing else None)
    return outcome


def _rank_main(rank, world_size, directory, checks):
    # The timeout bounds a rank left in a collective by a dead peer; it must outlast rank 0's single-process
    # reference computations, during which the other ranks wait, on a loaded CI machine.
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    report = {}
    try:
        for check in checks:
            torch.manual_seed(0)
            function, *args = CHECKS[check]
            try:
                function(*args)
                report[check] = None
            except Exception:
                report[check] = traceback.format_exc()
            failed = torch.tensor([report[check] is not None], dtype=torch.int32)
            dist.all_reduce(failed)
            if failed.item():
                break
    finally:
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def _chunks_of_rank(seq_len, rank, world_size):
    """The unsharded indices that rank keeps, written out from the layout's definition."""
    chunk = seq_len // (2 * world_size)
    return [*range(rank * chunk, (rank + 1) * chunk),
            *range((2 * world_size - 1 - rank) * chunk, (2 * world_size - rank) * chunk)]


# --- layout: shard, unshard, positions -------------------------------------------------------------------------

def _check_layout():
    world_size, rank = dist.get_world_size(), dist.get_rank()
    x = torch.randn(3, 8 * world_size, 5, dtype=torch.float64)
    x_before = x.clone()
    for seq_dim in (1, -2):
        local = parallel.context_parallel_shard(x, seq_dim)
        assert torch.equal(x, x_before), "shard modified its input"
        assert torch.equal(local, x[:, _chunks_of_rank(x.shape[1], rank, world_size)])
        assert torch.equal(parallel.context_parallel_unshard(local, seq_dim), x), "unshard(shard(x)) != x"
    # The sequence as the last dim, and integer data (token ids).
    ids = torch.randint(0, 1000, (2, 4 * world_size))
    assert torch.equal(parallel.context_parallel_unshard(parallel.context_parallel_shard(ids, -1), -1), ids)
    # Unshard's backward sums what every rank sends to a shard: the same loss on every rank counts W times.
    local = parallel.context_parallel_shard(x, 1).requires_grad_()
    grad_full = torch.randn_like(x)
    parallel.context_parallel_unshard(local, 1).backward(grad_full)
    assert torch.equal(local.grad, world_size * parallel.context_parallel_shard(grad_full, 1))

    seq_len = 4 * world_size
    positions = parallel.context_parallel_positions(seq_len)
    assert positions.dtype == torch.int64
    assert positions.tolist() == _chunks_of_rank(seq_len, rank, world_size)
    offsets = torch.tensor([7, 0, 2**33])  # int64 positions past 2^31
    batched = parallel.context_parallel_positions(seq_len, offset=offsets)
    assert batched.shape == (3, seq_len // world_size) and batched.dtype == torch.int64
    assert torch.equal(batched, offsets[:, None] + positions)
    assert torch.equal(parallel.context_parallel_positions(seq_len, offset=5), positions + 5)
    # Every position of the sequence is on exactly one rank, in order once unsharded.
    assert torch.equal(parallel.context_parallel_unshard(batched, 1), offsets[:, None] + torch.arange(seq_len))

    with pytest.raises(ValueError, match=r"multiple of 2 × the group size"):
        parallel.context_parallel_shard(torch.zeros(2, 2 * world_size + 1), 1)
    with pytest.raises(ValueError, match="seq_dim"):
        parallel.context_parallel_shard(x, 3)
    with pytest.raises(ValueError, match="even"):
        parallel.context_parallel_unshard(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="seq_len"):
        parallel.context_parallel_positions(6 * world_size + 1)
    with pytest.raises(ValueError, match="offset"):
        parallel.context_parallel_positions(seq_len, offset=torch.zeros(2, 2, dtype=torch.int64))


def test_no_process_group():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.context_parallel_shard(torch.zeros(2, 4), 1)


# --- attention -------------------------------------------------------------------------------------------------

ATTENTION_CASES = {
    # name: (dtype, causal, batch, seq, heads, kv_heads, head_dim, positions with per-sequence offsets, backend)
    "causal_gqa": (torch.float32, True, 2, 16, 4, 2, 16, True, "auto"),
    "causal_mqa_default_positions": (torch.float32, True, 1, 8, 2, 1, 32, False, "auto"),
    "full_gqa": (torch.float32, False, 2, 8, 4, 2, 16, True, "auto"),
    "causal_bf16": (torch.bfloat16, True, 1, 8, 2, 2, 16, True, "auto"),
    "causal_gqa_torch_backend": (torch.float32, True, 2, 16, 4, 2, 16, True, "torch"),
}


def _check_attention(case):
    dtype, causal, batch, seq_len, n_heads, n_kv_heads, head_dim, offsets, backend = ATTENTION_CASES[case]
    q = torch.randn(batch, seq_len, n_heads, head_dim, dtype=dtype)
    k, v = (torch.randn(batch, seq_len, n_kv_heads, head_dim, dtype=dtype) for _ in range(2))
    grad_out = torch.randn_like(q)
    options = {"causal": causal, "scaling_factor": 4.0, "base": 500.0, "backend": backend}
    if offsets:
        offset = torch.arange(batch, dtype=torch.int64) * 1000 + 3
        full_positions = offset[:, None] + torch.arange(seq_len)
        positions = parallel.context_parallel_positions(seq_len, offset=offset)
    else:
        full_positions = positions = None

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attention_rotary(*leaves, full_positions, **options)
    out.backward(grad_out)
    expected = [out, *(leaf.grad for leaf in leaves)]

    def shard(x):
        return parallel.context_parallel_shard(x, 1)

    local = [shard(x).requires_grad_() for x in (q, k, v)]
    local_before = [x.detach().clone() for x in local]
    local_out = parallel.context_parallel_attention_rotary(*local, positions, **options)
    local_out.backward(shard(grad_out))
    for x, before in zip(local, local_before, strict=True):
        assert torch.equal(x.detach(), before), "context_parallel_attention_rotary modified an input"
    results = [local_out, *(x.grad for x in local)]
    for name, got, want in zip(("out", "dq", "dk", "dv"), results, expected, strict=True):
        assert_close(got, shard(want), dtype, name=f"{case} rank {dist.get_rank()} {name}")


def _check_attention_errors():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="positions must have shape"):
        parallel.context_parallel_attention_rotary(q, q, q, torch.arange(8))
    with pytest.raises(ValueError, match="integer Tensor"):
        parallel.context_parallel_attention_rotary(q, q, q, torch.zeros(4))
    with pytest.raises(ValueError, match="share"):
        parallel.context_parallel_attention_rotary(q, q[:, :2], q[:, :2])
    with pytest.raises(ValueError, match="even"):
        parallel.context_parallel_attention_rotary(q[:, :3], q[:, :3], q[:, :3])


# --- FSDP2 + context parallelism on a patched Hugging Face model --------------------------------------------------

def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _token_loss(model, input_ids, labels, n_tokens, **inputs):
    """Summed next-token cross-entropy over the given tokens, divided by the token count of the whole batch."""
    logits = model(input_ids, use_cache=False, **inputs).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum") / n_tokens


def _check_fsdp_training_step():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from pi_kernels.integrations.transformers import enable_context_parallel, patch_model

    model = _tiny_llama()
    initial_state = {name: value.clone() for name, value in model.state_dict().items()}
    batch, seq_len = 2, 8 * dist.get_world_size()
    input_ids = torch.randint(0, 64, (batch, seq_len))
    # Labels are shifted on the whole sequence, then sharded: a shard's last token predicts the next rank's first.
    labels = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)
    n_tokens = int((labels != -100).sum())

    patch_model(model, attention=True)
    enable_context_parallel(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Each rank's loss is its share of the batch mean: the gradients are summed, not averaged (SUM
            # collectives, which gloo needs; NCCL takes them as well).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    positions = parallel.context_parallel_positions(seq_len)[None]
    loss = _token_loss(model, parallel.context_parallel_shard(input_ids, 1), parallel.context_parallel_shard(labels, 1),
                       n_tokens, position_ids=positions)
    loss.backward()
    grads = {name: param.grad.full_tensor() for name, param in model.named_parameters()}
    optimizer.step()
    stepped = {name: param.full_tensor() for name, param in model.named_parameters()}
    total_loss = loss.detach().clone()
    dist.all_reduce(total_loss)
    if dist.get_rank():
        return

    reference = _tiny_llama()
    reference.load_state_dict(initial_state)
    patch_model(reference, attention=True)
    reference_loss = _token_loss(reference, input_ids, labels, n_tokens)
    reference_loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert abs(total_loss.item() - reference_loss.item()) <= TOLERANCE[torch.float32] * abs(reference_loss.item())
    for name, param in reference.named_parameters():
        assert_close(grads[name], param.grad, torch.float32, name=f"grad of {name}")
        assert_close(stepped[name], param.detach(), torch.float32, name=f"{name} after one SGD step")


def _check_recipe_training_step(context_parallel, fsdp):
    """The recipe's torchrun layout (pi_kernels.recipes.distributed): one clipped SGD step against one process."""
    from pi_kernels.integrations.transformers import patch_model
    from pi_kernels.recipes.distributed import TrainingLayout

    world_size, rank = dist.get_world_size(), dist.get_rank()
    group = dist.new_subgroups(context_parallel)[0]
    layout = TrainingLayout(world_size, rank, context_parallel, fsdp, "gloo", group)
    model = patch_model(_tiny_llama())
    reference = patch_model(_tiny_llama())
    tokens = torch.randint(0, 64, (2, 8 * world_size))
    trained = layout.training_model(model)
    loss, batch_loss = layout.loss(trained, tokens)
    loss.backward()
    layout.reduce_gradients(trained)
    torch.nn.utils.clip_grad_norm_(trained.parameters(), 0.5)
    torch.optim.SGD(trained.parameters(), lr=0.1).step()
    layout.copy_back(trained, model)

    reference_loss = reference(input_ids=tokens, labels=tokens, use_cache=False).loss
    reference_loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert abs(batch_loss.item() - reference_loss.item()) <= TOLERANCE[torch.float32] * reference_loss.item()
    for (name, param), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert_close(param.detach(), expected.detach(), torch.float32, name=f"{name} after one step")


# --- the spawned runs ---------------------------------------------------------------------------------------------

CHECKS = {
    "layout": (_check_layout,),
    **{f"attention_{case}": (_check_attention, case) for case in ATTENTION_CASES},
    "attention_errors": (_check_attention_errors,),
    "fsdp_training_step": (_check_fsdp_training_step,),
    "recipe_step_context_parallel_fsdp": (_check_recipe_training_step, 2, True),
    "recipe_step_data_parallel": (_check_recipe_training_step, 1, False),
}
# Four ranks on a CI machine of two cores: the layout and one causal case.
CHECKS_BY_WORLD_SIZE = {2: list(CHECKS), 4: ["layout", "attention_causal_mqa_default_positions"]}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{(world_size, check): failure report or None}, from one spawned run per world size."""
    pytest.importorskip("transformers")
    return {(world_size, check): failure
            for world_size, checks in CHECKS_BY_WORLD_SIZE.items()
            for check, failure in _run_ranks(world_size, checks, tmp_path_factory.mktemp(f"w{world_size}")).items()}


@pytest.mark.parametrize("world_size, check", [(world_size, check) for world_size, checks in
                                               CHECKS_BY_WORLD_SIZE.items() for check in checks])
def test_context_parallel(outcomes, world_size, check):
    failure = outcomes[world_size, check]
    assert failure is None, f"{check} on {world_size} ranks failed:\n{failure}"


def test_enable_disable_context_parallel(device):
    from pi_kernels.integrations import transformers as hf

    with pytest.raises(ValueError, match="attention=True"):
        hf.enable_context_parallel(hf.patch_model(_tiny_llama().to(device)))
    model = hf.patch_model(_tiny_llama().to(device), attention=True)
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match="not enabled"):
        hf.disable_context_parallel(model)
    hf.enable_context_parallel(model)
    assert model.config._attn_implementation != implementation
    with pytest.raises(ValueError, match="position_ids"):  # refused before any collective: no process group here
        model(torch.zeros(1, 4, dtype=torch.int64, device=device), use_cache=False)
    with pytest.raises(ValueError, match="already enabled"):
        hf.enable_context_parallel(model)
    hf.disable_context_parallel(model)
    assert model.config._attn_implementation == implementation
    model(torch.zeros(1, 4, dtype=torch.int64, device=device), use_cache=False)
    hf.enable_context_parallel(model)
    hf.unpatch_model(model)
    assert model.config._attn_implementation == implementation
