"""Optimization settings: formats, runners, precisions, tolerances and selection strategies; the user's
environment switches, and the run defaults a caller in this process (the ``navdeploy optimize`` command) sets
for the ``nav.optimize`` calls of the code it runs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from navdeploy.errors import ConfigError
from navdeploy.formats.base import Format
from navdeploy.formats.registry import known_runner_names

# What verify compares against: tolerances per precision (atol, rtol). fp32 kernels from
# different backends reorder reductions, so exact equality is never expected.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 1e-3),
    "tf32": (1e-2, 1e-2),
    "fp16": (1e-2, 1e-2),
    "bf16": (5e-2, 5e-2),
    "int8": (1e-1, 1e-1),
}
PRECISIONS = tuple(DEFAULT_TOLERANCES)


@dataclass(frozen=True)
class MinLatency:
    """Pick the correct candidate with the lowest median latency at the captured batch size."""


@dataclass(frozen=True)
class MaxThroughput:
    """Pick the correct candidate with the highest throughput at any profiled batch size."""


@dataclass(frozen=True)
class LatencyBudget:
    """Pick the highest-throughput candidate whose median latency stays within ``ms`` milliseconds.

    Falls back to :class:`MinLatency` when no candidate meets the budget.
    """

    ms: float

    def __post_init__(self) -> None:
        if not self.ms > 0:
            raise ConfigError(f"LatencyBudget(ms={self.ms!r}): the budget must be a positive number of milliseconds.")


Strategy = Union[MinLatency, MaxThroughput, LatencyBudget]


@dataclass
class OptimizeConfig:
    """Settings for ``nav.optimize``. Every field has a default that works on CPU and GPU machines.

    Attributes:
        target_formats: formats to try; ``None`` means every format available on the target device.
        runners: runner names to try (e.g. ``"OnnxCPU"``, ``"TorchCompileCPU"``); ``None`` means all
            runners of the chosen formats, less the opt-in ``TorchCompileCUDAMaxAutotune`` (name it to try it).
            Eager (``TorchCPU``/``TorchCUDA``) is always measured as baseline.
        target_device: ``"cpu"`` or ``"cuda"``; ``None`` picks the device the module's weights live on.
        batch_sizes: batch sizes to profile; ``None`` means, on CPU, 1, the captured one and powers of two up to
            ``max_batch_size``; on CUDA the captured ones only (each further size is one more torch.compile of
            the module and CUDA-graph recording, minutes for a diffusion UNet; other sizes still run, a
            torch.compile winner compiling on its first call at such a size). Name the sizes a served model
            batches to (e.g. ``[1, 2, 4, 8]``) to have them verified, profiled and warmed.
        max_batch_size: the largest batch size profiled (and later served) when the module batches.
        tolerances: ``{"atol": .., "rtol": ..}`` overriding the defaults of the module's precision.
        strategy: how the winner is picked: ``MinLatency()`` (default), ``MaxThroughput()``,
            ``LatencyBudget(ms)``.
        verify_func: optional ``f(expected: list[Tensor], actual: list[Tensor]) -> bool`` called per sample
            with the flat output tensors, on top of the atol/rtol check.
        sample_count: how many captured samples per input structure are kept on disk and verified.
        workspace: where artifacts and manifests go (default ``$NAVDEPLOY_WORKSPACE`` or ``~/.cache/navdeploy``).
        timeout_s: a candidate's build + verify + profile is stopped after this many seconds.
        profile_time_s: time budget for profiling one candidate at one batch size.
        use_multiprocessing: build and run candidates in a spawned child; ``None`` reads
            ``NAVDEPLOY_USE_MULTIPROCESSING`` (default true).
        precisions: precisions to try each runner in (``"fp32"``, ``"fp16"``, ``"bf16"``, ``"int8"``); ``None``
            means the module's own, plus fp16 for fp32 modules on CUDA, plus bf16 for fp32 modules on a CPU that
            computes bf16 (AVX512-BF16 or AMX) in graphs whose best fp32 build takes 1 ms or more a call, or
            whose matmuls are mostly 192 wide or wider (below that bf16 gains nothing there). Each is checked
            against the module's own eager outputs with that precision's tolerance, and the pipeline's outputs
            against eager's. ``("fp32",)`` keeps fp32 only.
        build_workers: how many worker processes build and verify a module's candidates side by side (each
            holds its own copy of the module); profiling always runs with no build in flight, so figures are
            not disturbed. ``None`` reads ``NAVDEPLOY_BUILD_WORKERS``, else picks from the machine: 1 on the CPU;
            on CUDA one per 8 host cores (torch.compile builds trace on one core and compile kernels on the
            others), at most 4, and no more than fit in half the GPU's free memory at 3 copies of the module
            plus 2 GiB each (:func:`default_build_workers`). Needs multiprocessing. ``timeout_s`` stays wall time
            (less any wait to profile), and builds side by side share the cores: give slow builds more of it.
        parallel_modules: how many modules are optimized side by side, each with its own workers (their builds
            overlap; no timing ever overlaps a build of any module). ``None`` reads ``NAVDEPLOY_PARALLEL_MODULES``,
            else picks from the machine (:func:`default_parallel_modules`): on the CPU one per core, at most 4,
            while their copies fit in half the free memory; 1 when a module is on CUDA. Needs multiprocessing.
            Read from the config given to ``nav.optimize``.
        keep_artifacts: keep every candidate's artifact folder. By default, once a module's winner is chosen, the
            folders nothing will load are removed (their records stay, so a re-run does not build them again):
            kept are the winner's and the one a Python-backend Triton model would fall back to
            (``navdeploy/workspace/prune.py``). ``None`` reads ``NAVDEPLOY_KEEP_ARTIFACTS`` (default false). Keep
            them to choose another candidate by hand later.
        pipeline_repeats: after the swap the whole callable is timed over the dataloader eager and optimized,
            this many passes each, alternating; modules go back to eager (largest loss first) until the optimized
            pipeline is faster beyond noise. 0 skips the check. Read from the config given to ``nav.optimize``.
        thorough: ``True`` restores the exhaustive search: every candidate is built and profiled in full. By
            default candidates are screened on a few calls and only the leaders profiled in full, and a
            candidate that cannot win is not built (``navdeploy/candidates/search.py``; ``docs/search.md``).
            ``None`` reads the run default (``navdeploy optimize --thorough``), then ``NAVDEPLOY_THOROUGH``
            (default false). Results are shared: a thorough run after a quick one builds only what is missing.
    """

    target_formats: Optional[Sequence[Union[Format, str]]] = None
    runners: Optional[Sequence[str]] = None
    target_device: Optional[str] = None
    batch_sizes: Optional[Sequence[int]] = None
    max_batch_size: int = 8
    tolerances: Optional[dict[str, float]] = None
    strategy: Strategy = field(default_factory=MinLatency)
    verify_func: Optional[Callable[[list[torch.Tensor], list[torch.Tensor]], bool]] = None
    sample_count: int = 8
    workspace: Optional[Union[str, Path]] = None
    timeout_s: float = 600.0
    profile_time_s: float = 0.5
    use_multiprocessing: Optional[bool] = None
    precisions: Optional[Sequence[str]] = None
    build_workers: Optional[int] = None
    parallel_modules: Optional[int] = None
    pipeline_repeats: int = 5
    keep_artifacts: Optional[bool] = None
    thorough: Optional[bool] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field and the fix for any invalid value."""
        if isinstance(self.target_formats, str):  # a single format (Format is a str) is not a list of letters
            self.target_formats = (self.target_formats,)
        if isinstance(self.runners, str):
            self.runners = (self.runners,)
        if self.target_formats is not None:
            formats = []
            for f in self.target_formats:
                try:
                    formats.append(Format(f) if not (isinstance(f, str) and f.upper() in Format.__members__
                                                     and not isinstance(f, Format)) else Format[f.upper()])
                except ValueError:
                    valid = ", ".join(f"nav.Format.{x.name} ({x.value!r})" for x in Format)
                    raise ConfigError(f"target_formats: unknown format {f!r}; use one of {valid}.") from None
            self.target_formats = tuple(formats)
        if self.runners is not None:
            known = known_runner_names()
            for r in self.runners:
                if r not in known:
                    raise ConfigError(f"runners: unknown runner {r!r}; known runners: {', '.join(sorted(known))}.")
            self.runners = tuple(self.runners)
        if self.precisions is not None:
            if isinstance(self.precisions, str):
                self.precisions = (self.precisions,)
            for p in self.precisions:
                if p not in PRECISIONS:
                    raise ConfigError(f"precisions: unknown precision {p!r}; use {', '.join(PRECISIONS)}.")
            self.precisions = tuple(self.precisions)
        if self.target_device is not None and self.target_device not in ("cpu", "cuda"):
            raise ConfigError(f"target_device={self.target_device!r}: use 'cpu' or 'cuda'.")
        if self.target_device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("target_device='cuda' but this machine has no CUDA device; use target_device='cpu'.")
        if self.batch_sizes is not None:
            sizes = tuple(int(b) for b in self.batch_sizes)
            if not sizes or min(sizes) < 1:
                raise ConfigError(f"batch_sizes={list(self.batch_sizes)!r}: every batch size must be >= 1.")
            self.batch_sizes = tuple(sorted(set(sizes)))
        if int(self.max_batch_size) < 1:
            raise ConfigError(f"max_batch_size={self.max_batch_size!r}: must be >= 1.")
        if self.tolerances is not None:
            unknown = set(self.tolerances) - {"atol", "rtol"}
            if unknown:
                raise ConfigError(f"tolerances: unknown keys {sorted(unknown)}; use 'atol' and 'rtol'.")
            for k, v in self.tolerances.items():
                if not (isinstance(v, (int, float)) and v >= 0):
                    raise ConfigError(f"tolerances[{k!r}]={v!r}: must be a number >= 0.")
        if not isinstance(self.strategy, (MinLatency, MaxThroughput, LatencyBudget)):
            raise ConfigError(f"strategy={self.strategy!r}: use nav.MinLatency(), nav.MaxThroughput() or "
                              "nav.LatencyBudget(ms).")
        if int(self.sample_count) < 1:
            raise ConfigError(f"sample_count={self.sample_count!r}: must be >= 1.")
        if isinstance(self.pipeline_repeats, bool) or not isinstance(self.pipeline_repeats, int) \
                or self.pipeline_repeats < 0:
            raise ConfigError(f"pipeline_repeats={self.pipeline_repeats!r}: use a whole number >= 0 (0 skips the "
                              "eager-vs-optimized check of the whole pipeline; 5 is the default).")
        if self.build_workers is not None and (isinstance(self.build_workers, bool)
                                               or not isinstance(self.build_workers, int) or self.build_workers < 1):
            raise ConfigError(f"build_workers={self.build_workers!r}: use a whole number >= 1 (1 builds candidates "
                              "one at a time).")
        if self.parallel_modules is not None and (isinstance(self.parallel_modules, bool)
                                                  or not isinstance(self.parallel_modules, int)
                                                  or self.parallel_modules < 1):
            raise ConfigError(f"parallel_modules={self.parallel_modules!r}: use a whole number >= 1 (1 optimizes "
                              "the modules one after another).")
        if self.keep_artifacts is not None and not isinstance(self.keep_artifacts, bool):
            raise ConfigError(f"keep_artifacts={self.keep_artifacts!r}: use True (keep every candidate's artifact), "
                              "False (remove what nothing will load) or None (read NAVDEPLOY_KEEP_ARTIFACTS).")
        if self.thorough is not None and not isinstance(self.thorough, bool):
            raise ConfigError(f"thorough={self.thorough!r}: use True (build and profile every candidate in full), "
                              "False (screen them and profile the leaders) or None (the default).")
        for name in ("timeout_s", "profile_time_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be > 0 seconds.")

    def replace(self, **changes: Any) -> "OptimizeConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def tolerance_for(self, precision: str) -> tuple[float, float]:
        """(atol, rtol) for a precision, with the user's overrides applied."""
        atol, rtol = DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])
        if self.tolerances:
            atol = float(self.tolerances.get("atol", atol))
            rtol = float(self.tolerances.get("rtol", rtol))
        return atol, rtol

    def profile_batch_sizes(self, captured: Sequence[int], device: str = "cpu") -> tuple[int, ...]:
        """Batch sizes to profile: the user's list; else on CUDA the ``captured`` ones, on CPU 1, the largest
        captured one and powers of two up to max_batch_size (each capped at max_batch_size)."""
        if self.batch_sizes is not None:
            return tuple(b for b in self.batch_sizes if b <= self.max_batch_size) or (min(self.batch_sizes),)
        captured = sorted({min(b, self.max_batch_size) for b in captured}) or [1]
        if device == "cuda":
            return tuple(captured)
        sizes = {1, captured[-1]}
        b = 2
        while b <= self.max_batch_size:
            sizes.add(b)
            b *= 2
        return tuple(sorted(sizes))


