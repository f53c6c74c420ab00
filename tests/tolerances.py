"""The one place that says how close a kernel must be to the float64 reference, by dtype.

Errors are relative norms ‖out − ref‖ / ‖ref‖ against the reference computed in float64 on the same inputs.
"""

import torch

TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_error(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are empty)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    return 0.0 if ref.numel() == 0 else float((out - ref).norm() / denom)


def assert_close(out, ref, dtype, *, name="output", scale=1.0):
    """Assert ``rel_error(out, ref) ≤ scale · TOLERANCE[dtype]`` with a message naming what failed."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_error(out, ref)
    tol = scale * TOLERANCE[dtype]
    assert err <= tol, f"{name}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype})"


# Attention (softmax over thousands of products) has no fixed error bound per dtype; its bar, as flash-attention's
# tests set it, is relative to the same computation done in eager PyTorch in the input dtype: at most twice its
# error against float64, plus a floor well below the dtype's own rounding (half an ulp of 1 is 4.9e-4 for fp16,
# 3.9e-3 for bf16) so that an unusually exact eager result cannot make the bar unreachable.
ATTENTION_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_close_to_eager(out, ref, eager, dtype, *, name="output", scale=2.0):
    """Assert ``rel_error(out, ref) ≤ scale · rel_error(eager, ref) + ATTENTION_FLOOR[dtype]``.

    ``ref`` is the float64 reference, ``eager`` the same computation in plain PyTorch in the input dtype.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, eager_err = rel_error(out, ref), rel_error(eager, ref)
    tol = scale * eager_err + ATTENTION_FLOOR[dtype]
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.3e} ({scale:g} × eager {eager_err:.3e} + floor)"
