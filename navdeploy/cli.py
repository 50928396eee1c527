"""The ``navdeploy`` command: look at and tidy a workspace.

    navdeploy status                 # what the workspace holds: modules, graphs, winners, figures
    navdeploy clean unet --yes       # forget one module's results (the next optimize rebuilds them)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
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


if __name__ == "__main__":
    app()
