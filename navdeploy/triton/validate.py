"""Validate a Triton model repository the way Triton does, without Triton.

Every ``config.pbtxt`` is parsed with Triton's own protobuf (``tritonclient.grpc.model_config_pb2`` +
``google.protobuf.text_format``): that catches syntax errors, unknown fields and enum names. Then the rules
Triton's core applies when it loads a model, which a parse does not, are checked here: the name equals the
folder, backend/platform form a known pair and the default model file is present, a numeric version folder
exists, dims are non-empty and each -1 or >= 1, dynamic batching needs ``max_batch_size > 0`` and preferred
sizes within ``[1, max_batch_size]``, ``KIND_GPU`` only for GPU targets, warmup and ensemble consistency.

Each problem names the model, the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CONFIG = "config.pbtxt"

# platform -> (backend it belongs to, default model file name), as in Triton core's constants.h
PLATFORMS: dict[str, tuple[Optional[str], Optional[str]]] = {
    "onnxruntime_onnx": ("onnxruntime", "model.onnx"),
    "pytorch_libtorch": ("pytorch", "model.pt"),
    "libtorch": ("pytorch", "model.pt"),
    "torch_aoti": ("pytorch", "model.pt2"),
    "tensorrt_plan": ("tensorrt", "model.plan"),
    "tensorflow_graphdef": ("tensorflow", "model.graphdef"),
    "tensorflow_savedmodel": ("tensorflow", "model.savedmodel"),
    "ensemble": (None, None),
}
# backend -> default model file name when no platform says otherwise
BACKENDS: dict[str, Optional[str]] = {
    "onnxruntime": "model.onnx", "pytorch": "model.pt", "tensorrt": "model.plan", "python": "model.py",
    "openvino": "model.xml", "tensorflow": None,
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a repository: where (model, field), what, and how to fix it."""

    model: str
    field: str
    message: str
    fix: str
    severity: str = "error"  # "error" (Triton refuses the model) or "warning"

    def __str__(self) -> str:
        return f"[{self.severity}] model {self.model!r}, {self.field}: {self.message} Fix: {self.fix}"


def _config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - the extra is declared
        raise ImportError("validating Triton configs needs tritonclient[grpc]: pip install 'navdeploy[triton]'") from exc
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


def _version_folders(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=int)


def _default_file(cfg) -> Optional[str]:
    if cfg.default_model_filename:
        return cfg.default_model_filename
    if cfg.platform in PLATFORMS:
        return PLATFORMS[cfg.platform][1]
    return BACKENDS.get(cfg.backend)


def _check_io(model: str, cfg, pb2, problems: list[Problem]) -> None:
    for section, tensors in (("input", cfg.input), ("output", cfg.output)):
        seen: set[str] = set()
        for i, t in enumerate(tensors):
            where = f"{section}[{i}]" + (f" ({t.name!r})" if t.name else "")
            if not t.name:
                problems.append(Problem(model, f"{where}.name", "the tensor has no name.",
                                        f'give it the name the model uses, e.g. name: "{section}__{i}".'))
            elif t.name in seen:
                problems.append(Problem(model, f"{where}.name", f"name {t.name!r} appears twice in {section}.",
                                        "give every tensor a unique name."))
            seen.add(t.name)
            if t.data_type == pb2.TYPE_INVALID:
                problems.append(Problem(model, f"{where}.data_type", "data_type is missing or TYPE_INVALID.",
                                        "set the tensor's type, e.g. data_type: TYPE_FP32."))
            dims = list(t.dims)
            if not dims:
                problems.append(Problem(model, f"{where}.dims", "dims is empty; Triton needs the shape of every tensor.",
                                        "list the shape without the batch axis, e.g. dims: [ 3, 224, 224 ]; a scalar "
                                        "per batch item is dims: [ 1 ] with reshape: { shape: [ ] }."))
            bad = [d for d in dims if d != -1 and d < 1]
            if bad:
                problems.append(Problem(model, f"{where}.dims", f"dims {dims} contains {bad[0]}; each dim must be -1 "
                                        "(dynamic) or >= 1.", "use -1 for an axis whose size varies, else its size."))
            if t.HasField("reshape"):
                rbad = [d for d in t.reshape.shape if d != -1 and d < 1]
                if rbad:
                    problems.append(Problem(model, f"{where}.reshape.shape", f"reshape {list(t.reshape.shape)} "
                                            f"contains {rbad[0]}.", "each reshape dim must be -1 or >= 1."))


