"""The demo's accuracy against doing nothing: EfficientNet-Lite0's own ImageNet "ant" and "bee" logits, with no
training at all, against heads trained on the frozen backbone's features (`model.mode: feature_extraction`, as
configs/demo.yaml trains), on the downscaled demo copy and on the full-resolution photos. Heads start random, or
from the ImageNet classifier's ant and bee rows (`model.head_from_imagenet`, which the demo uses).

With the backbone frozen, its pooled features can be computed once per augmented view and only the head trained on
them: a recipe then costs a second instead of minutes, so recipes and seeds can be compared in one run. Epoch e
trains on view e (mod --views) of every train image, made by the job's own train transform (RandomResizedCrop and
flip); val goes through the job's resize and centre crop. The head is trained as the job trains it: SGD with
momentum, StepLR, shuffled batches; configs/demo.yaml's recipe is read from the file. Also printed: the best any
linear head can do on these train images (fitted to convergence on their un-augmented features), which bounds every
recipe that starts from a random head.

    .venv/bin/python benchmarks/demo_recipes.py [--views 10] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.formats.model_spec import ModelSpec  # noqa: E402
from pipeline.hardware import cpu_model  # noqa: E402
from pipeline.images import decode_image  # noqa: E402
from pipeline.models import build_model, head_from_imagenet  # noqa: E402
from pipeline.train.config import load_config  # noqa: E402
from pipeline.train.data import scan_image_folder  # noqa: E402
from pipeline.train.transforms import decode_sizes, eval_transform, train_transform  # noqa: E402

DATA = {"demo copy": REPO / "data" / "hymenoptera", "full resolution": REPO.parent / "shared" / "data" / "hymenoptera"}
DEMO = load_config(str(REPO / "configs" / "demo.yaml"))
CLASSES = list(DEMO.model.head_from_imagenet)
RECIPES = {  # name: head training options; configs/demo.yaml's first
    f"configs/demo.yaml: head from ImageNet, lr {DEMO.train.lr:g}, {DEMO.train.epochs} epochs, label smoothing "
    f"{DEMO.train.label_smoothing:g}": dict(
        lr=DEMO.train.lr, epochs=DEMO.train.epochs, batch_size=DEMO.train.batch_size, momentum=DEMO.train.momentum,
        step_size=DEMO.train.step_size, gamma=DEMO.train.gamma, label_smoothing=DEMO.train.label_smoothing,
        imagenet_head=True),
    "head from ImageNet, lr 0.001, 5 epochs": dict(lr=0.001, epochs=5, imagenet_head=True),
    "head from ImageNet, lr 0.001, 25 epochs": dict(lr=0.001, epochs=25, imagenet_head=True),
    "head from ImageNet, lr 0.003, 10 epochs, label smoothing 0.1": dict(lr=0.003, epochs=10, label_smoothing=0.1,
                                                                         imagenet_head=True),
    "random head, lr 0.01, 5 epochs (the demo before)": dict(lr=0.01, epochs=5),
    "random head, lr 0.001, 25 epochs": dict(lr=0.001, epochs=25),
    "random head, lr 0.01, 10 epochs, label smoothing 0.1": dict(lr=0.01, epochs=10, label_smoothing=0.1),
    "random head, lr 0.01, 10 epochs, weight decay 0.01": dict(lr=0.01, epochs=10, weight_decay=0.01),
}


def features(model: nn.Module, spec: ModelSpec, root: Path, classes: list[str], views: int) -> dict:
    """Pooled features: `views` augmented views and one plain view of train, one view of val; with targets."""
    data = scan_image_folder(str(root))
    assert data.classes == classes, f"{root} holds {data.classes}, not {classes}"
    out = {}
    with torch.no_grad():
        for split, sizes in (("train", decode_sizes(spec)[0]), ("val", decode_sizes(spec)[1])):
            samples = getattr(data, split)
            images = [decode_image(Path(key).read_bytes(), sizes) for key in samples.keys()]
            targets = torch.as_tensor(samples.targets.astype("int64"))

            def pooled(transform):
                x = torch.stack([transform(image) for image in images])
                return torch.cat([model.forward_head(model.forward_features(x[i:i + 64]), pre_logits=True)
                                  for i in range(0, len(x), 64)])

            out[split] = (pooled(eval_transform(spec)), targets)
            if split == "train":
                torch.manual_seed(0)
                out["views"] = torch.stack([pooled(train_transform(spec)) for _ in range(views)])
    return out


def train_head(feats: dict, imagenet: nn.Linear, seed: int, lr: float, epochs: int, batch_size: int = 16,
               momentum: float = 0.9, step_size: int = 7, gamma: float = 0.1, label_smoothing: float = 0.0,
               weight_decay: float = 0.0, imagenet_head: bool = False) -> float:
    """The val accuracy after training a head as the job does: a copy of `imagenet` (the head started from
    ImageNet's rows) or a random one."""
    targets = feats["train"][1]
    torch.manual_seed(seed)
    head = copy.deepcopy(imagenet) if imagenet_head else nn.Linear(imagenet.in_features, imagenet.out_features)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    for epoch in range(epochs):
        view = feats["views"][epoch % len(feats["views"])]
        order = torch.randperm(len(targets))
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            loss = criterion(head(view[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return accuracy(head(feats["val"][0]), feats["val"][1])


def best_linear_head(feats: dict) -> float:
    """A linear head fitted to convergence (L-BFGS) on the un-augmented train features."""
    x, y = feats["train"]
    head = nn.Linear(x.shape[-1], int(y.max()) + 1)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return accuracy(head(feats["val"][0]), feats["val"][1])


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return (logits.argmax(1) == targets).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=10, help="augmented views of each train image")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {cpu_model()}; {DEMO.model.arch}, ImageNet weights", flush=True)
    model, spec = build_model(DEMO.model.arch, len(CLASSES), DEMO.model.weights,
                              head_from_imagenet(CLASSES, DEMO.model.head_from_imagenet))
    model.eval()
    imagenet = model.get_submodule(spec.head)  # untrained, it gives ImageNet's own ant and bee logits
    for name, root in DATA.items():
        if not root.is_dir():
            print(f"{name}: {root} is absent; left out", flush=True)
            continue
        feats = features(model, spec, root, CLASSES, args.views)
        with torch.no_grad():
            zero_shot = accuracy(imagenet(feats["val"][0]), feats["val"][1])
        print(f"{name} ({len(feats['train'][1])} train, {len(feats['val'][1])} val): no training (ImageNet's "
              f"logits) {zero_shot:.4f}; the best linear head on these train images {best_linear_head(feats):.4f}",
              flush=True)
        for recipe, options in RECIPES.items():
            accs = [train_head(feats, imagenet, seed, **options) for seed in range(args.seeds)]
            print(f"  {recipe}: {' '.join(f'{a:.4f}' for a in accs)} (worst {min(accs) - zero_shot:+.4f} against "
                  "no training)", flush=True)


if __name__ == "__main__":
    main()