def _env_flag(*names: str, default: bool) -> bool:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value.lower() not in ("0", "false", "no", "off", "")
    return default


def use_multiprocessing(config: OptimizeConfig) -> bool:
    """Whether candidates run in spawned children: the config wins, then the environment."""
    if config.use_multiprocessing is not None:
        return config.use_multiprocessing
    return _env_flag("NAVDEPLOY_USE_MULTIPROCESSING", "NAVIGATOR_USE_MULTIPROCESSING", default=True)


def build_workers(config: OptimizeConfig, device: str = "cpu", module: Optional[torch.nn.Module] = None) -> int:
    """Worker processes that build a module's candidates side by side: the config wins, then
    ``NAVDEPLOY_BUILD_WORKERS``, then :func:`default_build_workers` for ``device`` and ``module`` on this machine."""
    if config.build_workers is not None:
        return config.build_workers
    value = _count_from_env("NAVDEPLOY_BUILD_WORKERS")
    if value is None:
        if device != "cuda" or not torch.cuda.is_available():
            return 1
        tensors = [*module.parameters(), *module.buffers()] if module is not None else []
        gpu = next((t.device for t in tensors if t.is_cuda), None)
        free, _ = torch.cuda.mem_get_info(gpu)
        return default_build_workers(device, _host_cores(), free, weight_bytes(module) if module is not None else 0)
    return value


