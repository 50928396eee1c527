"""The ``navdeploy`` command: look at and tidy a workspace, and deploy it to Triton.

    navdeploy status                 # what the workspace holds: modules, graphs, winners, figures
    navdeploy clean unet --yes       # forget one module's results (the next optimize rebuilds them)
    navdeploy export-repo model_repository --backend python   # a Triton model repository from the workspace
    navdeploy validate-repo model_repository                  # Triton's own checks, offline
    navdeploy serve-repo model_repository                     # serve it with the tritonserver in nvidia-pytriton
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from navdeploy.config import default_workspace
from navdeploy.workspace import read_manifest

app = typer.Typer(help="navdeploy: optimize PyTorch modules in place, verify them, deploy them.", no_args_is_help=True)
_console = Console()

WorkspaceOption = typer.Option(None, "--workspace", "-w", help="Workspace folder (default: $NAVDEPLOY_WORKSPACE "
                               "or ~/.cache/navdeploy).")


def _workspace(path: Optional[Path]) -> Path:
    return path if path is not None else default_workspace()


@app.command()
def status(workspace: Optional[Path] = WorkspaceOption) -> None:
    """Show each optimized module: its graphs, the selected runner, its latency and the eager baseline.

    Example: navdeploy status -w ./workspace
    """
    ws = _workspace(workspace)
    if not ws.is_dir():
        _console.print(f"[red]workspace {ws} does not exist[/]; run nav.optimize first or pass --workspace.")
        raise typer.Exit(1)
    table = Table(title=f"navdeploy workspace {ws}")
    for col in ("module", "graph", "device", "selected", "p50 ms", "eager p50 ms", "candidates ok/tried", "updated"):
        table.add_column(col)
    found = 0
    for folder in sorted(p for p in ws.iterdir() if p.is_dir()):
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        for key, entry in manifest["graphs"].items():
            found += 1
            by_name = {c["runner"]: c for c in entry["candidates"]}
            eager = next((c for c in entry["candidates"] if c["runner"] in ("TorchCPU", "TorchCUDA")), None)
            selected = by_name.get(entry.get("selected") or "")

            def p50(c: Optional[dict]) -> str:
                return f"{c['profile'][0]['p50_ms']:.3f}" if c and c.get("profile") else "-"

            ok = sum(c["status"] == "ok" for c in entry["candidates"])
            table.add_row(manifest["module"], key, manifest.get("device", "?"), entry.get("selected") or "[red]none[/]",
                          p50(selected), p50(eager), f"{ok}/{len(entry['candidates'])}", entry.get("updated", ""))
    if not found:
        _console.print(f"no optimized modules in {ws}")
        raise typer.Exit(1)
    _console.print(table)


@app.command()
def clean(module: Optional[str] = typer.Argument(None, help="Module name; all modules when omitted."),
          workspace: Optional[Path] = WorkspaceOption,
          yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Delete results from the workspace so the next nav.optimize rebuilds them.

    Example: navdeploy clean unet --yes
    """
    ws = _workspace(workspace)
    target = ws / module if module else ws
    if not target.exists():
        _console.print(f"[red]{target} does not exist[/]")
        raise typer.Exit(1)
    if not yes and not typer.confirm(f"Delete {target}?"):
        raise typer.Exit(1)
    shutil.rmtree(target)
    _console.print(f"deleted {target}")


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
                                                         "config.pbtxt.j2 / model.py.j2.")) -> None:
    """Write a Triton model repository: one model per optimized module graph, configs from Jinja templates.

    Example: navdeploy export-repo model_repository --backend python -w ./workspace
    """
    from navdeploy.errors import NavdeployError
    from navdeploy.triton import export_model_repository, plan_repository

    try:
        out = export_model_repository(path, module or None, backend, _workspace(workspace), instance_count=instances,
                                      warmup=warmup, templates_dir=templates)
        plans = plan_repository(_workspace(workspace), module or None, backend, warmup)
    except NavdeployError as exc:
        _console.print(f"[red]export failed:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1)
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
                                             "visible): whether KIND_GPU is allowed.")) -> None:
    """Check every config.pbtxt with Triton's protobuf and the rules Triton applies when loading a model.

    Exit code 1 when any model would be refused. Example: navdeploy validate-repo model_repository
    """
    from navdeploy.triton import validate_repository

    if target not in ("auto", "cpu", "gpu"):
        _console.print(f"[red]--target must be auto, cpu or gpu, not {target!r}[/]")
        raise typer.Exit(2)
    problems = validate_repository(path, target=target)
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


@app.command("serve-repo")
def serve_repo(path: Path = typer.Argument(..., help="Model repository folder (Python-backend models for the "
                                           "bundled server)."),
               http_port: Optional[int] = typer.Option(None, "--http-port", help="HTTP port (a free one when omitted)."),
               grpc_port: Optional[int] = typer.Option(None, "--grpc-port", help="gRPC port (a free one when omitted)."),
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
            raise typer.Exit(1)
        _console.print(f"serving {path}: HTTP {server.http_url}  gRPC {server.grpc_url}  (Ctrl-C stops)", highlight=False)
        code = server.wait()
        _console.print(f"[red]tritonserver exited with code {code}[/]\n{server.logs()[-3000:]}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        _console.print("stopping tritonserver")
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    app()
