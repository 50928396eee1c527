"""Write a Triton model repository from a navdeploy workspace.

One Triton model per optimized graph of each module: ``<repo>/<name>/config.pbtxt`` rendered from the Jinja
templates in the top-level ``templates/`` folder and ``<repo>/<name>/1/`` holding the artifact (and ``model.py`` for the
Python backend). Model names: ``<module>`` for a module with one input structure, ``<module>__<graph key>``
for each graph of a module with several (the graph key is the stable hash navdeploy gives an input structure).

Backend by the selected runner's format (``backend="auto"``), as each format file's ``TritonMapping`` says:

    onnx                    -> onnxruntime (onnxruntime_onnx, model.onnx; ORT TensorRT/CUDA accelerator if that won)
    trt                     -> tensorrt (tensorrt_plan, model.plan; CUDA graphs where the runner used them)
    torchscript             -> pytorch (pytorch_libtorch, model.pt; I/O named INPUT__i / OUTPUT__i)
    torch-aoti              -> pytorch (torch_aoti, model.pt2; INPUT__i / OUTPUT__i) where the target Triton's
                               core knows torch_aoti (``triton_version``), else python
    torch / torch-exportedprogram / anything else -> python (model.py loading an artifact of the graph)

``backend="python"`` emits every graph as a Python-backend model, runnable on any Triton, including the
``tritonserver`` bundled in the ``nvidia-pytriton`` wheel (see :mod:`navdeploy.triton.server`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import jinja2

from navdeploy._version import __version__
from navdeploy.capture.graph import Graph, TensorSpec
from navdeploy.capture.paths import tensor_paths
from navdeploy.errors import NavdeployError
from navdeploy.formats.base import Format, FormatSpec, RunnerTriton, TritonMapping
from navdeploy.formats.registry import FORMATS, RUNNERS
from navdeploy.templates_dir import templates_dir
from navdeploy.triton.validate import errors, validate_repository
from navdeploy.triton.versions import TritonRelease, resolve_release
from navdeploy.workspace.atomic import write_error
from navdeploy.workspace.identity import module_folders
from navdeploy.workspace.layout import MANIFEST
from navdeploy.workspace.manifest import load_manifest
from navdeploy.workspace.prune import python_artifact_choice
from navdeploy.workspace.records import CandidateRecord, GraphEntry, Manifest

log = logging.getLogger("navdeploy")

TEMPLATES = templates_dir()

DATA_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64", "bool": "TYPE_BOOL",
    "str": "TYPE_STRING", "string": "TYPE_STRING", "bytes": "TYPE_STRING",
}
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# ONNX TensorProto element types -> torch-style dtype names
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
               9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
BACKENDS = ("auto", "python")
# In every repository navdeploy writes: a later export may replace that folder without --force. Its text holds no
# version or date, so exporting the same workspace twice gives the same files.
REPOSITORY_MARKER = ".navdeploy-repository"
REPOSITORY_MARKER_TEXT = '{"navdeploy_repository": 1}\n'


def _format_spec(fmt: str) -> Optional[FormatSpec]:
    """The registry's spec of a format named in a manifest; None for a format this navdeploy does not know."""
    try:
        return FORMATS.get(Format(fmt))
    except ValueError:
        return None


def _triton_mapping(fmt: str) -> TritonMapping:
    spec = _format_spec(fmt)
    return spec.triton if spec is not None else TritonMapping()


def artifact_file(fmt: str) -> str:
    """The artifact's file name inside a format folder, as the format's exporter writes it."""
    spec = _format_spec(fmt)
    if spec is None or spec.artifact is None:
        raise NavdeployError(f"format {fmt!r} writes no artifact a Triton model can hold.")
    return spec.artifact


def _runner_triton(runner: str) -> RunnerTriton:
    spec = RUNNERS.get(runner)
    return spec.triton if spec is not None else RunnerTriton()


def _casts(runner: str) -> bool:
    """Whether the runner's artifact was built from a module cast to the candidate's precision, so it takes and
    returns that precision (a builder that takes the precision as a flag, TensorRT, keeps the module's I/O)."""
    spec = RUNNERS.get(runner)
    return spec is None or spec.precision_by == "cast"


