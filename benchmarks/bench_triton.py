"""Serving overhead of a Triton model repository on this CPU machine, in one run.

Optimizes a small CNN (ONNX + TorchScript candidates), exports the workspace with ``backend="python"``, serves it
with the tritonserver bundled in nvidia-pytriton and measures request latency (p50/p90) and throughput over HTTP
and gRPC (sequential requests, and gRPC with several requests in flight so the dynamic batcher works) against
the same selected runner called in-process through the optimized ``nav.Module``.

    python benchmarks/bench_triton.py [--seconds 2] [--out benchmarks/results/triton_cpu.json]

Prints a table and writes JSON. Compare the ratios of one run: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import navdeploy as nav
from navdeploy.triton import TritonServer


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def timed(fn, seconds: float, warmup: int = 20) -> list[float]:
    """Latencies in ms of repeated calls for about ``seconds``."""
    for _ in range(warmup):
        fn()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: list[float], batch: int, wall_s: float | None = None, requests: int | None = None) -> dict:
    times = sorted(times)
    n = requests if requests is not None else len(times)
    wall = wall_s if wall_s is not None else sum(times) / 1e3
    return {"batch_size": batch, "requests": n, "p50_ms": statistics.median(times),
            "p90_ms": times[int(0.9 * (len(times) - 1))], "throughput_samples_s": n * batch / wall}


def concurrent_grpc(url: str, name: str, x: np.ndarray, in_flight: int, seconds: float) -> dict:
    """``in_flight`` client threads, each sending requests back to back: latency per request, total throughput."""
    import tritonclient.grpc as grpcclient

    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker() -> None:
        client = grpcclient.InferenceServerClient(url)
        inp = grpcclient.InferInput("input__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        mine = []
        while time.perf_counter() < stop:
            start = time.perf_counter()
            client.infer(name, [inp])
            mine.append((time.perf_counter() - start) * 1e3)
        client.close()
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**summary(latencies, x.shape[0], time.perf_counter() - start), "in_flight": in_flight}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per row")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "triton_cpu.json"))
    args = parser.parse_args()
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    root = Path(tempfile.mkdtemp(prefix="navdeploy-bench-triton-"))
    model = nav.Module(cnn(), name="bench_triton_cnn")
    data = [(1, torch.randn(1, 3, 64, 64)) for _ in range(2)] + [(8, torch.randn(8, 3, 64, 64))]
    config = nav.OptimizeConfig(target_formats=(nav.Format.ONNX, nav.Format.TORCHSCRIPT), batch_sizes=(1, 8),
                                max_batch_size=8, workspace=root / "ws", use_multiprocessing=False)
    status = nav.optimize(model, data, config=config)
    selected = status.selected()["bench_triton_cnn"][0]
    repo = nav.export_model_repository(root / "model_repository", backend="python", workspace=root / "ws")
    name = "bench_triton_cnn"
    rows = []
    with TritonServer(repo) as server:
        http = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for batch in (1, 8):
                x = torch.randn(batch, 3, 64, 64)
                xn = x.numpy()
                with torch.no_grad():
                    expected = model.__wrapped__(x).numpy()
                    inproc = summary(timed(lambda x=x: model(x), args.seconds), batch)
                rows.append({"path": f"in-process ({selected})", **inproc})
                for proto, mod, client in (("HTTP", httpclient, http), ("gRPC", grpcclient, grpc)):
                    inp = mod.InferInput("input__0", list(xn.shape), "FP32")
                    inp.set_data_from_numpy(xn)
                    got = client.infer(name, [inp]).as_numpy("output__0")
                    assert np.allclose(got, expected, atol=1e-4, rtol=1e-3), "served output differs from eager"
                    call = lambda client=client, inp=inp: client.infer(name, [inp])
                    served = summary(timed(call, args.seconds), batch)
                    rows.append({"path": f"Triton {proto} (python backend)", **served,
                                 "p50_vs_in_process": served["p50_ms"] / inproc["p50_ms"]})
            x1 = np.random.randn(1, 3, 64, 64).astype(np.float32)
            conc = concurrent_grpc(server.grpc_url, name, x1, in_flight=8, seconds=args.seconds)
            stats = grpc.get_inference_statistics(name, as_json=True)["model_stats"][0]
            conc["server_inferences_per_execution"] = (int(stats["inference_count"])
                                                       / max(1, int(stats["execution_count"])))
            rows.append({"path": "Triton gRPC, 8 requests in flight (dynamic batching)", **conc})
        finally:
            http.close()
            grpc.close()

    table = Table(title=f"Triton serving vs in-process ({selected} artifact; {platform.machine()}, "
                        f"{torch.get_num_threads()} threads)")
    for col in ("path", "batch", "p50 ms", "p90 ms", "samples/s", "p50 vs in-process"):
        table.add_column(col)
    for r in rows:
        ratio = r.get("p50_vs_in_process")
        table.add_row(r["path"], str(r["batch_size"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
                      f"{r['throughput_samples_s']:.0f}", f"{ratio:.1f}x" if ratio else "-")
    Console(width=140).print(table)
    result = {
        "command": ("python benchmarks/bench_triton.py"
                    + (f" --seconds {args.seconds:g}" if args.seconds != 2.0 else "")),
        "machine": {"cpu": platform.machine(), "cores": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "model": {"name": "cnn", "parameters": sum(p.numel() for p in model.__wrapped__.parameters()),
                  "input": [1, 3, 64, 64]},
        "selected": selected, "backend": "python", "server": "tritonserver bundled in nvidia-pytriton",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
