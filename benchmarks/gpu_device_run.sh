#!/usr/bin/env bash
# The GPU runs, one device call each (the `device` tool: 10 minutes a command, at most 64 MiB carried a call, no
# downloads there; /tmp persists between calls while the machine stays warm, 30 s after a call).
#
#   bash benchmarks/gpu_device_run.sh MODE [ARGS]
#
# Modes (the wheels the device lacks travel in .whl/<bundle>/ folders, named in the call's `carry`; every mode first
# installs whatever bundle it finds there, so any call can bring the next bundle; see /work/wheels/PLAN.md):
#   setup                 install the carried bundles, report what is there (versions, imports under numpy 1.26)
#   tests                 the CUDA tests (GPU candidates, compile runners, build workers; ONNX Runtime CUDA once
#                         onnxruntime-gpu is installed)
#   sd PHASES             benchmarks/bench_sd_gpu.py --phases PHASES (eager,optimize,rerun,load,baseline,serve) on the
#                         workspace $ND_TMP/nd-sd/ws; the others under the image's numpy 2, `serve` in a venv whose
#                         site-packages put numpy 1.26 and pyzmq first (serve_python: the Python-backend stub runs
#                         that venv's python3 isolated, so PYTHONPATH cannot give it numpy 1.26).
#                         SD_BASELINE_MODES (default reduce-overhead) for `baseline`. Each module's log is copied
#                         to $OUT/sd_module_logs/; to see why a bind missed the compile caches, run with
#                         TORCH_LOGS="+torch._functorch._aot_autograd.autograd_cache" (workers' keys in those logs,
#                         the binding process's in the sd log).
#   ort [MODELS]          benchmarks/ort_cuda_check.py (resnet50,unet by default) with onnxruntime-gpu
#   pipelines [NAMES]     benchmarks/bench_pipelines.py --device cuda: GPT-2 generate (KV cache), BERT-base, ViT-base
#                         at real size, optimized with defaults, eager vs optimized in separate processes; it may
#                         outlive one call when started in the background (setsid), writing $ND_TMP/nd-results
#   bench                 bench_gpu: ResNet-50, BERT-base, small UNet in one call (as in session 7)
#   autotune              ResNet-50 with max-autotune-no-cudagraphs against eager
# Results accumulate in $ND_TMP/nd-results (the SD JSON across calls, also written into $OUT as it changes) and are
# copied to $OUT at the end of each call; the Python commands run under `timeout` to 20 s before the call's 600 s
# (ND_BUDGET) are up, counted from this script's start, so that the copy happens inside the 10 minutes (ND_LIMIT:
# a fixed limit instead).
#
# Bundles (built on the dev machine, see /work/wheels/PLAN.md): base (diffusers, tritonclient[http] and its deps,
# pyzmq, sh, importlib_metadata, ml_dtypes) -> $ND_TMP/site; np1 (numpy 1.26.4, scipy 1.16.3) and pytriton
# (nvidia-pytriton 0.7.0) -> $ND_TMP/site-np1; ort0..ort4 (onnxruntime-gpu 1.31.1 in 60 MiB pieces) ->
# $ND_TMP/nd-ort-parts, installed into $ND_TMP/site-ort once all five are there (ND_TMP: /tmp by default). Only
# where needed: base/optional (protobuf, if the image's cannot import tritonclient's model_config_pb2) and
# base/libpython (if the Python-backend stub cannot find this Python's libpython3.12.so.1.0).
# SD_ARGS / ORT_ARGS pass extra arguments (e.g. SD_ARGS="--tiny" and ORT_ARGS="--device cpu" to rehearse on a CPU).
#
# bench leaves out AOTInductorCUDA: on torch 2.11 it crashes in torch's own loader, also outside navdeploy
# (benchmarks/aoti_cuda_load_check.py), after ~80 s of building per model. autotune is its own call because
# max-autotune builds alone (it times kernels on the GPU while it compiles).
set -uo pipefail
mode=${1:?usage: gpu_device_run.sh setup|tests|sd PHASES|ort [MODELS]|pipelines [NAMES]|bench|autotune}
shift
out=${OUT:-/tmp/navdeploy-gpu-out}
tmp=${ND_TMP:-/tmp}  # where installs, pieces, workspaces and results persist between calls
results=$tmp/nd-results
script_start=$(date +%s)
mkdir -p "$out" "$results"
cd "$(dirname "$0")/.."
repo=$PWD
export PYTHONUNBUFFERED=1 NAVDEPLOY_CONSOLE_OUTPUT=logs
ORT_WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
ORT_SHA256=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7

