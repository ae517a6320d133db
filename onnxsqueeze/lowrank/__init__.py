"""Low-rank factorization numerics on numpy arrays: plain and whitened truncated SVD with the
error of every rank (``svd``), and the allocation of ranks across layers under one
parameter budget (``allocate``). Knows nothing of graphs."""
