"""`vlrl train` with the trainer's GPU memory capped (bench only): VLRL_TRAINER_MEMORY_FRACTION of the card, so
a recipe sized for an 80 GB GPU is proven within 80 GB on a larger one (its vLLM share is scaled by the caller)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, when run as a script from any folder

if __name__ == "__main__":
    fraction = os.environ.get("VLRL_TRAINER_MEMORY_FRACTION")
    if fraction:
        import torch

        torch.cuda.set_per_process_memory_fraction(float(fraction))
    from vlrl_cli.cli import main

    sys.argv = ["vlrl", "train", *sys.argv[1:]]
    main()
