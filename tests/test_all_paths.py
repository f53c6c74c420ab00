"""One rotation, every path: training and serving must rotate q and k the same way.

The same q, k, positions and scaling go through ``rotary_interp``, the ``qkv_proj_rotary`` epilogue (an identity
projection, so its outputs are the rotated inputs), ``attention_rotary`` (rotating in its own pass vs attending over
q and k rotated beforehand, and a decode step against caches filled by both cache appends, with ``rotate_k=False``
vs ``rotate_k=True``), ``rotary_kv_cache_append``, ``rotary_paged_kv_cache_append``, and the vLLM-convention ops
with angles computed in the kernel and read from a ``cos_sin_cache``. Every rotated tensor must be within 1e-6 of the
float64 reference and of ``rotary_interp``'s output, at positions up to 2**20 and 2**24 with ``scaling_factor=16``
(angles up to 2**20 rad, where a float32 angle would be off by up to its ulp, 0.125 rad).

The ``cos_sin_cache`` is built from float64 angles and rounded once to float32, as a careful engine would: each
entry is then within half a float32 ulp (2**-24 ≈ 6e-8) of the true cos/sin, which moves a rotated value by at most
~1.2e-7 of its norm, so the same 1e-6 bound holds (measured: ~1e-7). A cache whose angles were computed in float32,
``m * inv_freq``, is off by up to half an ulp of 2**20 rad, 0.06 rad, here: 5e-3 relative in the output at 2**24,
the error the kernels' float64 angle reduction avoids. Its
rows are allocated with ``torch.empty`` and only those at the positions are written, so the 2**24-row table costs
no memory beyond the pages those rows touch.

``check_every_path`` takes the backend of the ops that have several (rotary, vLLM convention, cache appends): here
"triton" and "torch"; ``tests/test_csrc.py`` runs it with ``backend="cuda"`` (the real extension on a GPU, its CPU
emulation elsewhere).
"""

import pytest
import torch

import pi_kernels
from pi_kernels import inference
from pi_kernels.reference import attention_rotary_reference, rotary_angles, rotary_interp_reference

from .test_attention import tf32_scale
from .tolerances import rel_error

SCALING_FACTOR = 16.0
N_HEADS, N_KV_HEADS, HEAD_DIM, SEQ = 2, 1, 16, 8
BOUND = 1e-6


def make_inputs(device, highest):
    """q, k, v (1, SEQ, heads, HEAD_DIM) in float32 and int64 positions (SEQ,) below ``highest``, one equal to it."""
    generator = torch.Generator().manual_seed(highest % 9973)
    q, k, v = (torch.randn(1, SEQ, heads, HEAD_DIM, generator=generator).to(device)
               for heads in (N_HEADS, N_KV_HEADS, N_KV_HEADS))
    positions = highest - torch.randint(0, 5000, (SEQ,), generator=generator)
    positions[-1] = highest
    return q, k, v, positions.to(device)


def assert_rotation(name, out, ref, expected, *, reference_scale=1.0):
    """Within BOUND of ``expected`` (what rotary_interp gave) and ``reference_scale`` · BOUND of the float64 reference
    (attention's float32 dots run in TF32 on a GPU: :func:`tf32_scale`)."""
    to_ref, to_expected = rel_error(out, ref), rel_error(out, expected)
    bound = reference_scale * BOUND
    assert to_ref <= bound, f"{name}: {to_ref:.2e} from the float64 reference (bound {bound:.0e})"
    assert to_expected <= BOUND, f"{name}: {to_expected:.2e} from the same computation through rotary_interp"


def sparse_cos_sin_cache(positions, device):
    """A (max position + 1, HEAD_DIM) float32 cos | sin cache whose rows at ``positions`` only are filled."""
    angles = rotary_angles(positions, scaling_factor=SCALING_FACTOR, rotary_dim=HEAD_DIM)  # float64
    cache = torch.empty(int(positions.max()) + 1, HEAD_DIM, device=device)
    cache[positions] = torch.cat([angles.cos(), angles.sin()], dim=-1).float()
    return cache