@dataclass(frozen=True)
class TensorConfig:
    """One input or output of a Triton model."""

    name: str
    data_type: str
    dims: list[int]
    reshape: Optional[list[int]] = None
    scalar: bool = False  # a 0-d tensor per batch item (or per call): the model.py reshapes it on its side
    # What the tensor is in the module's call or output (``attention_mask``, ``past_key_values.layers[0].keys``,
    # ``logits``): the tensors are named by position, so a client needs this to send them in the right order.
    source: Optional[str] = None


@dataclass
class ModelPlan:
    """Everything one Triton model is rendered from."""

    name: str
    module: str
    graph: str
    selected: str
    backend: str
    platform: Optional[str]
    artifact_format: str
    artifact_dir: Path
    max_batch_size: int
    preferred_batch_sizes: list[int]
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    instance_kind: str
    run_dtypes: list[str] = field(default_factory=list)
    accelerators: list[dict] = field(default_factory=list)
    cuda_graphs: bool = False
    warmup: Optional[dict] = None

    @property
    def default_model_filename(self) -> str:
        return "model.py" if self.backend == "python" else artifact_file(self.artifact_format)


def model_name(module: str, graph_key: str, graph_count: int) -> str:
    """The Triton model name of one graph: the module name, or ``<module>__<graph key>`` when it has several."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", module)
    return base if graph_count == 1 else f"{base}__{graph_key}"


def _environment(templates_dir: Optional[Path]) -> jinja2.Environment:
    loaders: list[jinja2.BaseLoader] = []
    if templates_dir is not None:
        loaders.append(jinja2.FileSystemLoader(str(templates_dir)))
    loaders.append(jinja2.FileSystemLoader(str(TEMPLATES)))
    return jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              autoescape=False)


def _python_loadable(graph_dir: Path, candidate: CandidateRecord, entry: GraphEntry, module_precision: str) -> bool:
    """Whether the templated model.py can load the candidate's format and its artifact is there."""
    folder = entry.artifact_folder(graph_dir, candidate.artifact_dir(module_precision))
    return _triton_mapping(candidate.format).python_preference is not None \
        and (folder / artifact_file(candidate.format)).exists()


def _python_artifact(graph_dir: Path, candidate: CandidateRecord, entry: GraphEntry,
                     module_precision: str) -> tuple[str, Path, CandidateRecord]:
    """The artifact a Python-backend model runs: the winner's when it has one the template loads, else the
    fastest verified candidate's that does, in the winner's precision where one is (after the pipeline check
    chose a graph's fallback in the module's own precision, not the low-precision build it passed over)."""
    if _python_loadable(graph_dir, candidate, entry, module_precision):
        return candidate.format, entry.artifact_folder(graph_dir, candidate.artifact_dir(module_precision)), candidate
    # Verified ones: fully profiled, or screened out by the search (correct, only not the fastest).
    usable = [c for c in entry.candidates if c.verified and _python_loadable(graph_dir, c, entry, module_precision)]
    best = python_artifact_choice(usable, candidate, module_precision)
    if best is None:
        raise NavdeployError(
            f"graph {graph_dir.name} of module {graph_dir.parent.name!r}: the selected runner "
            f"{candidate.name} has no artifact a Python-backend model can load, and no "
            "verified TorchScript, ExportedProgram, ONNX or AOTInductor artifact exists. Re-run nav.optimize with one "
            "of those in target_formats (e.g. nav.Format.TORCHSCRIPT).")
    return best.format, entry.artifact_folder(graph_dir, best.artifact_dir(module_precision)), best


def _sources(paths: list[str], count: int) -> list[Optional[str]]:
    """The config.pbtxt comment of each of ``count`` tensors (one line each: a dict key of the user's may hold a
    line break); none when the spec does not name them all."""
    return [" ".join(p.split()) for p in paths] if len(paths) == count else [None] * count


def _dims(spec: TensorSpec, batching: bool, batch_axis: bool) -> tuple[list[int], Optional[list[int]], bool]:
    """(dims, reshape, scalar) of a tensor. Triton has no scalar tensors: a scalar per batch item is dims [1]
    with an empty reshape (the model sees [B]); a 0-d tensor of a non-batching model is dims [1] without reshape
    (core refuses an empty reshape there), and the Python-backend model.py reshapes between [1] and [].
    ``batch_axis``: the graph's axis 0 is a batch axis that Triton does not batch (``_triton_batching``), so it
    stays in dims as -1."""
    dims = [-1 if lo != hi or lo < 1 else lo for lo, hi in zip(spec.min_shape, spec.max_shape)]
    if batching:
        dims = dims[1:]
    elif batch_axis and dims:
        dims[0] = -1
    if not dims:
        return [1], ([] if batching else None), True
    return dims, None, False