pip_target() {  # pip_target DIR WHEEL...: install wheels (no deps, no index) into DIR
  local dir=$1; shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dir" "$@"
}

install_bundles() {
  local b marker
  for b in base np1 pytriton; do
    [ -d ".whl/$b" ] || continue
    ls .whl/$b/*.whl >/dev/null 2>&1 || continue
    case $b in base) dir=$tmp/site ;; *) dir=$tmp/site-np1 ;; esac
    marker=$tmp/nd-installed-$b
    if [ ! -e "$marker" ]; then
      pip_target "$dir" .whl/$b/*.whl && touch "$marker" && echo "installed bundle $b into $dir"
    fi
  done
  mkdir -p $tmp/nd-ort-parts
  for f in .whl/ort*/*.part*; do
    [ -e "$f" ] && [ ! -e "$tmp/nd-ort-parts/$(basename "$f")" ] && cp "$f" $tmp/nd-ort-parts/ && echo "kept $(basename "$f")"
  done
  if [ ! -e $tmp/nd-installed-ort ]; then
    local n
    n=$(ls $tmp/nd-ort-parts/$ORT_WHEEL.part* 2>/dev/null | wc -l)
    echo "onnxruntime-gpu pieces here: $n of 5"
    if [ "$n" -eq 5 ]; then
      cat $tmp/nd-ort-parts/$ORT_WHEEL.part{0,1,2,3,4} > $tmp/$ORT_WHEEL
      if echo "$ORT_SHA256  $tmp/$ORT_WHEEL" | sha256sum -c --quiet; then
        pip_target $tmp/site-ort $tmp/$ORT_WHEEL && touch $tmp/nd-installed-ort && echo "installed onnxruntime-gpu"
        rm -f $tmp/$ORT_WHEEL $tmp/nd-ort-parts/*
      else
        echo "onnxruntime-gpu: the assembled wheel's checksum is wrong" >&2
      fi
    fi
  fi
  if [ -e $tmp/nd-installed-base ] && [ ! -e $tmp/nd-installed-pb ] && \
     ! PYTHONPATH=$tmp/site python3 -c "import tritonclient.grpc.model_config_pb2" 2>/dev/null; then
    ls .whl/base/optional/protobuf-*.whl >/dev/null 2>&1 && pip_target $tmp/site-pb .whl/base/optional/protobuf-*.whl \
      && touch $tmp/nd-installed-pb && echo "installed protobuf into $tmp/site-pb (the image's cannot load tritonclient)"
  fi
}

serve_python() {  # the interpreter of the serve phase: a venv whose site-packages list numpy 1.26 and pyzmq first
  # (a .pth file), then the image's packages. The Python-backend stub runs this venv's python3 in isolated mode,
  # where PYTHONPATH does not reach: numpy 1.26 on PYTHONPATH beside the image's venv would leave it numpy 2.
  local venv=$tmp/nd-serve-venv image site
  [ -x $venv/bin/python3 ] || python3 -m venv --without-pip $venv >&2 || return 1
  image=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  site=$($venv/bin/python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  {
    echo "$tmp/site-np1"
    [ -e $tmp/nd-installed-pb ] && echo "$tmp/site-pb"
    echo "$tmp/site"
    echo "import site; site.addsitedir('$image')"
  } > "$site/nd-serving.pth"
  echo $venv/bin/python3
}

stub_libraries() {  # what the Python-backend stub of the installed pytriton cannot load, in nav.serve's environment
  PYTHONPATH=$repo "$(serve_python)" - <<'PY'
import os, subprocess, sys
from pathlib import Path
import pytriton
from navdeploy.triton.server import stub_environment_while
stub = Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
with stub_environment_while():
    env = dict(os.environ)
out = subprocess.run(["ldd", str(stub)], env=env, capture_output=True, text=True).stdout
print("\n".join(line for line in out.splitlines() if "not found" in line) or "all found")
PY
}

use_libpython_fallback() {  # the stub links libpython3.X.so.1.0; where this Python's LIBDIR lacks it, the carried copy
  if [ -e $tmp/nd-installed-np1 ] && [ -e $tmp/nd-installed-pytriton ] && stub_libraries | grep -q "libpython.*not found"; then
    if [ -e .whl/base/libpython/libpython3.12.so.1.0 ] || [ -e $tmp/nd-libpython/libpython3.12.so.1.0 ]; then
      mkdir -p $tmp/nd-libpython && cp -n .whl/base/libpython/* $tmp/nd-libpython/ 2>/dev/null
      export LD_LIBRARY_PATH=$tmp/nd-libpython${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      echo "the stub's libpython is not in this Python's LIBDIR: using the carried copy ($tmp/nd-libpython)"
    fi
  fi
}

left_s() {  # seconds a Python command may run now: the call's 600 s less what has passed and 20 s to copy results
  [ -n "${ND_LIMIT:-}" ] && { echo "$ND_LIMIT"; return; }
  local left=$(( ${ND_BUDGET:-600} - 20 - ($(date +%s) - script_start) ))
  echo $(( left < 1 ? 1 : left ))  # never 0: timeout 0 would mean no limit
}

path_of() {  # path_of np2|ort: the PYTHONPATH of a phase (serve: serve_python)
  local p=$repo
  [ "$1" = ort ] && [ -e $tmp/nd-installed-ort ] && p=$p:$tmp/site-ort
  [ -e $tmp/nd-installed-pb ] && p=$p:$tmp/site-pb
  echo "$p:$tmp/site"
}

finish() {  # copy the results (JSON, this call's log) into $OUT: at most 8 files come back
  cp "$results"/*.json "$out"/ 2>/dev/null
  [ -n "${log:-}" ] && [ -e "$log" ] && cp "$log" "$out"/
  ls -la "$out"
}
trap finish EXIT

install_bundles
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
export PYTHONPATH
PYTHONPATH=$(path_of np2)
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

runners=TorchCUDA,TorchCompileCUDA,TorchCompileCUDAGraphs,TorchScriptCUDA,TorchExportCUDA,OnnxCUDA,OnnxTensorRT
runners=$runners,TensorRT,TorchTensorRT
stamp=$(date +%H%M%S)
case "$mode" in
  setup)
    log=$results/setup_$stamp.log
    {
      python3 -c "import google.protobuf as g, numpy; print('protobuf', g.__version__, 'numpy', numpy.__version__)"
      python3 -c "import diffusers, tritonclient.http; print('diffusers', diffusers.__version__, 'tritonclient ok')"
      [ -e $tmp/nd-installed-ort ] && PYTHONPATH=$(path_of ort) python3 -c \
        "import torch, onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
      if [ -e $tmp/nd-installed-np1 ] && [ -e $tmp/nd-installed-pytriton ]; then
        PYTHONPATH=$repo "$(serve_python)" -c "
import numpy, scipy, scipy.integrate, torch, transformers, diffusers
from transformers import CLIPTextModel
from diffusers import StableDiffusionPipeline
print('numpy', numpy.__version__, 'scipy', scipy.__version__, 'torch', torch.__version__, 'transformers',
      transformers.__version__, 'diffusers', diffusers.__version__)
import pytriton.triton, tritonclient.http, navdeploy.serving.serve
from navdeploy.triton.server import bundled_library_dirs, stub_packages, stub_python
print('pytriton ok; its libraries:', bundled_library_dirs())
print('the stub runs', stub_python(), 'isolated, and finds', stub_packages(['numpy', 'zmq']))"
        echo "the stub's libraries in nav.serve's environment: $(stub_libraries)"
        use_libpython_fallback
        [ -n "${LD_LIBRARY_PATH:-}" ] && echo "with the fallback: $(stub_libraries)"
      fi
    } 2>&1 | tee "$log" ;;
  tests)
    log=$results/gpu_tests_$stamp.log
    PYTHONPATH=$(path_of ort)
    # -v and faulthandler_timeout: if the timeout ends pytest, the log still says which test hung and where.
    timeout "$(left_s)" python3 -m pytest -v -p no:cacheprovider -rs -o faulthandler_timeout=120 \
      tests/test_gpu_candidates.py tests/test_compile_runners.py tests/test_build_workers.py tests/test_ort_cuda.py \
      2>&1 | tee "$log" ;;
  sd)
    phases=${1:?usage: gpu_device_run.sh sd PHASES (eager,optimize,rerun,load,baseline,serve)}
    log=$results/sd_${phases//,/-}_$stamp.log
    first=${phases//serve/}; first=$(echo "$first" | tr -s ',' | sed 's/^,//; s/,$//')
    if [ -n "$first" ]; then
      # shellcheck disable=SC2086 # SD_ARGS: extra arguments (--tiny for a check on a CPU machine)
      timeout "$(left_s)" python3 benchmarks/bench_sd_gpu.py --phases "$first" --workspace $tmp/nd-sd/ws \
        --out "$results/sd_gpu.json" --mirror "$out/sd_gpu.json" \
        --baseline-modes "${SD_BASELINE_MODES:-reduce-overhead}" ${SD_ARGS:-} 2>&1 | tee -a "$log"
    fi
    if [ "$first" != "$phases" ]; then
      if [ "$(left_s)" -lt 90 ]; then
        echo "serve: only $(left_s) s left; run it in a call of its own" | tee -a "$log"
      else
        use_libpython_fallback  # not in a pipe: it exports LD_LIBRARY_PATH for the serve phase
        # shellcheck disable=SC2086
        PYTHONPATH=$repo timeout "$(left_s)" "$(serve_python)" benchmarks/bench_sd_gpu.py --phases serve \
          --workspace $tmp/nd-sd/ws --out "$results/sd_gpu.json" --mirror "$out/sd_gpu.json" ${SD_ARGS:-} \
          2>&1 | tee -a "$log"
      fi
    fi
    # Each module's log (its workers' output lands there; with TORCH_LOGS set, their compile-cache keys), the last
    # 8 MB of each: compared with the binding process's keys in $log, they say why a bind missed the caches.
    mkdir -p "$out/sd_module_logs"
    for f in $tmp/nd-sd/ws/*/navdeploy.log; do
      [ -f "$f" ] && tail -c 8000000 "$f" > "$out/sd_module_logs/$(basename "$(dirname "$f")").log"
    done ;;
  ort)
    models=${1:-resnet50,unet}
    log=$results/ort_cuda_${models//,/-}_$stamp.log
    # shellcheck disable=SC2086 # ORT_ARGS: extra arguments (--torch-runners ..., --device cpu for a CPU check)
    PYTHONPATH=$(path_of ort) timeout "$(left_s)" python3 benchmarks/ort_cuda_check.py --models "$models" \
      --workspace $tmp/nd-ort/ws --out "$results/ort_cuda_${models//,/-}.json" ${ORT_ARGS:-} 2>&1 | tee "$log" ;;
  pipelines)
    names=${1:-gpt2_generate_kv_cache,bert_classifier,vit}
    log=$results/pipelines_cuda_$stamp.log
    timeout "$(left_s)" python3 benchmarks/bench_pipelines.py --device cuda --only "$names" --rounds "${ND_ROUNDS:-2}" \
      --out "$results/pipelines_cuda.json" 2>&1 | tee "$log" ;;
  bench)
    log=$results/gpu_bench_$stamp.log
    timeout "$(left_s)" python3 benchmarks/bench_gpu.py --models resnet50,bert,unet --timeout 150 --build-workers 4 \
      --runners "$runners" --out "$results/gpu_bench.json" 2>&1 | tee "$log" ;;
  autotune)
    log=$results/gpu_autotune_$stamp.log
    timeout "$(left_s)" python3 benchmarks/bench_gpu.py --models resnet50 --timeout 280 --build-workers 2 \
      --runners TorchCUDA,TorchCompileCUDAMaxAutotune --out "$results/gpu_autotune.json" 2>&1 | tee "$log" ;;
  *)
    echo "unknown mode $mode: use setup, tests, sd PHASES, ort [MODELS], pipelines [NAMES], bench or autotune" >&2
    exit 2 ;;
esac
