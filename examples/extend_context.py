"""Position Interpolation end to end; the recipe lives in pi_kernels/recipes/extend_context.py (same arguments)."""
import runpy

runpy.run_module("pi_kernels.recipes.extend_context", run_name="__main__", alter_sys=True)