def _has_0d(graph: Graph) -> bool:
    """A 0-d tensor among the graph's inputs or outputs: native backends compare ranks with dims [1] and refuse
    it, so only a Python-backend model (its model.py reshapes) serves it."""
    return any(not t.min_shape for t in list(graph.inputs) + list(graph.outputs))


def _triton_batching(graph: Graph) -> bool:
    """Whether Triton batches the graph's model. Not when a tensor is 0-d (a diffusion UNet's timestep): it has
    no batch axis, one value per call, so requests cannot be joined; such a model takes each request's full
    shapes (the batch axis -1 in dims)."""
    return graph.batching and not _has_0d(graph)


def _run_dtype(dtype: str, precision: str, module_precision: str) -> str:
    """The dtype an artifact built in ``precision`` takes for a tensor captured as ``dtype``."""
    if precision != module_precision and dtype in ("float32", "float16", "bfloat16", "float64") \
            and precision in PRECISION_DTYPES:
        return PRECISION_DTYPES[precision]
    return dtype


def _triton_type(dtype: str, where: str) -> str:
    if dtype not in DATA_TYPES:
        raise NavdeployError(f"{where}: dtype {dtype!r} has no Triton data type.")
    return DATA_TYPES[dtype]


def _onnx_io(path: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(name, dtype) of the ONNX model's graph inputs and outputs, read without loading external weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    ins = [(i.name, ONNX_DTYPES.get(i.type.tensor_type.elem_type, "?")) for i in model.graph.input
           if i.name not in initializers]
    outs = [(o.name, ONNX_DTYPES.get(o.type.tensor_type.elem_type, "?")) for o in model.graph.output]
    return ins, outs


def _batching(graph: Graph, manifest: Manifest, candidate: CandidateRecord) -> tuple[int, list[int]]:
    """(max_batch_size, preferred sizes) from what was profiled; (0, []) when the graph is not batched."""
    if not _triton_batching(graph):
        return 0, []
    profiled = sorted({p.batch_size for p in candidate.profile}) or sorted(manifest.batch_sizes)
    # The artifacts accept batch sizes up to max(max_batch_size, captured max): never promise more.
    limit = max(int(manifest.max_batch_size or 1), graph.inputs[0].max_shape[0] if graph.inputs else 1)
    largest = min(max(profiled) if profiled else limit, limit)
    preferred = [b for b in profiled if 1 < b <= largest] or [largest]
    return largest, preferred


def _accelerators(runner: RunnerTriton, precision: str) -> list[dict]:
    """The gpu_execution_accelerator entries of the ONNX Runtime execution provider the runner used."""
    if runner.accelerator == "tensorrt":
        mode = "FP16" if precision == "fp16" else "FP32"
        return [{"name": "tensorrt", "parameters": {"precision_mode": mode}}]
    if runner.accelerator == "cuda":
        return [{"name": "cuda", "parameters": {}}]
    return []


