"""The search against the exhaustive one, and against Model Navigator 0.14, in one run (issue 19).

    python benchmarks/bench_search.py [--only cnn,bert] [--mn-python /tmp/mn014/bin/python] [--quick-runs 3]
        [--out FILE]

Each optimize runs cold in a fresh process (a new workspace, nothing imported yet), timed around the
``nav.optimize`` call. The machine cache is warmed first (Inductor's ISA probe, once per machine; its cost is
reported as ``machine_probe_s``, what the first run on a new machine pays on top), so every run sees it alike.
Per model: the default search (``quick``), ``--quick-runs`` times (the first before Model Navigator, the next after
it and after the thorough run, so they meet the run's changing machine: the figure is their median, with their
range), and ``thorough=True``. Where a quick run's winner is not the thorough run's, both runs' workspaces are bound
(``nav.load_optimized``) in one fresh process and the two pipelines timed in turns (``head_to_head``): "same winner,
or within 5% of its latency" is read from that ratio, both winners timed in the same minute of the machine (its bf16
speed moves from minute to minute). Each quick winner's p50 at the captured batch in the thorough run's full
profile is reported too (``ratio_in_thorough_profile``; the check where the head-to-head fails to run). Then Model
Navigator 0.14's inplace optimize of
the same CNN (``benchmarks/mn014_cnn.py``, in its own venv, ``target_device=CPU``), between navdeploy's runs.
Writes ``benchmarks/results/search_cpu.json`` and prints a table. Figures from a shared machine are preliminary.

    python -m venv /tmp/mn014 && /tmp/mn014/bin/pip install torch==2.13.0 triton-model-navigator==0.14.0

Without NVIDIA's package index its ``tensorrt`` requirement does not install (a placeholder that downloads from
there); Model Navigator does not import TensorRT on CPU, so install it without it (``onnxruntime`` for
``onnxruntime-gpu``, no ``nvidia-modelopt``), as on the dev machine:

    python -m venv /tmp/mn014
    /tmp/mn014/bin/pip download --no-deps triton-model-navigator==0.14.0 -d /tmp/mnwheel
    /tmp/mn014/bin/pip install --no-deps torch==2.13.0 /tmp/mnwheel/triton_model_navigator-0.14.0-py3-none-any.whl
    /tmp/mn014/bin/pip install "dacite~=1.8" "fire>=0.4.0" "jsonlines>=3.1.0" "loguru>=0.7.2" "mpmath~=1.3" \
        "numpy<2" "onnx~=1.16" "onnx_graphsurgeon~=0.5" "onnxruntime~=1.20" onnxscript "packaging~=24.1" \
        "polygraphy>=0.49.0" "psutil>=5.7" "py-cpuinfo>=8.0" "pynvml~=11.5" "python-slugify~=8.0" "pyyaml~=6.0" \
        "tabulate>=0.8" "tritonclient[grpc]~=2.47" "wrapt>=1.16" "pyee>=11.1.0" "rich>=13.7.1" filelock \
        typing-extensions sympy networkx jinja2 fsspec "setuptools>=77.0.3"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = {"cnn_cold_optimize_s": 10.0, "cnn_vs_mn014_ratio": 1 / 3, "bert_cold_optimize_s": 40.0,
           "quick_winner_latency_ratio": 1.05}


def build(model: str):
    """The model, its nav.Module wrapping, the callable and the dataloader of one benchmark case."""
    import torch

    import navdeploy as nav

    if model == "cnn":
        sys.path.insert(0, str(ROOT / "examples"))
        from image_classifier import build_classifier

        module = nav.Module(build_classifier(), name="classifier")
        return module, module, [(1, torch.randn(1, 3, 64, 64)) for _ in range(4)], "classifier"
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128, num_labels=3)
    torch.manual_seed(0)
    module = nav.Module(BertForSequenceClassification(config).eval(), name="bert")

    def classify(input_ids, attention_mask):
        with torch.inference_mode():
            return module(input_ids=input_ids, attention_mask=attention_mask).logits

    data = []
    for batch, length, seed in ((2, 12, 1), (4, 32, 2)):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 1000, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, : length // 3] = 0  # left padding on one row
        data.append((batch, {"input_ids": ids, "attention_mask": mask}))
    return module, classify, data, "bert"


def child(model: str, mode: str, workspace: str, out: str) -> None:
    """One cold optimize in this (fresh) process; its figures go to ``out`` as JSON."""
    from navdeploy.workspace.machine_cache import machine_cache_root

    warm = any(machine_cache_root().glob("inductor-cpu-isa-*/*/*.so")) if machine_cache_root().is_dir() else False
    import navdeploy as nav
    from navdeploy.candidates.search import graph_search
    from navdeploy.workspace.manifest import read_manifest

    _, func, data, name = build(model)
    config = nav.OptimizeConfig(workspace=workspace, thorough=mode == "thorough")
    start = time.perf_counter()
    status = nav.optimize(func, data, config)
    seconds = time.perf_counter() - start
    module = status.modules[name]
    manifest = read_manifest(module.folder)
    graphs = []
    for graph in module.graphs:
        # The batch size selection compares candidates at (MinLatency: the profiled size for the captured batch).
        entry = manifest.graphs[graph.key].graph
        captured = entry.inputs[0].opt_shape[0] if entry.batching and entry.inputs else None
        batch = graph_search(config.strategy, False, entry.batching, captured, manifest.batch_sizes).batch
        records = []
        for c in graph.candidates:
            records.append({"name": c.name, "status": c.status, "error": (c.error or "")[:300],
                            "p50_ms_first": c.first_p50_ms(), "screen_ms": c.screen.p50_ms if c.screen else None,
                            "profile": [p.to_json() for p in c.profile],
                            "times": {k: v for k, v in c.times.items() if v is not None}})
        graphs.append({"key": graph.key, "selected": graph.selected, "batching": graph.batching, "batch": batch,
                       "candidates": records})
    Path(out).write_text(json.dumps({
        "model": model, "mode": mode, "optimize_s": seconds, "module_s": module.seconds,
        "machine_cache_warm": warm, "graphs": graphs,
        "pipeline": status.pipeline.to_json() if status.pipeline else None}, indent=2))


def head_to_head(model: str, workspaces: list[str], out: str, rounds: int = 20) -> None:
    """The pipeline bound to each workspace's winners (``nav.load_optimized``), all in this process, timed in turns:
    ``rounds`` rounds, each a pass over the dataloader (repeated to ~50 ms) per workspace, one after the other;
    the figure per workspace is the median pass. Both winners meet the same minute of the machine."""
    import torch

    import navdeploy as nav
    from navdeploy.capture.pytree import split_sample
    from navdeploy.inplace import registry

    pipelines = []
    for workspace in workspaces:
        registry.clear()  # names are unique among live modules: the pipeline bound before keeps its binding
        module, func, data, name = build(model)  # seeded: the same weights each time, so the fingerprint matches
        bound = nav.load_optimized(workspace=workspace)
        if not bound.get(name):
            raise RuntimeError(f"{name} did not bind to {workspace}")
        pipelines.append((module, func, data))

    def one_pass(func, data) -> None:
        for _, sample in data:
            args, kwargs = split_sample(sample)  # as nav.optimize calls it
            func(*args, **kwargs)

    with torch.inference_mode():
        for _, func, data in pipelines:
            for _ in range(3):
                one_pass(func, data)
        start = time.perf_counter()
        one_pass(pipelines[0][1], pipelines[0][2])
        repeats = max(1, int(0.05 / max(time.perf_counter() - start, 1e-6)))
        passes: list[list[float]] = [[] for _ in pipelines]
        for round_ in range(rounds):
            order = list(enumerate(pipelines))
            for i, (_, func, data) in order if round_ % 2 == 0 else reversed(order):  # neither always goes first
                start = time.perf_counter()
                for _ in range(repeats):
                    one_pass(func, data)
                passes[i].append((time.perf_counter() - start) / repeats * 1e3)
    Path(out).write_text(json.dumps({"workspaces": workspaces, "rounds": rounds, "repeats": repeats,
                                     "pass_ms": passes, "median_ms": [statistics.median(p) for p in passes]}))


def _run(args: list[str], timeout: float = 1800) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), NAVDEPLOY_REPORT="0"))
    return time.perf_counter() - start, done


def navdeploy_run(model: str, mode: str, kept: list[str]) -> dict:
    """One cold optimize in a fresh process and a new temporary workspace, appended to ``kept`` (removed by the
    caller once the head-to-head timings no longer need it)."""
    workspace = tempfile.mkdtemp(prefix=f"navdeploy-bench-{model}-{mode}-")
    kept.append(workspace)
    out = Path(workspace) / "result.json"
    wall, done = _run([sys.executable, __file__, "--child", model, "--mode", mode, "--workspace", workspace,
                       "--child-out", str(out)])
    if done.returncode != 0 or not out.is_file():
        return {"model": model, "mode": mode, "error": done.stderr[-3000:], "process_s": wall}
    result = json.loads(out.read_text())
    result["process_s"] = wall
    result["workspace"] = workspace
    return result


def in_turns(model: str, quick: dict, thorough: dict) -> Optional[dict]:
    """Where the quick run's winner is not the thorough run's: both bound in one fresh process and timed in turns
    (:func:`head_to_head`); the quick pipeline's median pass over the thorough one's."""
    if "workspace" not in quick or "workspace" not in thorough or \
            all(q["selected"] == t["selected"] for q, t in zip(quick["graphs"], thorough["graphs"])):
        return None
    out = Path(quick["workspace"]) / "head_to_head.json"
    try:
        _, done = _run([sys.executable, __file__, "--head-to-head", model, "--workspace", quick["workspace"],
                        "--workspace-b", thorough["workspace"], "--child-out", str(out)], timeout=600)
    except subprocess.TimeoutExpired:  # the profile ratio stands in
        return {"error": "timed out after 600 s"}
    if done.returncode != 0 or not out.is_file():
        return {"error": done.stderr[-3000:]}
    result = json.loads(out.read_text())
    quick_ms, thorough_ms = result["median_ms"]
    return {"quick_ms": quick_ms, "thorough_ms": thorough_ms, "ratio": quick_ms / thorough_ms,
            "rounds": result["rounds"], "pass_ms": result["pass_ms"]}


def quick_run(model: str, runs: list[dict], kept: list[str]) -> None:
    """One more cold optimize of the default search, appended to ``runs``."""
    runs.append(navdeploy_run(model, "quick", kept))
    print(f"{model} quick {len(runs)}: {runs[-1].get('optimize_s', float('nan')):.1f} s", flush=True)


def mn_run(mn_python: str) -> dict:
    folder = tempfile.mkdtemp(prefix="mn014-bench-")
    out = Path(folder) / "result.json"
    try:
        wall, done = _run([mn_python, str(HERE / "mn014_cnn.py"), "--out", str(out)])
        if done.returncode != 0 or not out.is_file():
            return {"error": (done.stdout + done.stderr)[-3000:], "process_s": wall}
        result = json.loads(out.read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["process_s"] = wall
    return result


def _p50_at(candidate: dict, batch) -> float | None:
    """p50 at ``batch`` in a candidate's full profile (its only point when the graph does not batch)."""
    for point in candidate["profile"]:
        if point["batch_size"] == batch or batch is None:
            return point["p50_ms"]
    return None


