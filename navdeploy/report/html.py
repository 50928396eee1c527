"""A self-contained HTML report of an optimize run: plots (inline SVG from matplotlib), correctness, failures,
time per step, the environment. No network is needed to view it.

    render_report(status, path)          the report of a ``nav.optimize`` run (an OptimizeStatus)
    write_run_report(status)             the same into <workspace>/reports/report-<timestamp>.html and latest.html
    render_workspace_report(workspace)   regenerate it from the workspace's manifests (``navdeploy report``)

matplotlib is optional (``pip install "navdeploy[report]"``): without it the report has tables and no plots.
It is imported only here, and only its object-oriented API is used (``Figure`` + the SVG backend), so the
backend of a user's own pyplot session is never changed.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import platform
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import jinja2

from navdeploy.config import DEFAULT_TOLERANCES
from navdeploy.templates_dir import templates_dir
from navdeploy.workspace.atomic import write_json_atomic
from navdeploy.workspace.identity import module_folders, report_replaceable
from navdeploy.workspace.layout import REPORTS_DIR
from navdeploy.workspace.manifest import read_manifest
from navdeploy.workspace.records import CandidateRecord, Manifest

log = logging.getLogger("navdeploy")

if TYPE_CHECKING:
    from navdeploy.optimize.status import OptimizeStatus

TEMPLATES = templates_dir()
RUN_RECORD = "latest.json"
_EAGER = ("TorchCPU", "TorchCUDA")
_COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#1b9e77", "#d95f02"]
_WINNER = "#c9a000"
_ERR_FLOOR = 1e-12  # zero errors are drawn here on the log axis


# --- environment ----------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_environment() -> dict[str, str]:
    """Versions and hardware that the figures depend on."""
    env: dict[str, str] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu": f"{_cpu_name()} ({os.cpu_count()} logical cores)"}
    try:
        from navdeploy._version import __version__

        env["navdeploy"] = __version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda (torch build)"] = torch.version.cuda or "none (CPU build)"
        if torch.cuda.is_available():
            env["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        else:
            env["gpu"] = "none visible"
    except Exception:  # noqa: BLE001 - a report never fails on this
        pass
    for package in ("onnxruntime", "onnx", "tensorrt", "torch_tensorrt"):
        try:
            module = __import__(package)
            env[package] = getattr(module, "__version__", "?")
            if package == "onnxruntime":
                env["onnxruntime providers"] = ", ".join(module.get_available_providers())
        except Exception:  # noqa: BLE001 - a package missing or broken is left out of the environment
            continue
    return env


# --- collecting the data --------------------------------------------------------------------------------------
def _tolerance(manifest: Manifest, precision: str) -> tuple[float, float]:
    tol = manifest.tolerances.get(precision)
    if tol:
        return float(tol[0]), float(tol[1])
    return DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])


def _times(candidate: CandidateRecord) -> dict[str, float]:
    return {k: float(v) for k, v in candidate.times.items() if isinstance(v, (int, float))}


def _candidate_view(c: CandidateRecord, manifest: Manifest, selected: Optional[str]) -> dict:
    """What the template shows of one candidate: its record's JSON, plus tolerances, winner and best throughput."""
    atol, rtol = _tolerance(manifest, c.precision_in(manifest.precision))
    profile = sorted((m.to_json() for m in c.profile), key=lambda p: p["batch_size"])
    return {**c.to_json(), "name": c.name, "atol": atol, "rtol": rtol, "profile": profile,
            "winner": c.name == selected, "times": _times(c), "best_throughput": c.best_throughput()}


