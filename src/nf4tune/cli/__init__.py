"""The `nf4tune` command: argument parsing only; the work lives in the library."""
