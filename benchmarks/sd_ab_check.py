"""The optimized SD pipeline against the by-hand ``torch.compile(pipe.unet, mode="reduce-overhead")`` one, in ONE
process, alternating passes: a comparison that drift between processes cannot tilt.

    python benchmarks/sd_ab_check.py WORKSPACE OUT.json [PAIRS]

WORKSPACE is a ``bench_sd_gpu.py`` workspace (SD-2.1-sized on CUDA, tiny on a CPU). On the H200 (session 11) the
by-hand UNet crashed inside torch's CUDA-graph trees next to navdeploy's CUDA-graph runners
(``benchmarks/results/sd_ab_check_h200_session11.txt``)."""

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_sd_gpu as b

import navdeploy as nav


def main(workspace: str, out_path: str, pairs: int) -> None:
    size = b.full_size() if torch.cuda.is_available() else b.tiny_size()
    ours = b.Text2Image(b.wrap(b.build_pipeline(size)), size)
    out: dict = {"command": " ".join(sys.argv), "loaded": nav.load_optimized(workspace)}
    hand_pipe = b.build_pipeline(size)
    hand_pipe.unet = torch.compile(hand_pipe.unet, mode="reduce-overhead")
    hand = b.Text2Image(hand_pipe, size)
    start = time.perf_counter()
    hand(b.PROMPT)
    out["by_hand_first_call_s"] = time.perf_counter() - start
    pipelines = {"navdeploy": ours, "by_hand": hand}
    for _ in range(2):
        for fn in pipelines.values():
            fn(b.PROMPT)
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    images = {}
    for _ in range(pairs):
        for name, fn in pipelines.items():
            stats = b.timed(lambda fn=fn: fn(b.PROMPT), 1, size)
            times[name].append(stats["median_s"] * 1000)
            images[name] = stats["_result"]
    for name, ms in times.items():
        out[name] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs_ms": ms}
    out["by_hand_over_navdeploy"] = out["by_hand"]["median_ms"] / out["navdeploy"]["median_ms"]
    out["navdeploy_faster_in_pairs"] = sum(a < h for a, h in zip(times["navdeploy"], times["by_hand"]))
    out["image_max_abs_diff"] = float(np.abs(images["navdeploy"] - images["by_hand"]).max())
    print(json.dumps(out, indent=1))
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 8)
