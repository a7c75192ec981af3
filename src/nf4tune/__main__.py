"""`python -m nf4tune ...`: the `nf4tune` command, also as torchrun starts it
(`torchrun --nproc-per-node N -m nf4tune train RECIPE.yaml`)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
