"""The ``navdeploy`` command: optimize, look at and tidy a workspace, and deploy it to Triton.

    navdeploy optimize my_pipeline.py            # run a script that wraps modules and calls nav.optimize
    navdeploy optimize my_pkg.pipeline:optimize  # or call a function that does
    navdeploy status                 # what the workspace holds: modules, graphs, winners, figures
    navdeploy report --open          # regenerate the HTML report from the workspace and open it
    navdeploy clean unet --yes       # forget one module's results (the next optimize rebuilds them)
    navdeploy export-repo model_repository --backend python   # a Triton model repository from the workspace
    navdeploy validate-repo model_repository                  # Triton's own checks, offline
    navdeploy serve examples/stable_diffusion.py:make_server_pipeline --factory   # a Python pipeline via PyTriton
    navdeploy serve-repo model_repository                     # serve it with the tritonserver in nvidia-pytriton
"""

from __future__ import annotations

import contextlib
import json
import logging
import runpy
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from navdeploy.config import CONSOLE_MODES, default_workspace, run_defaults
from navdeploy.formats.registry import EAGER_RUNNER
from navdeploy.workspace.identity import module_folders
from navdeploy.workspace.manifest import load_manifest
from navdeploy.workspace.records import CandidateRecord

app = typer.Typer(help="navdeploy: optimize PyTorch modules in place, verify them, deploy them.", no_args_is_help=True)
_console = Console()

WorkspaceOption = typer.Option(None, "--workspace", "-w", help="Workspace folder (default: $NAVDEPLOY_WORKSPACE "
                               "or ~/.cache/navdeploy).")


def _workspace(path: Optional[Path]) -> Path:
    return path if path is not None else default_workspace()


