"""One module per op: Triton kernels, launcher, autograd.Function and custom op; ``_schema.py`` holds the rope record
every op takes and ``record_op``, through which every op is registered with ``torch.library``."""
