"""Does an ONNX Runtime call slow down the torch call that follows it in the same process?

A pipeline alternates an ORT session (a small MLP) and a torch CNN, as a pipeline with an ONNX winner and an eager
or compiled neighbour does. The torch call is timed right after each ORT call, with ORT's default session options
(worker threads spin after a run) and with navdeploy's (navdeploy/formats/onnx.py: no spinning,
torch's thread count), with workers that spin inside a run and stop when it returns (``force_spinning_stop``), in
separate processes so no setting disturbs another; and alone (no ORT call before it). The ORT call's own time is
printed too.

Usage: python benchmarks/ort_interference_check.py [--repeats 200]
(writes benchmarks/results/ort_interference_cpu.json)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _child(mode: str, repeats: int) -> dict:
    import onnxruntime
    import torch

    sys.path.insert(0, str(ROOT))
    from navdeploy.formats.onnx import session_options

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)).eval()
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, padding=1)).eval()
    x, image = torch.randn(8, 512), torch.randn(1, 3, 64, 64)
    path = Path(tempfile.mkdtemp()) / "mlp.onnx"
    torch.onnx.export(mlp, (x,), str(path), dynamo=False, input_names=["x"])
    if mode == "default":
        options = onnxruntime.SessionOptions()
    else:
        options = session_options()
    if mode == "spinning inside a run":
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy()}
    times, ort_times = [], []
    with torch.no_grad():
        for i in range(repeats + 10):
            if mode != "alone":
                start = time.perf_counter()
                session.run(None, feeds)
                if i >= 10:
                    ort_times.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            cnn(image)
            if i >= 10:
                times.append((time.perf_counter() - start) * 1e3)
    return {"mode": mode, "torch_ms_p50": statistics.median(times),
            "torch_ms_p90": statistics.quantiles(times, n=10)[-1],
            "ort_ms_p50": statistics.median(ort_times) if ort_times else None, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.repeats)))
        return
    rows = []
    for mode in ("alone", "default", "navdeploy", "spinning inside a run"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'ORT options before the torch call':<36}{'torch p50 ms':>14}{'p90 ms':>10}{'ORT p50 ms':>12}")
    for r in rows:
        ort_ms = f"{r['ort_ms_p50']:.3f}" if r["ort_ms_p50"] is not None else "-"
        print(f"{r['mode']:<36}{r['torch_ms_p50']:>14.3f}{r['torch_ms_p90']:>10.3f}{ort_ms:>12}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.node(),
              "cpu_count": __import__("os").cpu_count(), "python": platform.python_version(), "rows": rows}
    (RESULTS / "ort_interference_cpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
