"""Is the optimized SD pipeline's per-run overhead Python's garbage collector?

    python benchmarks/sd_gc_check.py WORKSPACE OUT.json

Loads the ``bench_sd_gpu.py`` workspace in a fresh process (the SD-2.1-sized pipeline on CUDA, the tiny one on a
CPU) and times the pipeline five times as it is, again, after ``gc.freeze()``, with the collector off, and as it is
once more; each with the collections per run and the number of tracked objects."""

import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_sd_gpu as b

import navdeploy as nav


def main(workspace: str, out_path: str) -> None:
    size = b.full_size() if torch.cuda.is_available() else b.tiny_size()
    pipe = b.wrap(b.build_pipeline(size))
    out: dict = {"command": " ".join(sys.argv), "loaded": nav.load_optimized(workspace)}
    t2i = b.Text2Image(pipe, size)
    t2i(b.PROMPT)

    def runs(label: str, n: int = 5) -> None:
        before = [s["collections"] for s in gc.get_stats()]
        stats = b.timed(lambda: t2i(b.PROMPT), n, size)
        after = [s["collections"] for s in gc.get_stats()]
        out[label] = {"median_ms": stats["median_s"] * 1000, "runs_ms": [x * 1000 for x in stats["runs_s"]],
                      "collections_per_run": [(a - c) / n for a, c in zip(after, before)],
                      "objects": len(gc.get_objects())}
        print(label, out[label], flush=True)

    runs("as_is")
    start = time.perf_counter()
    gc.collect()
    out["full_collect_ms"] = (time.perf_counter() - start) * 1000
    runs("as_is_again")
    gc.freeze()
    runs("after_freeze")
    gc.unfreeze()
    gc.disable()
    runs("gc_disabled")
    gc.enable()
    runs("as_is_last")
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
