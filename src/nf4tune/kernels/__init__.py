"""Fast paths for the hot loops PyTorch has no fast op for, each held by tests to a PyTorch
reference: `cpu` (AVX-512, built on first use), `cuda` (Triton), `compiled_4bit` (torch.compile on
CPU). None chooses itself: `nf4tune.dispatch` decides which inputs each one takes."""
