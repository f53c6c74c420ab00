"""Benchmarks for pi_kernels: a shared harness (:mod:`benchmarks.harness`) and one script per op."""
