"""Shards as training data: shard folders (.tar, .tar.gz, .zip) and labels tables of archive members, streamed
shard by shard through real DataLoader processes, and a real Ray Train run on them."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from jobs.cli import main
from pipeline.formats.keys import Reader
from pipeline.train import shards
from pipeline.train.config import DataConfig
from pipeline.train.data import scan
from pipeline.train.dataset import ShardStream, Share, collate_skipping
from pipeline.train.splits import Layout
from pipeline.train.worker import Worker
from tests.helpers import make_image_folder, pack_shards, write_config

BATCH = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder tree, the same images in shard folders of 4 members: .tar, .tar.gz and .zip in turn)."""
    base = tmp_path_factory.mktemp("shards")
    images = make_image_folder(base / "images", train_per_class=11, val_per_class=5)
    return images, pack_shards(images, base / "shards", per_shard=4, suffixes=(".tar", ".tar.gz", ".zip"))


def member_classes(shard_root: Path, split: str) -> dict[str, str]:
    """Each image member of a split's shards, by key, with the class its folder names."""
    reader = Reader()
    return {key: key.split("!")[1].split("/")[0] for shard in sorted((shard_root / split).glob("0*"))
            for key, *_ in reader.archive_members(str(shard), set())}


def epoch(data, split: str, world: int, workers: int, epoch: int = 1, skip: int = 0, buffer: int = 4) -> list:
    """Each rank's batches of (key, class) in one epoch, each rank through a DataLoader of `workers` processes."""
    ranks = []
    for rank in range(world):
        stream = ShardStream(data.root, getattr(data, split), lambda image: torch.zeros(1), None, data.classes,
                             Share(rank, world, BATCH, seed=7, buffer=buffer, shuffle=split == "train"))
        stream.set_epoch(epoch)
        stream.skip = skip
        loader = DataLoader(stream, batch_size=BATCH, num_workers=workers, collate_fn=collate_skipping)
        batches = [[] if keys is None else [(key, data.classes[t]) for key, t in zip(keys, targets.tolist())]
                   for _, targets, keys, _ in loader]
        assert len(batches) == len(loader)  # what the progress line and the preemption clock count on
        ranks.append(batches)
    return ranks


def test_every_rank_takes_the_same_steps_and_sees_each_sample_once_per_epoch(folders):
    data = scan(DataConfig(root=str(folders[1])))
    truth = member_classes(folders[1], "train")
    assert data.classes == ["blue", "red"] and len(data.train) == 22 and len(data.val) == 10
    for world, workers in ((1, 0), (2, 2), (3, 1)):
        ranks = epoch(data, "train", world, workers)
        assert len({len(batches) for batches in ranks}) == 1  # DDP needs the same steps on every rank
        seen = Counter(sample for batches in ranks for batch in batches for sample in batch)
        assert all(truth[key] == label for key, label in seen)  # each member's class is its folder's
        assert len(seen) == 22 and sum(seen.values()) == math.ceil(22 / world) * world  # padding only
    first, second = (epoch(data, "train", 1, 0, e)[0] for e in (1, 2))
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))  # reshuffled every epoch
    unshuffled = epoch(data, "train", 1, 0, buffer=0)[0]
    assert sum(first, []) != sum(unshuffled, [])  # the buffer mixes members within and across shards
    val = epoch(data, "val", 3, 1)
    assert sorted(s for batches in val for batch in batches for s in batch) == sorted(
        set(s for batches in val for batch in batches for s in batch)) and sum(
        len(batch) for batches in val for batch in batches) == 10  # val: each once, no padding


def test_a_mid_epoch_resume_trains_what_the_interrupted_epoch_had_not(folders):
    data = scan(DataConfig(root=str(folders[1])))
    whole = epoch(data, "train", 2, 2)
    resumed = epoch(data, "train", 2, 2, skip=2 * BATCH)
    for rank in range(2):
        assert len(resumed[rank]) == len(whole[rank]) - 2
        assert Counter(sum(resumed[rank], [])) == Counter(sum(whole[rank][2:], []))


def test_max_steps_per_epoch_ends_the_epoch_after_that_many_batches(folders):
    """train.max_steps_per_epoch: the loop's batches stop at the limit, counted from a resumed epoch's start too."""
    data = scan(DataConfig(root=str(folders[1])))
    stream = ShardStream(data.root, data.train, lambda image: torch.zeros(1), None, data.classes, Share(0, 1, BATCH))
    loader = DataLoader(stream, batch_size=BATCH, num_workers=1, collate_fn=collate_skipping)
    worker = Worker(torch.device("cpu"), rank=0, world=1, amp_dtype=None, channels_last=False)
    assert len(loader) == 8 and [p for p, *_ in worker.batches(loader, "train", limit=3)] == [1, 2, 3]
    stream.skip = 2 * BATCH  # resumed after 2 steps: positions go on from 3
    assert [p for p, *_ in worker.batches(loader, "train", start=2, limit=3)] == [3]