def follow_ups_beside(config: OptimizeConfig, device: str, module: torch.nn.Module, alone: bool) -> bool:
    """Whether a second worker builds a CPU module's follow-up precision copies (bf16) beside its own candidates
    once eager's timing shows they will be tried (``precision.follow_ups_early``), rather than after them. The
    builds that dominate are single-core (AOTInductor's lowering and its compiler), so on the bench's BERT the two
    AOTInductor builds, fp32 and bf16, took 14 s each one after another on a 2-core machine. Only when the module
    is optimized ``alone`` (no other module side by side takes the cores), the process may use two cores or more,
    two copies of the module fit as for two modules side by side (:func:`default_parallel_modules`), candidates run
    in workers, and the user set no number of build workers (``build_workers``, ``NAVDEPLOY_BUILD_WORKERS``)."""
    if (device != "cpu" or not alone or not use_multiprocessing(config) or config.build_workers is not None
            or _count_from_env("NAVDEPLOY_BUILD_WORKERS") is not None):
        return False
    size = weight_bytes(module)
    return default_parallel_modules(["cpu"], _host_cores(), _free_memory(), [size, size]) >= 2


def _count_from_env(name: str) -> Optional[int]:
    """A whole number >= 1 from the environment variable ``name``; None when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name}={value!r}: use a whole number >= 1.")
    return int(value)


CORES_PER_CUDA_WORKER = 8
MAX_DEFAULT_WORKERS = 4
WORKER_GPU_OVERHEAD = 2 << 30  # a CUDA context, cuDNN/cuBLAS workspaces, CUDA-graph pools, profiling activations


def default_build_workers(device: str, cores: int, free_gpu_bytes: int, module_bytes: int) -> int:
    """Build workers when the user names none.

    CPU: 1. On the 2-core machines here, two workers made a small CNN's optimize slower (41 s against 33 s):
    torch.compile and AOTInductor already keep both cores busy.

    CUDA: one worker per 8 host cores, at most 4, and only as many as fit in half the GPU's free memory. A
    torch.compile build traces, lowers and runs its Python on one core and compiles kernels on a pool of the
    others, so builds side by side overlap mostly the single-core part; more workers than cores/8 fight over the
    compile pool (4 workers on the 16-core H200: ResNet-50 96 s against 104 s with 1, within noise; the SD
    UNet's builds stretched past 13 minutes). Each worker holds the module (and a cast or channels-last copy of
    it, and its compiled runner) on the GPU: 3 copies plus 2 GiB each."""
    if device != "cuda":
        return 1
    by_cores = max(1, cores // CORES_PER_CUDA_WORKER)
    per_worker = 3 * max(0, int(module_bytes)) + WORKER_GPU_OVERHEAD
    by_memory = max(1, int(free_gpu_bytes // 2 // per_worker))
    return max(1, min(MAX_DEFAULT_WORKERS, by_cores, by_memory))


def parallel_modules(config: OptimizeConfig, modules: Sequence[torch.nn.Module], devices: Sequence[str]) -> int:
    """Modules optimized side by side: the config wins, then ``NAVDEPLOY_PARALLEL_MODULES``, then
    :func:`default_parallel_modules`; never more than the modules, and 1 without multiprocessing."""
    if not use_multiprocessing(config) or len(modules) <= 1:
        return 1
    if config.parallel_modules is not None:
        return min(config.parallel_modules, len(modules))
    value = _count_from_env("NAVDEPLOY_PARALLEL_MODULES")
    if value is not None:
        return min(value, len(modules))
    sizes = [weight_bytes(m) for m in modules]
    return min(len(modules), default_parallel_modules(devices, _host_cores(), _free_memory(), sizes))


def weight_bytes(module: torch.nn.Module) -> int:
    """The bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


