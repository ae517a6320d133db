"""Calibration: observers over Numba kernels, a streaming collector, and a cache."""
