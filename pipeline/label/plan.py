"""How a labeling job runs on the cluster: the predictor actors, the read tasks and the model they load."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from pipeline.formats.labels_file import RowRules
from pipeline.hardware import gpu_capability, gpu_half_precision, native_bf16
from pipeline.label.predictor import CPU_DECODED, DTYPES, ModelPayload, Predictor, example_batch, torchscript_model
from pipeline.label.reading import BLOCK_BYTES, ReadSettings, read_units
from pipeline.label.units import Work
from pipeline.models import WithEmbedding

# Images per model call. On CPU, small batches keep a ResNet's activations in cache (docs/labeling.md, How it runs);
# a GPU needs big ones to stay busy (a predictor halves its batch once if its GPU runs out of memory).
CPU_BATCH, GPU_BATCH = 8, 256
MAX_THREADS = 4  # per CPU actor: intra-op scaling flattens beyond about 4 threads at CPU batch sizes
# A read task is one decoding thread that also waits on storage. Its reservation must differ from the
# predictor's, or Ray Data fuses reading into the predictor actors and decoding stops running in parallel.
READ_CPUS = 0.5


@dataclass(frozen=True)
class ActorPlan:
    """The predictor actors' pool, resources and precision, and the read tasks' CPUs."""

    num_gpus: int  # per actor: 1 on GPU nodes, else 0
    num_cpus: float  # per actor
    threads: int  # torch threads per actor
    batch_size: int  # images per model call
    initial_actors: int
    max_actors: int
    precision: str  # what the actors compute in (choose_precision)
    precision_reason: str  # why: for --precision auto's line
    read_cpus: float = READ_CPUS
    waiting: bool = False  # no node is up that can run an actor: the autoscaler adds one as the job asks

    @property
    def gpu(self) -> bool:
        return self.num_gpus > 0


def actor_plan(batch_size: int | None, max_actors: int | None, precision: str = "auto") -> ActorPlan:
    """How many predictor actors, with what resources and in which `precision` (--precision: choose_precision), for
    the nodes that are up now. A GPU each where there are
    GPUs. On CPUs, an actor reserves half a CPU less than its threads use, so a read task always finds room: a
    pool that reserves every CPU starves the read tasks and the pipeline stalls forever. With no node up that can
    run one (a head without CPUs, workers the autoscaler has not added yet), actors of one thread, which fit any
    node that joins: `waiting` says so. The pool grows to `max_actors` as nodes join."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = sum(int(r.get("GPU", 0)) for r in nodes)
    cpus = [r["CPU"] for r in nodes if r.get("CPU", 0) >= 1]
    if gpus:
        actors, threads = gpus, 2
        resources = {"num_gpus": 1, "num_cpus": 1, "batch_size": batch_size or GPU_BATCH}
    else:
        threads = int(min(MAX_THREADS, min(cpus, default=1)))
        actors = sum(int(c // threads) for c in cpus)  # per node: room for a read task beside each actor
        resources = {"num_gpus": 0, "num_cpus": threads - READ_CPUS, "batch_size": batch_size or CPU_BATCH}
    actors = max(1, actors)
    max_actors = max_actors or actors
    precision, reason = choose_precision(precision, gpu=bool(gpus))
    return ActorPlan(**resources, threads=threads, initial_actors=min(actors, max_actors), max_actors=max_actors,
                     precision=precision, precision_reason=reason, waiting=not gpus and not cpus)


def dataset(work: Work, reading: ReadSettings, actors: ActorPlan, payload: ModelPayload,
            rules: RowRules) -> ray.data.Dataset:
    """Units (a read task each) → read-and-decode tasks → predictor actors. The sorted loose-file keys that loose
    units index (work.keys) go to the object store once. GPU predictors decode JPEGs themselves, on the GPU: their
    read tasks only read (`reading.encoded`, device_decoding), and they decode at full size."""
    configure_ray_data()
    gpu = actors.gpu
    if gpu:
        from pipeline.label.device_decoding import check_image_extension  # torchvision.io: GPU jobs only

        check_image_extension()
    return (
        # Rows of Ray Data are Arrow's: each unit goes as its row.
        ray.data.from_items([unit.row() for unit in work.units], override_num_blocks=len(work.units))
        .map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=actors.read_cpus,
                     fn_kwargs={"reading": reading, "files_ref": [ray.put(work.keys)]})
        .map_batches(
            Predictor,
            # CPU actors take each read block whole and run it in model batches: a call per block, not per batch,
            # as each call and its result block cost Ray Data milliseconds.
            batch_size=actors.batch_size if gpu else None,
            batch_format="numpy",
            fn_constructor_kwargs={
                "payload_ref": [ray.put(payload)],
                "rules": rules,
                "threads": actors.threads,
                "batch_size": actors.batch_size,
                "device_decode": gpu,
            },
            compute=ray.data.ActorPoolStrategy(min_size=1, initial_size=actors.initial_actors,
                                               max_size=actors.max_actors),
            num_cpus=actors.num_cpus,
            num_gpus=actors.num_gpus,
        )
    )


def split_cpu_decoded(table: pa.Table) -> tuple[pa.Table, int]:
    """A block of the dataset as the labels file holds it, and how many of its files GPU actors decoded on their
    CPU instead of the GPU (predictor.CPU_DECODED; none for CPU actors' blocks)."""
    if CPU_DECODED not in table.column_names:
        return table, 0
    return table.drop_columns([CPU_DECODED]), pc.sum(table.column(CPU_DECODED)).as_py() or 0


def configure_ray_data() -> None:
    """Blocks that stream, and no progress bars: the job prints its own progress line (Ray Data's notices are
    quieted with Ray's other output, in pipeline.ray_output)."""
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = BLOCK_BYTES
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def choose_precision(requested: str, gpu: bool) -> tuple[str, str]:
    """The precision the actors compute in, and why: `auto` takes bf16 where it is native and fp32 or fp16
    elsewhere. GPU actors autocast: to bf16 from sm_80 on, to fp16 before (hardware.gpu_half_precision). CPU actors
    take bf16 where the CPU has native bf16 (hardware.native_bf16), else fp32: emulated bf16 is several times
    slower. The driver's CPU stands for the CPU actors', and its GPU, where it has one, for the GPU actors' (one
    kind of each per cluster)."""
    if requested != "auto":
        return requested, "--precision"
    if gpu:
        precision, why = gpu_half_precision(gpu_capability())
        return precision, f"GPU actors autocast: {why}"
    flag = native_bf16()
    if flag:
        return "bf16", f"this CPU computes bf16 natively ({flag})"
    return "fp32", "this CPU has no native bf16 (no avx512_bf16 or amx_bf16), where bf16 runs several times slower"


def model_payload(state: dict, model: torch.nn.Module, precision: str, gpu: bool, embeddings: bool = False,
                  log=print) -> ModelPayload:
    """What the predictors need of the checkpoint `state` (checkpoint.load), built once here and put once in the
    object store.

    GPU predictors build the model from its weights. CPU predictors get it as TorchScript instead: traced in
    channels_last (oneDNN's fastest layout), frozen (BatchNorm folded into the convolutions), with bf16 weights
    for bf16. They load it with torch alone, without torchvision or timm, which saves each actor seconds.
    Freezing changes some models' results (inception_v3's, for one); those run eagerly on CPUs too. With
    `embeddings`, the model returns (pooled features, logits) (models.WithEmbedding)."""
    spec = state["model"]
    if embeddings:
        model = WithEmbedding(model, spec.head)
    payload = ModelPayload(spec, state["classes"], precision, device="cuda" if gpu else "cpu",
                           embedding_size=model.head.in_features if embeddings else None)
    if not gpu:
        example = torch.randn(2, 3, spec.input_size, spec.input_size)
        with torch.inference_mode():
            expected = logits_of(model(example))
        frozen = replace(payload, torchscript=torchscript(model, spec.input_size, precision))
        if _computes(frozen, example, expected, tolerance=1e-3 if precision == "fp32" else 5e-2):
            return frozen
        log(f"label: TorchScript changes {spec.arch}'s results; CPU actors run it eagerly")
    return replace(payload, weights=state["model_state"])


def torchscript(model: torch.nn.Module, input_size: int, precision: str) -> bytes:
    model = model.to(DTYPES[precision], memory_format=torch.channels_last)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, yet still the fastest on CPU
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # model_payload checks the trace's results
        buffer = io.BytesIO()
        traced = torch.jit.trace(model, example_batch(1, input_size, DTYPES[precision]))
        torch.jit.save(torch.jit.freeze(traced), buffer)
    return buffer.getvalue()


def logits_of(output) -> torch.Tensor:
    return output[1] if isinstance(output, tuple) else output


def _computes(payload: ModelPayload, example: torch.Tensor, expected: torch.Tensor, tolerance: float) -> bool:
    """Whether the actors' TorchScript model, fused as they fuse it, gives the eager model's logits."""
    try:
        forward = torchscript_model(payload, len(example))
        with torch.inference_mode():
            got = logits_of(forward(example.contiguous(memory_format=torch.channels_last))).float()
    except RuntimeError:  # oneDNN Graph cannot fuse some graphs (swin_t's, for one)
        return False
    return bool(((got - expected).abs().max() <= tolerance * expected.abs().max()).item())
