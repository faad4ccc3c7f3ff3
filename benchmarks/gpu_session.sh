#!/usr/bin/env bash
# Every CUDA check of the project in one prepared run, for a session lent a GPU machine
# (the `device` tool: about 15 minutes of device time in all, start-up included). Planned
# to finish in under 8 minutes on an H100/H200; each step has its own time limit, so a
# slow or failing step costs its limit and the others still run. No step has run on a
# GPU yet: the first session that gets one runs this and records the figures in
# docs/benchmarks.md.
#
# What it checks (logs under $OUT, or gpu-out/ without it):
#   1. throughput   benchmarks/gpu_throughput.py: ResNet-50 fp32 / tf32 / bf16 /
#                   bf16+channels_last / +torch.compile, MFU, --max-batch       (~3 min)
#   2. train_*      visiontrain train on CUDA: AMP fp16 with GradScaler, bf16,
#                   channels_last, pinned memory, torch.compile, async save      (~1.5 min)
#   3. autobatch    data.batch_size=auto per precision (32, bf16, fp16)          (~1 min)
#   4. profile      visiontrain profile on CUDA: phases, kernels, peak memory, MFU (~20 s)
#   5. nccl         a 1-process torchrun with the NCCL backend (one GPU)        (~30 s)
#
# The device machine has torch, torchvision and timm; the rest travels as wheels (see
# the device README): pydantic pydantic-core annotated-types typing-inspection rich
# markdown-it-py mdurl pygments torchmetrics lightning-utilities optuna (+ alembic
# sqlalchemy colorlog) opencv-python-headless (the loader's augmentation kernels), named
# in `carry` as .whl. Then:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src && bash benchmarks/gpu_session.sh
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
RUNS="$(mktemp -d)"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its log, go on on failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local code=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $code in $((SECONDS - start)) s"
    [ "$code" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step throughput 200 "$PY" benchmarks/gpu_throughput.py --warmup 10 --steps 20 --repeats 3 \
    --max-batch

# A small real run per precision: the default data at 96 px through timm's resnet18.
TRAIN=(-m visiontrain train model.name=resnet18 data.image_size=96 data.batch_size=128
    train.epochs=2 train.device=cuda data.pin_memory=true data.num_workers=4
    train.progress=plain run.report=false "run.dir=$RUNS")
step train_fp16 60 "$PY" "${TRAIN[@]}" train.precision=fp16 run.name=fp16
step train_bf16_cl 60 "$PY" "${TRAIN[@]}" train.precision=bf16 train.channels_last=true \
    run.name=bf16cl
step train_compile 120 "$PY" "${TRAIN[@]}" train.precision=bf16 train.channels_last=true \
    train.compile=true run.name=compile
step train_async 60 "$PY" "${TRAIN[@]}" train.precision=bf16 run.async_save=true \
    run.save_every_steps=5 run.name=async

step autobatch 120 "$PY" benchmarks/autobatch_gpu.py --train-size 2048
step profile 60 "$PY" -m visiontrain profile model.name=resnet18 data.image_size=96 \
    train.device=cuda train.precision=bf16 train.channels_last=true --steps 10 \
    --out "$OUT/profile"
step nccl 60 "$PY" -m torch.distributed.run --nproc_per_node=1 -m visiontrain train \
    train.device=cuda train.epochs=1 data.train_size=512 train.progress=plain \
    run.report=false "run.dir=$RUNS" run.name=nccl

# Figures to record: the summary lines of each run.
for run in "$RUNS"/*/summary.json; do
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-2], s.get('precision'), s.get('device'), s.get('timings'), s['metrics'].get('val', {}).get('accuracy'))" "$run"
done | tee "$OUT/runs.txt"
exit $status
