#!/usr/bin/env bash
# The GPU benchmark runs, one device call each (the `device` tool: 10 minutes a command, no downloads there).
#
# Prepare once, on the dev machine (diffusers is not on the device image; the UNet needs it):
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata zipp
# Then call the device tool with carry [".whl"] and one of, in this order (the most needed first: 30 minutes of
# device time hold the three only when none runs to its limit; bench and autotune save their JSON as they go):
#   bash benchmarks/gpu_device_run.sh bench      # bench_gpu: ResNet-50, BERT-base, small UNet in one call
#   bash benchmarks/gpu_device_run.sh tests      # the CUDA tests (tests/test_gpu_candidates.py, test_compile_runners.py)
#   bash benchmarks/gpu_device_run.sh autotune   # ResNet-50 with max-autotune-no-cudagraphs against eager
# Logs and JSON land in $OUT; copy the JSON into benchmarks/results/ with the command in its README.
#
# bench leaves out AOTInductorCUDA: on torch 2.11 it crashes in torch's own loader, also outside navdeploy
# (benchmarks/aoti_cuda_load_check.py), after ~80 s of building per model. autotune is its own call because
# max-autotune builds alone (it times kernels on the GPU while it compiles).
set -uo pipefail
mode=${1:?usage: gpu_device_run.sh tests|bench|autotune}
out=${OUT:-/tmp/navdeploy-gpu-out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NAVDEPLOY_CONSOLE_OUTPUT=logs
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

runners=TorchCUDA,TorchCompileCUDA,TorchCompileCUDAGraphs,TorchScriptCUDA,TorchExportCUDA,OnnxCUDA,OnnxTensorRT
runners=$runners,TensorRT,TorchTensorRT
case "$mode" in
  tests)
    # -v and faulthandler_timeout: if the timeout ends pytest, the log still says which test hung and where.
    timeout 540 python3 -m pytest -v -p no:cacheprovider -rs -o faulthandler_timeout=120 \
      tests/test_gpu_candidates.py tests/test_compile_runners.py \
      2>&1 | tee "$out/gpu_tests.log" ;;
  bench)
    timeout 570 python3 benchmarks/bench_gpu.py --models resnet50,bert,unet --timeout 150 --build-workers 4 \
      --runners "$runners" --out "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log" ;;
  autotune)
    timeout 570 python3 benchmarks/bench_gpu.py --models resnet50 --timeout 280 --build-workers 2 \
      --runners TorchCUDA,TorchCompileCUDAMaxAutotune --out "$out/gpu_autotune.json" 2>&1 | tee "$out/gpu_autotune.log" ;;
  *)
    echo "unknown mode $mode: use tests, bench or autotune" >&2; exit 2 ;;
esac