def _module_view(manifest: Manifest, graph_keys: Optional[list[str]], seconds: Optional[float],
                 optimized: Optional[bool], folder: Path) -> dict:
    graphs = []
    keys = graph_keys if graph_keys is not None else list(manifest.graphs)
    for key in keys:
        entry = manifest.graphs.get(key)
        if entry is None:
            continue
        candidates = [_candidate_view(c, manifest, entry.selected) for c in entry.candidates]
        info = entry.graph.to_json() if entry.graph is not None else {}
        batch = None
        if info.get("batching") and info.get("inputs"):
            batch = info["inputs"][0].get("opt_shape", [None])[0]
        counts = info.get("batch_counts") or {}
        mix = ", ".join(f"batch {b} ×{n}" for b, n in sorted(counts.items(), key=lambda kv: int(kv[0])))
        graphs.append({"key": key, "selected": entry.selected, "candidates": candidates,
                       "batching": bool(info.get("batching")), "calls": info.get("calls"), "batch": batch,
                       "mix": mix if len(counts) > 1 else "",
                       "inputs": info.get("inputs") or [], "outputs": info.get("outputs") or [],
                       "failed": [c for c in candidates if c["status"] == "failed"],
                       "skipped": [c for c in candidates if c["status"] == "skipped"],
                       "screened": [c for c in candidates if c["status"] == "screened"]})
    steps = {"export_s": 0.0, "load_s": 0.0, "verify_s": 0.0, "profile_s": 0.0}
    cached = 0
    for g in graphs:
        for c in g["candidates"]:
            if c.get("cached"):
                cached += 1
                continue
            for k in steps:
                steps[k] += c["times"].get(k, 0.0)
            steps["profile_s"] += c["times"].get("screen_s", 0.0)  # a screen is a short profile
    return {"name": manifest.module, "device": manifest.device, "precision": manifest.precision,
            "class": manifest.class_name or "", "folder": str(folder), "seconds": seconds, "optimized": optimized,
            "updated": manifest.updated, "batch_sizes": manifest.batch_sizes, "graphs": graphs,
            "steps": steps, "cached": cached}


def _run_view(modules: list[dict], pipeline: Optional[dict], env: dict, command: Optional[str],
              workspace: Optional[Path], seconds: Optional[float], created: str, regenerated: bool) -> dict:
    run: dict[str, Any] = {"modules": modules, "env": env, "workspace": str(workspace) if workspace else None,
                           "seconds": seconds, "created": created, "regenerated": regenerated,
                           "command": command, "pipeline": None}
    if pipeline:
        eager, opt = pipeline.get("eager_s") or 0.0, pipeline.get("optimized_s")
        shares = []
        names = [m["name"] for m in modules] or list(pipeline.get("module_eager_s", {}))
        for name in names:
            e = pipeline.get("module_eager_s", {}).get(name)
            o = pipeline.get("module_optimized_s", {}).get(name)
            shares.append({"name": name, "eager_s": e, "optimized_s": o,
                           "eager_pct": 100.0 * e / eager if e is not None and eager else None,
                           "optimized_pct": 100.0 * o / opt if o is not None and opt else None})
        other_e = eager - sum(s["eager_s"] or 0.0 for s in shares)
        other_o = (opt - sum(s["optimized_s"] or 0.0 for s in shares)) if opt else None
        shares.append({"name": "rest of the pipeline", "eager_s": max(other_e, 0.0),
                       "optimized_s": max(other_o, 0.0) if other_o is not None else None,
                       "eager_pct": 100.0 * max(other_e, 0.0) / eager if eager else None,
                       "optimized_pct": 100.0 * max(other_o, 0.0) / opt if opt and other_o is not None else None,
                       "rest": True})
        run["pipeline"] = {**pipeline, "speedup": (eager / opt) if opt and eager else None, "shares": shares}
    return run


def _reproduce(module: str, workspace: Optional[str], command: Optional[str]) -> str:
    script = shlex.quote(command) if command else "your_script.py"
    ws = f" -w {shlex.quote(workspace)}" if workspace else ""
    return (f"navdeploy clean {shlex.quote(module)}{ws} --yes\n"
            f"NAVDEPLOY_CONSOLE_OUTPUT=detailed NAVDEPLOY_USE_MULTIPROCESSING=False python {script}")


