"""numba kernels and the graph executor (a leaf: NumPy and numba only)."""
