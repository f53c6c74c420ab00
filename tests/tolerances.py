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
