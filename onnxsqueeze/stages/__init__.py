"""Lossy families under one accuracy budget: the budget, the judge that measures a
candidate as onnxruntime runs it, per-node sensitivity, the shared fewest-kept search and
the latency gate; ``quantize`` is the first family (factorization and pruning join it)."""
