"""Hand-written kernels for the hot loops PyTorch has no fast op for, each held by tests to a
PyTorch reference: `cpu` (AVX-512, built on first use). Callers choose them by device and fall back
to the reference paths where they are missing."""
