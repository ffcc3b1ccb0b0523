"""The model zoo. `create_model(name, num_classes=..., in_channels=..., options=...)`."""
from edgeres.models.registry import (ARCHS, ArchSpec, create_model, get_spec, list_archs, register_arch,
                                     register_builder)
from edgeres.models.resnet import ResNet

register_builder("resnet", ResNet)

__all__ = ["ARCHS", "ArchSpec", "ResNet", "create_model", "get_spec", "list_archs", "register_arch"]
