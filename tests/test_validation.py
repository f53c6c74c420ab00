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
