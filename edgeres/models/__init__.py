"""The model zoo. `create_model(name, num_classes=..., in_channels=..., options=...)`."""
from edgeres.models.densenet import DENSENETS, DenseNet
from edgeres.models.registry import ARCHS, ArchSpec, create_model, get_spec, list_archs, register_arch, register_builder
from edgeres.models.resnet import ResNet

register_builder("resnet", ResNet)
register_builder("densenet", DenseNet)
for _name, _args in DENSENETS.items():
    register_arch(ArchSpec(_name, "densenet", 224 if _args["stem"] == "imagenet" else 32, 3, "densenet",
                           dict(_args, bn_size=4, compression=0.5)))

__all__ = ["ARCHS", "ArchSpec", "DenseNet", "ResNet", "create_model", "get_spec", "list_archs", "register_arch"]
