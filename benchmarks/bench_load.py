"""Load benchmark: concurrent clients against the PyTriton-served optimized pipeline, on loopback only, bounded
in requests and time. Reports p50/p99 latency, throughput and failed requests (the target: zero failures).

    python benchmarks/bench_load.py [--clients 8] [--requests 200] [--seconds 30]
        [--out benchmarks/results/load_cpu.json]

The pipeline is the two-module example (`examples/two_module_pipeline.py`), optimized into a temporary workspace
and served with `nav.serve` (dynamic batching up to 8). Every response is checked against the eager pipeline.
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
from navdeploy.serving import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # two_module_pipeline, imported in main()


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests per client at most")
    parser.add_argument("--seconds", type=float, default=30.0, help="stop sending after this long")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_cpu.json"))
    args = parser.parse_args()

    import two_module_pipeline as example

    workspace = Path(tempfile.mkdtemp(prefix="navdeploy-load-"))
    pipe = example.build_pipeline(workspace)
    torch.manual_seed(0)
    data = [(b, (torch.randn(b, 3, 32, 32), {"scale": 0.5})) for b in (1, 4, 8)]
    status = nav.optimize(pipe, data, nav.OptimizeConfig(workspace=workspace, batch_sizes=(1, 4, 8),
                                                         max_batch_size=8, profile_time_s=0.1))

    def eager(images: np.ndarray) -> np.ndarray:
        """The same pipeline with the unwrapped modules: what every response must match."""
        with torch.no_grad():
            features = pipe.encoder.__wrapped__(torch.from_numpy(images)) * 0.5
            return pipe.head.__wrapped__(features).softmax(dim=-1).numpy()

    def infer(images: np.ndarray) -> dict:
        with torch.no_grad():
            return {"logits": pipe(torch.from_numpy(images), scale=0.5).numpy()}

    image_shape = (3, 32, 32)
    with torch.no_grad():
        probe = torch.randn(1, *image_shape)
        n_out = pipe(probe, scale=0.5).shape[-1]
    handle = nav.serve(infer, inputs=[Tensor("images", np.float32, image_shape)],
                       outputs=[Tensor("logits", np.float32, (n_out,))], name="pipeline", max_batch_size=8,
                       blocking=False, workspace=workspace, load_optimized=False, max_queue_delay_us=500)
    latencies: list[float] = []
    failures: list[str] = []
    wrong = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def client_loop(i: int) -> None:
        from tritonclient.http import InferenceServerClient, InferInput

        client = InferenceServerClient(handle.http_url)
        rng = np.random.default_rng(i)
        try:
            for _ in range(args.requests):
                if time.monotonic() > deadline:
                    break
                x = rng.standard_normal((1, *image_shape), dtype=np.float32)
                inp = InferInput("images", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                start = time.perf_counter()
                try:
                    out = client.infer("pipeline", [inp]).as_numpy("logits")
                except Exception as exc:  # noqa: BLE001 - counted, the load goes on
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                elapsed = (time.perf_counter() - start) * 1e3
                ok = np.allclose(out, eager(x), atol=1e-4, rtol=1e-3)
                with lock:
                    latencies.append(elapsed)
                    wrong[0] += 0 if ok else 1
        finally:
            client.close()

    try:
        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        handle.stop()

    ordered = sorted(latencies)
    result = {
        "command": "python benchmarks/bench_load.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "clients": args.clients, "requests_ok": len(latencies), "requests_failed": len(failures),
        "wrong_results": wrong[0], "failures": failures[:10], "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall else None,
        "p50_ms": statistics.median(ordered) if ordered else None,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else None,
        "selected": status.selected(),
    }
    if not ordered:
        print(f"no request succeeded; failures: {failures[:3]}")
        return result
    print(f"{args.clients} clients: {len(latencies)} ok, {len(failures)} failed, {wrong[0]} wrong; "
          f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, {result['throughput_rps']:.0f} req/s "
          f"(load average {result['machine']['load_average'][0]:.1f})")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["requests_failed"] == 0 else 1)