def _plan_graph(name: str, module_folder: Path, manifest: Manifest, entry: GraphEntry, backend: str,
                instance_kind: str, warmup: bool, release: TritonRelease) -> Optional[ModelPlan]:
    module = manifest.module
    module_precision = manifest.precision
    graph = entry.graph
    candidate = entry.selected_candidate()
    if candidate is None:
        log.warning("module %s graph %s has no selected runner; it gets no Triton model", module, graph.key)
        return None
    graph_dir = module_folder / graph.key
    precision = candidate.precision_in(module_precision)
    fmt = candidate.format
    mapping = _triton_mapping(fmt)
    max_batch, preferred = _batching(graph, manifest, candidate)
    platform: Optional[str] = None
    accelerators: list[dict] = []
    cuda_graphs = False
    in_names = [f"input__{i}" for i in range(len(graph.inputs))]
    out_names = [f"output__{i}" for i in range(len(graph.outputs))]
    in_dtypes = [t.dtype for t in graph.inputs]
    out_dtypes = [t.dtype for t in graph.outputs]
    run_dtypes = list(in_dtypes)
    if _has_0d(graph) or (mapping.platform == "torch_aoti" and not release.torch_aoti):
        backend = "python"  # a form this Triton loads: no torch_aoti in its core, or no scalar tensors natively

    if backend == "auto" and mapping.backend is not None:
        triton_backend, platform = mapping.backend, mapping.platform
        art_fmt, art_dir = fmt, entry.artifact_folder(graph_dir, candidate.artifact_dir(module_precision))
        if mapping.io_names == "onnx-file":  # the ONNX graph's own names and dtypes
            ins, outs = _onnx_io(art_dir / artifact_file(fmt))
            in_names, in_dtypes = [n for n, _ in ins], [d for _, d in ins]
            out_names, out_dtypes = [n for n, _ in outs], [d for _, d in outs]
        else:
            if mapping.io_names == "INPUT__N":
                in_names = [f"INPUT__{i}" for i in range(len(graph.inputs))]
                out_names = [f"OUTPUT__{i}" for i in range(len(graph.outputs))]
            if _casts(candidate.runner):  # artifacts built in another precision take and return that precision
                in_dtypes = [_run_dtype(d, precision, module_precision) for d in in_dtypes]
                out_dtypes = [_run_dtype(d, precision, module_precision) for d in out_dtypes]
        runner = _runner_triton(candidate.runner)
        accelerators, cuda_graphs = _accelerators(runner, precision), runner.cuda_graphs
    else:
        triton_backend = "python"
        art_fmt, art_dir, used = _python_artifact(graph_dir, candidate, entry, module_precision)
        used_precision = used.precision_in(module_precision)
        run_dtypes = [_run_dtype(d, used_precision, module_precision) for d in in_dtypes]
        if _triton_mapping(art_fmt).io_names == "onnx-file":
            run_dtypes = [d for _, d in _onnx_io(art_dir / artifact_file(art_fmt))[0]]
    artifact = art_dir / artifact_file(art_fmt)
    if not artifact.exists():
        raise NavdeployError(f"module {module!r} graph {graph.key}: artifact {artifact} is missing; "
                             "re-run nav.optimize to rebuild it.")
    if len(in_names) != len(graph.inputs) or len(out_names) != len(graph.outputs):
        raise NavdeployError(f"module {module!r} graph {graph.key}: the {art_fmt} artifact has {len(in_names)} "
                             f"inputs and {len(out_names)} outputs, the captured graph {len(graph.inputs)} and "
                             f"{len(graph.outputs)}.")
    where = f"module {module!r} graph {graph.key}"
    batching = _triton_batching(graph)
    in_paths = _sources(graph.input_paths, len(graph.inputs))
    out_paths = _sources(tensor_paths(graph.output_spec), len(graph.outputs))
    inputs = [TensorConfig(n, _triton_type(d, where), *_dims(t, batching, graph.batching), source=p)
              for n, d, t, p in zip(in_names, in_dtypes, graph.inputs, in_paths)]
    outputs = [TensorConfig(n, _triton_type(d, where), *_dims(t, batching, graph.batching), source=p)
               for n, d, t, p in zip(out_names, out_dtypes, graph.outputs, out_paths)]
    warm = None
    if warmup:
        warm = {"batch_size": 1, "inputs": [
            {"name": c.name, "data_type": c.data_type,
             "dims": (t.opt_shape[1:] if batching else t.opt_shape) or [1]}
            for c, t in zip(inputs, graph.inputs)]}
    return ModelPlan(name, module, graph.key, candidate.name, triton_backend, platform, art_fmt, art_dir,
                     max_batch, preferred, inputs, outputs, instance_kind, run_dtypes, accelerators, cuda_graphs, warm)


