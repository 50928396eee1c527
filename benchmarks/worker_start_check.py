"""How long two workers take to be ready: spawned (each imports torch and the model's modules, as navdeploy's do)
against a fork server that imports them once and forks the workers. The parent stays busy for 1.2 s meanwhile, as
it does while it captures the pipeline.

    python benchmarks/worker_start_check.py [--runs 3]

Each start method runs in a fresh process, alternating; the figures are seconds from the first start to each
worker's "ready" (results: benchmarks/results/worker_start_session29.txt)."""

from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import subprocess
import sys
import time

MODULES = ["torch", "transformers.models.bert.modeling_bert"]


def _work(queue, t0: float) -> None:
    for name in MODULES:
        importlib.import_module(name)
    queue.put(time.time() - t0)


def _one(method: str) -> None:
    import torch  # noqa: F401 - the parent has torch, as a user's process does

    t0 = time.time()
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(MODULES)
    queue = ctx.Queue()
    workers = [ctx.Process(target=_work, args=(queue, t0)) for _ in range(2)]
    for worker in workers:
        worker.start()
    end = time.time() + 1.2
    while time.time() < end:  # the parent captures meanwhile
        pass
    ready = sorted(queue.get() for _ in workers)
    for worker in workers:
        worker.join()
    print(f"{method:10s} ready after " + " / ".join(f"{s:.2f}" for s in ready) + " s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=("spawn", "forkserver"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _one(args.child)
        return
    for _ in range(args.runs):
        for method in ("spawn", "forkserver"):
            subprocess.run([sys.executable, __file__, "--child", method], check=True)


if __name__ == "__main__":
    main()