def check_every_path(device, highest, backend, *, projection_and_attention=True):
    """Rotate through every path; ``backend`` for the rotary, vLLM-convention and cache-append ops.

    ``projection_and_attention``: also ``qkv_proj_rotary`` and ``attention_rotary`` (on their default backend).
    """
    q, k, v, positions = make_inputs(device, highest)
    q_ref, k_ref = rotary_interp_reference(q.double(), k.double(), positions, scaling_factor=SCALING_FACTOR)
    q_rot, k_rot = pi_kernels.rotary_interp(q, k, positions, scaling_factor=SCALING_FACTOR, backend=backend)
    assert_rotation("rotary_interp q", q_rot, q_ref, q_rot)
    assert_rotation("rotary_interp k", k_rot, k_ref, k_rot)

    # In place through vLLM's convention on flat (tokens, heads * head_size) tensors, computed and cached angles.
    for cos_sin_cache in (None, sparse_cos_sin_cache(positions, device)):
        query, key = q[0].flatten(1).clone(), k[0].flatten(1).clone()
        if cos_sin_cache is None:
            inference.rotary_embedding_interp(positions, query, key, HEAD_DIM, scaling_factor=SCALING_FACTOR,
                                              backend=backend)
        else:
            inference.rotary_embedding(positions, query, key, HEAD_DIM, cos_sin_cache, backend=backend)
        what = "rotary_embedding" + ("_interp" if cos_sin_cache is None else " (cos_sin_cache)")
        assert_rotation(f"{what} query", query.view(q.shape), q_ref, q_rot)
        assert_rotation(f"{what} key", key.view(k.shape), k_ref, k_rot)

    # KV-cache appends: q comes back rotated, k lands rotated in the cache.
    k_cache, v_cache = torch.zeros(1, SEQ + 3, N_KV_HEADS, HEAD_DIM, device=device), \
        torch.zeros(1, SEQ + 3, N_KV_HEADS, HEAD_DIM, device=device)
    q_dense = pi_kernels.rotary_kv_cache_append(q, k, v, k_cache, v_cache, torch.zeros(1, dtype=torch.int64,
                                                                                        device=device),
                                                positions=positions[None], scaling_factor=SCALING_FACTOR,
                                                backend=backend)
    assert_rotation("rotary_kv_cache_append q", q_dense, q_ref, q_rot)
    assert_rotation("rotary_kv_cache_append k_cache", k_cache[:, :SEQ], k_ref, k_rot)
    block_size = 4
    slots = torch.randperm(3 * SEQ, generator=torch.Generator().manual_seed(0))[:SEQ].to(device)
    paged_k, paged_v = (torch.zeros(3 * SEQ // block_size, block_size, N_KV_HEADS, HEAD_DIM, device=device)
                        for _ in range(2))
    q_paged = pi_kernels.rotary_paged_kv_cache_append(q[0], k[0], v[0], paged_k, paged_v, slots, positions,
                                                      scaling_factor=SCALING_FACTOR, backend=backend)
    k_from_pages = paged_k.flatten(0, 1)[slots][None]
    assert_rotation("rotary_paged_kv_cache_append q", q_paged[None], q_ref, q_rot)
    assert_rotation("rotary_paged_kv_cache_append k_cache", k_from_pages, k_ref, k_rot)
    if not projection_and_attention:
        return

    # The projection epilogue: x holds q, k and v of each token; an identity weight projects it onto itself.
    x = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
    identity = torch.eye(x.shape[-1], device=device)
    q_proj, k_proj, v_proj = pi_kernels.qkv_proj_rotary(x, identity, num_heads=N_HEADS, num_kv_heads=N_KV_HEADS,
                                                        head_dim=HEAD_DIM, positions=positions,
                                                        scaling_factor=SCALING_FACTOR)
    assert_rotation("qkv_proj_rotary q", q_proj, q_ref, q_rot)
    assert_rotation("qkv_proj_rotary k", k_proj, k_ref, k_rot)
    assert torch.equal(v_proj, v), "qkv_proj_rotary: v is the identity projection of v"

    # Attention rotating q and k itself equals attention over q and k rotated beforehand (both sides checked).
    ids = positions[None]
    rotating = pi_kernels.attention_rotary(q, k, v, ids, k_positions=ids, scaling_factor=SCALING_FACTOR)
    prerotated = pi_kernels.attention_rotary(q_rot, k_rot, v, rotate_q=False, rotate_k=False)
    expected = attention_rotary_reference(q_ref, k_ref, v.double(), rotate_q=False, rotate_k=False)
    assert_rotation("attention_rotary (prefill)", rotating, expected, prerotated, reference_scale=tf32_scale(device))
    # Decode: the last token's query against the caches both appends filled (rotate_k=False) and against the
    # un-rotated keys (rotate_k=True).
    query, query_ids = q[:, -1:], ids[:, -1:]
    expected = attention_rotary_reference(q_ref[:, -1:], k_ref, v.double(), causal=False, rotate_q=False,
                                          rotate_k=False)
    rotating = pi_kernels.attention_rotary(query, k, v, query_ids, k_positions=ids, causal=False,
                                           scaling_factor=SCALING_FACTOR)
    for name, cached_k, cached_v in (("dense", k_cache[:, :SEQ], v_cache[:, :SEQ]),
                                     ("paged", k_from_pages, paged_v.flatten(0, 1)[slots][None])):
        decoded = pi_kernels.attention_rotary(query, cached_k, cached_v, query_ids, causal=False,
                                              scaling_factor=SCALING_FACTOR, rotate_k=False)
        assert_rotation(f"attention_rotary decode, {name} cache", decoded, expected, rotating,
                        reference_scale=tf32_scale(device))


@pytest.mark.parametrize("highest", [2**20, 2**24])
def test_every_path_rotates_alike(device, highest):
    check_every_path(device, highest, "triton")


@pytest.mark.parametrize("highest", [2**20, 2**24])
def test_torch_backend_rotates_alike(device, highest):
    check_every_path(device, highest, "torch", projection_and_attention=False)