def plan_repository(workspace: Path, modules: Optional[Iterable[str]] = None, backend: str = "auto",
                    warmup: bool = False, triton_version: Optional[str] = None) -> list[ModelPlan]:
    """The Triton models a workspace yields, without writing anything (``triton_version``: the target release,
    which decides how AOTInductor artifacts are served; None: the newest supported)."""
    release = resolve_release(triton_version)
    if backend not in BACKENDS:
        raise NavdeployError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    workspace = Path(workspace)
    if not workspace.is_dir():
        raise NavdeployError(f"workspace {workspace} does not exist; run nav.optimize first or pass workspace=.")
    wanted = set(modules) if modules is not None else None
    plans: list[ModelPlan] = []
    found: set[str] = set()
    for folder in module_folders(workspace):  # not the user's folders beside them (a manifest.json of their own)
        if not (folder / MANIFEST).exists():  # a module whose first optimize has not finished
            continue
        manifest, problem = load_manifest(folder)  # a manifest that is a folder, unreadable or malformed: named
        if manifest is None:
            if wanted is None or folder.name in wanted:  # never export a deployment with a module silently missing
                raise NavdeployError(f"{problem}; re-run nav.optimize for module {folder.name!r} to rewrite it, or "
                                     f"leave it out with --module (modules=).")
            continue
        name = manifest.module
        if wanted is not None and name not in wanted:
            continue
        found.add(name)
        if manifest.reverted:  # a Triton model runs alone, not between the pipeline's other work
            log.warning("module %s runs eagerly in your pipeline (the pipeline check put it back to eager: %s); its "
                        "repository model serves the selected runner, the fastest of the module measured alone",
                        name, manifest.reverted)
        kind = "KIND_GPU" if manifest.device.startswith("cuda") else "KIND_CPU"
        graphs = manifest.graphs
        for key in sorted(graphs):
            plan = _plan_graph(model_name(name, key, len(graphs)), folder, manifest, graphs[key], backend, kind, warmup,
                               release)
            if plan is not None:
                plans.append(plan)
    if wanted is not None and wanted - found:
        raise NavdeployError(f"no optimized module named {', '.join(sorted(wanted - found))} in {workspace}; "
                             "`navdeploy status` lists what the workspace holds.")
    if not plans:
        raise NavdeployError(f"nothing to export from {workspace}: no module there has a selected runner. "
                             "Run nav.optimize first.")
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise NavdeployError(f"two modules map to the same Triton model name among {names}; rename a nav.Module.")
    return plans


def render_model(plan: ModelPlan, env: jinja2.Environment, instance_count: int = 1,
                 max_queue_delay_us: int = 100) -> dict[str, str]:
    """File name (inside the model folder) -> text, for one model."""
    context: dict[str, Any] = {
        "navdeploy_version": __version__, "name": plan.name, "module": plan.module, "graph": plan.graph,
        "selected": plan.selected, "platform": plan.platform, "backend": plan.backend,
        "max_batch_size": plan.max_batch_size, "default_model_filename": plan.default_model_filename,
        "inputs": plan.inputs, "outputs": plan.outputs, "dynamic_batching": plan.max_batch_size > 0,
        "preferred_batch_sizes": plan.preferred_batch_sizes, "max_queue_delay_us": max_queue_delay_us,
        "instance_count": instance_count, "instance_kind": plan.instance_kind, "accelerators": plan.accelerators,
        "cuda_graphs": plan.cuda_graphs, "warmup": plan.warmup,
    }
    files = {"config.pbtxt": env.get_template("config.pbtxt.j2").render(**context)}
    if plan.backend == "python":
        files["1/model.py"] = env.get_template("model.py.j2").render(
            **context, artifact_format=plan.artifact_format, artifact_file=artifact_file(plan.artifact_format),
            input_names=repr([t.name for t in plan.inputs]), output_names=repr([t.name for t in plan.outputs]),
            run_dtypes=repr(plan.run_dtypes), batching=repr(plan.max_batch_size > 0),
            scalar_inputs=repr([t.scalar for t in plan.inputs]), scalar_outputs=repr([t.scalar for t in plan.outputs]))
    return files