def test_the_index_is_written_once_and_redone_for_a_changed_shard(folders, tmp_path):
    shard_root = Path(shutil.copytree(folders[1], tmp_path / "shards"))
    lines = []
    first = scan(DataConfig(root=str(shard_root)), lines.append)
    assert (shard_root / "train" / shards.INDEX).exists() and len(lines) == 2  # train and val, indexed once
    # A start with the index opens no shard: garbage of the same size goes unnoticed until streamed.
    shard = shard_root / "train" / "000001.tar.gz"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    lines.clear()
    again = scan(DataConfig(root=str(shard_root)), lines.append)
    assert not lines and list(again.train.counts) == list(first.train.counts)
    with open(shard, "ab") as f:  # a shard whose size changed is counted again
        f.write(b"\0")
    changed = scan(DataConfig(root=str(shard_root)), lines.append)
    assert lines == [f"indexing 1 of 6 shards in {shard_root}/train (once; the counts go to {shards.INDEX})"]
    assert changed.train.counts[1] == 0 and len(changed.train) == 18


def test_a_labels_table_of_archive_members_streams_compressed_tars_too(folders, tmp_path):
    shard_root = folders[1]
    truth = {split: member_classes(shard_root, split) for split in ("train", "val")}
    gone = f"{shard_root}/train/000001.tar.gz!blue/gone.jpg"
    rows = [{"path": key, "label": label, "split": split} for split in truth for key, label in truth[split].items()]
    pq.write_table(pa.Table.from_pylist([*rows, {"path": gone, "label": "blue", "split": "train"}]),
                   tmp_path / "labels.parquet")
    data = scan(DataConfig(root=str(tmp_path / "labels.parquet")))
    assert data.train.layout is data.val.layout is Layout.LABELED_MEMBERS and len(data.train) == 23
    for split in ("train", "val"):
        world = 1 if split == "train" else 2  # 23 train samples: 2 ranks would take one twice
        seen = Counter(sample for rank in epoch(data, split, world, 1) for batch in rank for sample in batch)
        assert dict(seen) == {sample: 1 for sample in truth[split].items()}
    stream = ShardStream(data.root, data.train, lambda image: 0, None, data.classes, Share(0, 1, 1, shuffle=False))
    blue = data.classes.index("blue")  # its given label, kept for the audit's row
    assert [sample for sample in stream if sample[0] is None] == [(None, gone, "not in the archive", blue)]


@pytest.mark.ray
def test_a_shard_cut_short_after_indexing_still_gives_every_rank_its_steps(tmp_path):
    """A shard that ends early once indexed (a disk error, a copy still being written): its members past the cut
    are failed samples, so every rank takes the steps it was counted for (DDP's ranks must never fall out of
    step) and each sample is still good or skipped once."""
    images = make_image_folder(tmp_path / "images", train_per_class=11, val_per_class=2)
    root = pack_shards(images, tmp_path / "shards", per_shard=4, suffixes=(".tar",))
    data = scan(DataConfig(root=str(root)))
    cut = sorted((root / "train").glob("0*"))[1]
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 3])
    left = [key for key, data, *_ in Reader().archive_members(str(cut), set()) if data]
    assert len(left) < 4
    for world in (1, 2):
        ranks = epoch(data, "train", world, 0)  # asserts each rank's loader length: the steps it was counted for
        assert len({len(batches) for batches in ranks}) == 1
        assert len({key for batches in ranks for batch in batches for key, _ in batch}) == 22 - 4 + len(left)
    stream = ShardStream(data.root, data.train, lambda image: 0, None, data.classes, Share(0, 1, 1, shuffle=False))
    failed = [(key.removeprefix(f"{cut}!"), target) for _, key, _, target in (s for s in stream if s[0] is None)]
    assert failed == [(f"(indexed member {n}, not read)", -1) for n in range(len(left) + 1, 5)]


def test_train_on_a_shard_folder(ray_local, folders, tmp_path):
    """Two workers on shards of the three kinds: every train sample once, every val sample once, the prediction
    grid read from the shards."""
    shard_root = folders[1]
    config = write_config(tmp_path / "c.yaml", "shards", shard_root, tmp_path / "runs",
                          scaling={"num_workers": 2, "use_gpu": False}, train={"epochs": 1, "batch_size": 4,
                                                                                "num_data_workers": 1})
    assert main(["train", "-c", str(config)]) == 0
    summary = json.loads((tmp_path / "runs" / "shards" / "summary.json").read_text())
    [first] = summary["epochs"]
    assert summary["classes"] == ["blue", "red"] and summary["skipped_files"] == 0
    # Every val sample once: in the share that chooses the best epoch, or in the calibration share.
    assert first["train_images"] == 22 and first["val_images"] + summary["calibration_images"] == 10
    assert sum(map(sum, summary["confusion_matrix"])) == first["val_images"] and summary["calibration_images"]
    assert (tmp_path / "runs" / "shards" / "predictions.png").stat().st_size > 0
