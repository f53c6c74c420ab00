"""One module per op: Triton kernels, launcher, autograd.Function and torch.library registration."""

import os


def _interpreting():
    """Whether Triton kernels run under its interpreter (``TRITON_INTERPRET=1``, a machine without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