# --- plots ----------------------------------------------------------------------------------------------------
def _matplotlib() -> Optional[Any]:
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401 - checks the OO API is importable
    except ImportError:
        return None
    return matplotlib


class _Plotter:
    """Figures as inline SVG strings; each gets its own id salt so several SVGs can share one page."""

    def __init__(self, matplotlib: Any):
        self.mpl = matplotlib
        self.count = 0

    def _svg(self, fig: Any) -> str:
        self.count += 1
        buf = io.StringIO()
        with self.mpl.rc_context({"svg.hashsalt": f"navdeploy-{self.count}", "svg.fonttype": "none"}):
            fig.savefig(buf, format="svg", bbox_inches="tight")
        text = buf.getvalue()
        text = text[text.index("<svg"):]
        return re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.S)  # RDF boilerplate

    def _figure(self, width: float, height: float) -> Any:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(width, height), dpi=100)
        fig.patch.set_alpha(0)
        return fig

    @staticmethod
    def _style(ax: Any) -> None:
        ax.grid(True, which="major", color="#dddddd", linewidth=0.8)
        ax.grid(True, which="minor", color="#f0f0f0", linewidth=0.5)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.set_axisbelow(True)

    def performance(self, graph: dict) -> Optional[str]:
        """p50 latency and throughput vs batch size, one line per candidate; the winner thick, gold, starred."""
        measured = [c for c in graph["candidates"] if c["profile"]]
        # A graph that does not batch is profiled once, at its captured shapes (no batch size): the table says it.
        if not measured or any(p["batch_size"] is None for c in measured for p in c["profile"]):
            return None
        from matplotlib.ticker import NullLocator

        fig = self._figure(10.5, 3.3)
        lat, thr = fig.subplots(1, 2)
        sizes = sorted({p["batch_size"] for c in measured for p in c["profile"]})
        for i, c in enumerate(measured):
            xs = [p["batch_size"] for p in c["profile"]]
            style: dict[str, Any] = {"color": _COLORS[i % len(_COLORS)], "linewidth": 1.6, "marker": "o",
                                     "markersize": 4, "alpha": 0.9, "label": c["name"]}
            if c["winner"]:
                style.update(color=_WINNER, linewidth=3.2, marker="*", markersize=13, alpha=1.0, zorder=5,
                             label=f"\u2605 {c['name']} (winner)", markeredgecolor="#6b5500")
            elif c["status"] != "ok":
                style.update(linestyle=":", label=f"{c['name']} ({c['status']})")
            lat.plot(xs, [p["p50_ms"] for p in c["profile"]], **style)
            style.pop("label")
            thr.plot(xs, [p["throughput"] for p in c["profile"]], **style)
        for ax, title, ylabel, key in ((lat, "Latency (p50) vs batch size", "ms per batch", "p50_ms"),
                                       (thr, "Throughput vs batch size", "samples / s", "throughput")):
            values = [p[key] for c in measured for p in c["profile"] if p.get(key)]
            ax.set_xscale("log", base=2)
            if values and max(values) / max(min(values), 1e-12) > 20:  # a wide spread: log scale
                ax.set_yscale("log")
                ylabel += " (log)"
            else:
                ax.set_ylim(0, max(values or [1]) * 1.12)
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(s) for s in sizes])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=11, loc="left")
            self._style(ax)
        handles, labels = lat.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False, fontsize=9,
                   bbox_to_anchor=(0.5, -0.02))
        fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(labels) - 1) // 4), 1, 1))
        return self._svg(fig)

    def correctness(self, graph: dict) -> Optional[str]:
        """Max abs and rel error vs eager per candidate (log axis), each candidate's tolerance drawn as a red line."""
        rows = [c for c in graph["candidates"] if c.get("max_abs_err") is not None or c.get("max_rel_err") is not None]
        if not rows:
            return None
        fig = self._figure(10.5, 1.4 + 0.36 * len(rows))
        axes = fig.subplots(1, 2, sharey=True)
        labels = [("\u2605 " if c["winner"] else "") + c["name"] for c in rows]
        ys = list(range(len(rows)))
        for ax, key, tol_key, title in ((axes[0], "max_abs_err", "atol", "max abs error vs eager"),
                                        (axes[1], "max_rel_err", "rtol", "max rel error vs eager")):
            values = [c.get(key) for c in rows]
            shown = [v if v else 0.0 for v in values]  # zero (exact) or missing: no bar, a label instead
            colors = [_WINNER if c["winner"] else ("#59a14f" if c["status"] == "ok" else "#e15759") for c in rows]
            ax.barh(ys, [max(v, _ERR_FLOOR) - _ERR_FLOOR if v else 0.0 for v in shown], color=colors, height=0.6,
                    left=_ERR_FLOOR)
            for y, c in zip(ys, rows):
                ax.plot([c[tol_key]] * 2, [y - 0.42, y + 0.42], color="#c0392b", linewidth=2, linestyle="--",
                        label=f"tolerance ({tol_key})" if y == 0 else None, zorder=4)
            for y, v in zip(ys, values):
                if not v:
                    ax.text(_ERR_FLOOR * 2, y, "0 (exact)" if v == 0 else "not measured", va="center", fontsize=8,
                            color="#555")
            ax.set_xscale("log")
            top = max(max(shown), max(c[tol_key] for c in rows))
            ax.set_xlim(_ERR_FLOOR, top * 20)
            ax.set_title(title, fontsize=11, loc="left")
            self._style(ax)
            ax.grid(False, axis="y")
        axes[0].set_yticks(ys)
        axes[0].set_yticklabels(labels, fontsize=9)
        axes[0].invert_yaxis()
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, ["tolerance of the candidate's precision (atol, rtol)"], loc="lower center",
                   frameon=False, fontsize=9, bbox_to_anchor=(0.5, -0.02))
        fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
        return self._svg(fig)


