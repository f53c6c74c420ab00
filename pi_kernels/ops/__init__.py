"""One module per op: Triton kernels, launcher, autograd.Function and torch.library registration."""
