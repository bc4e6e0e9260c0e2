"""Shared fixtures: one real local Ray for the session, generated image folders, the real ants/bees data."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "hymenoptera"
SHARED_DATA = REPO.parent / "shared" / "data" / "hymenoptera"

# Every process of the session, Ray's workers included, talks to the S3 API server below with made-up
# credentials, and never asks an instance-metadata service for real ones.
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"})


@pytest.fixture(scope="session")
def ray_local():
    """One real Ray instance for every test that needs it (start-up costs seconds); stopped at the end."""
    from pipeline.ray_internals import bind_to_loopback

    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    bind_to_loopback()
    # With the dashboard: Ray Train's placement-group cleaner queries the state API it serves, and
    # without it decides the run is dead and tears the workers down. address="local": an instance of its own,
    # even while another cluster runs on this machine.
    from pipeline.cluster import setup_worker

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"worker_process_setup_hook": setup_worker})
    yield ray
    ray.shutdown()


def make_image_folder(root: Path, classes=("blue", "red"), train_per_class=12, val_per_class=6, size=48, seed=0) -> Path:
    """ImageFolder of JPEGs a small model can learn: each class has its own dominant colour."""
    rng = random.Random(seed)
    palette = [(40, 60, 200), (200, 50, 40), (40, 180, 60), (200, 200, 40), (150, 40, 160)]
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = palette[c % len(palette)]
                img = Image.new("RGB", (size + rng.randrange(16), size), tuple(min(255, v + rng.randrange(40)) for v in base))
                for _ in range(6):  # noise blobs so images differ
                    x, y = rng.randrange(size), rng.randrange(size)
                    img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 6, y + 6))
                img.save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


def write_config(path: Path, name: str, data_root: Path, storage: Path, **sections) -> Path:
    """A small, fast training config (tiny CNN, 1 epoch) with per-section overrides."""
    config = {
        "name": name,
        "data": {"root": str(data_root)},
        "model": {"arch": "mobilenet_v3_small", "weights": "none", "mode": "finetune"},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.01, "step_size": 1, "gamma": 0.5, "num_data_workers": 0},
        "scaling": {"num_workers": 1, "use_gpu": False},
        "storage": {"path": str(storage)},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="session")
def demo_run(ray_local, tmp_path_factory) -> dict:
    """The demo config trained briefly on the repo's ants/bees copy: a real pretrained checkpoint for labeling tests."""
    from jobs.cli import main

    storage = tmp_path_factory.mktemp("demo-runs")
    assert main(["train", "-c", str(REPO / "configs" / "demo.yaml"), "train.epochs=2", f"data.root={DEMO_DATA}", f"storage.path={storage}"]) == 0
    return json.loads((storage / "demo" / "summary.json").read_text())


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> str:
    """A random-weight MobileNetV3-small checkpoint for classes blue and red, at 64 pixels."""
    from tests.helpers import random_weight_checkpoint

    return random_weight_checkpoint("mobilenet_v3_small", ["blue", "red"], tmp_path_factory.mktemp("ckpt"), input_size=64)


@pytest.fixture(scope="session")
def shared_hymenoptera() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data test needs ../shared/data/hymenoptera, which is absent here ({SHARED_DATA})")
    return SHARED_DATA


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def listening_sockets(processes) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket these psutil processes listen on."""
    import psutil

    found = []
    for proc in processes:
        try:
            found += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:  # a worker that exited meanwhile
            pass
    return found


from tests.helpers import free_port  # noqa: E402


@dataclass
class S3Server:
    endpoint: str  # host:port

    def uri(self, path: str) -> str:
        """s3://PATH with the endpoint in pyarrow's URI query form, as a MinIO or Ceph user writes it."""
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http"

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", allow_bucket_creation=True)

    def upload(self, local: Path, path: str) -> str:
        """Copy a local file or folder to s3://PATH; return its URI."""
        import pyarrow.fs as pafs

        fs = self.filesystem()
        if local.is_dir():
            pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            with fs.open_output_stream(path) as f:
                f.write(local.read_bytes())
        return self.uri(path)


BUCKETS = ("data", "runs", "labels", "submit", "bench")  # made with the server, as a user's buckets exist


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API server (moto's server mode, as Ray's own tests use) on 127.0.0.1, stopped at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    server = S3Server(f"127.0.0.1:{port}")
    for bucket in BUCKETS:
        server.filesystem().create_dir(bucket)
    try:
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)