def _copy_artifact(src: Path, dst: Path, only: Optional[str] = None) -> None:
    """Hard-link the artifact's files (all of the format folder, e.g. ONNX external data, or ``only`` that one)
    when the file system allows it (big models), else copy them."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if only is not None and item.name != only:
            continue
        target = dst / item.name
        if item.is_dir():
            shutil.copytree(item, target)
            continue
        try:
            os.link(item, target)
        except OSError:
            shutil.copy2(item, target)


def render_serve_script(plans: list[ModelPlan], env: jinja2.Environment, workspace: Optional[Path],
                        pipeline: Optional[str] = None, factory: bool = False) -> str:
    """The repository's ``serve.py``: a readable entry point documenting how its pipeline and models are served.

    ``workspace`` is the one the export was given; None when it came from ``$NAVDEPLOY_WORKSPACE`` or the default,
    and then ``serve.py`` resolves it the same way when it runs. The text holds no date or other trace of when it
    was written, so exporting the same workspace twice gives the same file.
    """
    models = [{"name": p.name, "backend": p.backend, "platform": p.platform, "module": p.module,
               "device": "GPU" if p.instance_kind == "KIND_GPU" else "CPU"} for p in plans]
    return env.get_template("serve.py.j2").render(
        version=__version__, models=models, pipeline=pipeline, factory=factory,
        workspace=str(workspace) if workspace is not None else None,
        python_only=all(p.backend == "python" for p in plans))


def is_navdeploy_repository(path: Path) -> bool:
    """Whether ``path`` is a folder navdeploy wrote as a model repository (it holds the marker)."""
    return path.is_dir() and (path / REPOSITORY_MARKER).is_file()


def check_target(path: Path, force: bool = False) -> None:
    """Refuse a target that export would destroy without having written it: a regular file (always), or a
    non-empty folder that is not a navdeploy repository (unless ``force``)."""
    if path.is_symlink():
        raise NavdeployError(f"{path} is a symbolic link; export-repo replaces folders, never links. Pass the "
                             "folder it points to, or another path.")
    if path.exists() and not path.is_dir():
        raise NavdeployError(f"{path} is a file, not a model repository folder; export-repo never replaces a file. "
                             "Pass another path, or move the file away.")
    if not path.is_dir() or is_navdeploy_repository(path) or force:
        return
    if next(path.iterdir(), None) is not None:
        raise NavdeployError(f"{path} is a folder with files that navdeploy did not write (no {REPOSITORY_MARKER}); "
                             "exporting would delete them. Pass an empty or new folder, or --force (force=True) "
                             "to replace it.")


def write_repository(plans: list[ModelPlan], path: Path, instance_count: int = 1, max_queue_delay_us: int = 100,
                     templates_dir: Optional[Path] = None, target: str = "auto",
                     extra_files: Optional[dict[str, str]] = None, triton_version: Optional[str] = None, *,
                     force: bool = False) -> Path:
    """Render and copy every model into a temporary folder beside ``path``, validate it, then swap it into place.

    A failure (render, copy or validation) leaves an existing repository at ``path`` untouched. ``path`` must be
    new, empty or a repository navdeploy wrote (``force``: any folder); see :func:`check_target`."""
    path = Path(path).absolute()
    check_target(path, force)
    try:
        return _write_repository(plans, path.resolve(), instance_count, max_queue_delay_us, templates_dir, target,
                                 extra_files, triton_version)
    except OSError as exc:  # a full disk, a read-only or forbidden folder: one error naming the path and the fix
        raise write_error(exc, path, "or export to another folder") from exc


def _write_repository(plans: list[ModelPlan], path: Path, instance_count: int, max_queue_delay_us: int,
                      templates_dir: Optional[Path], target: str, extra_files: Optional[dict[str, str]],
                      triton_version: Optional[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    env = _environment(Path(templates_dir) if templates_dir else None)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        (tmp / REPOSITORY_MARKER).write_text(REPOSITORY_MARKER_TEXT)
        for plan in plans:
            folder = tmp / plan.name
            fmt = plan.artifact_format
            _copy_artifact(plan.artifact_dir, folder / "1",
                           artifact_file(fmt) if _triton_mapping(fmt).copy_artifact_only else None)
            for rel, text in render_model(plan, env, instance_count, max_queue_delay_us).items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_text(text)
        for rel, text in (extra_files or {}).items():
            (tmp / rel).write_text(text)
        problems = errors(validate_repository(tmp, target=target, triton_version=triton_version))
        if problems:
            raise NavdeployError("the emitted repository does not validate:\n" + "\n".join(map(str, problems)))
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.rmdir(old)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# The templates of a repository a user's folder may override (each one it lacks comes from the shipped ones).
_OVERRIDABLE = ("config.pbtxt.j2", "model.py.j2", "serve.py.j2")


def _templates_folder(templates_dir: Optional[str | Path]) -> Optional[Path]:
    """The user's templates folder, which must exist: a mistyped path never falls back to the shipped templates."""
    if templates_dir is None or str(templates_dir) == "":
        return None
    folder = Path(templates_dir)
    if not folder.is_dir():
        raise NavdeployError(f"templates folder {folder} does not exist or is not a folder; pass the folder that "
                             "holds your config.pbtxt.j2 / model.py.j2, or leave it out for the shipped templates.")
    if not any((folder / name).is_file() for name in _OVERRIDABLE):
        raise NavdeployError(f"templates folder {folder} holds none of {', '.join(_OVERRIDABLE)}, so every file "
                             "would come from the shipped templates; pass the folder that holds yours, or leave it "
                             "out for the shipped templates.")
    return folder