def _check_batching(model: str, cfg, problems: list[Problem]) -> None:
    if cfg.max_batch_size < 0:
        problems.append(Problem(model, "max_batch_size", f"max_batch_size is {cfg.max_batch_size}.",
                                "use 0 for a model without a batch axis, else the largest batch it accepts."))
    if cfg.HasField("dynamic_batching"):
        if cfg.max_batch_size <= 0:
            problems.append(Problem(model, "dynamic_batching", "dynamic_batching needs max_batch_size > 0 "
                                    f"(it is {cfg.max_batch_size}).",
                                    "remove dynamic_batching, or set max_batch_size to the largest batch the model takes."))
        else:
            for size in cfg.dynamic_batching.preferred_batch_size:
                if not 1 <= size <= cfg.max_batch_size:
                    problems.append(Problem(model, "dynamic_batching.preferred_batch_size",
                                            f"preferred batch size {size} is outside [1, max_batch_size={cfg.max_batch_size}].",
                                            f"use sizes between 1 and {cfg.max_batch_size}, or raise max_batch_size."))


def _check_instances(model: str, cfg, pb2, target: str, problems: list[Problem]) -> None:
    kinds = pb2.ModelInstanceGroup.Kind
    for i, group in enumerate(cfg.instance_group):
        where = f"instance_group[{i}]"
        if group.kind == kinds.Value("KIND_GPU") and target != "gpu":
            problems.append(Problem(model, f"{where}.kind", "KIND_GPU on a CPU target: Triton fails to load the model "
                                    "where no GPU is visible.", "use kind: KIND_CPU, or validate with --target gpu."))
        if group.count < 0:
            problems.append(Problem(model, f"{where}.count", f"count is {group.count}.", "use a count >= 1."))
        if group.kind == kinds.Value("KIND_CPU") and list(group.gpus):
            problems.append(Problem(model, f"{where}.gpus", "gpus are listed for a KIND_CPU group.",
                                    "remove gpus, or use kind: KIND_GPU."))
    accelerators = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    if accelerators and target != "gpu":
        problems.append(Problem(model, "optimization.execution_accelerators.gpu_execution_accelerator",
                                "GPU execution accelerators on a CPU target are ignored.",
                                "drop them for CPU deployments.", severity="warning"))


def _check_backend(model: str, cfg, problems: list[Problem]) -> None:
    if cfg.platform == "ensemble":
        if cfg.backend:
            problems.append(Problem(model, "backend", f"an ensemble has no backend (got {cfg.backend!r}).",
                                    "remove the backend line."))
        return
    if not cfg.backend and not cfg.platform:
        problems.append(Problem(model, "backend", "neither backend nor platform is set.",
                                'set backend, e.g. backend: "onnxruntime", "pytorch", "tensorrt" or "python".'))
        return
    if cfg.platform and cfg.platform not in PLATFORMS:
        problems.append(Problem(model, "platform", f"unknown platform {cfg.platform!r}.",
                                f"use one of {', '.join(sorted(PLATFORMS))}, or only set backend."))
    elif cfg.platform and cfg.backend and PLATFORMS[cfg.platform][0] not in (cfg.backend, None):
        problems.append(Problem(model, "backend", f"backend {cfg.backend!r} does not serve platform {cfg.platform!r}.",
                                f'use backend: "{PLATFORMS[cfg.platform][0]}" with platform "{cfg.platform}".'))
    if cfg.backend == "python" and cfg.platform:
        problems.append(Problem(model, "platform", f"a python-backend model has platform {cfg.platform!r}.",
                                "remove the platform line."))
    if cfg.backend and cfg.backend not in BACKENDS:
        problems.append(Problem(model, "backend", f"backend {cfg.backend!r} is not one navdeploy knows; Triton needs "
                                "it in its backend directory.", "check the name (e.g. onnxruntime, pytorch).",
                                severity="warning"))


def _check_versions(model: str, folder: Path, cfg, problems: list[Problem]) -> None:
    versions = _version_folders(folder)
    if not versions:
        problems.append(Problem(model, "version folder", f"{folder} has no numeric version folder; Triton loads "
                                "nothing from it.", f"put the model file in {folder}/1/."))
        return
    if cfg.version_policy.HasField("specific"):
        for v in cfg.version_policy.specific.versions:
            if str(v) not in versions:
                problems.append(Problem(model, "version_policy.specific.versions", f"version {v} has no folder.",
                                        f"create {folder}/{v}/ or remove {v} from the policy."))
    if cfg.platform == "ensemble":
        return
    expected = _default_file(cfg)
    if expected is None:
        return
    for v in versions:
        if not (folder / v / expected).exists():
            problems.append(Problem(model, "default_model_filename", f"{folder.name}/{v}/{expected} does not exist.",
                                    f"put the model file at {folder}/{v}/{expected}, or set default_model_filename."))