def compare(quick: dict, thorough: dict, turns: Optional[dict] = None) -> dict:
    """Same winner, or the quick winner within 5% of the thorough winner's latency, per graph: in the two
    pipelines timed in turns where that was measured (``turns``, :func:`in_turns`: both winners in the same
    minute of the machine), else the quick winner's p50 in the thorough run's full profile (one run, one minute:
    on this machine bf16 speed moves from minute to minute, so a thorough run in a fast-bf16 minute can pick a bf16
    build that the quick run's minute did not favour)."""
    rows = []
    for q, t in zip(quick.get("graphs", []), thorough.get("graphs", [])):
        by_name = {c["name"]: c for c in t["candidates"]}
        winner = by_name.get(t["selected"])
        chosen = by_name.get(q["selected"])
        batch = t.get("batch")
        best, mine = (_p50_at(winner, batch) if winner else None), (_p50_at(chosen, batch) if chosen else None)
        ratio = mine / best if best and mine else None
        rows.append({"graph": q["key"], "quick_winner": q["selected"], "thorough_winner": t["selected"],
                     "same_winner": q["selected"] == t["selected"], "ratio_in_thorough_profile": ratio,
                     "within_5_percent_in_thorough_profile": ratio is not None and ratio <= 1.05})
    pipeline_ratio = turns.get("ratio") if turns else None
    same = bool(rows) and all(r["same_winner"] for r in rows)
    if pipeline_ratio is not None:
        ok = same or pipeline_ratio <= 1.05
    else:
        ok = same or (bool(rows) and all(r["within_5_percent_in_thorough_profile"] for r in rows))
    return {"graphs": rows, "in_turns": turns, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="cnn,bert")
    parser.add_argument("--mn-python", default="/tmp/mn014/bin/python",
                        help="Model Navigator 0.14's venv python ('' skips the comparison)")
    parser.add_argument("--quick-runs", type=int, default=3, help="cold optimizes of the default search per model")
    parser.add_argument("--out", default=str(HERE / "results" / "search_cpu.json"))
    parser.add_argument("--child")
    parser.add_argument("--mode", default="quick")
    parser.add_argument("--workspace")
    parser.add_argument("--child-out")
    parser.add_argument("--head-to-head")
    parser.add_argument("--workspace-b")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.mode, args.workspace, args.child_out)
        return 0
    if args.head_to_head:
        head_to_head(args.head_to_head, [args.workspace, args.workspace_b], args.child_out)
        return 0

    import torch

    models = [m.strip() for m in args.only.split(",") if m.strip()]
    probe_s, done = _run([sys.executable, "-c", "from navdeploy.formats.inductor_probe import warm_cpu_isa; "
                          "warm_cpu_isa()"])
    results: dict = {"command": " ".join(["python benchmarks/bench_search.py", *sys.argv[1:]]),
                     "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "torch": torch.__version__, "load_average": os.getloadavg()},
                     "machine_probe_s": probe_s if done.returncode == 0 else None,
                     "targets": TARGETS, "models": {}}
    for model in models:
        runs: list[dict] = []
        kept: list[str] = []  # the runs' temporary workspaces, until the head-to-head timings are done
        try:
            quick_run(model, runs, kept)
            entry: dict = {"quick": runs[0], "quick_runs": runs}
            if model == "cnn" and args.mn_python and Path(args.mn_python).exists():
                entry["mn014"] = mn_run(args.mn_python)  # between navdeploy's runs: the same machine state
                print(f"cnn Model Navigator 0.14: {entry['mn014'].get('optimize_s', float('nan')):.1f} s",
                      flush=True)
            if args.quick_runs > 1:
                quick_run(model, runs, kept)
            entry["thorough"] = navdeploy_run(model, "thorough", kept)
            print(f"{model} thorough: {entry['thorough'].get('optimize_s', float('nan')):.1f} s", flush=True)
            while len(runs) < args.quick_runs:
                quick_run(model, runs, kept)
            turns = [in_turns(model, r, entry["thorough"]) for r in runs]
        finally:
            for workspace in kept:
                shutil.rmtree(workspace, ignore_errors=True)
        for r in [*runs, entry.get("thorough", {})]:
            r.pop("workspace", None)
        seconds = [r["optimize_s"] for r in runs if r.get("optimize_s")]
        entry["quick_s"] = {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
                            "runs": seconds} if seconds else None
        comparisons = [compare(r, entry["thorough"], t) for r, t in zip(runs, turns)]
        entry["comparison"] = comparisons[0]
        entry["comparisons"] = comparisons
        entry["every_quick_run_ok"] = all(c["ok"] for c in comparisons) and len(seconds) == len(runs)
        if "mn014" in entry and entry["mn014"].get("optimize_s") and entry["quick_s"]:
            entry["ratio_to_mn014"] = entry["quick_s"]["median"] / entry["mn014"]["optimize_s"]
        results["models"][model] = entry
    results["machine"]["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))

    from rich.console import Console
    from rich.table import Table

    table = Table(title="navdeploy search: cold optimize (fresh process, new workspace), preliminary")
    for col in ("model", "quick s (median [range])", "thorough s", "MN 0.14 s", "quick / MN", "quick winner",
                "thorough winner", "quick winner vs best"):
        table.add_column(col)
    for model, entry in results["models"].items():
        row = entry["comparison"]["graphs"][0] if entry["comparison"]["graphs"] else {}
        mn = entry.get("mn014", {}).get("optimize_s")
        ratio = row.get("ratio_in_thorough_profile")
        q = entry["quick_s"]
        same = all(r.get("same_winner") for c in entry["comparisons"] for r in c["graphs"])
        turns = [c["in_turns"]["ratio"] for c in entry["comparisons"] if (c.get("in_turns") or {}).get("ratio")]
        table.add_row(model, f"{q['median']:.1f} [{q['min']:.1f}-{q['max']:.1f}] n={len(q['runs'])}" if q else "-",
                      f"{entry['thorough'].get('optimize_s', float('nan')):.1f}", f"{mn:.1f}" if mn else "-",
                      f"{entry['ratio_to_mn014']:.2f}" if "ratio_to_mn014" in entry else "-",
                      str(row.get("quick_winner")), str(row.get("thorough_winner")),
                      "same in every run" if same else
                      (f"{ratio:.2f}x in the thorough profile (first run)" if ratio else "-") +
                      (f"; in turns {', '.join(f'{t:.2f}x' for t in turns)}" if turns else ""))
    Console().print(table)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
