"""bpcnn: biologically plausible convolutional networks.

Locally connected networks, instant weight sharing and the sleep phase (dynamic weight sharing)
from R. Pogodin, Y. Mehta, T. P. Lillicrap, P. E. Latham, "Towards Biologically Plausible
Convolutional Networks", NeurIPS 2021 (arXiv 2106.13031).
"""

__version__ = "0.1.0"

from .config import RunConfig
from .convert import to_channels_last, to_convolutional, to_locally_connected
from .layers import LocallyConnected2d, locally_connected2d
from .sharing import InstantSharing, share_weights_instantly, weight_snr, weight_snrs
from .sleep import SleepPhase, share_weights_dynamically
from .training import evaluate, read_metrics, train

__all__ = [
    "LocallyConnected2d",
    "locally_connected2d",
    "to_locally_connected",
    "to_convolutional",
    "to_channels_last",
    "share_weights_instantly",
    "weight_snr",
    "weight_snrs",
    "InstantSharing",
    "share_weights_dynamically",
    "SleepPhase",
    "RunConfig",
    "train",
    "evaluate",
    "read_metrics",
]
