#!/usr/bin/env bash
# One prepared run for a session lent a GPU machine (the `run` tool): the decode benchmark, then train
# throughput and MFU, each under its own time limit so one cannot eat the other's; results in $OUT.
#   run: bash bench/device.sh        (timeout_s 540 leaves a rerun's worth of the 15 device minutes)
set -u
OUT="${OUT:-/tmp/cai-device}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" \
  > "$OUT/versions.txt" 2>&1
timeout 300 python3 bench/gpu.py --time-budget 240 --out "$OUT/gpu.json" > "$OUT/gpu.log" 2>&1
echo "gpu.py exit $?" >> "$OUT/gpu.log"
# the train benchmark imports jobs (pydantic) and trl, datasets: the machine's image has accelerate, peft and
# transformers but not those. Carry them as wheels, fetched here beforehand (device README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     trl==1.16.0 datasets==5.2.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 dill==0.4.1 multiprocess==0.70.19
#   run: bash bench/device.sh with carry [".whl"]
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl > "$OUT/pip.log" 2>&1 || echo "pip install of .whl failed: see pip.log" >&2
fi
python3 -c "import trl, datasets, pydantic" 2> "$OUT/imports.log" || echo "trl/datasets/pydantic missing: gpu_train.py will fail (carry .whl)" >&2
timeout 200 python3 bench/gpu_train.py --out "$OUT/gpu_train.json" > "$OUT/gpu_train.log" 2>&1
echo "gpu_train.py exit $?" >> "$OUT/gpu_train.log"
tail -n 25 "$OUT/gpu.log" "$OUT/gpu_train.log"