# --- rendering ------------------------------------------------------------------------------------------------
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)

    def num(value: Optional[float], spec: str = ".3f") -> str:
        return "–" if value is None or isinstance(value, jinja2.Undefined) else format(value, spec)

    def dur(value: Optional[float]) -> str:
        if value is None or isinstance(value, jinja2.Undefined):
            return "–"
        if value < 1e-3:
            return f"{value * 1e6:.0f} µs"
        if value < 1:
            return f"{value * 1e3:.1f} ms"
        return f"{value:.2f} s"

    env.filters["num"] = num
    env.filters["dur"] = dur
    env.filters["shape"] = lambda spec: "×".join(
        str(lo) if lo == hi else f"{lo}–{hi}" for lo, hi in zip(spec.get("min_shape", []), spec.get("max_shape", [])))
    return env


def _render(run: dict, path: Path) -> Path:
    mpl = _matplotlib()
    plotter = _Plotter(mpl) if mpl is not None else None
    for m in run["modules"]:
        for g in m["graphs"]:
            g["reproduce"] = _reproduce(m["name"], run["workspace"], run["command"])
            g["perf_svg"] = g["corr_svg"] = None
            if plotter is not None:
                g["perf_svg"] = plotter.performance(g)
                g["corr_svg"] = plotter.correctness(g)
        total = sum(m["steps"].values())
        m["steps_pct"] = {k: (100.0 * v / total if total else 0.0) for k, v in m["steps"].items()}
    page = _environment().get_template("report.html.j2").render(
        run=run, plots=plotter is not None, plots_note=None if plotter is not None else
        'matplotlib is not installed: this report has no plots. pip install "navdeploy[report]" and run '
        "`navdeploy report` to regenerate it with plots.",
        title=f"navdeploy report · {', '.join(m['name'] for m in run['modules']) or 'no modules'}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _status_run(status: "OptimizeStatus", env: Optional[dict] = None, created: Optional[str] = None) -> dict:
    """The run record of a status: what a later ``navdeploy report`` needs beyond the manifests."""
    return {"created": created or _dt.datetime.now().isoformat(timespec="seconds"),
            "workspace": str(status.workspace) if status.workspace else None, "command": status.command,
            "seconds": status.seconds, "pipeline": status.pipeline.to_json() if status.pipeline else None,
            "env": env or collect_environment(),
            "modules": {n: {"folder": str(m.folder), "graphs": [g.key for g in m.graphs], "seconds": m.seconds,
                            "bind_s": m.bind_s, "optimized": m.optimized} for n, m in status.modules.items()}}


def _modules_from_record(record: dict) -> list[dict]:
    modules = []
    for _name, info in record["modules"].items():
        folder = Path(info["folder"])
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        modules.append(_module_view(manifest, info.get("graphs"), info.get("seconds"), info.get("optimized"), folder))
    return modules


def render_report(status: "OptimizeStatus", path: str | Path) -> Path:
    """Write the HTML report of an optimize run to ``path``; returns the path."""
    record = _status_run(status)
    run = _run_view(_modules_from_record(record), record["pipeline"], record["env"], record["command"],
                    status.workspace, status.seconds, record["created"], regenerated=False)
    return _render(run, Path(path))


def write_run_report(status: "OptimizeStatus") -> Path:
    """``<workspace>/reports/report-<timestamp>.html`` (and ``latest.html``, ``latest.json`` to regenerate it)."""
    from navdeploy.config import default_workspace

    workspace = Path(status.workspace) if status.workspace else default_workspace()
    folder = workspace / REPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"report-{stamp}.html", 1
    while path.exists():
        n += 1
        path = folder / f"report-{stamp}-{n}.html"
    record = _status_run(status)
    run = _run_view(_modules_from_record(record), record["pipeline"], record["env"], record["command"],
                    workspace, status.seconds, record["created"], regenerated=False)
    _render(run, path)
    latest = folder / "latest.html"
    if not report_replaceable(latest):  # a reports/ folder of the user's (a workspace that is a project folder)
        log.warning("%s is not a navdeploy report: left as it is; this run's report is %s", latest, path)
        return path
    tmp = folder / ".latest.html.tmp"
    tmp.write_bytes(path.read_bytes())
    os.replace(tmp, latest)
    if report_replaceable(folder / RUN_RECORD):
        write_json_atomic(folder / RUN_RECORD, record)
    return path




def render_workspace_report(workspace: str | Path, path: Optional[str | Path] = None) -> Path:
    """Regenerate the report from the workspace: every module with a manifest; the pipeline summary, command and
    environment of the latest optimize run when ``reports/latest.json`` exists. Default path:
    ``<workspace>/reports/latest.html``. Raises FileNotFoundError when the workspace holds no manifest."""
    workspace = Path(workspace)
    record: dict = {}
    record_path = workspace / REPORTS_DIR / RUN_RECORD
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
    last = record.get("modules") or {}
    modules = []
    if workspace.is_dir():
        for folder in module_folders(workspace):  # not the user's folders beside them
            manifest = read_manifest(folder)
            if manifest is None:
                continue
            info = last.get(manifest.module, {})
            modules.append(_module_view(manifest, None, info.get("seconds"), info.get("optimized"), folder))
    if not modules:
        raise FileNotFoundError(f"no optimized modules in {workspace}; run nav.optimize first or pass --workspace.")
    pipeline = record.get("pipeline")
    run = _run_view(modules, pipeline, collect_environment(), record.get("command"), workspace,
                    record.get("seconds"), _dt.datetime.now().isoformat(timespec="seconds"), regenerated=True)
    if record.get("env"):
        run["env"] = record["env"]
    run["recorded"] = record.get("created")
    if path is None:
        path = workspace / REPORTS_DIR / "latest.html"
        if not report_replaceable(path):
            raise FileExistsError(f"{path} is not a navdeploy report and stays as it is; pass --output (path=) to "
                                  "write the report elsewhere.")
    return _render(run, Path(path))


__all__ = ["collect_environment", "render_report", "render_workspace_report", "write_run_report"]
