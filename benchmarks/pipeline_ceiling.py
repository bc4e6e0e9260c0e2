"""The labeling pipeline's own ceiling: rows/s through list -> read -> predict -> commit, with a model that costs
little (random-weight MobileNetV3-small at 32 pixels) on tiny JPEGs, and where the time goes.

    .venv/bin/python benchmarks/pipeline_ceiling.py [--images 20000] [--batch-size 128] [--gpu-images-per-s 3000]

Each stage is timed alone on this machine, then the whole job:
  listing   list_inputs over the folder (the driver)
  read      Ray Data's read tasks alone: read, decode, resize and crop, rows counted in the driver
  model     the predictors' TorchScript model alone on ready tensors, at the default CPU batch and at the job's batch
  commit    LabelWriter.add and close on ready label tables: Parquet, provenance, the lock (the driver)
  job       `imgjobs label --batch-size B` as a fresh command, after start-up (its summary), and end to end
The job runs at a batch of 128 by default, one model call per read block: at the default CPU batch of 8, the
model's cost per call (TorchScript runs MobileNetV3's fifty-odd small ops one by one) would bound the job, and
it is the pipeline this measures.
The job's rate against one GPU's labeling rate (--gpu-images-per-s, an assumption to set for your GPU and model)
says how many GPUs one driver can feed. Nothing here is a pass/fail test: it prints numbers for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from label_throughput import imgjobs_cpu_model, label_job, rows_per_s  # noqa: E402

from pipeline.formats import checkpoint  # noqa: E402
from pipeline.formats.labels_file import OUTPUT_SCHEMA, Decoding, Provenance  # noqa: E402
from pipeline.formats.model_spec import ModelSpec  # noqa: E402
from pipeline.hardware import cpu_model  # noqa: E402
from pipeline.label import units  # noqa: E402
from pipeline.label.output import CommitPolicy, LabelWriter  # noqa: E402
from pipeline.label.plan import CPU_BATCH, MAX_THREADS  # noqa: E402
from pipeline.label.predictor import example_batch  # noqa: E402
from pipeline.label.sources import list_inputs  # noqa: E402
from tests.helpers import random_weight_checkpoint  # noqa: E402


def tiny_images(folder: Path, count: int) -> None:
    """`count` 32x32 JPEGs: 64 distinct ones, hard-linked, so making 20,000 takes a second."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    distinct = []
    for i in range(64):
        distinct.append(folder / f"distinct-{i:02d}.jpg")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(distinct[-1], quality=90)
    for i in range(count - len(distinct)):
        os.link(distinct[i % len(distinct)], folder / f"{i:06d}.jpg")


def time_read(files: pa.Array, spec: ModelSpec, output: Path) -> float:
    """Rows/s of the read tasks alone, over the units the job plans."""
    import ray

    from pipeline.cluster import init_ray
    from pipeline.label import plan
    from pipeline.label.reading import ReadSettings, read_units

    init_ray()
    plan.configure_ray_data()
    actors = plan.actor_plan(None, None)
    work = units.plan([], files, units.Records())
    start = time.perf_counter()
    rows = 0
    dataset = ray.data.from_items([unit.row() for unit in work.units], override_num_blocks=len(work.units))
    dataset = dataset.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=actors.read_cpus,
                                  fn_kwargs={"reading": ReadSettings(spec, str(output)),
                                             "files_ref": [ray.put(work.keys)]})
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += batch.num_rows
    seconds = time.perf_counter() - start
    ray.shutdown()
    return rows / seconds


def time_model(ckpt: str, batch_size: int) -> float:
    """Rows/s of the CPU predictors' model alone, with their threads, on ready tensors."""
    import torch

    torch.set_num_threads(min(MAX_THREADS, os.cpu_count()))
    state = checkpoint.load(ckpt)
    batch = example_batch(batch_size, state["model"].input_size, torch.float32)
    return rows_per_s(imgjobs_cpu_model(state, "fp32", batch_size), batch, seconds=3)


def time_commit(out: Path, rows: int) -> float:
    """Rows/s of the driver's commits, in blocks of 16 label rows, the size of a read block of 224-pixel crops as
    CPU predictors return it, each block a unit of its own: more units per row than a job commits, so a lower
    bound."""
    n = 16
    schema = OUTPUT_SCHEMA
    for field in units.BOOKKEEPING:
        schema = schema.append(field)
    block = pa.Table.from_pylist([{
        "path": f"/data/{i:09d}.jpg", "label": "a", "label_index": 0, "score": 0.9, "topk_labels": ["a", "b"],
        "topk_scores": [0.9, 0.1], "uncertain": False, "error": None, "error_kind": None, "width": 32, "height": 32,
        units.UNIT: "u", units.UNIT_TOTAL: n if i == n - 1 else -1,
    } for i in range(n)], schema=schema)
    blocks = [block.set_column(0, "path", pa.array([f"/data/{b:06d}-{i:02d}.jpg" for i in range(n)]))
              .set_column(len(OUTPUT_SCHEMA), units.UNIT, pa.array([f"unit{b}"] * n)) for b in range(rows // n)]
    start = time.perf_counter()
    provenance = Provenance(imgjobs_version="bench", checkpoint="none", weights_sha256="0" * 64, arch="none",
                            classes=["a", "b"], precision="fp32", decode=Decoding(exact=False), top_k=2,
                            min_confidence=0.0, embeddings=None, compute_precision="fp32", decode_device="cpu")
    writer = LabelWriter(str(out), provenance, CommitPolicy(rows_per_file=100_000, every_s=60.0), overwrite=False,
                         log=lambda line: None)
    for table in blocks:
        writer.add(table)
    writer.close()
    return len(blocks) * n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=128, help="the job's --batch-size (see above)")
    parser.add_argument("--gpu-images-per-s", type=float, default=3000.0,
                        help="what one GPU labels with your model, to say how many GPUs one driver feeds")
    args = parser.parse_args()
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "|", cpu_model(), "|", os.cpu_count(), "CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = random_weight_checkpoint("mobilenet_v3_small", ["a", "b"], tmp, input_size=32)
        images = tmp / "images"
        tiny_images(images, args.images)

        start = time.perf_counter()
        files = list_inputs([str(images)]).files
        print(f"  listing  {len(files) / (time.perf_counter() - start):9.0f} files/s ({len(files)} files)")
        spec = ModelSpec(arch="none", head="none", mean=[0.5] * 3, std=[0.5] * 3, resize_size=36, input_size=32)
        print(f"  read     {time_read(files, spec, tmp / 'read'):9.0f} rows/s (read tasks alone)")
        for batch in (CPU_BATCH, args.batch_size):
            print(f"  model    {time_model(ckpt, batch):9.0f} rows/s (the model alone at batch {batch})")
        print(f"  commit   {time_commit(tmp / 'commit', args.images):9.0f} rows/s (driver: Parquet, lock)")
        summary, _ = label_job(ckpt, [str(images)], tmp / "out", "--batch-size", str(args.batch_size))
        steady = summary["images_per_s_after_startup"]
        print(f"  job      {steady:9.0f} rows/s after start-up ({summary['startup_seconds']:.1f}s), "
              f"{summary['images_per_s']:.0f} end to end")
        print(f"  one driver feeds {steady / args.gpu_images_per_s:.2f} GPU(s) labeling "
              f"{args.gpu_images_per_s:.0f} images/s each")


if __name__ == "__main__":
    main()
