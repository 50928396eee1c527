"""Load benchmark: concurrent clients mixing valid and invalid requests against the PyTriton-served optimized
pipeline, on loopback only, bounded in time and requests. Reports p50/p99 latency and throughput of the valid
requests, how many failed (the target: none), whether every invalid request was refused, and whether the server
was alive and answering at the end. Exits 1 when a valid request failed or the server died.

    python benchmarks/bench_load.py [--clients 64] [--seconds 60] [--invalid-share 0.2]
        [--requests 100000] [--out benchmarks/results/load_cpu.json]

The pipeline is the two-module example (`examples/two_module_pipeline.py`), optimized into a temporary workspace
and served with `nav.serve` (dynamic batching up to 8). Every valid response is checked against the eager pipeline.
Invalid requests (a share of each client's requests, over HTTP) rotate through: a huge declared shape with a small
body (the request that ended tritonserver before nav.serve's request bounds), a batch over max_batch_size, a wrong
datatype, a wrong item shape, a missing input, an unknown input and a body that is not JSON.

Check it runs: python benchmarks/bench_load.py --clients 4 --seconds 5 --out /tmp/load_check.json
"""

from __future__ import annotations

import argparse
import http.client
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

IMAGE_SHAPE = (3, 32, 32)
MAX_BATCH = 8


def _invalid_bodies() -> list[tuple[str, bytes]]:
    """(label, body) of each kind of invalid request, for POST /v2/models/pipeline/infer."""
    def body(inputs: list[dict]) -> bytes:
        return json.dumps({"inputs": inputs}).encode()

    image = {"name": "images", "datatype": "FP32"}
    return [
        ("huge declared shape", body([{**image, "shape": [1, 3, 32, 2**40], "data": [1.0] * 4}])),
        ("batch over max_batch_size", body([{**image, "shape": [2**20, *IMAGE_SHAPE], "data": [1.0] * 4}])),
        ("wrong datatype", body([{**image, "datatype": "INT32", "shape": [1, *IMAGE_SHAPE],
                                  "data": [1] * int(np.prod(IMAGE_SHAPE))}])),
        ("wrong item shape", body([{**image, "shape": [1, 3, 16, 16], "data": [1.0] * 768}])),
        ("missing input", body([])),
        ("unknown input", body([{**image, "name": "other", "shape": [1], "data": [1.0]}])),
        ("not JSON", b"{this is not json"),
    ]


