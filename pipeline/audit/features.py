"""The audit's model work: a backbone's pooled features for every training image (one Ray task per part of a
split), then per fold a linear head fitted on the other folds' features, whose softmax over this fold's images
gives their out-of-fold probabilities (one Ray task per fold). Each task writes its result once, under a name of
its own, so that a killed audit's rerun skips what is there.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from torch import nn
from torch.nn import functional as F

from pipeline import storage
from pipeline.audit.confident_learning import stratified_folds
from pipeline.formats import checkpoint
from pipeline.formats.model_spec import ModelSpec, TrainedModel
from pipeline.models import WithEmbedding, build_model, from_checkpoint
from pipeline.train.config import Config
from pipeline.train.dataset import Share, split_loader
from pipeline.train.splits import TrainingData
from pipeline.train.transforms import decode_sizes, eval_transform

# The linear heads' inverse L2 strengths, as scikit-learn's LogisticRegression weighs them (the summed loss plus
# |W|²/2C), one chosen per fold by the log loss of an inner cross-validation: on ants/bees with 10% of labels moved,
# C = 1 left every head sure of everything, and found a third fewer moved labels per suspect than the C it picks.
STRENGTHS = np.logspace(0, -4, 9)
INNER_FOLDS = 3
LBFGS_STEPS = 200


def feature_model(cfg: Config, classes: list[str]) -> tuple[WithEmbedding, ModelSpec]:
    """The backbone whose pooled features the heads fit, in eval mode: audit.checkpoint's (a model trained on
    these labels), or model.arch with model.weights (ImageNet's, by default)."""
    if cfg.audit.checkpoint:
        trained = TrainedModel.of(checkpoint.load(cfg.audit.checkpoint))
        model, spec = from_checkpoint(trained), trained.spec
    else:
        model, spec = build_model(cfg.model.arch, len(classes), cfg.model.weights)
    return WithEmbedding(model.eval(), spec.head), spec


@ray.remote(num_cpus=1)
def extract_part(model: WithEmbedding, spec: ModelSpec, data: TrainingData, part: tuple[str, int, int],
                 cfg: Config, path: str) -> int:
    """Write the features of part `part` ((split, index, parts)) of a split to `path`; its images that do not
    read or decode get a row with their given label, their error and no features. Returns the rows written."""
    split, index, parts = part
    share = Share(index, parts, cfg.audit.batch_size, shuffle=False)
    keys, targets, values, errors = forward(model.backbone, spec, data, split, share, cfg)
    paths, features, reasons = output_columns(keys, values, errors, model.head.in_features, fill=0.0)
    rows = pa.table({
        "path": paths,
        "target": pa.array(np.concatenate([targets, [target for _, target in errors.values()]]).astype(np.int16)),
        "feature": features,
        "error": reasons,
    })
    write_once(rows, path)
    return len(rows)


def forward(model: nn.Module, spec: ModelSpec, data: TrainingData, split: str, share: Share,
            cfg: Config) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, tuple[str, int]]]:
    """`model`'s outputs over `share` of a split, as val sees its images, on this task's device: (keys, targets,
    outputs as float32 rows, {key: (reason, target)} of the images that did not read or decode)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.eval().to(device)
    draft = None if cfg.data.exact_decode else decode_sizes(spec)[1]
    loader, _ = split_loader(data, split, eval_transform(spec), draft, share, num_workers=cfg.train.num_data_workers,
                             pin_memory=device.type == "cuda")
    keys, targets, outputs, errors = [], [], [], {}
    with torch.no_grad():
        for images, batch_targets, batch_keys, skipped in loader:
            errors.update(skipped)
            if images is None:
                continue
            outputs.append(model(images.to(device, non_blocking=True)).float().cpu().numpy())
            keys += batch_keys
            targets.append(batch_targets.numpy())
    values = np.concatenate(outputs) if outputs else np.zeros((0,), dtype=np.float32)
    return keys, np.concatenate(targets) if targets else np.zeros(0, np.int16), values, errors


def output_columns(keys: list[str], values: np.ndarray, errors: dict[str, tuple[str, int]], width: int,
                   fill: float) -> tuple[pa.Array, pa.FixedSizeListArray, pa.Array]:
    """forward()'s results as columns, a row per image: (path, its `width` values, error), the images that did not
    read or decode last, with `fill` for values and their reason."""
    paths = pa.array(keys + list(errors), pa.string())
    filled = np.concatenate([values.reshape(-1, width), np.full((len(errors), width), fill, np.float32)])
    reasons = pa.array([None] * len(keys) + [why for why, _ in errors.values()], pa.string())
    return paths, pa.FixedSizeListArray.from_arrays(filled.ravel(), width), reasons


@ray.remote(num_cpus=1)
def fit_fold(features: np.ndarray, targets: np.ndarray, folds: np.ndarray, fold: int, classes: int,
             path: str) -> float:
    """Fit a linear head on the images outside `fold` and write the softmax over those in it to `path`: their row
    numbers (into the arrays given) and probabilities. Returns the head's C."""
    inside = np.flatnonzero(folds == fold)
    outside = np.flatnonzero((folds != fold) & (folds >= 0))
    x, y = torch.from_numpy(features[outside]), torch.from_numpy(targets[outside]).long()
    c = choose_strength(x, y, classes)
    head, mean, std = fit_linear_head(x, y, classes, c)
    with torch.no_grad():
        probs = head((torch.from_numpy(features[inside]) - mean) / std).softmax(1).numpy().astype(np.float32)
    write_once(pa.table({"row": inside.astype(np.int64),
                         "probs": pa.FixedSizeListArray.from_arrays(probs.ravel(), classes)}), path)
    return c


def choose_strength(x: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    """The C of STRENGTHS whose heads, fitted on INNER_FOLDS - 1 of this fold's training images, give the held-out
    rest the lowest log loss of their given labels."""
    inner = torch.from_numpy(stratified_folds(y.numpy(), INNER_FOLDS, seed=0))
    losses = []
    for c in STRENGTHS:
        loss = 0.0
        for k in range(INNER_FOLDS):
            head, mean, std = fit_linear_head(x[inner != k], y[inner != k], classes, c)
            with torch.no_grad():
                loss += F.cross_entropy(head((x[inner == k] - mean) / std), y[inner == k], reduction="sum").item()
        losses.append(loss)
    return float(STRENGTHS[int(np.argmin(losses))])


def fit_linear_head(x: torch.Tensor, y: torch.Tensor, classes: int,
                    c: float) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on centred features with inverse L2 strength `c`, by L-BFGS: (head, mean,
    std). One scale for all features, not one each: a feature that is almost always 0 (after a ReLU) would otherwise
    become huge on the one image where it is not, and decide that image's probabilities alone."""
    torch.manual_seed(0)
    x, y = x.float(), y.long()
    mean = x.mean(0)
    std = (x - mean).std().clamp_min(1e-6)
    x = (x - mean) / std
    head = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(head(x), y) + head.weight.pow(2).sum() / (2 * c * len(y))
        value.backward()
        return value

    optimizer.step(loss)
    return head.eval(), mean, std


def write_once(table: pa.Table, path: str) -> None:
    """Write `table` to `path` whole or not at all: a local file under a temporary name, then renamed (an object
    store's upload is whole by itself)."""
    fs, base = storage.resolve(path)
    local = isinstance(fs, pafs.LocalFileSystem)
    fs.create_dir(base.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, base + ".partial" if local else base, filesystem=fs)
    if local:
        fs.move(base + ".partial", base)
