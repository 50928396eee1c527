"""Serving benchmark on this CPU machine, in one run: the tiny Stable Diffusion pipeline of
``examples/stable_diffusion.py`` (32x32 images, 2 steps, int8 UNet)

  - served through PyTriton with its optimized modules (``nav.serve``),
  - called in-process with the same optimized modules,
  - served through PyTriton with the eager pipeline (nothing wrapped),

each measured as the p50/p90 latency of sequential one-prompt requests and the throughput (requests/s) of
``--clients`` concurrent clients sending one-prompt requests (in-process: as many threads sharing the pipeline).

    python benchmarks/bench_serving.py [--out benchmarks/results/serving_cpu.json]

Prints the figures and the ratios, and writes JSON with the command. Read ratios: these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import navdeploy as nav

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import stable_diffusion as sd  # noqa: E402 - examples/ must be on sys.path first

PROMPTS = [sd.PROMPT, "a horse on mars", "an astronaut", "a photo of mars"]


def _latency(call, requests: int) -> dict:
    times = []
    for i in range(requests):
        start = time.perf_counter()
        call(PROMPTS[i % len(PROMPTS)])
        times.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(times, n=10)
    return {"p50_ms": statistics.median(times), "p90_ms": q[8], "requests": requests}


def _throughput(make_call, clients: int, seconds: float) -> float:
    done, stop = [0] * clients, threading.Event()

    def worker(i: int) -> None:
        call = make_call()
        while not stop.is_set():
            call(PROMPTS[i % len(PROMPTS)])
            done[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def _client_call(server):
    from tritonclient.http import InferInput

    client = server.client()

    def call(prompt: str) -> np.ndarray:
        p = InferInput("prompt", [1, 1], "BYTES")
        p.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
        return client.infer("stable_diffusion", [p]).as_numpy("image")

    return call


def _measure_served(pipeline, load_optimized: bool, workspace: str, args) -> tuple[dict, np.ndarray]:
    with nav.serve(pipeline, inputs=sd.SERVE_INPUTS, outputs=sd.SERVE_OUTPUTS, name="stable_diffusion",
                   max_batch_size=args.clients, max_queue_delay_us=args.queue_delay_us, blocking=False,
                   load_optimized=load_optimized, workspace=workspace) as server:
        call = _client_call(server)
        image = call(sd.PROMPT)
        for _ in range(3):
            call(sd.PROMPT)
        figures = _latency(call, args.requests)
        figures["throughput_rps"] = _throughput(lambda: _client_call(server), args.clients, args.seconds)
    return figures, image


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving_cpu.json"))
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    args = parser.parse_args()
    workspace = tempfile.mkdtemp(prefix="navdeploy_bench_serving_")

    config = nav.OptimizeConfig(target_formats=(nav.Format.ONNX, nav.Format.TORCHSCRIPT), profile_time_s=0.2,
                                workspace=workspace)
    result = sd.main(workspace=workspace, config=config, quantize=True)
    optimized_pipe = sd.Text2Image(result["pipeline"])
    print(f"selected: {result['selected']}; optimized vs eager image max abs diff {result['max_abs_diff']:.2e}")

    lock = threading.Lock()

    def in_process(prompt: str) -> np.ndarray:
        with lock:  # what the server does too: one pipeline call at a time
            return optimized_pipe([prompt])

    for _ in range(3):
        in_process(sd.PROMPT)
    inproc = _latency(in_process, args.requests)
    inproc["throughput_rps"] = _throughput(lambda: in_process, args.clients, args.seconds)

    served_opt, image_opt = _measure_served(optimized_pipe, True, workspace, args)

    eager_pipe = sd.Text2Image(sd.build_eager_pipeline(quantize=True))  # same weights, nothing wrapped
    served_eager, image_eager = _measure_served(eager_pipe, False, workspace, args)

    ratios = {
        "served_vs_inprocess_p50": served_opt["p50_ms"] / inproc["p50_ms"],
        "served_overhead_p50_ms": served_opt["p50_ms"] - inproc["p50_ms"],
        "served_optimized_vs_served_eager_p50_speedup": served_eager["p50_ms"] / served_opt["p50_ms"],
        "served_optimized_vs_served_eager_throughput": served_opt["throughput_rps"] / served_eager["throughput_rps"],
        "served_vs_inprocess_throughput": served_opt["throughput_rps"] / inproc["throughput_rps"],
    }
    report = {
        "command": "python benchmarks/bench_serving.py " + " ".join(sys.argv[1:]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads(),
                    "load_average_1m": os.getloadavg()[0],
                    "platform": platform.platform()},
        "pipeline": {"image": sd.IMAGE_SIZE, "steps": sd.STEPS, "selected": result["selected"],
                     "optimize_s": result["optimize_s"]},
        "settings": vars(args),
        "served_optimized": served_opt, "in_process_optimized": inproc, "served_eager": served_eager,
        "ratios": ratios,
        "images": {"served_vs_inprocess_max_abs": float(np.abs(image_opt - result["optimized"]).max()),
                   "served_eager_vs_eager_max_abs": float(np.abs(image_eager - result["eager"]).max())},
    }
    for label in ("served_optimized", "in_process_optimized", "served_eager"):
        f = report[label]
        print(f"{label:22s} p50 {f['p50_ms']:7.2f} ms  p90 {f['p90_ms']:7.2f} ms  "
              f"throughput {f['throughput_rps']:6.1f} req/s ({args.clients} clients)")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
