"""Instructions per routed call of an optimized module, counted by callgrind: a measure of navdeploy's routing cost
that other processes on a shared machine do not disturb (timings do; see bench_core.py for those).

    python benchmarks/routing_instructions.py [--workspace DIR] [--calls 200] [--out result.json]

A Linear(4, 4) and a module of 100 parameter tensors are optimized once (TorchScript, bound by hand whatever the
profile said) into the workspace, then a child process binds them from it and runs under
``valgrind --tool=callgrind``, which dumps its counters at each ``os.getppid()``: the segments between two are
``--calls`` calls of one thing. The runner is replaced by a function returning a fixed output, so what is counted
is the routing alone: the module call minus that function called directly, the handler, the route lookup and the
weights check. To compare two versions, run the same command with ``PYTHONPATH`` set to each checkout (the
workspace is reused). Needs valgrind; takes a few minutes (torch's import under callgrind).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

SEGMENTS = ("module call", "runner stand-in", "handler call", "weights check", "empty call")
MODULES = {"linear": lambda: nn.Linear(4, 4).eval(),
           "params100": lambda: nn.Sequential(*[nn.Linear(4, 4) for _ in range(50)]).eval()}


def prepare(workspace: Path) -> None:
    """Optimize each module once into ``workspace`` (skipped when its manifest is there) and select TorchScript."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_core import bound_to_runner

    for name, make in MODULES.items():
        if not (workspace / f"instr_{name}" / "manifest.json").exists():
            torch.manual_seed(0)
            bound_to_runner(make(), f"instr_{name}", torch.randn(1, 4), workspace)


def measure(workspace: Path, name: str, calls: int) -> None:
    """Under callgrind: bind, warm up, then one segment per entry of SEGMENTS."""
    import navdeploy as nav
    from navdeploy.inplace.binding import bind

    torch.manual_seed(0)
    module = nav.Module(MODULES[name](), name=f"instr_{name}")
    if not bind(module, workspace / module.name) or not module.is_optimized:
        raise SystemExit(f"could not bind {module.name} from {workspace}")
    handler = module.nav_state.handler
    x = torch.randn(1, 4)
    with torch.no_grad():
        (key, (graph, run)), = handler.graphs.items()
        output = run([x])
        handler.graphs[key] = (graph, lambda inputs: output)  # what is left is the routing
        stand_in = handler.graphs[key][1]
        watch = handler.watch
        segments = [lambda: module(x), lambda: stand_in([x]), lambda: handler(module.__wrapped__, (x,), {}),
                    lambda: watch.reason([x]), lambda: None]
        for segment in segments:
            for _ in range(50):
                segment()
        os.getppid()
        for segment in segments:
            for _ in range(calls):
                segment()
            os.getppid()


def count(workspace: Path, name: str, calls: int, folder: Path) -> dict[str, float]:
    """Instructions per call of each segment, from a callgrind run of ``measure`` in a child process."""
    out = folder / name
    command = ["valgrind", "--tool=callgrind", "--dump-before=getppid", f"--callgrind-out-file={out}",
               sys.executable, __file__, "--measure", name, "--workspace", str(workspace), "--calls", str(calls)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dumps = sorted(folder.glob(f"{name}.*"), key=lambda p: int(p.suffix[1:]))[1:]  # the first is the start-up
    totals = []
    for dump in dumps[:len(SEGMENTS)]:
        line = next(line for line in dump.read_text().splitlines() if line.startswith("summary:"))
        totals.append(int(line.split()[1]) / calls)
    result = dict(zip(SEGMENTS, totals))
    result["routing (module call - runner stand-in)"] = result["module call"] - result["runner stand-in"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=str(Path(tempfile.gettempdir()) / "navdeploy-routing-instructions"))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workspace = Path(args.workspace)
    if args.measure:
        measure(workspace, args.measure, args.calls)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    prepare(workspace)
    folder = Path(tempfile.mkdtemp(prefix="navdeploy-callgrind-"))
    result = {name: count(workspace, name, args.calls, folder) for name in MODULES}
    import navdeploy

    result["navdeploy"] = str(Path(navdeploy.__file__).parent)
    for name in MODULES:
        print(f"{name}:")
        for segment, value in result[name].items():
            print(f"  {segment:40s} {value:10.0f} instructions/call")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
