"""prunable: remove whole channels from PyTorch CNNs, chosen by a Taylor estimate.

Example
-------
>>> import torch, prunable
>>> net = prunable.CharNet(10, config=[8, "M"], input_size=8)
>>> net(torch.randn(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from .errors import EstimationError, PrunableError, PruningValueError, SurgeryError
from .models import CharNet, SeedNet, vgg
from .nn import PBatchNorm1d, PBatchNorm2d, PConv2d, PLinear, convert
from .surgery import ModuleHandler, Role, register_handler, slice_optimizer_state

__version__ = "0.1.0"

__all__ = [
    "CharNet", "EstimationError", "ModuleHandler", "PBatchNorm1d", "PBatchNorm2d", "PConv2d",
    "PLinear", "PrunableError", "PruningValueError", "Role", "SeedNet", "SurgeryError",
    "convert", "register_handler", "slice_optimizer_state", "vgg",
]
