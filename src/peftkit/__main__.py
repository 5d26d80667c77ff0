"""`python -m peftkit ...` is the `peftkit` command (so `torchrun --nproc_per_node N -m peftkit train CONFIG.yaml`)."""
import sys

from .cli import main

sys.exit(main())
