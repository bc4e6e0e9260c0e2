"""What tests and benchmarks share: generated image folders and configs, checkpoints with random weights, jobs run
in-process or in their own process, clusters on this machine, an S3 API server's client side, and a peak-memory
sampler. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote

import psutil
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from jobs.cli import main
from pipeline.formats import checkpoint
from pipeline.hardware import cpu_model
from pipeline.models import build_model
from pipeline.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # Debian's package, which .ci/run installs
DEMO_DATA = REPO / "data" / "hymenoptera"
# The full-resolution photos: ../shared beside the checkout, or the copy inside it that benchmarks/gpu_check.sh
# --prepare makes for a device machine, where ../shared does not travel.
SHARED_DATA = next((p for p in (REPO / "data" / "shared-hymenoptera", REPO.parent / "shared" / "data" / "hymenoptera")
                    if p.is_dir()), REPO.parent / "shared" / "data" / "hymenoptera")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_image_folder(root: Path, classes=("blue", "red"), train_per_class=12, val_per_class=6, size=48,
                      seed=0) -> Path:
    """An image folder tree of JPEGs a small model can learn: each class has its own dominant colour."""
    rng = random.Random(seed)
    palette = [(40, 60, 200), (200, 50, 40), (40, 180, 60), (200, 200, 40), (150, 40, 160)]
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = palette[c % len(palette)]
                colour = tuple(min(255, v + rng.randrange(40)) for v in base)
                img = Image.new("RGB", (size + rng.randrange(16), size), colour)
                for _ in range(6):  # noise blobs so images differ
                    x, y = rng.randrange(size), rng.randrange(size)
                    img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 6, y + 6))
                img.save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


def pack_shards(folder: Path, out: Path, per_shard: int, suffixes=(".tar",)) -> Path:
    """An image folder tree (root/{train,val}/<class>/*.jpg) packed into shard folders (out/{train,val}/*.tar...)
    as WebDataset writes them: members in class folders, classes mixed within shards, the shards' kinds taking
    turns from `suffixes` (.tar, .tar.gz, .zip)."""
    for split in ("train", "val"):
        members = sorted(p.relative_to(folder / split) for p in (folder / split).rglob("*.jpg"))
        members = sorted(members, key=lambda p: (p.name, str(p)))  # interleave the classes
        (out / split).mkdir(parents=True, exist_ok=True)
        for n, first in enumerate(range(0, len(members), per_shard)):
            path = out / split / f"{n:06d}{suffixes[n % len(suffixes)]}"
            if path.suffix == ".zip":
                with zipfile.ZipFile(path, "w") as archive:
                    for member in members[first:first + per_shard]:
                        archive.write(folder / split / member, str(member))
            else:
                with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
                    for member in members[first:first + per_shard]:
                        tar.add(folder / split / member, str(member))
    return out


def tiny_jpeg_shards(root: Path, shards: int, per_shard: int, classes: tuple = ()) -> list[Path]:
    """`shards` uncompressed tar shards of `per_shard` 32×32 JPEGs each, named as img2dataset names them
    (000000.tar, members 000000000.jpg...): copies of 16 distinct images, so writing them is fast. With `classes`,
    members sit in class folders in turn (ants/000000000.jpg, bees/000000001.jpg...)."""
    blobs = []
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 16, 255 - i * 16, (i * 40) % 256)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = root / f"{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                data = blobs[(s * per_shard + i) % 16]
                n = s * per_shard + i
                info = tarfile.TarInfo(f"{classes[n % len(classes)]}/{n:09d}.jpg" if classes else f"{n:09d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


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


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def session_processes(session: int) -> list[psutil.Process]:
    """The processes of session `session`: a process started with start_new_session, and what it started."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == session:
                found.append(proc)
        except (ProcessLookupError, PermissionError):
            pass
    return found


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


@dataclass
class S3Server:
    endpoint: str  # host:port
    log: Path  # the server's log: a line per request

    def listings(self, since: int = 0) -> list[str]:
        """The prefixes of the recursive listings (ListObjectsV2 without a delimiter) logged after line `since`."""
        requests = self.log.read_text().splitlines()[since:]
        return [unquote(line.split("prefix=")[1].split()[0].split("&")[0]) for line in requests
                if "list-type=2" in line and "delimiter=" not in line]

    def uri(self, path: str) -> str:
        """s3://PATH with the endpoint in pyarrow's URI query form, as a MinIO or Ceph user writes it."""
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http"

    def filesystem(self):
        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", allow_bucket_creation=True)

    def upload(self, local: Path, path: str) -> str:
        """Copy a local file or folder to s3://PATH; return its URI."""
        fs = self.filesystem()
        if local.is_dir():
            pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            with fs.open_output_stream(path) as f:
                f.write(local.read_bytes())
        return self.uri(path)

    def labels(self, prefix: str) -> list[dict]:
        """Every row of the label output at s3://PREFIX."""
        fs = self.filesystem()
        parts = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(prefix)) if i.path.endswith(".parquet"))
        return [row for part in parts for row in pq.read_table(part, filesystem=fs).to_pylist()]


BUCKETS = ("data", "runs", "labels", "submit", "bench")  # made with the server, as a user's buckets exist


@contextlib.contextmanager
def s3_api_server(log: Path):
    """A real S3 API server (moto's server mode, as Ray's own tests use) on 127.0.0.1, with BUCKETS; stopped on
    leaving."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                    str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        server = S3Server(f"127.0.0.1:{port}", log)
        for bucket in BUCKETS:
            server.filesystem().create_dir(bucket)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)


def train(config, *overrides) -> dict:
    """`imgjobs train -c CONFIG OVERRIDES` in this process, on the session's Ray: the run's summary."""
    assert main(["train", "-c", str(config), *overrides]) == 0
    cfg = load_config(str(config), list(overrides))
    return json.loads((Path(cfg.storage.path) / cfg.name / "summary.json").read_text())


def wait_for_checkpoint(run_dir, accept=lambda metrics: True, timeout=180):
    """Until Ray has recorded a checkpoint, whose reported metrics `accept` takes, as the latest in its run
    snapshot (the file a restart or rerun resumes from)."""
    deadline = time.time() + timeout
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while True:
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
            if latest and accept(latest["metrics"]):
                return
        except (OSError, ValueError):  # not written yet, or being written
            pass
        assert time.time() < deadline, f"no such checkpoint in {run_dir} after {timeout}s"
        time.sleep(0.1)


def random_weight_state(arch: str, classes: list[str], input_size: int | None = None) -> dict:
    """A checkpoint's contents in the training job's format, with random weights; optionally at a smaller
    input size (resized to 9/8 of it, as ImageNet presets do)."""
    torch.manual_seed(0)
    model, spec = build_model(arch, len(classes), "none")
    if input_size:
        spec = replace(spec, input_size=input_size, resize_size=input_size * 9 // 8)
    return {"model": spec, "classes": classes, "model_state": model.eval().state_dict()}


def random_weight_checkpoint(arch: str, classes: list[str], folder: Path, input_size: int | None = None) -> str:
    return checkpoint.save(random_weight_state(arch, classes, input_size), str(folder))


NO_RAY_ADDRESS = "no-ray-in-the-fast-tier"  # conftest's --fast sets it: any Ray a command starts fails at once


def fresh_env() -> dict:
    """A user's shell on a CPU machine: no Ray address, so a command starts its own local Ray (except in the fast
    tier, where it must not), and no GPU, even on a machine that has one."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" or v == NO_RAY_ADDRESS}
    return env | {"CUDA_VISIBLE_DEVICES": ""}


def start_label(args: list, env: dict, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen) -> subprocess.Popen:
    """`imgjobs label ARGS` as its own process, as a user runs it."""
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "label", *args], cwd=REPO, env=env,
                            stdout=stdout, stderr=stderr, text=True, **popen)


@contextlib.contextmanager
def peak_memory(processes):
    """Yields a dict whose "rss" and "pss" (bytes) become the peak sums over `processes()`, sampled every 0.5 s.
    PSS splits pages that processes share (torch's libraries, mapped by every worker) among them; RSS counts
    them once per process."""
    peak = {"rss": 0, "pss": 0}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.5):
            now = {"rss": 0, "pss": 0}
            for p in processes():
                try:
                    info = p.memory_full_info()
                except psutil.Error:  # exited meanwhile
                    continue
                now["rss"] += info.rss
                now["pss"] += info.pss
            peak.update({k: max(peak[k], now[k]) for k in peak})

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


class Clock:
    """A monotonic clock that moves only when the test says (`now`, seconds)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def label_files(out: Path) -> list[Path]:
    """The committed labels files of an output folder, in name order: not a job's hidden temporaries, which
    `*.parquet` matches too."""
    return sorted(p for p in out.glob("*.parquet") if not p.name.startswith((".", "_")))


def read_output(out: Path) -> list[dict]:
    """Every row of a label output folder."""
    files = label_files(out)
    return pq.read_table(files).to_pylist() if files else []


CLUSTER_SCRIPT = """
import json, sys
from ray.cluster_utils import Cluster
head, workers = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args=head)
nodes = [cluster.add_node(**args) for args in workers]
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address, "nodes": [n.node_id for n in nodes]}), flush=True)
# "add {args}" a worker node; "remove N": lose worker node N hard; "preempt N SECONDS": drain it as the autoscaler
# does on a spot notice, with SECONDS to go; end of input: stop all.
for line in sys.stdin:
    command, argument = line.split(" ", 1)
    if command == "add":
        nodes.append(cluster.add_node(**json.loads(argument)))
        cluster.wait_for_nodes()
        print("done", nodes[-1].node_id, flush=True)
        continue
    elif command == "preempt":
        import time
        from ray._raylet import GcsClient
        from ray.core.generated import autoscaler_pb2
        index, seconds = argument.split()
        GcsClient(address=cluster.gcs_address).drain_node(
            nodes[int(index)].node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "spot instance reclaimed", int((time.time() + float(seconds)) * 1000))
    else:
        cluster.remove_node(nodes[int(argument)], allow_graceful=False)
    print("done", flush=True)
cluster.shutdown()
"""


def without_auth(env) -> dict:
    """The environment less Ray's token settings, which a Ray that this process started puts in it: a user's shell
    has none."""
    return {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}


class LocalCluster:
    """A multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: each node its own raylet), in its own
    process, so that stopping it touches only what it started. Jobs join it with RAY_ADDRESS=address."""

    def __init__(self, head: dict, workers: list[dict], env: dict | None = None, token: bool = True):
        """`env`: more environment for every Ray process of the cluster (Ray's own settings). `token`: token
        authentication on, as on any cluster that `ray start` or `ray up` makes, with a token of its own; off, as
        in the clusters of Ray's own tests."""
        self.token = Path(tempfile.mkdtemp(prefix="imgjobs-cluster-")) / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        if head.get("include_dashboard"):
            head = {**head, "dashboard_port": free_port()}  # beside the session's Ray and other test clusters
        # Nodes see no GPU unless a test gives them one: tests mean CPU, on a GPU machine too.
        head, workers = {"num_gpus": 0, **head}, [{"num_gpus": 0, **w} for w in workers]
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token)} if token else {}
        self.auth = auth
        self.process = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT, json.dumps(head), json.dumps(workers)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**without_auth(os.environ), **auth, **(env or {})})
        started = json.loads(self.process.stdout.readline())
        self.address, self.nodes = started["address"], started["nodes"]  # worker nodes, in the order added
        self.alive = set(self.nodes)

    def add_node(self, **args) -> None:
        node = self._command(f"add {json.dumps({'num_gpus': 0, **args})}")
        self.nodes.append(node)
        self.alive.add(node)

    def remove_node(self, index: int) -> None:
        self._command(f"remove {index}")
        self.alive.discard(self.nodes[index])

    def preempt_node(self, index: int, seconds: float) -> None:
        """Drain node `index` for preemption with a deadline `seconds` away. Ray counts the node's loss as a
        preemption only once that deadline has passed, as when the cloud reclaims it on time."""
        self._command(f"preempt {index} {seconds}")

    def _command(self, line: str) -> str:
        """Sends a command to the cluster's process; returns what its "done" reply says besides."""
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline().split()
        assert reply[:1] == ["done"], reply
        return " ".join(reply[1:])

    def env(self) -> dict:
        """A client's environment: the cluster's address, and where its token is (imgjobs finds it there)."""
        token = {"RAY_AUTH_TOKEN_PATH": str(self.token)} if self.auth else {}
        return {**without_auth(os.environ), "RAY_ADDRESS": self.address, **token}

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)
        shutil.rmtree(self.token.parent, ignore_errors=True)


@contextlib.contextmanager
def benchmark_cluster(name: str):
    """A scale benchmark's setting: its header line (date, CPU, cores), then a work folder and a local Ray cluster
    of every core, which jobs join with the environment it yields: (work folder, environment). Both go at the end,
    a SIGTERM's included."""
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {os.cpu_count()} cores", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped, it still stops its cluster
    work = Path(tempfile.mkdtemp(prefix=f"imgjobs-{name}-"))
    cluster = LocalCluster({"num_cpus": os.cpu_count()}, [])
    try:
        yield work, {**os.environ, **cluster.env(), "CUDA_VISIBLE_DEVICES": ""}
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


class AutoscalingCluster:
    """A head that advertises no CPUs, under Ray's real autoscaler (v2, what `ray up` runs since Ray 2.50) with its
    fake multi-node provider: worker nodes of `worker_types` start on this machine as jobs ask for them, and stop
    when idle. Ray's own cluster_utils.AutoscalingCluster stops every Ray process on the machine; this one stops
    only its own process tree."""

    def __init__(self, worker_types: dict):
        self.token = Path(tempfile.mkdtemp(prefix="imgjobs-as-")) / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        config = {
            "cluster_name": "imgjobs-test", "max_workers": 8, "head_node_type": "ray.head.default",
            "provider": {"type": "external",
                         "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                         "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address,
                         "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID},
            "available_node_types": {"ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
                                     **worker_types},
            "upscaling_speed": 1.0, "idle_timeout_minutes": 0.25, "auth": {}, "docker": {},
            **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                   "cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False,
        }
        # Where `ray up` leaves the config on the head: jobs started with HOME=home find it as they would there.
        self.home = self.token.parent / "home"
        config_file = self.home / "ray_bootstrap_config.yaml"
        config_file.parent.mkdir()
        config_file.write_text(json.dumps(config))
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
             "--node-ip-address=127.0.0.1", "--num-cpus=0", "--num-gpus=0", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={free_port()}", f"--temp-dir={self.token.parent}",
             f"--autoscaling-config={config_file}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
                 "RAY_AUTH_TOKEN_PATH": str(self.token), "RAY_enable_autoscaler_v2": "1",
                 "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        try:
            self.wait_for_raylets(1)  # the head's: a job that comes sooner finds no Ray on this machine to join
        except BaseException:  # no fixture holds this cluster yet to stop it
            self.stop()
            raise

    def raylets(self) -> int:
        count = 0
        for process in psutil.Process(self.process.pid).children(recursive=True):
            try:
                count += "raylet" in process.name()
            except psutil.NoSuchProcess:  # a node stopping meanwhile
                pass
        return count

    def wait_for_raylets(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.raylets() != count:
            assert time.monotonic() < deadline, f"the cluster did not come to {count} raylet(s)"
            time.sleep(0.5)

    def env(self) -> dict:
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_TOKEN_PATH": str(self.token)}

    def wait_until_at_rest(self, timeout: float = 120) -> None:
        """Waits until the autoscaler has stopped every worker node it started: the head's raylet is the only one."""
        self.wait_for_raylets(1, timeout)

    def stop(self) -> None:
        """Stops the head and the worker nodes its autoscaler started: the process tree of `ray start`."""
        head = psutil.Process(self.process.pid)
        tree = [head, *head.children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(tree, timeout=5)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        self.process.wait()
        shutil.rmtree(self.token.parent, ignore_errors=True)


class S3Proxy:
    """An HTTP proxy in front of the S3 server that forwards every request, and records it. A subclass may drop a
    request without a reply (`drops`), or trickle a reply's body a byte a second until `released` is set (`holds`)."""

    def __init__(self, target: str):
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str]] = []  # (method, path and query) of every request
        self.released = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def forward(self):
                proxy.requests.append((self.command, self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.drops(self.command, self.path):
                    self.close_connection = True
                    return
                upstream = http.client.HTTPConnection(target, timeout=60)
                upstream.request(self.command, self.path, body, dict(self.headers))
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                # A HEAD reply has no body but states the object's size.
                self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if proxy.holds(self.command, self.path):  # a byte a second keeps the client waiting, not failing
                    while len(data) > 1 and not proxy.released.wait(1.0):
                        self.wfile.write(data[:1])
                        self.wfile.flush()
                        data = data[1:]
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def drops(self, method: str, path: str) -> bool:
        return False

    def holds(self, method: str, path: str) -> bool:
        return False

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


class FlakyProxy(S3Proxy):
    """Goes down for `down_for` seconds at the first GET of a .jpg (it drops every connection without a reply, as a
    restarting server or a network blip does): listing works, then reading meets the outage."""

    def __init__(self, target: str, down_for: float):
        super().__init__(target)
        self.down_for, self.up_at, self.dropped = down_for, None, 0

    def drops(self, method: str, path: str) -> bool:
        if self.up_at is None and method == "GET" and path.split("?")[0].endswith(".jpg"):
            self.up_at = time.monotonic() + self.down_for
        if self.up_at is not None and time.monotonic() < self.up_at:
            self.dropped += 1
            return True
        return False


class HeldImage(S3Proxy):
    """An image on the S3 server that holds back whichever job reads it until the test lets it go: its bytes come a
    byte a second until release() (a JPEG of a thousand bytes or more holds for that many seconds). Given as an
    input (`uri`), its key (`key`) sorts after every local path: a unit of its own, listed last. A job that must
    outlast an event (a kill, a second job, a node joining) then outlasts it on any machine, however fast."""

    def __init__(self, s3: S3Server, data: bytes):
        super().__init__(s3.endpoint)
        path = f"data/held-{uuid.uuid4().hex[:8]}/held.jpg"
        with s3.filesystem().open_output_stream(path) as f:
            f.write(data)
        self.key, self.uri = f"s3://{path}", f"s3://{path}?endpoint_override={self.endpoint}&scheme=http"

    def holds(self, method: str, path: str) -> bool:
        return method == "GET" and path.split("?")[0].endswith(self.key[len("s3:/"):])

    def release(self) -> None:
        """From now on every reader gets the image's bytes (readers of killed jobs may take some too)."""
        self.released.set()

    close = S3Proxy.stop
