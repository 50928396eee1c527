"""How fast is an ONNX Runtime CPU session whose workers never spin (navdeploy's options), against one whose
workers spin between the operators of a run and stop when it returns (``session.force_spinning_stop``), alone and in
a whole pipeline?

Real modules built from configs (random weights): the example CNN at batch 1, a small BERT encoder (4 layers,
hidden 128) at batch 4 x 32 tokens, the bench's tiny SD UNet at batch 2 and its VAE decoder at batch 1. Each
(module, option) pair runs in its own process, alternating, ``--rounds`` times: the ORT call's median, and the median
of a small torch CNN called right after each ORT call.

With ``--sd-workspace W`` (a workspace of ``bench_pipelines.py --only sd_guidance --keep-workspace``: the folder
that holds sd_clip, sd_unet, sd_vae_decoder) the whole SD pipeline is loaded from it in fresh processes instead, under
each option (ORT runners' sessions built with it), and timed over 24 calls: the median and p10-p90 of the last 16.

Usage: python benchmarks/ort_spinning_check.py [--only cnn,bert] [--rounds 2] [--sd-workspace W]
(writes benchmarks/results/ort_spinning_cpu.json, or ort_spinning_sd_cpu.json with --sd-workspace)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODULES = ("cnn", "bert", "unet", "vae")
MODES = ("navdeploy", "spinning inside a run")


def _module(which: str):
    import torch
    from torch import nn

    sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
    torch.manual_seed(0)
    if which == "cnn":
        import image_classifier

        return image_classifier.build_classifier().eval(), [torch.randn(1, 3, 64, 64)]
    import bench_pipelines

    if which == "bert":
        return bench_pipelines.bert_encoder(), [torch.randint(0, 1000, (4, 32)), torch.ones(4, 32, dtype=torch.int64)]
    spec = bench_pipelines.SPECS["sd_guidance"]
    spec.device = "cpu"
    pipe = spec.build()["pipe"]
    if which == "unet":
        return bench_pipelines.sd_unet_call(pipe)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = pipe.vae.decoder

        def forward(self, latents):
            return self.decoder(latents)

    return Decoder().eval(), [torch.randn(1, 4, 16, 16)]


def _options(options, mode: str):
    if mode == "spinning inside a run":
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def _sd_child(mode: str, workspace: str) -> dict:
    """The whole SD pipeline loaded from ``workspace``, its ORT sessions built with ``mode``'s options."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import navdeploy.formats.onnx as onnx_format

    navdeploy_options = onnx_format.session_options
    onnx_format.session_options = lambda: _options(navdeploy_options(), mode)
    import bench_pipelines

    import navdeploy as nav

    spec = bench_pipelines.SPECS["sd_guidance"]
    spec.device = "cpu"
    state = spec.build()
    spec.wrap(state)
    pipeline = spec.pipeline(state)
    nav.load_optimized(workspace)
    sample = spec.dataloader(state)[-1][1]
    times = []
    for _ in range(24):
        start = time.perf_counter()
        bench_pipelines.invoke(pipeline, sample)
        times.append((time.perf_counter() - start) * 1e3)
    last = times[8:]
    deciles = statistics.quantiles(last, n=10)
    return {"module": "sd pipeline", "mode": mode, "median_ms": statistics.median(last), "p10_ms": deciles[0],
            "p90_ms": deciles[-1], "calls_ms": times}


def _child(which: str, mode: str, folder: str, calls: int) -> dict:
    import onnxruntime
    import torch

    sys.path.insert(0, str(ROOT))
    from navdeploy.formats.onnx import session_options

    module, inputs = _module(which)
    path = Path(folder) / f"{which}.onnx"
    if not path.exists():
        torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, opset_version=17)
    options = _options(session_options(), mode)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    torch.manual_seed(1)
    neighbour = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(32, 32, 3, padding=1)).eval()
    image = torch.randn(1, 3, 64, 64)
    ort_ms, torch_ms = [], []
    with torch.inference_mode():
        for i in range(calls + 5):
            start = time.perf_counter()
            session.run(None, feeds)
            middle = time.perf_counter()
            neighbour(image)
            end = time.perf_counter()
            if i >= 5:
                ort_ms.append((middle - start) * 1e3)
                torch_ms.append((end - middle) * 1e3)
    return {"module": which, "mode": mode, "ort_ms_p50": statistics.median(ort_ms),
            "torch_after_ms_p50": statistics.median(torch_ms), "calls": calls}


def _sd_main(args, env: dict) -> None:
    rows = []
    for _ in range(args.rounds):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--sd-child", mode, args.sd_workspace], capture_output=True,
                                 text=True, check=True, env=env).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'SD pipeline, ORT workers':<28}{'median ms':>10}{'p10 ms':>9}{'p90 ms':>9}")
    for r in rows:
        print(f"{r['mode']:<28}{r['median_ms']:>10.1f}{r['p10_ms']:>9.1f}{r['p90_ms']:>9.1f}")
    _write("ort_spinning_sd_cpu.json", rows)


def _write(name: str, rows: list) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.node(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "rows": rows}
    (RESULTS / name).write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MODULES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--sd-workspace", default=None, help="time the whole SD pipeline loaded from this workspace")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--sd-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, args.calls)))
        return
    if args.sd_child:
        print(json.dumps(_sd_child(*args.sd_child)))
        return
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.sd_workspace:
        _sd_main(args, env)
        return
    folder = tempfile.mkdtemp(prefix="navdeploy-ort-spinning-")
    rows = []
    for which in args.only.split(","):
        for _ in range(args.rounds):
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--child", which, mode, folder, "--calls",
                                      str(args.calls)], capture_output=True, text=True, check=True, env=env).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'module':<8}{'ORT workers':<18}{'ORT p50 ms':>12}{'torch after p50 ms':>20}")
    for r in rows:
        print(f"{r['module']:<8}{r['mode']:<18}{r['ort_ms_p50']:>12.3f}{r['torch_after_ms_p50']:>20.3f}")
    _write("ort_spinning_cpu.json", rows)


if __name__ == "__main__":
    main()
