"""Quantization numerics and the QDQ building blocks the passes assemble: scales and zero
points, per-channel rounding, GPTQ, n-bit packing, weight storage forms. Knows nothing of
budgets, calibration runs or which nodes to quantize."""
