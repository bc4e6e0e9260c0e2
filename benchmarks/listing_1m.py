"""How long listing a tree of a million image files takes: imgjobs' lister vs pyarrow vs ray.data.read_images.

    .venv/bin/python benchmarks/listing_1m.py [--files 1000000] [--read-images-timeout 600]

Creates the files (empty, 1,000 per folder, two levels deep) in a temporary folder on the same disk as
the system temp dir, and deletes them afterwards. read_images lists files when the dataset is created;
it runs in a child process so it can be stopped at the timeout.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.label.sources import list_inputs  # noqa: E402


def make_tree(root: Path, files: int, per_folder: int = 1000) -> None:
    for i in range(files):
        folder = root / f"g{i // (per_folder * 100):03d}" / f"f{i // per_folder:05d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True)
        os.close(os.open(folder / f"img{i:07d}.JPG", os.O_CREAT | os.O_WRONLY))


def pyarrow_listing(root: str) -> int:
    import pyarrow.fs as pafs

    infos = pafs.LocalFileSystem().get_file_info(pafs.FileSelector(root, recursive=True))
    return sum(1 for i in infos if i.type == pafs.FileType.File)


def read_images_listing(root: str, result) -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    start = time.perf_counter()
    ray.data.read_images(root)  # lists (and stats) every file here, before any read
    result.put(time.perf_counter() - start)
    ray.shutdown()


def timed(name: str, fn, *args) -> None:
    start = time.perf_counter()
    count = fn(*args)
    print(f"  {name:<44} {time.perf_counter() - start:7.1f} s  ({count} files)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--read-images-timeout", type=float, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        start = time.perf_counter()
        make_tree(root, args.files)
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs: "
              f"created {args.files} empty files in {time.perf_counter() - start:.0f} s", flush=True)
        timed("imgjobs list_inputs (os.scandir walk)", lambda: len(list_inputs([str(root)]).files))
        timed("pyarrow FileSelector(recursive=True)", pyarrow_listing, str(root))
        result = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=read_images_listing, args=(str(root), result))
        proc.start()
        proc.join(args.read_images_timeout)
        if proc.is_alive():
            proc.kill()
            print(f"  ray.data.read_images (dataset creation)      > {args.read_images_timeout:.0f} s: stopped")
        else:
            print(f"  ray.data.read_images (dataset creation)      {result.get():7.1f} s")
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
