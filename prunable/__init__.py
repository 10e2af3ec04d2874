"""prunable: remove whole channels from PyTorch CNNs, chosen by a Taylor estimate.

Example
-------
>>> import torch, prunable
>>> net = prunable.CharNet(10, config=[8, "M"], input_size=8)
>>> net(torch.randn(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from .attention import AttentionHandler
from .errors import EstimationError, PrunableError, PruningValueError, SurgeryError
from .flops import count_flops, count_params, measure_latency, module_flops
from .graph import ChannelGroup, DependencyGraph
from .io import ModelFileError, load, save
from .importance import (
    APoZ, CRITERIA, Aggregation, BNScale, Criterion, MeanActivation, Random, TaylorActivation, TaylorBN,
    TaylorWeight, WeightNorm, make_criterion,
)
from .models import CharNet, SeedNet, vgg
from .nn import PBatchNorm1d, PBatchNorm2d, PConv2d, PLinear, convert
from .oracle import oracle_importance
from .plan import Plan
from .pruner import Pruner, Scope
from .reasons import SkipKind, SkipReason
from .recurrent import RecurrentCellHandler, RecurrentHandler
from .selection import Constraints, Selector
from .transfer import apply_plan, export_plan
from .surgery import ModuleHandler, ParametrizationHandler, Role, register_handler, slice_optimizer_state

__version__ = "0.1.0"

__all__ = [
    "Aggregation", "APoZ", "apply_plan", "AttentionHandler", "BNScale", "ChannelGroup", "CharNet", "Constraints", "convert",
    "count_flops", "count_params", "CRITERIA", "Criterion", "DependencyGraph", "EstimationError", "export_plan", "load",
    "make_criterion", "MeanActivation", "measure_latency", "ModelFileError", "module_flops", "ModuleHandler",
    "oracle_importance", "ParametrizationHandler", "PBatchNorm1d", "PBatchNorm2d", "PConv2d", "Plan", "PLinear",
    "PrunableError", "Pruner", "PruningValueError", "Random", "RecurrentCellHandler", "RecurrentHandler",
    "register_handler", "Role", "save", "Scope", "SeedNet", "Selector", "SkipKind", "SkipReason",
    "slice_optimizer_state", "SurgeryError", "TaylorActivation", "TaylorBN", "TaylorWeight", "vgg", "WeightNorm",
]
