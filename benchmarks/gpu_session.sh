#!/usr/bin/env bash
# Every GPU check in one run, for a session that is lent a GPU machine (the `device` tool): tests marked `gpu`
# (and `tensorrt` where TensorRT exists), then benchmarks/bench_gpu.py; everything lands under $OUT.
#
# Prepared here (Python 3.12 wheels the GPU machine lacks; see the device README), in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl nncf==3.4.0 openvino-telemetry pydot jsonschema natsort pymoo ninja
# Then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/edgeres-gpu}
mkdir -p "$OUT"
export NNCF_CI=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 2
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi -L; python3 -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.cuda.get_device_name(0))'
  python3 -c 'import torchvision, nncf; print("torchvision", torchvision.__version__, "nncf", nncf.__version__)'; } \
  2>&1 | tee "$OUT/env.txt"
# GPU tests (the CPU suite runs in CI); a short timeout each, so one hang cannot eat the lease
timeout 240 python3 -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider tests/ 2>&1 | tail -40 | tee "$OUT/gpu-tests.txt"
timeout 300 python3 benchmarks/bench_gpu.py --out "$OUT" 2>&1 | tail -30 | tee "$OUT/bench-gpu.txt"
echo "done: $(ls "$OUT")"