def _missing(path: Path) -> str:
    """Why ``path`` is not a folder, in words: it is a file, or it does not exist."""
    return "is a file, not a workspace folder" if path.exists() else "does not exist"


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print one readable line (never wrapped, no traceback) and return the Exit to raise."""
    _console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def _warn(message: str) -> None:
    """Print one warning line (never wrapped)."""
    _console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show the warnings navdeploy raises inside the block as one line each, not Python's two-line form."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:  # also when the block fails: the warnings often say why
            for w in caught:
                _warn(str(w.message).removeprefix("navdeploy: "))


@contextlib.contextmanager
def _quiet_log() -> Iterator[None]:
    """Keep navdeploy's log records out of the terminal inside the block (Python prints a library's warnings
    when no handler is set): the command prints each problem once, as one line."""
    log = logging.getLogger("navdeploy")
    handler = logging.NullHandler()
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_spec(target: str) -> bool:
    """``module:function`` or ``path/file.py:function`` (a drive letter such as ``C:\\x.py`` is not a spec)."""
    head, sep, attr = target.rpartition(":")
    return bool(sep and head and attr and not any(c in attr for c in "/\\") and not attr.endswith(".py"))


def _load_function(spec: str) -> Callable[[], Any]:
    """The object a ``module:function`` / ``path/file.py:function`` spec names; errors are ``typer.Exit``."""
    from navdeploy.errors import NavdeployError
    from navdeploy.serving import load_callable

    try:
        obj = load_callable(spec)
    except NavdeployError as exc:
        raise _fail(str(exc)) from exc
    except SyntaxError as exc:
        raise _fail(f"cannot import {spec.rpartition(':')[0]!r}: SyntaxError: {exc.msg} "
                    f"({exc.filename}, line {exc.lineno})") from exc
    except Exception as exc:  # an import error inside the user's module: one line, no traceback
        raise _fail(f"cannot import {spec.rpartition(':')[0]!r}: {_one_line(exc)}") from exc
    if not callable(obj):
        raise _fail(f"{spec!r} is a {type(obj).__name__}, not a function to call.")
    return obj


def _run_script(path: Path) -> None:
    """Run ``path`` as ``__main__`` in this process (like ``python path``), so its own nav.optimize call runs."""
    script = path.resolve()
    argv, sys_path0 = sys.argv[:], list(sys.path)
    sys.argv = [str(script)]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
        sys.path[:] = sys_path0


@app.command()
def optimize(target: str = typer.Argument(..., help="path/to/script.py (run as __main__), or module:function / "
                                          "path/file.py:function (called with no arguments)."),
             workspace: Optional[Path] = typer.Option(None, "--workspace", "-w", help="Workspace folder for this "
                                                      "run (instead of $NAVDEPLOY_WORKSPACE)."),
             console: Optional[str] = typer.Option(None, "--console", help="simple, detailed or logs (instead "
                                                   "of $NAVDEPLOY_CONSOLE_OUTPUT)."),
             thorough: bool = typer.Option(False, "--thorough", help="Build and profile every candidate in full "
                                           "(the exhaustive search) instead of screening them.")) -> None:
    """Run a script or function that wraps modules with nav.Module and calls nav.optimize.

    A script runs in this process as __main__ (its `if __name__ == "__main__":` block runs); a
    module:function or path/file.py:function is imported and called with no arguments.

    Examples: navdeploy optimize examples/image_classifier.py -w ./workspace;
    navdeploy optimize my_pkg.pipeline:optimize --console detailed --thorough
    """
    from navdeploy.errors import NavdeployError

    if console is not None:
        console = console.strip().lower()
        if console not in CONSOLE_MODES:
            raise _fail(f"--console must be simple, detailed or logs, not {console!r}", 2)
    is_spec = _is_spec(target)
    if not is_spec:
        path = Path(target)
        if not path.is_file():
            hint = "" if target.endswith(".py") else " (give path/to/script.py, module:function or file.py:function)"
            raise _fail(f"script {target!r} does not exist{hint}.")
    # Passed in-process as the defaults of the script's own nav.optimize calls: the environment stays the
    # user's settings, untouched, for the script and whatever it starts.
    ws = workspace.expanduser().resolve() if workspace is not None else None
    with run_defaults(workspace=ws, console=console, thorough=True if thorough else None):
        if is_spec:
            func = _load_function(target)
            try:
                func()
            except NavdeployError as exc:
                raise _fail(str(exc)) from exc
        else:
            try:
                _run_script(path)
            except NavdeployError as exc:
                raise _fail(str(exc)) from exc
            except SyntaxError as exc:
                raise _fail(f"cannot run {target!r}: SyntaxError: {exc.msg} ({exc.filename}, "
                            f"line {exc.lineno})") from exc
            except ImportError as exc:
                raise _fail(f"cannot run {target!r}: {_one_line(exc)}") from exc
            except SystemExit as exc:  # sys.exit() in the script: keep its exit code
                if exc.code not in (None, 0):
                    if not isinstance(exc.code, int):
                        _console.print(str(exc.code), soft_wrap=True, highlight=False, markup=False)
                    raise typer.Exit(exc.code if isinstance(exc.code, int) else 1) from exc


@app.command()
def status(workspace: Optional[Path] = WorkspaceOption) -> None:
    """Show each optimized module: its graphs, the selected runner, its latency and the eager baseline.

    Example: navdeploy status -w ./workspace
    """
    ws = _workspace(workspace)
    if not ws.is_dir():
        _console.print(f"[red]workspace {ws} {_missing(ws)}[/]; run nav.optimize first or pass --workspace.")
        raise typer.Exit(1)
    table = Table(title=f"navdeploy workspace {ws}")
    for col in ("module", "graph", "device", "selected", "p50 ms", "eager p50 ms", "candidates ok/tried", "updated"):
        table.add_column(col)
    found = 0
    reverted: dict[str, str] = {}
    fell_back: dict[str, tuple[str, str]] = {}
    for folder in module_folders(ws):  # not the user's folders beside them (a manifest.json of their own)
        manifest, problem = load_manifest(folder)
        if problem:  # one line naming the file; the other modules are still listed
            _warn(f"{problem}; re-run nav.optimize for that module, or `navdeploy clean {folder.name}`.")
        if manifest is None:
            continue
        if manifest.reverted:
            reverted[manifest.module] = manifest.reverted
        elif manifest.fell_back:
            fell_back[manifest.module] = (manifest.precision, manifest.fell_back)
        for key, entry in manifest.graphs.items():
            found += 1
            eager = next((c for c in entry.candidates if c.runner in EAGER_RUNNER.values()), None)
            selected = entry.selected_candidate()  # by candidate name: TensorRT[fp16] is not the runner TensorRT

            def p50(c: Optional[CandidateRecord]) -> str:
                value = c.shown_p50_ms() if c else None
                if value is None:
                    return "-"
                return f"{value:.3f}" if c.ok else f"{value:.3f} (screen)"  # eager not profiled in full

            ok = sum(c.ok for c in entry.candidates)
            shown = escape(entry.selected or "") or "[red]none[/]"
            if manifest.reverted and entry.selected:
                shown += " [yellow](runs eager *)[/]"
            table.add_row(manifest.module, key, manifest.device, shown, p50(selected), p50(eager),
                          f"{ok}/{len(entry.candidates)}", entry.updated or "")
    if not found:
        _console.print(f"no optimized modules in {ws}")
        raise typer.Exit(1)
    _console.print(table)
    for name, why in reverted.items():  # load_optimized binds these as eager; the repository still exports them
        _console.print(f"* {escape(name)} runs eagerly in your pipeline: the pipeline check put it back to eager "
                       f"({escape(why)}). export-repo still serves its selected runner, the fastest of it alone.")
    for name, (precision, why) in fell_back.items():
        _console.print(f"{escape(name)} runs its best {precision} candidates: the pipeline check chose them over "
                       f"faster ones in a lower precision ({escape(why)}).")


@app.command()
def report(workspace: Optional[Path] = WorkspaceOption,
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file to write (default: "
                                                 "<workspace>/reports/latest.html)."),
           open_: bool = typer.Option(False, "--open", help="Open the report in a web browser.")) -> None:
    """Regenerate the HTML optimization report from the workspace's manifests (plots, correctness, failures).

    nav.optimize writes one after every run to <workspace>/reports/; this rebuilds it, e.g. after installing
    matplotlib. Example: navdeploy report -w ./workspace --open
    """
    from navdeploy.report.html import render_workspace_report
    from navdeploy.workspace.atomic import write_error
    from navdeploy.workspace.layout import REPORTS_DIR

    ws = _workspace(workspace)
    if not ws.is_dir():
        raise _fail(f"workspace {ws} {_missing(ws)}; run nav.optimize first or pass --workspace.")
    if output is not None and (output.is_dir() or not output.name):
        raise _fail(f"--output {output} is a folder; give the HTML file to write, e.g. "
                    f"--output {output / 'report.html'}")
    try:
        with _warnings_as_lines(), _quiet_log():  # an unusable manifest: one line naming it (not the log's too)
            path = render_workspace_report(ws, output)
    except (FileNotFoundError, FileExistsError) as exc:  # no modules; a reports/latest.html of the user's
        raise _fail(str(exc)) from exc
    except OSError as exc:
        where = output if output is not None else ws / REPORTS_DIR
        raise _fail(str(write_error(exc, where, "or pass --output FILE to write the report elsewhere"))) from exc
    _console.print(f"report: {path}", soft_wrap=True, highlight=False)
    if open_:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            _console.print("[yellow]no web browser found; open the file above yourself[/]")


TritonVersionOption = typer.Option(
    None, "--triton-version", help="Triton release the repository is for, e.g. 24.10 (= server 2.51, the one in "
    "nvidia-pytriton); default: the newest navdeploy supports. Decides the platforms accepted and how AOTInductor "
    "models are emitted.")


@app.command("export-repo")
def export_repo(path: Path = typer.Argument(Path("model_repository"), help="Repository folder to write (replaced "
                                            "atomically)."),
                workspace: Optional[Path] = WorkspaceOption,
                module: Optional[list[str]] = typer.Option(None, "--module", "-m", help="Module to export (repeat); "
                                                           "all when omitted."),
                backend: str = typer.Option("auto", "--backend", "-b", help="auto (by the selected format) or python "
                                            "(every model a Python-backend model)."),
                instances: int = typer.Option(1, "--instances", help="instance_group count per model."),
                warmup: bool = typer.Option(False, "--warmup", help="Add model_warmup with zero inputs."),
                templates: Optional[Path] = typer.Option(None, "--templates", help="Folder with your own "
                                                         "config.pbtxt.j2 / model.py.j2."),
                triton_version: Optional[str] = TritonVersionOption,
                force: bool = typer.Option(False, "--force", help="Replace PATH even when it is a non-empty folder "
                                           "navdeploy did not write (its files are deleted).")) -> None:
    """Write a Triton model repository: one model per optimized module graph, configs from Jinja templates.

    PATH must be new, empty or a repository navdeploy wrote (a regular file is never replaced; another folder
    only with --force). Example: navdeploy export-repo model_repository --backend python -w ./workspace
    """
    from navdeploy.errors import NavdeployError
    from navdeploy.triton import export_model_repository, plan_repository

    if instances < 1:
        raise _fail(f"--instances must be 1 or more (model instances per model), not {instances}.", 2)
    try:
        out = export_model_repository(path, module or None, backend, workspace, instance_count=instances,
                                      warmup=warmup, templates_dir=templates, triton_version=triton_version,
                                      force=force)
        plans = plan_repository(_workspace(workspace), module or None, backend, warmup, triton_version)
    except NavdeployError as exc:
        _console.print(f"[red]export failed:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from exc
    table = Table(title=f"Triton model repository {out}")
    for col in ("model", "module", "graph", "selected runner", "backend", "artifact", "max batch"):
        table.add_column(col)
    for p in plans:
        table.add_row(p.name, p.module, p.graph, p.selected, p.platform or p.backend, p.artifact_format,
                      str(p.max_batch_size))
    _console.print(table)


@app.command("validate-repo")
def validate_repo(path: Path = typer.Argument(..., help="Model repository folder."),
                  target: str = typer.Option("auto", "--target", help="cpu, gpu, or auto (gpu when one is "
                                             "visible): whether KIND_GPU is allowed."),
                  triton_version: Optional[str] = TritonVersionOption) -> None:
    """Check every config.pbtxt with Triton's protobuf and the rules Triton applies when loading a model.

    Exit code 1 when any model would be refused. Example: navdeploy validate-repo model_repository
    """
    from navdeploy.errors import NavdeployError
    from navdeploy.triton import validate_repository

    if target not in ("auto", "cpu", "gpu"):
        _console.print(f"[red]--target must be auto, cpu or gpu, not {target!r}[/]")
        raise typer.Exit(2)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise _fail(f"{path} {what}; pass the model repository folder (navdeploy export-repo writes one).")
    try:
        problems = validate_repository(path, target=target, triton_version=triton_version)
    except NavdeployError as exc:
        _console.print(f"[red]{escape(str(exc))}[/]", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from exc
    failed = [p for p in problems if p.severity == "error"]
    for p in problems:  # one line per problem (never wrapped): easy to grep in CI logs
        tag = "[red]error[/]" if p.severity == "error" else "[yellow]warning[/]"
        _console.print(f"{tag} model {escape(repr(p.model))}, field {escape(p.field)}: {escape(p.message)} "
                       f"[bold]Fix:[/] {escape(p.fix)}",
                       soft_wrap=True, highlight=False, markup=True)
    if problems:
        _console.print(f"{len(failed)} error(s), {len(problems) - len(failed)} warning(s) in {path}", highlight=False)
    if failed:
        raise typer.Exit(1)
    models = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    _console.print(f"[green]ok[/]: {len(models)} model(s) in {path} pass Triton's checks: {', '.join(models)}",
                   soft_wrap=True, highlight=False)


@app.command()
def serve(spec: str = typer.Argument(..., help="The pipeline: module:function or path/file.py:function."),
          factory: bool = typer.Option(False, "--factory", help="SPEC names a factory: call it with no arguments "
                                       "to get the pipeline."),
          name: Optional[str] = typer.Option(None, "--name", help="Triton model name (default: the pipeline's "
                                             "navdeploy_serve or 'pipeline')."),
          host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1)."),
          http_port: Optional[int] = typer.Option(None, "--http-port", help="HTTP port (a free one when omitted)."),
          grpc_port: Optional[int] = typer.Option(None, "--grpc-port", help="gRPC port (a free one when omitted)."),
          metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="Metrics port (a free one when "
                                                     "omitted)."),
          max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="Largest batch the pipeline "
                                                       "gets; 0 for a pipeline that does not batch (default 8)."),
          max_queue_delay_us: Optional[int] = typer.Option(None, "--max-queue-delay-us", help="Dynamic batcher "
                                                           "delay in microseconds."),
          sample: Optional[str] = typer.Option(None, "--sample", help="One request item as JSON, e.g. "
                                               "'{\"prompt\": \"a photo\"}', to infer inputs and outputs from."),
          workspace: Optional[Path] = typer.Option(None, "--workspace", "-w", help="Workspace with the optimized "
                                                   "modules (default: $NAVDEPLOY_WORKSPACE or ~/.cache/navdeploy)."),
          load_optimized: bool = typer.Option(True, "--load-optimized/--no-load-optimized", help="Load the "
                                              "optimized modules from the workspace first."),
          max_request_bytes: Optional[int] = typer.Option(None, "--max-request-bytes", help="The most bytes one "
                                                          "request may declare for its inputs (default 64 MiB); "
                                                          "larger requests are refused before they are allocated."),
          log_verbose: Optional[int] = typer.Option(None, "--log-verbose", help="Triton log verbosity.")) -> None:
    """Serve a Python pipeline (module:function) through PyTriton until Ctrl-C.

    Wrapped modules run their selected runners in-process. Inputs and outputs come from the pipeline's
    navdeploy_serve attribute or are inferred from --sample.

    Example: navdeploy serve examples/stable_diffusion.py:make_server_pipeline --factory --http-port 8000
    """
    from navdeploy.errors import NavdeployError
    from navdeploy.serving import serve_from_spec

    kwargs: dict[str, Any] = {}  # only what was given: the pipeline's navdeploy_serve supplies the other defaults
    if sample is not None:
        try:
            kwargs["sample"] = json.loads(sample)
        except json.JSONDecodeError as exc:
            raise _fail(f"--sample is not valid JSON ({exc}): give one request item, "
                        "e.g. '{\"prompt\": \"a photo\"}'.") from exc
        if not isinstance(kwargs["sample"], dict):
            raise _fail(f"--sample must be a JSON object (input name -> value), not {type(kwargs['sample']).__name__}.")
    ports = {k: v for k, v in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port)) if v is not None}
    for key, value in (("name", name), ("host", host), ("ports", ports or None), ("max_batch_size", max_batch_size),
                       ("max_queue_delay_us", max_queue_delay_us), ("workspace", workspace),
                       ("log_verbose", log_verbose), ("max_request_bytes", max_request_bytes)):
        if value is not None:
            kwargs[key] = value
    if not load_optimized:
        kwargs["load_optimized"] = False
    try:
        serve_from_spec(spec, factory=factory, blocking=True, **kwargs)
    except NavdeployError as exc:  # ConfigError included
        raise _fail(str(exc) if spec in str(exc) else f"cannot serve {spec!r}: {exc}") from exc
    except (ImportError, SyntaxError) as exc:
        raise _fail(f"cannot serve {spec!r}: {_one_line(exc)}") from exc
    except KeyboardInterrupt:
        _console.print("stopped")


@app.command("serve-repo")
def serve_repo(path: Path = typer.Argument(..., help="Model repository folder (Python-backend models for the "
                                           "bundled server)."),
               http_port: Optional[int] = typer.Option(None, "--http-port", help="HTTP port (a free one when "
                                                       "omitted)."),
               grpc_port: Optional[int] = typer.Option(None, "--grpc-port", help="gRPC port (a free one when "
                                                       "omitted)."),
               metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="Enable metrics on this port."),
               timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for readiness."),
               tritonserver: Optional[Path] = typer.Option(None, "--tritonserver", help="A full Triton binary "
                                                           "instead of the one bundled in nvidia-pytriton."),
               backend_directory: Optional[Path] = typer.Option(None, "--backend-directory", help="Backends of "
                                                                "--tritonserver.")) -> None:
    """Serve a repository on 127.0.0.1 with the tritonserver bundled in nvidia-pytriton; Ctrl-C stops it.

    Example: navdeploy serve-repo model_repository --http-port 8000 --grpc-port 8001
    """
    import signal

    from navdeploy.errors import NavdeployError
    from navdeploy.triton import TritonServer, validate_repository

    failed = [p for p in validate_repository(path, target="auto") if p.severity == "error"]
    if failed:
        for p in failed:
            _console.print(f"[red]{escape(str(p))}[/]", soft_wrap=True, highlight=False)
        _console.print("[red]the repository does not validate[/]; see navdeploy validate-repo.")
        raise typer.Exit(1)
    server = TritonServer(path, http_port, grpc_port, metrics_port, startup_timeout_s=timeout,
                          tritonserver=tritonserver, backend_directory=backend_directory)

    def _interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: stop the server cleanly
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            server.start()
        except NavdeployError as exc:
            _console.print(f"[red]cannot serve {path}:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from exc
        _console.print(f"serving {path}: HTTP {server.http_url}  gRPC {server.grpc_url}  (Ctrl-C stops)",
                       highlight=False)
        code = server.wait()
        _console.print(f"[red]tritonserver exited with code {code}[/]\n{server.logs()[-3000:]}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        _console.print("stopping tritonserver")
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def _clean_targets(ws: Path, module: Optional[str]) -> list[Path]:
    """What ``clean`` deletes: the named module's folder, or every module folder and navdeploy's own folders.
    Anything that is not a navdeploy workspace or module folder is refused with one line."""
    from navdeploy.workspace.identity import is_module_folder, is_workspace, own_paths
    from navdeploy.workspace.layout import WORKSPACE_MARKER, plain_name_problem

    if not ws.is_dir():
        raise _fail(f"workspace {ws} {_missing(ws)}; pass --workspace.")
    if not is_workspace(ws):
        raise _fail(f"{ws} is not a navdeploy workspace (no {WORKSPACE_MARKER} and no module folder with a valid "
                    "manifest); clean deletes only what nav.optimize wrote. Pass the workspace with --workspace.")
    if module is None:
        return module_folders(ws) + own_paths(ws)
    if plain_name_problem(module):
        raise _fail(f"{module!r} is not a module name: clean takes the name of one module of the workspace as "
                    "`navdeploy status` lists it (no path, no '..'), e.g. `navdeploy clean unet`.")
    folder = ws / module
    if not is_module_folder(folder):
        names = ", ".join(p.name for p in module_folders(ws)) or "none"
        raise _fail(f"no module {module!r} in workspace {ws} (modules there: {names}).")
    return [folder]


def _delete(path: Path) -> None:
    """Delete a module folder (refusing while an optimize run holds its lock: it would rebuild half of it), the
    inductor cache or a report file."""
    from filelock import FileLock, Timeout

    from navdeploy.workspace.atomic import write_error
    from navdeploy.workspace.locks import LOCK_FILE

    fix = "or leave the workspace as it is"
    lock = FileLock(str(path / LOCK_FILE)) if (path / LOCK_FILE).exists() else None
    try:
        if lock is not None:
            lock.acquire(timeout=0)
    except Timeout:
        raise _fail(f"{path} is being optimized by another run; wait for it to finish, then clean.") from None
    except OSError as exc:  # a read-only workspace cannot even take the lock
        raise _fail(str(write_error(exc, path, fix)).replace("cannot write", "cannot delete", 1)) from exc
    try:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    except OSError as exc:
        raise _fail(str(write_error(exc, path, fix)).replace("cannot write", "cannot delete", 1)) from exc
    finally:
        if lock is not None:
            lock.release()


@app.command()
def clean(module: Optional[str] = typer.Argument(None, help="Module name; all modules when omitted."),
          workspace: Optional[Path] = WorkspaceOption,
          yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Delete results from the workspace so the next nav.optimize rebuilds them.

    Only a navdeploy workspace is cleaned, and in it only the module folders navdeploy created, inductor_cache/
    and the reports in reports/; files navdeploy did not write stay. Example: navdeploy clean unet --yes
    """
    from navdeploy.workspace.layout import REPORTS_DIR

    ws = _workspace(workspace)
    targets = _clean_targets(ws, module)
    if not targets:
        _console.print(f"nothing to clean in {ws}", soft_wrap=True, highlight=False)
        return
    listing = ", ".join(str(p.relative_to(ws)) for p in targets)
    if not yes and not typer.confirm(f"Delete {listing} from {ws}?"):
        raise typer.Exit(1)
    for path in targets:
        _delete(path)
    with contextlib.suppress(OSError):  # reports/ goes once it is empty: not when it holds files of the user's
        (ws / REPORTS_DIR).rmdir()
    _console.print(f"deleted {listing} from {ws}", soft_wrap=True, highlight=False)


if __name__ == "__main__":
    app()
