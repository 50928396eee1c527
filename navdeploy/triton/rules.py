"""The rules Triton core applies when it loads a model configuration, written for navdeploy.

They follow the order of Triton core's loading: auto-complete (a missing backend/platform/model file name is
inferred from the platform, the file name or the first version folder), normalisation (version policy latest 1,
preferred batch size = max_batch_size, instance count and KIND_AUTO resolved), then validation (model, I/O shapes
and reshapes, batch inputs/outputs, dynamic and sequence batching, ensembles, instance groups) and warmup. Each
rule is a generator of :class:`Problem`; a rule never stops at the first problem, so one run lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from math import prod
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from navdeploy.triton.problems import Problem
from navdeploy.triton.versions import TritonRelease

# default model file of each backend, as Triton core's auto-complete fills it in
BACKEND_FILES: dict[str, str] = {
    "onnxruntime": "model.onnx", "tensorrt": "model.plan", "openvino": "model.xml", "python": "model.py",
}
PLATFORM_FILES: dict[str, str] = {
    "onnxruntime_onnx": "model.onnx", "pytorch_libtorch": "model.pt", "torch_aoti": "model.pt2",
    "tensorrt_plan": "model.plan", "tensorflow_graphdef": "model.graphdef", "tensorflow_savedmodel": "model.savedmodel",
}
# backends whose platform Triton core checks (any platform goes with any other backend, e.g. python)
TYPED_BACKENDS = ("tensorflow", "tensorrt", "onnxruntime", "pytorch")
KNOWN_BACKENDS = ("onnxruntime", "pytorch", "tensorrt", "python", "openvino", "tensorflow")
CORRID_TYPES = ("TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING")


@dataclass(frozen=True)
class Resolved:
    """backend, platform and model file name after Triton core's auto-complete."""

    backend: str
    platform: str
    model_file: Optional[str]
    inferred: tuple[str, ...] = ()  # which of them auto-complete filled in


@dataclass
class ModelContext:
    """Everything the rules read about one model folder."""

    model: str  # the folder name
    folder: Path
    cfg: Any  # the parsed inference.ModelConfig
    pb2: Any  # tritonclient.grpc.model_config_pb2
    target: str  # "cpu" or "gpu"
    release: TritonRelease
    configs: dict = field(default_factory=dict)  # name -> parsed config of every model in the repository

    def problem(self, where: str, message: str, fix: str, severity: str = "error") -> Problem:
        return Problem(self.model, where, message, fix, severity)

    @cached_property
    def versions(self) -> list[str]:
        """The numeric version folders, in Triton's order (by number)."""
        return sorted((p.name for p in self.folder.iterdir() if p.is_dir() and p.name.isdigit()), key=int)

    @cached_property
    def resolved(self) -> Resolved:
        return resolve_backend(self.cfg, self.model, self.folder, self.release)

    def type_name(self, value: int) -> str:
        return self.pb2.DataType.Name(value)


def _first_version_files(folder: Path) -> set[str]:
    """The entries of the version folder Triton's auto-complete inspects: the first one in string order."""
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return {p.name for p in (folder / subdirs[0]).iterdir()} if subdirs else set()


