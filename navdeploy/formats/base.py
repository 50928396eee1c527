"""What a format and a runner are: plain records holding the functions that build and load them."""

from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from navdeploy.capture.graph import Graph


class Format(str, enum.Enum):
    """A model format a module can be turned into. Each format has one or more runners."""

    TORCH = "torch"  # the eager module itself; runners: TorchCPU/TorchCUDA and torch.compile
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORTEDPROGRAM = "torch-exportedprogram"
    TORCH_AOTI = "torch-aoti"  # AOTInductor package (.pt2)
    ONNX = "onnx"
    TENSORRT = "trt"
    TORCH_TRT = "torch-trt"


RunFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass
class BuildContext:
    """Everything an exporter needs. ``path`` is an empty folder the artifact goes into."""

    module: torch.nn.Module  # a FlatModule in eval mode, on ``device``
    example: list[torch.Tensor]  # example inputs; batch axis 0 grown to 2 when the graph batches
    graph: Graph
    dynamic_axes: list[dict[int, tuple[int, int]]]  # per input: {axis: (min, max)}
    path: Path
    device: str
    precision: str  # the candidate's precision (the module was already cast when the runner casts)
    module_dir: Path  # the module's workspace folder, for caches kept across builds (e.g. TensorRT timing cache)
    # What the formats of one graph and precision share within a worker (the one torch.export that AOTInductor,
    # ONNX and the ExportedProgram start from); None: nothing is shared.
    shared: Optional[dict] = None
    # Seconds of sub-steps worth recording beside ``export_s`` (e.g. ``torch_export_s`` when this export ran it).
    timings: dict = field(default_factory=dict)
    # Called once the export's own Python work is done and only compiler processes run (AOTInductor's g++ steps):
    # they leave a core to spare, which the process that binds the winner uses to prepare its loading.
    compiling: Callable[[], None] = field(default=lambda: None)

    @property
    def input_names(self) -> list[str]:
        return [f"input__{i}" for i in range(len(self.graph.inputs))]

    @property
    def output_names(self) -> list[str]:
        return [f"output__{i}" for i in range(len(self.graph.outputs))]


@dataclass
class LoadContext:
    """Everything a runner needs to start: the artifact (if its format writes one) or the module."""

    artifact: Optional[Path]
    module: torch.nn.Module  # the FlatModule, for runners that run the module itself
    graph: Graph
    device: str
    precision: str = "fp32"


# How a native Triton backend names a model's tensors: as the ONNX file names them ("onnx-file"), as libtorch
# maps names to forward() argument positions ("INPUT__N" / "OUTPUT__N"), or as navdeploy's exporters name them.
TritonIONames = Literal["onnx-file", "INPUT__N", "input__N"]


@dataclass(frozen=True)
class TritonMapping:
    """How a format's artifact is served by Triton. ``backend`` None: no native backend runs it, so its graphs
    become Python-backend models (``model.py``) that load an artifact of another format."""

    backend: Optional[str] = None  # e.g. "onnxruntime", "pytorch", "tensorrt"
    platform: Optional[str] = None  # e.g. "onnxruntime_onnx", "pytorch_libtorch", "torch_aoti", "tensorrt_plan"
    io_names: TritonIONames = "input__N"
    # The templated model.py can load it: its rank among such formats (0 first) when the winner's own format
    # cannot be loaded there and the fastest verified candidate's artifact is used instead; None: it cannot.
    python_preference: Optional[int] = None
    # Only the artifact file goes into the model folder: the folder holds build inputs too (TensorRT's ONNX).
    copy_artifact_only: bool = False


@dataclass(frozen=True)
class FormatSpec:
    """A format: how to export the module into it. ``export`` is None for the eager module itself."""

    format: Format
    artifact: Optional[str] = None  # file name inside the format folder
    export: Optional[Callable[[BuildContext], None]] = None
    requires: tuple[str, ...] = ()  # importable packages the export needs
    triton: TritonMapping = TritonMapping()


