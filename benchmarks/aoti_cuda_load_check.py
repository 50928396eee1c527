"""Does AOTInductor work on this CUDA machine at all? Exports, packages, loads and runs a model outside navdeploy,
each variant in its own process (a crash in torch's loader must not end the check), and prints how each ended.

    python benchmarks/aoti_cuda_load_check.py small:fp32:static resnet50:fp16:dynamic --out $OUT/aoti.json

A variant is ``model:dtype:shapes`` with model ``small`` (5-layer CNN) or ``resnet50`` (torchvision, random
weights), dtype ``fp32``/``fp16`` and shapes ``static`` (batch 2) or ``dynamic`` (batch 1..32, as navdeploy
exports it). When navdeploy's AOTInductorCUDA candidate dies (e.g. with SIGSEGV), this tells a torch/driver
problem from a navdeploy one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r'''
import sys, time, faulthandler, torch
faulthandler.enable()
model_name, dtype, shapes = sys.argv[1:4]
torch.manual_seed(0)
if model_name == "small":
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10))
    shape = (3, 32, 32)
else:
    import torchvision
    model = torchvision.models.resnet50(weights=None)
    shape = (3, 224, 224)
dt = torch.float16 if dtype == "fp16" else torch.float32
model = model.eval().cuda().to(dt)
start = time.time()
with torch.no_grad():
    dynamic = ({0: torch.export.Dim("batch", min=1, max=32)},) if shapes == "dynamic" else None
    program = torch.export.export(model, (torch.randn(2, *shape, device="cuda", dtype=dt),), dynamic_shapes=dynamic)
    path = f"/tmp/aoti_check_{model_name}_{dtype}_{shapes}.pt2"
    configs = {"aot_inductor.check_lowerbound": False} if shapes == "dynamic" else {}
    torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)
    print(f"STEP compiled in {time.time() - start:.1f} s", flush=True)
    runner = torch._inductor.aoti_load_package(path)
    print("STEP loaded", flush=True)
    for bs in ((1, 2, 32) if shapes == "dynamic" else (2,)):
        x = torch.randn(bs, *shape, device="cuda", dtype=dt)
        err = (runner(x).float() - model(x).float()).abs().max().item()
        print(f"STEP batch {bs}: max abs error vs eager {err:.3g}", flush=True)
print("STEP ok")
'''


def check(variant: str, timeout_s: float) -> dict:
    model, dtype, shapes = variant.split(":")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, model, dtype, shapes], capture_output=True, text=True,
                              timeout=timeout_s)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, text = None, f"timed out after {timeout_s:g} s\n{exc.stdout or ''}"
    steps = [line[5:] for line in text.splitlines() if line.startswith("STEP ")]
    frame = next((line.strip() for line in text.split("Current thread", 1)[-1].splitlines()
                  if line.strip().startswith('File "')), None) if code is not None and code < 0 else None
    return {"variant": variant, "returncode": code, "seconds": round(time.perf_counter() - start, 1), "steps": steps,
            "crash_frame": frame}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=["small:fp32:static"])
    parser.add_argument("--out", default="aoti_cuda_load_check.json")
    parser.add_argument("--timeout", type=float, default=280.0)
    args = parser.parse_args()
    results = []
    for variant in args.variants:
        r = check(variant, args.timeout)
        results.append(r)
        print(f"{variant:28} rc={r['returncode']} {r['seconds']:6.1f} s  steps: {'; '.join(r['steps']) or '-'}"
              + (f"\n{'':28} crashed in {r['crash_frame']}" if r["crash_frame"] else ""))
    import torch

    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "command": "python benchmarks/aoti_cuda_load_check.py " + " ".join(sys.argv[1:])}
    with open(args.out, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
