"""Inputs for every torchvision classification model, shared by the zoo test and docs/zoo.md."""

import torch
import torchvision

#: fast and architecturally diverse: run by `make test`
REPRESENTATIVE = {
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5",
    "efficientnet_b0", "convnext_tiny", "regnet_x_400mf", "resnext50_32x4d", "squeezenet1_1",
    "googlenet", "mnasnet0_5", "vgg11_bn", "alexnet", "vit_b_32", "swin_t", "wide_resnet50_2",
}


def all_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (random weights, 10 classes, eval mode) and a small valid input."""
    kwargs, size = {"num_classes": 10}, 64
    if name.startswith("vit"):
        size = int(name.rsplit("_", 1)[1]) * 4  # four patches a side
        kwargs["image_size"] = size
    elif name.startswith("inception"):
        kwargs["aux_logits"], kwargs["init_weights"], size = False, False, 96
    elif name == "googlenet":
        kwargs["aux_logits"], kwargs["init_weights"] = False, False
    elif name.startswith("maxvit"):
        kwargs["input_size"], size = (224, 224), 224  # partitions of 7 at every stage
    model = torchvision.models.get_model(name, **kwargs).eval()
    return model, torch.randn(1, 3, size, size)
