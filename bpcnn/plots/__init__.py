"""Figures shared by the notebooks and scripts; each function draws onto matplotlib axes or saves a file."""
from .training import *  # noqa: F401,F403
from .dynamics import *  # noqa: F401,F403
from .results import *  # noqa: F401,F403
