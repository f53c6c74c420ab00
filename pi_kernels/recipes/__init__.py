"""End-to-end recipes built on pi_kernels; each module is a command (``python -m pi_kernels.recipes.<name>``)."""
