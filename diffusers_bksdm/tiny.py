"""`diffusers_bksdm.tiny`: the documented home of the tiny local teachers, which live in
:mod:`diffusers_bksdm.miniature.tiny`. Importing this module gives the same names."""

from .miniature.tiny import *  # noqa: F403
from .miniature.tiny import __all__  # noqa: F401
