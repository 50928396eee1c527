"""Validate a Triton model repository the way Triton does, without Triton.

Every ``config.pbtxt`` is parsed with Triton's own protobuf (``tritonclient.grpc.model_config_pb2`` +
``google.protobuf.text_format``): that catches syntax errors, unknown fields and enum names. Then the rules
Triton's core applies when it loads a model, which a parse does not (:mod:`navdeploy.triton.rules`: auto-complete
of backend/platform/model file, version folders, tensor dims and reshapes, batch I/O, dynamic and sequence
batching, instance groups, warmup, ensembles), for a target Triton release (:mod:`navdeploy.triton.versions`),
and the checks its backends make of the model files against the config (:mod:`navdeploy.triton.artifacts`).

Each problem names the model, the field, the value and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from navdeploy.triton.artifacts import ARTIFACT_RULES
from navdeploy.triton.problems import Problem
from navdeploy.triton.rules import RULES, ModelContext
from navdeploy.triton.versions import TritonRelease, resolve_release

__all__ = ["Problem", "parse_config", "validate_model", "validate_repository", "errors"]

CONFIG = "config.pbtxt"


def _config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - the extra is declared
        raise ImportError("validating Triton configs needs tritonclient[grpc]: "
                          "pip install 'navdeploy[triton]'") from exc
    return model_config_pb2


def parse_config(text: str):
    """Parse config.pbtxt text with Triton's protobuf; raises ``google.protobuf.text_format.ParseError``."""
    from google.protobuf import text_format

    return text_format.Parse(text, _config_pb2().ModelConfig())


def _resolve_target(target: str) -> str:
    if target == "auto":
        try:
            import torch

            return "gpu" if torch.cuda.is_available() else "cpu"
        except ImportError:  # pragma: no cover
            return "cpu"
    if target not in ("cpu", "gpu"):
        raise ValueError(f"target must be 'auto', 'cpu' or 'gpu', got {target!r}")
    return target


def validate_model(folder: Path, target: str = "auto", configs: Optional[dict] = None,
                   triton_version: Optional[str | TritonRelease] = None) -> list[Problem]:
    """Problems of one model folder (``configs``: name -> parsed config of the repository, for ensembles)."""
    from google.protobuf import text_format

    model = folder.name
    path = folder / CONFIG
    if not path.is_file():
        return [Problem(model, CONFIG, f"{path} does not exist.", "write a config.pbtxt for the model "
                        "(navdeploy validates explicit configurations only).")]
    try:
        cfg = parse_config(path.read_text())
    except text_format.ParseError as exc:
        return [Problem(model, CONFIG, f"Triton's protobuf cannot parse it: {exc}.",
                        "fix the field or enum name at that line (see Triton's model_config.proto).")]
    ctx = ModelContext(model, folder, cfg, _config_pb2(), _resolve_target(target), resolve_release(triton_version),
                       configs or {})
    return [problem for rule in RULES + ARTIFACT_RULES for problem in rule(ctx)]


def _model_folders(repo: Path) -> list[Path]:
    return sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def _parsed_configs(folders: list[Path]) -> dict:
    """name -> parsed config of every model whose config parses (the others are reported per model)."""
    configs = {}
    for folder in folders:
        try:
            configs[folder.name] = parse_config((folder / CONFIG).read_text())
        except Exception:  # noqa: BLE001 - reported per model by validate_model
            pass
    return configs


def validate_repository(path: str | Path, target: str = "auto",
                        triton_version: Optional[str | TritonRelease] = None) -> list[Problem]:
    """Every problem of every model in a repository (no errors: Triton would accept it).

    ``target``: ``"cpu"``, ``"gpu"`` or ``"auto"`` (a GPU when torch sees one) decides whether KIND_GPU is allowed.
    ``triton_version``: the Triton release to check against (``"24.10"``, or a server version such as ``"2.51"``);
    None: the newest navdeploy supports (:data:`navdeploy.triton.versions.DEFAULT_RELEASE`).
    """
    release = resolve_release(triton_version)
    repo = Path(path)
    if not repo.is_dir():
        what = "is not a folder" if repo.exists() else "does not exist"
        return [Problem(str(repo), "repository", f"{repo} {what}.", "pass the model repository's path.")]
    folders = _model_folders(repo)
    if not folders:
        return [Problem(str(repo), "repository", f"{repo} holds no model folders.",
                        "export one with navdeploy export-repo, or add <model>/config.pbtxt and <model>/1/.")]
    configs = _parsed_configs(folders)
    return [p for folder in folders for p in validate_model(folder, target, configs, release)]


def errors(problems: list[Problem]) -> list[Problem]:
    """Only the problems that make Triton refuse a model."""
    return [p for p in problems if p.severity == "error"]
