#!/usr/bin/env bash
# gaqat's GPU checks in one command, for a machine with one CUDA GPU where python3 has
# torch, torchvision, numpy, pillow, tqdm, matplotlib, onnx and onnxruntime (gaqat itself
# runs from this checkout's src/; nothing is installed or downloaded):
#
#   OUT=gpu_results GAQAT_DATA=~/.cache/gaqat bash benchmarks/gpu_checks.sh [DEVICE]
#
# DEVICE defaults to cuda; `cpu` runs every step at smoke size (how the script is tested).
# GAQAT_DATA must hold the DigitsDG cache (digits_dg/, as `gaqat demo` builds it: the GPU
# machine may have no network); EfficientNet-Lite0's grid starts from the ImageNet weights
# of the [lite] extra's package, which PYTHONPATH can bring (it is kept, src/ put first).
# Each step has its own time limit, so one that hangs or fails leaves the others' results.
# What lands in OUT (at most 8 files):
#   device.txt              the GPU, driver, torch and this checkout's commit
#   throughput.json         benchmarks/gpu_throughput.py, fp32 and bf16 autocast
#   throughput_compile.json the same with --compile (torch.compile), bf16
#   torchrun.txt            a run through torchrun on the GPU against the same run in one
#                           plain process: their last records, and whether they are equal
#   lite_records.tar.gz     EfficientNet-Lite0's low-bit grid: the run folders' records
#                           (benchmarks/lowbit_study.py; untar into the study folder,
#                           then `lowbit_study.py page`)
#   log.txt                 everything the steps printed
set -u -o pipefail
DEVICE=${1:-cuda}
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
exec > >(tee -a "$OUT/log.txt") 2>&1

step() {  # step SECONDS NAME COMMAND...: run one check under a time limit, never abort
    local seconds=$1 name=$2
    shift 2
    echo "== $name (limit ${seconds}s) $(date +%T)"
    timeout --kill-after=10 "$seconds" "$@"
    local status=$?
    echo "== $name: exit $status $(date +%T)"
    return $status
}

if [ "$DEVICE" = cpu ]; then
    quick=(--quick) steps=20 lite=(--quick --networks small_cnn) json=gpu_throughput_quick
else
    quick=(--rounds 10) steps=200 lite=(--networks efficientnet_lite0) json=gpu_throughput
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$OUT/device.txt"
cat "$OUT/device.txt"

step 150 throughput python3 benchmarks/gpu_throughput.py --device "$DEVICE" "${quick[@]}" &&
    cp "benchmarks/results/$json.json" "$OUT/throughput.json"
step 200 throughput_compile python3 benchmarks/gpu_throughput.py --device "$DEVICE" \
    "${quick[@]}" --precision bf16 --compile &&
    cp "benchmarks/results/$json.json" "$OUT/throughput_compile.json"

# torchrun on the GPU: one rank per GPU (NCCL refuses two ranks on one GPU), so on a
# one-GPU machine this checks the launcher's path, not the gradient averaging.
train=(-m gaqat train --dataset digits --test-envs 1 --steps "$steps" --checkpoint-freq
    "$steps" --device "$DEVICE" --quiet)
step 120 torchrun_init python3 "${train[@]}" --output "$WORK/erm"
for how in plain torchrun; do
    launcher=(python3)
    [ $how = torchrun ] && launcher=(torchrun --standalone --nproc-per-node 1)
    step 120 "$how" "${launcher[@]}" "${train[@]}" --algorithm gaqat --bits 4 \
        --init "$WORK/erm/checkpoint.pt" --output "$WORK/$how"
done
python3 - "$WORK" >"$OUT/torchrun.txt" <<'EOF'
import json, sys
from pathlib import Path

last = {}
for how in ("plain", "torchrun"):
    lines = (Path(sys.argv[1]) / how / "results.jsonl").read_text().splitlines()
    last[how] = {k: v for k, v in json.loads(lines[-1]).items() if k.endswith("_acc")}
    print(how, json.dumps(last[how], sort_keys=True))
print("equal:", last["plain"] == last["torchrun"])
EOF
cat "$OUT/torchrun.txt"

step 240 lite python3 benchmarks/lowbit_study.py run "$WORK/lowbit" "${lite[@]}" \
    --parts cost corruptions --device "$DEVICE"
(cd "$WORK/lowbit" 2>/dev/null && find . -name '*.jsonl' -o -name done -o -name '*.json' |
    tar -czf "$OUT/lite_records.tar.gz" -T -) || echo "no EfficientNet-Lite0 records"
rm -rf "$WORK"
