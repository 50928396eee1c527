"""ONNX Runtime's CUDA execution provider in navdeploy, on the GPU (issue 16): the OnnxCUDA candidate builds,
verifies and profiles next to the torch candidates for ResNet-50 and the SD 2.1 UNet (fp16), runs on the CUDA
provider with IO binding (no host copy in a call), and a Triton repository exported with OnnxCUDA selected (the
onnxruntime backend with the CUDA accelerator) passes ``navdeploy validate-repo``.

    python benchmarks/ort_cuda_check.py --models resnet50,unet --out $OUT/ort_cuda.json
    python benchmarks/ort_cuda_check.py --models tiny --device cpu --out /tmp/ort.json   # the code path on a CPU

Needs onnxruntime-gpu (``onnxruntime.get_available_providers()`` lists CUDAExecutionProvider); the JSON is written
after each model. ``--device cpu`` runs OnnxCPU instead (a check of the script itself, not of the CUDA EP).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import navdeploy as nav  # noqa: E402
from navdeploy.inplace.binding import bind  # noqa: E402
from navdeploy.workspace.manifest import read_manifest, write_manifest  # noqa: E402
from navdeploy.workspace.samples import load_samples  # noqa: E402


def resnet50(device):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(device, torch.float16)
    return model, [(1, torch.randn(1, 3, 224, 224, device=device, dtype=torch.float16))], (1, 8)


def unet(device):
    from bench_sd_gpu import full_size
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        model = UNet2DConditionModel(**full_size().unet)
    model = model.eval().to(device, torch.float16).requires_grad_(False)
    half = dict(device=device, dtype=torch.float16)
    # One denoising step with guidance: latents and text embeddings of batch 2, the timestep a 0-d tensor.
    call = (torch.randn(2, 4, 64, 64, **half), torch.tensor(981, device=device),
            torch.randn(2, 77, 1024, **half), {"return_dict": False})
    return model, [(2, call)], (2,)


def tiny(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3, padding=1)).eval().to(device)
    return model, [(1, torch.randn(1, 3, 16, 16, device=device))], (1, 4)


MODELS = {"resnet50": resnet50, "unet": unet, "tiny": tiny}


def host_copies(fn) -> list[str]:
    """Host<->device copies recorded by torch's profiler while ``fn`` runs (and torch copies: ``aten::_to_copy``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return sorted({e.name for e in prof.events()
                   if "HtoD" in e.name or "DtoH" in e.name or e.name == "aten::_to_copy"})


def check_model(name: str, device: str, workspace: Path, timeout_s: float, torch_runners: tuple[str, ...]) -> dict:
    onnx_runner = "OnnxCUDA" if device == "cuda" else "OnnxCPU"
    model, data, batch_sizes = MODELS[name](device)
    module = nav.Module(model, name=f"ort_{name}")
    config = nav.OptimizeConfig(workspace=workspace, runners=(*torch_runners, onnx_runner), batch_sizes=batch_sizes,
                                max_batch_size=max(batch_sizes), timeout_s=timeout_s, pipeline_repeats=0,
                                keep_artifacts=True, thorough=True)  # OnnxCUDA profiled, bound and exported
    # below whatever won (the default search screens it out when a torch candidate is far ahead: on the H200
    # ResNet-50 fp16 OnnxCUDA took 1.45 ms at batch 1 against 0.42 ms under CUDA graphs)
    result: dict = {"model": name, "device": device, "runners": list(config.runners)}
    start = time.perf_counter()
    status = nav.optimize(module, data, config)
    result["optimize_s"] = time.perf_counter() - start
    graph = status.modules[module.name].graphs[0]
    result["selected"] = graph.selected
    result["candidates"] = {c.name: {"status": c.status, "step": c.step, "error": c.error, "max_abs_err": c.max_abs_err,
                                     "p50_ms": {str(p.batch_size): p.p50_ms for p in c.profile}, "times": c.times}
                            for c in graph.candidates}
    onnx = next((c for c in graph.candidates if c.runner == onnx_runner and c.status == "ok"), None)
    result["onnx_ok"] = onnx is not None
    if onnx is None:
        return result

    # Bound by hand, as load_optimized binds a selected runner: the provider and the copies of one call.
    folder = workspace / module.name
    manifest = read_manifest(folder)
    for entry in manifest.graphs.values():
        entry.selected = onnx.name
    manifest.reverted = None
    write_manifest(folder, manifest)
    result["bound"] = bind(module, folder, manifest)
    (_, run), = module.nav_state.handler.graphs.values()
    result["providers"] = run.session.get_providers()
    tensors = load_samples(folder / graph.key, device=device)[0].inputs  # the runner's flat inputs, as captured
    with torch.no_grad():
        outputs = run(tensors)
        result["outputs_on"] = sorted({str(o.device) for o in outputs})
        result["host_copies_in_a_call"] = host_copies(lambda: run(tensors))

    # The Triton repository of that choice: onnxruntime backend, the CUDA accelerator on GPU; validated offline.
    repo = Path(tempfile.mkdtemp(prefix="ort_repo_")) / "repo"
    nav.export_model_repository(repo, modules=[module.name], backend="auto", workspace=workspace)
    config_text = (repo / module.name / "config.pbtxt").read_text()
    result["triton_config"] = config_text
    result["accelerator_cuda"] = "gpu_execution_accelerator" in config_text and '"cuda"' in config_text
    target = "gpu" if device == "cuda" else "cpu"
    check = subprocess.run([sys.executable, "-m", "navdeploy.cli", "validate-repo", str(repo), "--target", target],
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    result["validate_repo"] = {"returncode": check.returncode, "output": (check.stdout + check.stderr)[-3000:]}
    shutil.rmtree(repo.parent, ignore_errors=True)  # its config is in the JSON; the artifact is in the workspace
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,unet", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default="ort_cuda.json")
    parser.add_argument("--workspace", default=None, help="navdeploy workspace (default: a new temporary folder)")
    parser.add_argument("--timeout", type=float, default=400.0, help="per-candidate timeout, seconds")
    parser.add_argument("--torch-runners", default=None,
                        help="the torch candidates beside ONNX (default TorchCUDA,TorchScriptCUDA,"
                             "TorchCompileCUDAGraphs; on the CPU TorchCPU,TorchScriptCPU)")
    args = parser.parse_args()
    import onnxruntime

    default = "TorchCUDA,TorchScriptCUDA,TorchCompileCUDAGraphs" if args.device == "cuda" else "TorchCPU,TorchScriptCPU"
    torch_runners = tuple(r for r in (args.torch_runners or default).split(",") if r)
    workspace = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="navdeploy-ort-"))
    env = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "onnxruntime_file": onnxruntime.__file__, "providers": onnxruntime.get_available_providers(),
           "command": " ".join(sys.argv)}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    results: dict = {"environment": env, "models": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    code = 0
    for name in args.models.split(","):
        try:
            r = check_model(name, args.device, workspace, args.timeout, torch_runners)
        except Exception as exc:  # noqa: BLE001 - one model failing must not lose the other's figures
            r = {"model": name, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            code = 1
        results["models"].append(r)
        out.write_text(json.dumps(results, indent=2, default=str))
        print(json.dumps({k: v for k, v in r.items() if k not in ("triton_config",)}, indent=1, default=str)[:6000],
              flush=True)
        valid = r.get("validate_repo", {}).get("returncode") == 0
        code |= 0 if r.get("onnx_ok") and valid and not r.get("host_copies_in_a_call") else 1
    return code


if __name__ == "__main__":
    sys.exit(main())
