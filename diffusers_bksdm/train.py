"""`python -m diffusers_bksdm.train` and `accelerate launch -m diffusers_bksdm.train`: the documented entry point of
the trainer, which lives in :mod:`diffusers_bksdm.training.train`. Importing this module gives the same names."""

import sys

from .training.train import *  # noqa: F403
from .training.train import __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
