"""The memory-overlap check behind every in-place op, against brute force on random strided layouts."""

import itertools
import random

import pytest
import torch

from pi_kernels import _validation


def addresses(x):
    """Storage offsets of every element of x."""
    return [x.storage_offset() + sum(i * s for i, s in zip(index, x.stride(), strict=True))
            for index in itertools.product(*(range(n) for n in x.shape))]


def random_layout(rng, storage, ndim):
    shape = [rng.randint(0, 4) for _ in range(ndim)]
    strides = [rng.choice([0, 1, 2, 3, 5, 8, 12, 16, 20, 40]) for _ in range(ndim)]
    return storage.as_strided(shape, strides, rng.randint(0, 60))


@pytest.mark.parametrize("seed", range(4))
def test_overlap_check_matches_brute_force(seed):
    rng = random.Random(seed)
    storage = torch.zeros(4000)
    for _ in range(300):
        ndim = rng.randint(1, 4)
        a, b = random_layout(rng, storage, ndim), random_layout(rng, storage, ndim)
        a_addresses = addresses(a)
        assert _validation._overlaps_itself(a) == (len(set(a_addresses)) < len(a_addresses)), \
            f"internal overlap of shape {tuple(a.shape)}, strides {a.stride()}"
        assert _validation._overlap_each_other(a, b) == bool(set(a_addresses) & set(addresses(b))), \
            f"overlap of {tuple(a.shape)}/{a.stride()}+{a.storage_offset()} and " \
            f"{tuple(b.shape)}/{b.stride()}+{b.storage_offset()}"


def test_fused_buffer_slices_do_not_overlap():
    """q, k and v sliced out of one projection output (the usual in-place case) pass; shifted views do not."""
    qkv = torch.randn(7, 3, (4 + 2 * 2) * 16)
    q, k = qkv[..., :64].view(7, 3, 4, 16), qkv[..., 64:96].view(7, 3, 2, 16)
    _validation.check_no_overlap((("q", q), ("k", k)))
    with pytest.raises(ValueError, match="q is written in place but shares memory with k"):
        _validation.check_no_overlap((("q", q), ("k", qkv[..., 48:80].view(7, 3, 2, 16))))
    with pytest.raises(ValueError, match="k_cache is written in place but shares memory with v"):
        _validation.check_no_overlap((("k_cache", q),), (("v", q[:1]),))


# --------------------------------------------------------------------------------------------------------------------
# The largest position (issue 18): refused past _positions.MAX_POSITION, float32-accurate up to it
# --------------------------------------------------------------------------------------------------------------------

HUGE_INT_OFFSET = 2**70  # past int64: once an "Unable to cast" RuntimeError from the op boundary


def _calls_with_positions(positions, backend, device):
    """Every public op that takes positions, called with ``positions`` (an int offset or an id tensor)."""
    import pi_kernels
    from pi_kernels import inference

    torch.set_default_device(device)
    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 1, 8)
    positions = positions if isinstance(positions, int) else positions.to(device)
    ids = positions if isinstance(positions, int) else positions.expand(2, 3)
    flat_ids = ids if isinstance(ids, int) else ids.reshape(-1)
    calls = {
        "rotary_interp": lambda: pi_kernels.rotary_interp(q, k, positions, backend=backend),
        "attention_rotary": lambda: pi_kernels.attention_rotary(q, k, k, positions, backend=backend),
        "qkv_proj_rotary": lambda: pi_kernels.qkv_proj_rotary(torch.randn(2, 3, 8), torch.randn(32, 8), num_heads=2,
                                                              num_kv_heads=1, head_dim=8, positions=positions,
                                                              backend=backend),
        "rotary_kv_cache_append": lambda: pi_kernels.rotary_kv_cache_append(
            q, k, k, torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8), torch.tensor([0, 1]), positions=positions,
            backend=backend),
    }
    if not isinstance(positions, int):
        calls["rotary_paged_kv_cache_append"] = lambda: pi_kernels.rotary_paged_kv_cache_append(
            q[0], k[0], k[0], torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8), torch.arange(3), flat_ids[:3],
            backend=backend)
        calls["rotary_embedding_interp"] = lambda: inference.rotary_embedding_interp(
            flat_ids, torch.randn(6, 16), None, 8, backend=backend)
    return calls


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("positions", [HUGE_INT_OFFSET, 2**31, torch.tensor([[0, 5, 2**31]]),
                                       torch.tensor([[0, 5, 2**62]])], ids=["2**70", "2**31", "ids 2**31", "ids 2**62"])
def test_positions_past_the_maximum_are_refused(device, backend, positions):
    try:
        for call in _calls_with_positions(positions, backend, device).values():
            with pytest.raises(ValueError, match=r"positions (offset )?must be"):
                call()
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float32_accuracy_up_to_the_maximum_position(device, backend):
    """At the largest accepted positions (an id of 2**31 - 1, offset + index just below 2**32) the rotation keeps
    float32 accuracy, measured against angles reduced in extended precision."""
    import numpy as np

    import pi_kernels
    from pi_kernels.scaling import rope_inv_freq

    from .tolerances import assert_close

    head_dim, scaling_factor = 64, 0.9
    ids = torch.tensor([[2**31 - 1, 2**31 - 2, 2**30 + 12345, 7]])
    q = torch.randn(1, 4, 3, head_dim)
    q_out, _ = pi_kernels.rotary_interp(q.to(device), q[:, :, :0].to(device), ids.to(device),
                                        scaling_factor=scaling_factor, backend=backend)
    inv_freq = rope_inv_freq(10000.0, head_dim).double().numpy().astype(np.longdouble)
    # 64-bit mantissa: m · inv_freq / s to ~2**-32 at m < 2**32, then reduced modulo 2π before the float64 sin/cos.
    angles = ids.numpy()[0].astype(np.longdouble)[:, None] * inv_freq[None, :] / np.longdouble(scaling_factor)
    two_pi = 8 * np.arctan(np.longdouble(1))  # π to the 64-bit mantissa, not float64's
    reduced = torch.from_numpy((angles - np.floor(angles / two_pi) * two_pi).astype(np.float64))
    cos, sin = reduced.cos()[:, None, :], reduced.sin()[:, None, :]
    x1, x2 = q.double()[0, :, :, :head_dim // 2], q.double()[0, :, :, head_dim // 2:]
    ref = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    assert_close(q_out[0].cpu(), ref, torch.float32, name=f"rotation at positions near 2**31 ({backend})")