def _check_warmup(model: str, cfg, problems: list[Problem]) -> None:
    names = {t.name for t in cfg.input}
    for i, warm in enumerate(cfg.model_warmup):
        if not 1 <= warm.batch_size <= max(1, cfg.max_batch_size):
            problems.append(Problem(model, f"model_warmup[{i}].batch_size",
                                    f"batch_size {warm.batch_size} is outside [1, {max(1, cfg.max_batch_size)}].",
                                    "use 1 for non-batching models, else a size up to max_batch_size."))
        for key, value in warm.inputs.items():
            if key not in names:
                problems.append(Problem(model, f"model_warmup[{i}].inputs[{key!r}]", f"{key!r} is not a model input.",
                                        f"use one of {sorted(names)}."))
            if not list(value.dims) or any(d < 1 for d in value.dims):
                problems.append(Problem(model, f"model_warmup[{i}].inputs[{key!r}].dims",
                                        f"warmup dims {list(value.dims)} must be concrete sizes >= 1.",
                                        "give the full shape of one sample, without the batch axis."))


def _check_ensemble(model: str, cfg, configs: dict, problems: list[Problem]) -> None:
    steps = cfg.ensemble_scheduling.step
    if not steps:
        problems.append(Problem(model, "ensemble_scheduling", "an ensemble without steps.",
                                "add ensemble_scheduling { step [ ... ] }."))
        return
    available = {t.name for t in cfg.input}
    produced: set[str] = set()
    for i, step in enumerate(steps):
        where = f"ensemble_scheduling.step[{i}]"
        target = configs.get(step.model_name)
        if step.model_name not in configs:
            problems.append(Problem(model, f"{where}.model_name", f"model {step.model_name!r} is not in the repository.",
                                    "add that model or fix the name."))
        for key, value in step.input_map.items():
            if target is not None and key not in {t.name for t in target.input}:
                problems.append(Problem(model, f"{where}.input_map[{key!r}]",
                                        f"{key!r} is not an input of {step.model_name!r}.",
                                        f"use one of {sorted(t.name for t in target.input)}."))
        for key, value in step.output_map.items():
            if target is not None and key not in {t.name for t in target.output}:
                problems.append(Problem(model, f"{where}.output_map[{key!r}]",
                                        f"{key!r} is not an output of {step.model_name!r}.",
                                        f"use one of {sorted(t.name for t in target.output)}."))
            produced.add(value)
    tensors = available | produced
    for i, step in enumerate(steps):
        for key, value in step.input_map.items():
            if value not in tensors:
                problems.append(Problem(model, f"ensemble_scheduling.step[{i}].input_map[{key!r}]",
                                        f"ensemble tensor {value!r} is neither an ensemble input nor a step output.",
                                        "map it from an ensemble input or another step's output_map."))
    for t in cfg.output:
        if t.name not in produced:
            problems.append(Problem(model, f"output ({t.name!r})", "no step produces this ensemble output.",
                                    "map a step output to it in output_map."))


def validate_model(folder: Path, target: str = "auto", configs: Optional[dict] = None) -> list[Problem]:
    """Problems of one model folder (``configs``: name -> parsed config of the repository, for ensembles)."""
    from google.protobuf import text_format

    pb2 = _config_pb2()
    target = _resolve_target(target)
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
    problems: list[Problem] = []
    if cfg.name and cfg.name != model:
        problems.append(Problem(model, "name", f"name {cfg.name!r} differs from the folder name {model!r}.",
                                f'use name: "{model}" or rename the folder.'))
    _check_backend(model, cfg, problems)
    _check_batching(model, cfg, problems)
    _check_io(model, cfg, pb2, problems)
    _check_instances(model, cfg, pb2, target, problems)
    _check_versions(model, folder, cfg, problems)
    _check_warmup(model, cfg, problems)
    if cfg.platform == "ensemble":
        _check_ensemble(model, cfg, configs or {}, problems)
    return problems


def _model_folders(repo: Path) -> list[Path]:
    return sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def validate_repository(path: str | Path, target: str = "auto") -> list[Problem]:
    """Every problem of every model in a repository (empty list: Triton would accept it).

    ``target``: ``"cpu"``, ``"gpu"`` or ``"auto"`` (a GPU when torch sees one) decides whether KIND_GPU is allowed.
    """
    repo = Path(path)
    if not repo.is_dir():
        return [Problem(str(repo), "repository", f"{repo} is not a folder.", "pass the model repository's path.")]
    folders = _model_folders(repo)
    if not folders:
        return [Problem(str(repo), "repository", f"{repo} holds no model folders.",
                        "export one with navdeploy export-repo, or add <model>/config.pbtxt and <model>/1/.")]
    configs = {}
    for folder in folders:
        try:
            configs[folder.name] = parse_config((folder / CONFIG).read_text())
        except Exception:  # noqa: BLE001 - reported per model below
            pass
    problems: list[Problem] = []
    for folder in folders:
        problems.extend(validate_model(folder, target, configs))
    return problems


def errors(problems: list[Problem]) -> list[Problem]:
    """Only the problems that make Triton refuse a model."""
    return [p for p in problems if p.severity == "error"]
