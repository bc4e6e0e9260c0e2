"""Training's read path from S3 against local disk: images/s through the training dataset (read, decode, eval
transform) with 2 DataLoader workers, from a real S3 API server on 127.0.0.1 (moto) and from local disk, in one
run. The plain way's ceiling is reading the raw bytes alone.

    .venv/bin/python benchmarks/s3_read.py [--data ../shared/data/hymenoptera] [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.formats.keys import Reader  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.train.data import scan_image_folder  # noqa: E402
from pipeline.train.dataset import ImageDataset, collate_skipping  # noqa: E402
from pipeline.train.transforms import eval_transform  # noqa: E402
from tests.helpers import s3_api_server  # noqa: E402


def images_per_s(root: str, spec: dict, workers: int) -> float:
    folder = scan_image_folder(root)
    dataset = ImageDataset(root, folder.train, eval_transform(spec))
    loader = DataLoader(dataset, batch_size=16, num_workers=workers, collate_fn=collate_skipping)
    start, seen = time.perf_counter(), 0
    for images, *_ in loader:
        seen += 0 if images is None else len(images)
    return seen / (time.perf_counter() - start)


def raw_bytes_per_s(root: str) -> float:
    """Reading each file's bytes in one process, no decoding: the storage's own ceiling for this access pattern."""
    folder = scan_image_folder(root)
    reader = Reader.for_root(root)
    start = time.perf_counter()
    for key in folder.train.keys():
        reader.read(key)
    return len(folder.train) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hymenoptera"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, s3_api_server(Path(tmp) / "moto.log") as s3:
        uri = s3.upload(Path(args.data), "bench/hymenoptera")
        _, spec = build_model("resnet18", 2, "none")
        print(f"{platform.processor() or platform.machine()}; {len(scan_image_folder(args.data).train)} train images")
        for _ in range(args.repeats):
            local, remote = images_per_s(args.data, spec, 2), images_per_s(uri, spec, 2)
            print(f"dataset, 2 loader workers: local {local:.1f} img/s, S3 {remote:.1f} img/s, "
                  f"S3 / local {remote / local:.2f}")
            local, remote = raw_bytes_per_s(args.data), raw_bytes_per_s(uri)
            print(f"raw bytes, 1 process:      local {local:.1f} files/s, S3 {remote:.1f} files/s, "
                  f"S3 / local {remote / local:.2f}")


if __name__ == "__main__":
    main()
