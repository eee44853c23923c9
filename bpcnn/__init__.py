"""bpcnn: biologically plausible convolutional networks.

Locally connected networks, instant weight sharing and the sleep phase (dynamic weight sharing)
from R. Pogodin, Y. Mehta, T. P. Lillicrap, P. E. Latham, "Towards Biologically Plausible
Convolutional Networks", NeurIPS 2021 (arXiv 2106.13031).
"""

__version__ = "0.1.0"
