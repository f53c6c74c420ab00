"""Benchmarks for pi_kernels: a shared runner (:mod:`benchmarks.harness`, on :mod:`~benchmarks.cli`,
:mod:`~benchmarks.timing`, :mod:`~benchmarks.results_io` and :mod:`~benchmarks.report`), one registry of peers and
the Provider record (:mod:`benchmarks.peers`), and one script per op."""