MAX_PARALLEL_MODULES = 4


def default_parallel_modules(devices: Sequence[str], cores: int, free_bytes: Optional[int],
                             module_bytes: Sequence[int]) -> int:
    """Modules optimized side by side when the user names no number.

    CPU: one per core, at most 4. The builds that dominate a CPU optimize run on one core each (AOTInductor's
    Python lowering, then one compiler process for its wrapper and one for its kernels; ONNX export), so two
    modules' builds side by side keep two cores busy where one module's kept one. Only as many as fit in half the
    free memory, at 3 copies of each module (a worker's copy, a cast copy, the compiled runner's constants).

    CUDA: 1. Side by side on one GPU has not been measured; the CUDA builds already run ``build_workers``."""
    if any(d != "cpu" for d in devices):
        return 1
    count = max(1, min(MAX_PARALLEL_MODULES, cores, len(module_bytes)))
    if free_bytes is not None:
        largest = sorted((max(0, int(b)) for b in module_bytes), reverse=True)
        while count > 1 and 3 * sum(largest[:count]) > free_bytes // 2:
            count -= 1
    return count


def _free_memory() -> Optional[int]:
    """The memory available to new processes (Linux: MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _host_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's share), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def keep_artifacts(config: OptimizeConfig) -> bool:
    """Whether every candidate's artifact folder stays: the config wins, then ``NAVDEPLOY_KEEP_ARTIFACTS``
    (default false: what nothing will load is removed after selection)."""
    if config.keep_artifacts is not None:
        return config.keep_artifacts
    return _env_flag("NAVDEPLOY_KEEP_ARTIFACTS", default=False)


def thorough(config: OptimizeConfig) -> bool:
    """Whether the search is exhaustive: the config wins, then the run defaults, then ``NAVDEPLOY_THOROUGH``."""
    if config.thorough is not None:
        return config.thorough
    if _run_defaults.thorough is not None:
        return _run_defaults.thorough
    return _env_flag("NAVDEPLOY_THOROUGH", default=False)


def report_enabled() -> bool:
    """NAVDEPLOY_REPORT=0 skips the HTML report (default: on); the pipeline check runs either way."""
    return _env_flag("NAVDEPLOY_REPORT", default=True)


CONSOLE_MODES = ("simple", "detailed", "logs")


@dataclass(frozen=True)
class RunDefaults:
    """Defaults for the ``nav.optimize`` calls made while :func:`run_defaults` is open; ``None`` leaves a
    setting to the environment. An ``OptimizeConfig(workspace=...)`` still wins over ``workspace``."""

    workspace: Optional[Path] = None
    console: Optional[str] = None
    thorough: Optional[bool] = None


# Process-wide, like the environment variables it stands in for: threads a script starts see it too (a
# ContextVar would give them an empty context).
_run_defaults = RunDefaults()


@contextlib.contextmanager
def run_defaults(workspace: Optional[Union[str, Path]] = None, console: Optional[str] = None,
                 thorough: Optional[bool] = None) -> Iterator[RunDefaults]:
    """Make ``workspace``, ``console`` and ``thorough`` the defaults of every ``nav.optimize`` (and workspace lookup)
    in this process while the block runs, ahead of ``NAVDEPLOY_WORKSPACE``/``NAVDEPLOY_CONSOLE_OUTPUT``/
    ``NAVDEPLOY_THOROUGH``; the previous defaults come back when it ends, also on error. Settings left ``None`` keep
    the enclosing defaults."""
    global _run_defaults
    if console is not None:
        console = console.strip().lower()
        if console not in CONSOLE_MODES:
            raise ConfigError(f"console={console!r}: use simple, detailed or logs.")
    previous = _run_defaults
    _run_defaults = RunDefaults(Path(workspace).expanduser() if workspace is not None else previous.workspace,
                                console if console is not None else previous.console,
                                thorough if thorough is not None else previous.thorough)
    try:
        yield _run_defaults
    finally:
        _run_defaults = previous


def current_run_defaults() -> RunDefaults:
    """The defaults :func:`run_defaults` set now (every field ``None`` outside one)."""
    return _run_defaults


def console_output() -> str:
    """``simple`` (default), ``detailed`` or ``logs``: the run defaults' console mode, else
    NAVDEPLOY_CONSOLE_OUTPUT (NAVIGATOR_ alias)."""
    if _run_defaults.console is not None:
        return _run_defaults.console
    for name in ("NAVDEPLOY_CONSOLE_OUTPUT", "NAVIGATOR_CONSOLE_OUTPUT"):
        value = os.environ.get(name)
        if value:
            value = value.strip().lower()
            if value not in CONSOLE_MODES:
                raise ConfigError(f"{name}={value!r}: use simple, detailed or logs.")
            return value
    return "simple"


def default_workspace() -> Path:
    """The run defaults' workspace, else ``$NAVDEPLOY_WORKSPACE``, else ``~/.cache/navdeploy``."""
    if _run_defaults.workspace is not None:
        return _run_defaults.workspace
    env = os.environ.get("NAVDEPLOY_WORKSPACE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "navdeploy"


def resolve_workspace(config: Optional[OptimizeConfig]) -> Path:
    """The workspace of a config, or the default."""
    if config is not None and config.workspace is not None:
        return Path(config.workspace).expanduser()
    return default_workspace()
