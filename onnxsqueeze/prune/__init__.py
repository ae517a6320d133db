"""Pruning numerics on numpy arrays: importance (magnitude, Wanda) and sparsity masks
(unstructured per output, N:M). Knows nothing of graphs."""