def _infer_backend(cfg, model: str, files: set[str], release: TritonRelease) -> tuple[str, str, str]:
    """(backend, platform, model file) the way Triton core auto-completes a config that leaves some out."""
    backend, platform, file = cfg.backend, cfg.platform, cfg.default_model_filename
    if not platform and backend in ("", "tensorflow") and file in ("model.savedmodel", "model.graphdef"):
        return "tensorflow", {"model.savedmodel": "tensorflow_savedmodel"}.get(file, "tensorflow_graphdef"), file
    if platform.startswith("tensorflow_"):
        return backend or "tensorflow", platform, file or PLATFORM_FILES.get(platform, "")
    bare = not platform and not file
    if not backend:
        by_platform = {"tensorrt_plan": "tensorrt", "onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}
        by_file = {"model.plan": "tensorrt", "model.onnx": "onnxruntime", "model.xml": "openvino",
                   "model.pt": "pytorch", "model.py": "python"}
        if release.torch_aoti:
            by_platform["torch_aoti"] = "pytorch"
            by_file["model.pt2"] = "pytorch"
        backend = by_platform.get(platform) or by_file.get(file, "")
        if not backend and bare:
            found = [f for f in ("model.plan", "model.onnx", "model.xml", "model.pt") if f in files]
            if not found and release.torch_aoti and "model.pt2" in files:
                found, platform = ["model.pt2"], "torch_aoti"
            if not found and "model.py" in files:
                found = ["model.py"]
            backend = by_file.get(found[0], "") if found else ""
        if not backend and bare and "." in model:  # a custom backend named by the model: "<name>.<backend>"
            backend = model.split(".", 1)[1]
            file = f"model.{backend}"
    if backend == "tensorrt":
        platform = platform or "tensorrt_plan"
    elif backend == "onnxruntime":
        platform = platform or "onnxruntime_onnx"
    elif backend == "pytorch":
        platform = platform or "pytorch_libtorch"
    file = file or PLATFORM_FILES.get(platform) or BACKEND_FILES.get(backend, "")
    return backend, platform, file


def resolve_backend(cfg, model: str, folder: Path, release: TritonRelease) -> Resolved:
    """backend/platform/model file as Triton's core sees them after auto-complete."""
    if cfg.platform == "ensemble":
        return Resolved(cfg.backend, "ensemble", None)
    backend, platform, file = _infer_backend(cfg, model, _first_version_files(folder), release)
    inferred = tuple(name for name, before, after in (("backend", cfg.backend, backend),
                                                     ("platform", cfg.platform, platform))
                     if not before and after)
    return Resolved(backend, platform, file or None, inferred)


# ---------------------------------------------------------------------------------------------------- model level


def check_name(ctx: ModelContext) -> Iterator[Problem]:
    """The config's name (auto-completed from the folder when empty) must be the folder's."""
    if ctx.cfg.name and ctx.cfg.name != ctx.model:
        yield ctx.problem("name", f"name {ctx.cfg.name!r} differs from the folder name {ctx.model!r}.",
                          f'use name: "{ctx.model}" or rename the folder.')


def check_backend(ctx: ModelContext) -> Iterator[Problem]:
    """A backend Triton finds, and a platform its core knows for this release and pairs with that backend."""
    cfg, rel = ctx.cfg, ctx.release
    if cfg.platform == "ensemble":
        if cfg.backend:
            yield ctx.problem("backend", f"an ensemble has no backend (got {cfg.backend!r}).",
                              "remove the backend line.")
        return
    # Core checks the pair only for the backends it knows; python or a custom backend ignores the platform.
    if cfg.platform and cfg.platform not in rel.platforms and (not cfg.backend or cfg.backend in TYPED_BACKENDS):
        later = " (Triton core knows it from release 26.03)" if cfg.platform == "torch_aoti" else ""
        fix = ("export the AOTInductor model as a Python-backend model (navdeploy export-repo --triton-version "
               f"{rel.release} does), or target a newer Triton with --triton-version" if cfg.platform == "torch_aoti"
               else f"use one of {', '.join(sorted(rel.platforms))}, or set only backend")
        yield ctx.problem("platform", f"{rel} does not know platform {cfg.platform!r}{later}.", fix + ".")
        return
    res = ctx.resolved
    if not res.backend:
        yield ctx.problem("backend", "neither backend nor platform is set, and no model file in the first version "
                          "folder tells Triton which backend to use.",
                          'set backend, e.g. backend: "onnxruntime", "pytorch", "tensorrt" or "python".')
        return
    if res.inferred:
        yield ctx.problem("backend", f"{' and '.join(res.inferred)} not set; Triton infers "
                          f"backend {res.backend!r}" + (f", platform {res.platform!r}" if res.platform else "") + ".",
                          f'write backend: "{res.backend}" so the config says what Triton will do.', "warning")
    expected = rel.platforms.get(res.platform)
    if res.backend in TYPED_BACKENDS and expected != res.backend:
        pair = next((p for p, b in rel.platforms.items() if b == res.backend), None)
        yield ctx.problem("platform", f"backend {res.backend!r} does not serve platform {res.platform!r} in {rel}.",
                          f'use platform "{pair}" with backend "{res.backend}", or remove the platform line.')
    elif res.platform and res.backend not in TYPED_BACKENDS:
        yield ctx.problem("platform", f"backend {res.backend!r} ignores platform {res.platform!r}.",
                          "remove the platform line.", "warning")
    if res.backend not in KNOWN_BACKENDS:
        yield ctx.problem("backend", f"backend {res.backend!r} is not one navdeploy knows; Triton needs it in its "
                          "backend directory.", "check the name (e.g. onnxruntime, pytorch).", "warning")


def check_max_batch_size(ctx: ModelContext) -> Iterator[Problem]:
    if ctx.cfg.max_batch_size < 0:
        yield ctx.problem("max_batch_size", f"max_batch_size is {ctx.cfg.max_batch_size}.",
                          "use 0 for a model without a batch axis, else the largest batch it accepts.")


def check_versions(ctx: ModelContext) -> Iterator[Problem]:
    """A numeric version folder holding the model file (version policy: latest 1 unless the config says)."""
    versions = ctx.versions
    if not versions:
        yield ctx.problem("version folder", f"{ctx.folder} has no numeric version folder; Triton loads nothing "
                          "from it.", f"put the model file in {ctx.folder}/1/.")
        return
    policy = ctx.cfg.version_policy
    if policy.HasField("specific"):
        for v in policy.specific.versions:
            if str(v) not in versions:
                yield ctx.problem("version_policy.specific.versions", f"version {v} has no folder.",
                                  f"create {ctx.folder}/{v}/ or remove {v} from the policy.")
    if policy.HasField("latest") and policy.latest.num_versions < 1:
        yield ctx.problem("version_policy.latest.num_versions", f"num_versions is {policy.latest.num_versions}: "
                          "Triton serves no version.", "use num_versions: 1 (or more).")
    file = ctx.resolved.model_file
    if ctx.cfg.platform == "ensemble" or not file:
        return
    for v in versions:
        if not (ctx.folder / v / file).exists():
            yield ctx.problem("default_model_filename", f"{ctx.model}/{v}/{file} does not exist.",
                              f"put the model file at {ctx.folder}/{v}/{file}, or set default_model_filename.")


# --------------------------------------------------------------------------------------------------------- tensors


def _segments(shape: list[int]) -> list[int]:
    """Element counts of the runs between -1 dims: [2, 4, -1, 6] -> [8, 6]."""
    counts, current = [], 1
    for d in shape:
        if d == -1:
            counts.append(current)
            current = 1
        else:
            current *= d
    return counts + [current]


def _reshape_problems(ctx: ModelContext, where: str, dims: list[int], shape: list[int]) -> Iterator[Problem]:
    """dims and reshape must hold the same elements (an empty reshape takes dims of one element)."""
    if any(d != -1 and d < 1 for d in shape):
        bad = next(d for d in shape if d != -1 and d < 1)
        yield ctx.problem(f"{where}.reshape.shape", f"reshape {shape} contains {bad}.",
                          "each reshape dim must be -1 or >= 1.")
        return
    if not shape:
        if prod(dims) != 1 or -1 in dims:
            yield ctx.problem(f"{where}.reshape.shape", f"an empty reshape needs dims of one element, got {dims}.",
                              "use dims: [ 1 ] with reshape: { shape: [ ] }, or give the real shape in reshape.")
        return
    if (-1 in dims) != (-1 in shape) or (-1 not in dims and prod(dims) != prod(shape)):
        yield ctx.problem(f"{where}.reshape.shape", f"dims {dims} and reshape {shape} hold different element counts.",
                          f"make reshape a shape of the same {prod(dims) if -1 not in dims else 'variable'} "
                          "elements, e.g. equal to dims.")
    elif -1 in dims and _segments(dims) != _segments(shape):
        yield ctx.problem(f"{where}.reshape.shape", f"dims {dims} and reshape {shape} do not match between their -1 "
                          f"axes (element counts {_segments(dims)} vs {_segments(shape)}).",
                          "keep each -1 at a place where the fixed axes before and after it multiply to the same size.")


def _tensor_problems(ctx: ModelContext, section: str, i: int, t) -> Iterator[Problem]:
    where = f"{section}[{i}]" + (f" ({t.name!r})" if t.name else "")
    if not t.name:
        yield ctx.problem(f"{where}.name", "the tensor has no name.",
                          f'give it the name the model uses, e.g. name: "{section}__{i}".')
    if t.data_type == ctx.pb2.TYPE_INVALID:
        yield ctx.problem(f"{where}.data_type", "data_type is missing or TYPE_INVALID.",
                          "set the tensor's type, e.g. data_type: TYPE_FP32.")
    dims = list(t.dims)
    if not dims:
        yield ctx.problem(f"{where}.dims", "dims is empty; Triton needs the shape of every tensor.",
                          "list the shape without the batch axis, e.g. dims: [ 3, 224, 224 ]; a scalar is dims: [ 1 ] "
                          "(with reshape: { shape: [ ] } only when max_batch_size > 0).")
    bad = [d for d in dims if d != -1 and d < 1]
    if bad:
        yield ctx.problem(f"{where}.dims", f"dims {dims} contains {bad[0]}; each dim must be -1 (dynamic) or >= 1.",
                          "use -1 for an axis whose size varies, else its size.")
    if t.HasField("reshape"):
        shape = list(t.reshape.shape)
        if not shape and ctx.cfg.max_batch_size == 0:
            yield ctx.problem(f"{where}.reshape", "an empty reshape on a non-batching model (max_batch_size 0): "
                              "Triton has no scalar tensors.",
                              "remove the reshape and keep dims: [ 1 ] (the model sees shape [1]; reshape to [] in "
                              "model.py), or set max_batch_size > 0.")
        elif dims and not bad:
            yield from _reshape_problems(ctx, where, dims, shape)
    trt = ctx.resolved.platform == "tensorrt_plan"
    if t.is_shape_tensor and not trt:
        yield ctx.problem(f"{where}.is_shape_tensor", f"shape tensors exist only on TensorRT; this model's platform "
                          f"is {ctx.resolved.platform or ctx.resolved.backend!r}.", "remove is_shape_tensor.")
    if t.is_non_linear_format_io and (not trt or len(dims) != 3):
        yield ctx.problem(f"{where}.is_non_linear_format_io", "non-linear I/O formats need a TensorRT model and 3 "
                          f"dims (platform {ctx.resolved.platform!r}, dims {dims}).", "remove is_non_linear_format_io.")


def check_io(ctx: ModelContext) -> Iterator[Problem]:
    """Names, types, dims and reshapes of every input and output; image formats need 3 dims."""
    formats = ctx.pb2.ModelInput.Format
    for section, tensors in (("input", ctx.cfg.input), ("output", ctx.cfg.output)):
        seen: set[str] = set()
        for i, t in enumerate(tensors):
            if t.name and t.name in seen:
                yield ctx.problem(f"{section}[{i}] ({t.name!r}).name", f"name {t.name!r} appears twice in {section}.",
                                  "give every tensor a unique name.")
            seen.add(t.name)
            yield from _tensor_problems(ctx, section, i, t)
            if section == "input" and t.format != formats.Value("FORMAT_NONE") and len(t.dims) != 3:
                yield ctx.problem(f"input[{i}] ({t.name!r}).format", f"{formats.Name(t.format)} needs 3 dims (C, H, W "
                                  f"without the batch axis), got {list(t.dims)}.",
                                  "remove format (FORMAT_NONE), or give dims of 3 axes.")


def check_batch_io(ctx: ModelContext) -> Iterator[Problem]:
    """batch_input / batch_output: one source input that exists, INT32/FP32 batch inputs, known target outputs."""
    inputs = {t.name for t in ctx.cfg.input}
    outputs = {t.name for t in ctx.cfg.output}
    allowed = (ctx.pb2.TYPE_INT32, ctx.pb2.TYPE_FP32)
    for kind, items in (("batch_input", ctx.cfg.batch_input), ("batch_output", ctx.cfg.batch_output)):
        for i, item in enumerate(items):
            where = f"{kind}[{i}]"
            if len(item.source_input) != 1:
                yield ctx.problem(f"{where}.source_input", f"{kind} needs exactly 1 source input, got "
                                  f"{list(item.source_input)}.", "name one model input in source_input.")
            for name in item.source_input:
                if name not in inputs:
                    yield ctx.problem(f"{where}.source_input", f"{name!r} is not a model input.",
                                      f"use one of {sorted(inputs)}.")
            if kind == "batch_input" and item.data_type not in allowed:
                yield ctx.problem(f"{where}.data_type", f"batch inputs are TYPE_INT32 or TYPE_FP32, got "
                                  f"{ctx.type_name(item.data_type)}.", "use data_type: TYPE_INT32 or TYPE_FP32.")
            if kind == "batch_output":
                targets = list(item.target_name)
                for name in targets:
                    if name not in outputs:
                        yield ctx.problem(f"{where}.target_name", f"{name!r} is not a model output.",
                                          f"use one of {sorted(outputs)}.")
                for name in {n for n in targets if targets.count(n) > 1}:
                    yield ctx.problem(f"{where}.target_name", f"target {name!r} is listed twice.", "list it once.")


# -------------------------------------------------------------------------------------------------------- batching


def _preferred_problems(ctx: ModelContext, where: str, sizes: list[int]) -> Iterator[Problem]:
    limit = ctx.cfg.max_batch_size
    for size in sizes:
        if size <= 0 or size > limit:
            needs = " (dynamic/sequence batching of preferred sizes needs max_batch_size > 0)" if limit <= 0 else ""
            yield ctx.problem(where, f"preferred batch size {size} is outside [1, max_batch_size={limit}]{needs}.",
                              f"use sizes between 1 and {limit}, or raise max_batch_size." if limit > 0 else
                              "remove the preferred sizes, or set max_batch_size to the largest batch the model takes.")


def check_dynamic_batching(ctx: ModelContext) -> Iterator[Problem]:
    """Preferred sizes within [1, max_batch_size] (none: Triton uses max_batch_size), priority levels, ordering."""
    if not ctx.cfg.HasField("dynamic_batching"):
        return
    db = ctx.cfg.dynamic_batching
    yield from _preferred_problems(ctx, "dynamic_batching.preferred_batch_size", list(db.preferred_batch_size))
    if ctx.cfg.max_batch_size == 0 and not db.preferred_batch_size:
        yield ctx.problem("dynamic_batching", "dynamic_batching on a model with max_batch_size 0 batches nothing "
                          "(requests run one by one).", "set max_batch_size > 0, or remove dynamic_batching.",
                          "warning")
    levels = db.priority_levels
    if levels:
        if not 1 <= db.default_priority_level <= levels:
            yield ctx.problem("dynamic_batching.default_priority_level", f"default_priority_level "
                              f"{db.default_priority_level} is outside [1, priority_levels={levels}].",
                              f"set default_priority_level between 1 and {levels}.")
        for level in db.priority_queue_policy:
            if not 1 <= level <= levels:
                yield ctx.problem(f"dynamic_batching.priority_queue_policy[{level}]", f"priority level {level} is "
                                  f"outside [1, priority_levels={levels}].", f"use levels between 1 and {levels}.")
    if db.preserve_ordering:
        if levels > 1:
            yield ctx.problem("dynamic_batching.preserve_ordering", f"preserve_ordering allows one priority level, "
                              f"priority_levels is {levels}.", "remove preserve_ordering or use priority_levels: 1.")
        delay = ctx.pb2.ModelQueuePolicy.DELAY
        policies = [("default_queue_policy", db.default_queue_policy)] + \
            [(f"priority_queue_policy[{k}]", v) for k, v in db.priority_queue_policy.items()]
        for name, policy in policies:
            if policy.default_timeout_microseconds and policy.timeout_action == delay:
                yield ctx.problem(f"dynamic_batching.{name}.timeout_action", "timeout_action DELAY conflicts with "
                                  "preserve_ordering.", "use timeout_action: REJECT, or remove preserve_ordering.")


def _control_problems(ctx: ModelContext, sb) -> Iterator[Problem]:
    kinds = ctx.pb2.ModelSequenceBatching.Control.Kind
    seen_tensors: set[str] = set()
    seen_kinds: dict[int, str] = {}
    for i, control_input in enumerate(sb.control_input):
        where = f"sequence_batching.control_input[{i}]"
        if not control_input.name:
            yield ctx.problem(f"{where}.name", "a control tensor without a name.", "name the model input it feeds.")
        elif control_input.name in seen_tensors:
            yield ctx.problem(f"{where}.name", f"control tensor {control_input.name!r} is used for several controls.",
                              "give each control its own tensor.")
        seen_tensors.add(control_input.name)
        for c in control_input.control:
            kind = kinds.Name(c.kind)
            if c.kind in seen_kinds:
                yield ctx.problem(f"{where}.control", f"{kind} is given twice (also by {seen_kinds[c.kind]!r}).",
                                  f"keep one {kind} control.")
            seen_kinds[c.kind] = control_input.name
            values = [n for n in ("int32_false_true", "fp32_false_true", "bool_false_true") if len(getattr(c, n))]
            if kind == "CONTROL_SEQUENCE_CORRID":
                if values:
                    yield ctx.problem(f"{where}.control", f"CONTROL_SEQUENCE_CORRID takes no {values[0]}.",
                                      "remove it and set data_type instead.")
                if ctx.type_name(c.data_type) not in CORRID_TYPES:
                    yield ctx.problem(f"{where}.control.data_type", f"CONTROL_SEQUENCE_CORRID has type "
                                      f"{ctx.type_name(c.data_type)}.", f"use one of {', '.join(CORRID_TYPES)}.")
            elif kind in ("CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_END", "CONTROL_SEQUENCE_READY"):
                if len(values) != 1:
                    yield ctx.problem(f"{where}.control", f"{kind} needs exactly one of int32_false_true, "
                                      f"fp32_false_true, bool_false_true (got {values or 'none'}).",
                                      "give one, e.g. int32_false_true: [ 0, 1 ].")
                elif len(getattr(c, values[0])) != 2:
                    yield ctx.problem(f"{where}.control.{values[0]}", f"{values[0]} of {kind} needs 2 entries "
                                      "(false, true).", f"use {values[0]}: [ 0, 1 ].")


def check_sequence_batching(ctx: ModelContext) -> Iterator[Problem]:
    """Controls well formed, oldest-first preferred sizes, direct slot utilization, no response cache."""
    if not ctx.cfg.HasField("sequence_batching"):
        return
    sb = ctx.cfg.sequence_batching
    if ctx.cfg.response_cache.enable:
        yield ctx.problem("response_cache.enable", "the response cache does not work with sequence batching.",
                          "set response_cache { enable: false }.")
    yield from _control_problems(ctx, sb)
    if sb.HasField("oldest"):
        yield from _preferred_problems(ctx, "sequence_batching.oldest.preferred_batch_size",
                                       list(sb.oldest.preferred_batch_size))
    if sb.HasField("direct") and not 0.0 <= sb.direct.minimum_slot_utilization <= 1.0:
        yield ctx.problem("sequence_batching.direct.minimum_slot_utilization", "minimum_slot_utilization "
                          f"{sb.direct.minimum_slot_utilization} is outside (0, 1].", "use a value in (0, 1].")


def check_transaction_policy(ctx: ModelContext) -> Iterator[Problem]:
    if ctx.cfg.model_transaction_policy.decoupled and ctx.cfg.response_cache.enable:
        yield ctx.problem("response_cache.enable", "the response cache does not work with a decoupled model.",
                          "set response_cache { enable: false }, or make the model non-decoupled.")


# ------------------------------------------------------------------------------------------------------ instances


def _group_problems(ctx: ModelContext, i: int, group) -> Iterator[Problem]:
    kinds = ctx.pb2.ModelInstanceGroup.Kind
    kind = kinds.Name(group.kind)
    where = f"instance_group[{i}]" + (f" ({group.name!r})" if group.name else "")
    gpus = list(group.gpus)
    if kind == "KIND_GPU" and ctx.target != "gpu":
        yield ctx.problem(f"instance_group[{i}].kind", "KIND_GPU on a CPU target: Triton fails to load the model "
                          "where no GPU is visible.",
                          "use kind: KIND_CPU (or KIND_AUTO), or validate with --target gpu.")
    if kind in ("KIND_CPU", "KIND_MODEL") and gpus:
        yield ctx.problem(f"{where}.gpus", f"gpus {gpus} are listed for a {kind} group.",
                          "remove gpus, or use kind: KIND_GPU.")
    if any(g < 0 for g in gpus):
        yield ctx.problem(f"{where}.gpus", f"gpus {gpus} holds a negative id.", "list CUDA device ids (0, 1, ...).")
    if group.count < 1:
        default = 2 if kind == "KIND_CPU" and ctx.resolved.backend in ("onnxruntime", "tensorflow") else 1
        yield ctx.problem(f"{where}.count", f"count is {group.count}; Triton uses its default ({default}).",
                          "set the count you want (>= 1).", "warning")
    if ctx.resolved.platform != "tensorrt_plan":
        if list(group.profile):
            yield ctx.problem(f"{where}.profile", f"profile {list(group.profile)} is only for TensorRT models; this "
                              f"one's platform is {ctx.resolved.platform or ctx.resolved.backend!r}.",
                              "remove profile.")
        if list(group.secondary_devices):
            yield ctx.problem(f"{where}.secondary_devices", "secondary devices (NVDLA) are used by TensorRT only.",
                              "remove secondary_devices.", "warning")
    else:
        for profile in group.profile:
            if not profile.isdigit():
                yield ctx.problem(f"{where}.profile", f"profile {profile!r} is not a non-negative integer.",
                                  'name TensorRT optimization profiles by index, e.g. profile: [ "0" ].')


def check_instances(ctx: ModelContext) -> Iterator[Problem]:
    """Kinds and GPUs of every instance group (an empty list gets one group from Triton); accelerators on CPU."""
    if ctx.cfg.platform == "ensemble" or ctx.cfg.HasField("ensemble_scheduling"):
        return
    for i, group in enumerate(ctx.cfg.instance_group):
        yield from _group_problems(ctx, i, group)
    if ctx.cfg.optimization.execution_accelerators.gpu_execution_accelerator and ctx.target != "gpu":
        yield ctx.problem("optimization.execution_accelerators.gpu_execution_accelerator",
                          "GPU execution accelerators on a CPU target are ignored.", "drop them for CPU deployments.",
                          "warning")


# --------------------------------------------------------------------------------------------------------- warmup


def _warmup_input_problems(ctx: ModelContext, where: str, value, tensor) -> Iterator[Problem]:
    which = value.WhichOneof("input_data_type")
    if which is None:
        yield ctx.problem(f"{where}", "no zero_data, random_data or input_data_file.", "add zero_data: true.")
    elif which == "input_data_file" and not (ctx.folder / "warmup" / value.input_data_file).is_file():
        yield ctx.problem(f"{where}.input_data_file", f"{ctx.model}/warmup/{value.input_data_file} does not exist.",
                          f"put the file at {ctx.folder}/warmup/{value.input_data_file}.")
    dims = list(value.dims)
    if any(d < 1 for d in dims):
        yield ctx.problem(f"{where}.dims", f"warmup dims {dims} must be concrete sizes >= 1 (Triton needs every "
                          "variable-size axis given).", "give the full shape of one sample, without the batch axis.")
    if tensor is not None and value.data_type != tensor.data_type:
        yield ctx.problem(f"{where}.data_type", f"{ctx.type_name(value.data_type)} differs from the input's "
                          f"{ctx.type_name(tensor.data_type)}.", f"use data_type: {ctx.type_name(tensor.data_type)}.")


def check_warmup(ctx: ModelContext) -> Iterator[Problem]:
    """Every warmup sample: batch size within max_batch_size, known inputs with concrete dims and data."""
    inputs = {t.name: t for t in ctx.cfg.input}
    limit = max(1, ctx.cfg.max_batch_size)
    for i, warm in enumerate(ctx.cfg.model_warmup):
        if warm.batch_size == 0:
            yield ctx.problem(f"model_warmup[{i}].batch_size", "batch_size 0: Triton skips this sample.",
                              "use batch_size: 1 or remove the sample.", "warning")
        elif warm.batch_size > limit:
            yield ctx.problem(f"model_warmup[{i}].batch_size", f"batch_size {warm.batch_size} is outside [1, {limit}].",
                              "use 1 for non-batching models, else a size up to max_batch_size.")
        for key, value in warm.inputs.items():
            if key not in inputs:
                yield ctx.problem(f"model_warmup[{i}].inputs[{key!r}]", f"{key!r} is not a model input.",
                                  f"use one of {sorted(inputs)}.")
            yield from _warmup_input_problems(ctx, f"model_warmup[{i}].inputs[{key!r}]", value, inputs.get(key))
        missing = sorted(n for n, t in inputs.items() if not t.optional and n not in warm.inputs)
        if warm.batch_size and missing:
            yield ctx.problem(f"model_warmup[{i}].inputs", f"the sample lacks required inputs {missing}.",
                              "give every non-optional input.")


# ------------------------------------------------------------------------------------------------------- ensembles


def _ensemble_shape_problems(ctx: ModelContext) -> Iterator[Problem]:
    cfg = ctx.cfg
    if cfg.HasField("ensemble_scheduling") and cfg.platform != "ensemble":
        yield ctx.problem("ensemble_scheduling", f"ensemble_scheduling on a model whose platform is "
                          f"{cfg.platform!r}.", 'set platform: "ensemble", or remove ensemble_scheduling.')
    if cfg.platform != "ensemble":
        return
    if not cfg.HasField("ensemble_scheduling"):
        yield ctx.problem("ensemble_scheduling", "an ensemble without ensemble_scheduling.",
                          "add ensemble_scheduling { step [ ... ] }.")
    for name, present in (("instance_group", len(cfg.instance_group)), ("optimization", cfg.HasField("optimization")),
                          ("model_warmup", len(cfg.model_warmup))):
        if present:
            yield ctx.problem(name, f"an ensemble takes no {name}; its steps' models have their own.",
                              f"remove {name} from the ensemble.")


def _step_problems(ctx: ModelContext, i: int, step) -> Iterator[Problem]:
    where = f"ensemble_scheduling.step[{i}]"
    target = ctx.configs.get(step.model_name)
    if target is None:
        yield ctx.problem(f"{where}.model_name", f"model {step.model_name!r} is not in the repository.",
                          "add that model or fix the name.")
        return
    for section, mapping, tensors in (("input_map", step.input_map, target.input),
                                      ("output_map", step.output_map, target.output)):
        names = {t.name for t in tensors}
        for key in mapping:
            if key not in names:
                kind = "input" if section == "input_map" else "output"
                yield ctx.problem(f"{where}.{section}[{key!r}]", f"{key!r} is not an {kind} of {step.model_name!r}.",
                                  f"use one of {sorted(names)}.")


def check_ensemble(ctx: ModelContext) -> Iterator[Problem]:
    """Only ensembles schedule steps; every step's model and tensors exist; every tensor flows somewhere."""
    yield from _ensemble_shape_problems(ctx)
    if ctx.cfg.platform != "ensemble" or not ctx.cfg.HasField("ensemble_scheduling"):
        return
    steps = ctx.cfg.ensemble_scheduling.step
    if not steps:
        yield ctx.problem("ensemble_scheduling", "an ensemble without steps.",
                          "add ensemble_scheduling { step [ ... ] }.")
        return
    produced = {v for s in steps for v in s.output_map.values()}
    consumed = {v for s in steps for v in s.input_map.values()}
    inputs = {t.name for t in ctx.cfg.input}
    for i, step in enumerate(steps):
        yield from _step_problems(ctx, i, step)
        for key, value in step.input_map.items():
            if value not in inputs | produced:
                yield ctx.problem(f"ensemble_scheduling.step[{i}].input_map[{key!r}]", f"ensemble tensor {value!r} "
                                  "is neither an ensemble input nor a step output.",
                                  "map it from an ensemble input or another step's output_map.")
    for name in sorted(inputs - consumed):
        yield ctx.problem(f"input ({name!r})", "no step reads this ensemble input.",
                          "map it into a step's input_map, or remove it.")
    outputs = {t.name for t in ctx.cfg.output}
    for name in sorted(outputs - produced):
        yield ctx.problem(f"output ({name!r})", "no step produces this ensemble output.",
                          "map a step output to it in output_map.")
    for name in sorted(produced - consumed - outputs):
        yield ctx.problem("ensemble_scheduling", f"ensemble tensor {name!r} is produced but never used.",
                          "read it in a later step, make it an ensemble output, or drop it from output_map.")


RULES: tuple[Callable[[ModelContext], Iterator[Problem]], ...] = (
    check_name, check_backend, check_max_batch_size, check_versions, check_io, check_batch_io,
    check_dynamic_batching, check_sequence_batching, check_transaction_policy, check_instances, check_warmup,
    check_ensemble,
)