@dataclass(frozen=True)
class RunnerTriton:
    """What a runner's choice implies for its Triton model, beyond its format's mapping."""

    accelerator: Optional[str] = None  # an ONNX Runtime execution provider Triton enables: "cuda" or "tensorrt"
    cuda_graphs: bool = False  # it ran its model under CUDA graphs


@dataclass(frozen=True)
class RunnerSpec:
    """A runner: loads an artifact (or the module) on one device and returns ``run(inputs) -> outputs``."""

    name: str
    format: Format
    device: str  # "cpu" or "cuda"
    load: Callable[[LoadContext], RunFn]
    requires: tuple[str, ...] = ()
    is_available: Optional[Callable[[], Optional[str]]] = field(default=None, compare=False)
    # "cast": navdeploy casts the module and float inputs to the candidate precision before export/run;
    # "builder": the format's builder takes the precision as a flag (TensorRT) and the module stays as it is.
    precision_by: str = "cast"
    # Its build times kernels on the device (TensorRT tactics, max-autotune): it builds with no other candidate
    # running, as profiling does, or its choices would be timed against the neighbours' work.
    builds_alone: bool = False
    # False: tried only when named in OptimizeConfig(runners=...), never by default.
    by_default: bool = True
    triton: RunnerTriton = RunnerTriton()
    # Where the search builds it (lower first): the likely winners first (candidates/search.py).
    search_rank: int = 50
    # Runners whose kernels this one runs, with a wrapper of its own or without theirs (torch.compile's Python
    # wrapper and guards around AOTInductor's kernels; the same kernels without CUDA-graph replay): the search
    # builds it only when none of them verified (thorough: always). It builds in the first one's chain.
    twin_of: tuple[str, ...] = ()
    # It runs eager's kernels uncompiled (an ExportedProgram's aten graph): by default the search builds it only
    # where a Python-backend Triton model would have no other artifact to load (search.eager_kernels_skip_reason).
    runs_eager_kernels: bool = False
    # False: the search's follow-up precisions (bf16 on a CPU that computes it: candidates/precision.py) skip it,
    # as its copy cannot be faster there than the others' (ExportedProgram runs eager kernels, as TorchCPU[bf16]
    # does) or cannot run (ONNX Runtime's CPU provider has no bf16 Add or MatMul kernel). Named precisions try it.
    follows_up: bool = True
    # What the process that loads this runner can do ahead, while candidates build in workers (Inductor's imports
    # and CPU ISA probe: seconds the bind of a winner would otherwise wait for). Once per process; must not raise.
    prepare_loading: Optional[Callable[[], None]] = field(default=None, compare=False)
    # Whether its build of a module (already cast to the precision given) prepacks the matmul weights (a frozen
    # AOTInductor build: oneDNN's packed layout, where eager reorders them every call), so eager's copy in a low
    # precision does not predict its speed.
    prepacks: Optional[Callable[[torch.nn.Module, str], bool]] = field(default=None, compare=False)

    def unavailable_reason(self) -> Optional[str]:
        """None when the runner can run here, else why not (missing package, no provider, no GPU)."""
        for package in self.requires:
            if importlib.util.find_spec(package) is None:
                return f"package {package!r} is not installed"
        if self.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return self.is_available() if self.is_available else None


def as_list(outputs) -> list[torch.Tensor]:
    """Runner outputs (tensor, tuple or list) as a list of tensors."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return list(outputs)


def canonical_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides a new tensor of its shape has, where only the strides of its size-1 (or size-0) axes
    differ from them: torch calls such a tensor contiguous whatever those strides are, yet AOTInductor checks every
    stride (a decoder's one-token K/V view, ``(2, 4, 1, 32)`` with strides ``(128, 32, 128, 1)``, was refused).
    A view of the same memory, no copy; any other tensor is returned as it is."""
    shape = t.shape
    if len(shape) < 2 or (1 not in shape and 0 not in shape) or not t.is_contiguous():
        return t
    strides, step = [0] * len(shape), 1
    for axis in range(len(shape) - 1, -1, -1):
        strides[axis] = step
        step *= max(shape[axis], 1)
    return t if t.stride() == tuple(strides) else t.as_strided(shape, strides)
