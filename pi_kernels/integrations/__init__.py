"""Adapters that route other libraries' models through the pi_kernels public API (import each one explicitly)."""