def export_model_repository(path: str | Path = "model_repository", modules: Optional[Iterable[Any]] = None,
                            backend: str = "auto", workspace: Optional[str | Path] = None, *,
                            instance_count: int = 1, max_queue_delay_us: int = 100, warmup: bool = False,
                            templates_dir: Optional[str | Path] = None, pipeline: Optional[str] = None,
                            pipeline_factory: bool = False, triton_version: Optional[str] = None,
                            force: bool = False) -> Path:
    """Write a Triton model repository with one model per optimized module graph; returns its path.

    Args:
        path: the repository folder; replaced atomically (built beside it, validated, then renamed). It must be
            new, empty or a repository navdeploy wrote; a regular file there is never replaced.
        modules: module names or ``nav.Module``s to export; all modules of the workspace when None.
        backend: ``"auto"`` (by the selected runner's format: onnxruntime, pytorch, tensorrt, else python) or
            ``"python"`` (every model a Python-backend model: runs on any Triton, including the one bundled in
            ``nvidia-pytriton``).
        workspace: the navdeploy workspace (default: the modules' workspace, ``$NAVDEPLOY_WORKSPACE`` or
            ``~/.cache/navdeploy``).
        instance_count: model instances per model (``instance_group.count``).
        max_queue_delay_us: the dynamic batcher's queue delay for batched models.
        warmup: add a ``model_warmup`` with zero inputs of the captured opt shape.
        templates_dir: a folder with your own ``config.pbtxt.j2`` / ``model.py.j2`` overriding the shipped ones.
        pipeline: ``"module:function"`` of the Python pipeline; the repository's generated ``serve.py`` serves it
            through PyTriton (``pipeline_factory=True`` when the function returns the pipeline).
        triton_version: the Triton release the repository is for (``"24.10"`` = server 2.51, the one in
            nvidia-pytriton; default: the newest navdeploy supports). AOTInductor artifacts become ``torch_aoti``
            models where that release's core knows the platform, else Python-backend models; the repository is
            validated against that release.
        force: replace ``path`` even when it is a non-empty folder navdeploy did not write.
    """
    from navdeploy.config import default_workspace

    names = None
    if modules is not None:
        names = []
        for m in modules:
            if isinstance(m, str):
                names.append(m)
                continue
            names.append(m.name)
            own = getattr(getattr(m, "optimize_config", None), "workspace", None)
            if workspace is None and own is not None:
                workspace = own
    ws = Path(workspace) if workspace is not None else default_workspace()
    if not isinstance(instance_count, int) or instance_count < 1:
        raise NavdeployError(f"instance_count must be 1 or more (model instances per model), not {instance_count!r}.")
    check_target(Path(path).absolute(), force)  # before any work: a refused target costs nothing
    templates = _templates_folder(templates_dir)
    plans = plan_repository(ws, names, backend, warmup, triton_version)
    gpu = any(p.instance_kind == "KIND_GPU" for p in plans)
    # serve.py names the workspace only when the caller chose one: an implicit one is resolved where it is served.
    serve_py = render_serve_script(plans, _environment(templates), Path(workspace) if workspace is not None else None,
                                   pipeline, pipeline_factory)
    out = write_repository(plans, Path(path), instance_count, max_queue_delay_us, templates,
                           target="gpu" if gpu else "cpu", extra_files={"serve.py": serve_py},
                           triton_version=triton_version, force=force)
    log.info("wrote Triton model repository %s: %s", out, ", ".join(f"{p.name} ({p.backend})" for p in plans))
    return out