def _percentile(ordered: list[float], q: float) -> float | None:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else None


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="send requests for this long")
    parser.add_argument("--invalid-share", type=float, default=0.2, help="share of invalid requests (0..1)")
    parser.add_argument("--requests", type=int, default=100_000, help="requests per client at most")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request client timeout, seconds")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_cpu.json"))
    args = parser.parse_args()
    if not 0 <= args.invalid_share <= 1 or args.clients < 1 or args.seconds <= 0:
        parser.error("--clients >= 1, --seconds > 0 and 0 <= --invalid-share <= 1")

    import two_module_pipeline as example

    workspace = Path(tempfile.mkdtemp(prefix="navdeploy-load-"))
    pipe = example.build_pipeline(workspace)
    torch.manual_seed(0)
    data = [(b, (torch.randn(b, *IMAGE_SHAPE), {"scale": 0.5})) for b in (1, 4, 8)]
    status = nav.optimize(pipe, data, nav.OptimizeConfig(workspace=workspace, batch_sizes=(1, 4, 8),
                                                         max_batch_size=MAX_BATCH, profile_time_s=0.1))

    def eager(images: np.ndarray) -> np.ndarray:
        """The same pipeline with the unwrapped modules: what every response must match."""
        with torch.no_grad():
            features = pipe.encoder.__wrapped__(torch.from_numpy(images)) * 0.5
            return pipe.head.__wrapped__(features).softmax(dim=-1).numpy()

    def infer(images: np.ndarray) -> dict:
        with torch.no_grad():
            return {"logits": pipe(torch.from_numpy(images), scale=0.5).numpy()}

    with torch.no_grad():
        n_out = pipe(torch.randn(1, *IMAGE_SHAPE), scale=0.5).shape[-1]
    handle = nav.serve(infer, inputs=[Tensor("images", np.float32, IMAGE_SHAPE)],
                       outputs=[Tensor("logits", np.float32, (n_out,))], name="pipeline", max_batch_size=MAX_BATCH,
                       blocking=False, workspace=workspace, load_optimized=False, max_queue_delay_us=500)
    invalid_bodies = _invalid_bodies()
    lock = threading.Lock()
    latencies: list[float] = []  # valid requests answered correctly, ms
    invalid_latencies: list[float] = []
    failures: list[str] = []  # valid requests that failed
    wrong = [0]
    accepted_invalid: list[str] = []  # invalid requests the server answered with 200
    invalid_errors: list[str] = []  # invalid requests answered with neither 200 nor 4xx (5xx, connection lost)
    refused = {label: 0 for label, _ in invalid_bodies}
    start_at = time.monotonic()
    deadline = start_at + args.seconds

    def client_loop(i: int) -> None:
        from tritonclient.http import InferenceServerClient, InferInput

        client = InferenceServerClient(handle.http_url, network_timeout=args.timeout, connection_timeout=args.timeout)
        raw = http.client.HTTPConnection(*handle.http_url.rsplit(":", 1), timeout=args.timeout)
        rng = np.random.default_rng(i)
        try:
            for n in range(args.requests):
                if time.monotonic() > deadline:
                    break
                if rng.random() < args.invalid_share:
                    label, body = invalid_bodies[(i + n) % len(invalid_bodies)]
                    start = time.perf_counter()
                    try:
                        raw.request("POST", "/v2/models/pipeline/infer", body=body,
                                    headers={"Content-Type": "application/json"})
                        response = raw.getresponse()
                        response.read()
                        code = response.status
                    except (OSError, http.client.HTTPException) as exc:
                        raw.close()  # reconnects on the next request
                        code = f"{type(exc).__name__}: {exc}"
                    elapsed = (time.perf_counter() - start) * 1e3
                    with lock:
                        invalid_latencies.append(elapsed)
                        if code == 200:
                            accepted_invalid.append(label)
                        elif isinstance(code, int) and 400 <= code < 500:
                            refused[label] += 1
                        else:
                            invalid_errors.append(f"invalid request {label!r} answered {code}"[:200])
                    continue
                x = rng.standard_normal((1, *IMAGE_SHAPE), dtype=np.float32)
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
            raw.close()

    alive_at_end = False
    try:
        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        try:  # alive and answering at the end
            probe = np.zeros((1, *IMAGE_SHAPE), np.float32)
            from tritonclient.http import InferInput

            inp = InferInput("images", list(probe.shape), "FP32")
            inp.set_data_from_numpy(probe)
            out = handle.client().infer("pipeline", [inp]).as_numpy("logits")
            alive_at_end = handle.running and np.allclose(out, eager(probe), atol=1e-4, rtol=1e-3)
        except Exception as exc:  # noqa: BLE001 - reported
            failures.append(f"final probe: {type(exc).__name__}: {exc}"[:200])
    finally:
        handle.stop()

    ordered, invalid_ordered = sorted(latencies), sorted(invalid_latencies)
    result = {
        "command": "python benchmarks/bench_load.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.machine(), "processor": platform.processor(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "clients": args.clients, "seconds": args.seconds, "invalid_share": args.invalid_share,
        "valid_ok": len(latencies), "valid_failed": len(failures), "wrong_results": wrong[0],
        "invalid_refused": refused, "invalid_accepted": len(accepted_invalid), "invalid_errors": len(invalid_errors),
        "server_alive_at_end": alive_at_end, "failures": failures[:10], "invalid_error_samples": invalid_errors[:10],
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall else None,
        "p50_ms": statistics.median(ordered) if ordered else None, "p99_ms": _percentile(ordered, 0.99),
        "invalid_p50_ms": statistics.median(invalid_ordered) if invalid_ordered else None,
        "invalid_p99_ms": _percentile(invalid_ordered, 0.99),
        "selected": status.selected(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    p50, p99 = result["p50_ms"] or float("nan"), result["p99_ms"] or float("nan")
    print(f"{args.clients} clients, {wall:.1f} s: {len(latencies)} valid ok, {len(failures)} failed, {wrong[0]} wrong; "
          f"{sum(refused.values())} invalid refused, {len(accepted_invalid)} accepted, {len(invalid_errors)} other; "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, {result['throughput_rps'] or 0:.0f} req/s; "
          f"server alive at the end: {alive_at_end} (load average {result['machine']['load_average'][0]:.1f}) "
          f"-> {args.out}")
    return result


if __name__ == "__main__":
    outcome = main()
    ok = outcome["valid_failed"] == 0 and outcome["wrong_results"] == 0 and outcome["server_alive_at_end"] \
        and outcome["invalid_accepted"] == 0 and outcome["invalid_errors"] == 0
    sys.exit(0 if ok else 1)
