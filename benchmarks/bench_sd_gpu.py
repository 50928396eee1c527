"""Stable Diffusion 2.1-sized, on the GPU, with navdeploy's defaults (issue 16): eager fp16, cold optimize, cache
re-run, optimized pipeline, fresh-process load, the by-hand torch.compile baseline, and serving.

    python benchmarks/bench_sd_gpu.py --phases eager,optimize,rerun,load,baseline,serve \\
        --workspace /tmp/navdeploy-sd --out /tmp/navdeploy-sd-results/sd_gpu.json
    python benchmarks/bench_sd_gpu.py --tiny --phases all --workspace /tmp/sd-tiny --out /tmp/sd-tiny/sd.json

The pipeline is built here from configs with random (seeded) weights, nothing downloaded: a diffusers
``UNet2DConditionModel`` as SD 2.1 (block_out_channels 320/640/1280/1280, cross-attention 1024, attention_head_dim
5/10/20/20, linear projections), an OpenCLIP-H-sized ``CLIPTextModel`` (hidden 1024, 23 layers, 16 heads,
intermediate 4096, 77 positions, vocab 49408) with a character-level CLIP tokenizer written to a temporary
folder (``examples/stable_diffusion.py``'s), the SD ``AutoencoderKL`` (128/256/512/512, 4 latent channels) and a
``DDIMScheduler``, in a ``StableDiffusionPipeline``: fp16 on CUDA, 512x512, 20 steps, guidance 7.5, one prompt,
the initial latents from a CPU generator with a fixed seed (every process draws the same ones). The modules are
wrapped as the seed's user does (text_encoder with ``output_mapping``, unet, vae.decoder) and optimized with
``OptimizeConfig(workspace=...)``, every other setting default. ``--tiny``: tiny configs, CPU, fp32, 3 steps, 32x32
(the same code path end to end, serving included, in a few minutes on a CPU).

Phases (``--phases``, comma-separated, or ``all``), each in a process of its own, in the order given; the JSON at
``--out`` gets each phase's record when it starts, every 15 s while it runs (``elapsed_s``) and when it ends, so
a command killed at its time limit keeps what was done:
  eager     build time, the eager pipeline timed ``--runs`` times (median, min, max), its image (the reference,
            saved beside ``--out``)
  optimize  ``nav.optimize`` wall time, per module the selected runner and every candidate (status, error, p50,
            steps' times), navdeploy's own pipeline check, the workspace's size; then the optimized pipeline
            timed and its image against eager. An optimize killed by a time limit resumes in the next optimize
            phase (its checkpoints): the record then says ``resumed`` and the earlier run's ``elapsed_s`` is in
            the earlier record. Once one optimize phase has finished, later ones are skipped (that is ``rerun``).
  rerun     a second ``nav.optimize`` in a fresh process on the same workspace: wall time (target <= 60 s),
            whether every candidate came from the cache; the optimized pipeline again
  load      a fresh process: ``nav.load_optimized``: load time, first call, pipeline time, image against eager
  baseline  by hand, as a user writes it: ``pipe.unet = torch.compile(pipe.unet, mode=...)`` for each of
            ``--baseline-modes`` (``reduce-overhead``, ``max-autotune``; ``+cl`` adds
            ``pipe.unet.to(memory_format=torch.channels_last)`` first), each in a fresh process with an empty
            inductor cache: first call (compile included), pipeline time, image against eager
  serve     ``nav.serve`` of the pipeline (modules loaded from the workspace) on 127.0.0.1, tritonclient HTTP
            requests: the image against the in-process one and eager, request latency against the in-process
            call (alternating, ``--serve-requests`` of each). Needs numpy<2 (nvidia-pytriton) in this process
            and in the environment of its python3, which the Python-backend stub runs isolated (see
            ``benchmarks/gpu_device_run.sh`` serve_python); under numpy 2 the phase records why it was skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import navdeploy as nav  # noqa: E402

PHASES = ("eager", "optimize", "rerun", "load", "baseline", "serve")
PROMPT = "a photo of an astronaut riding a horse on mars"
SEED = 0
HEARTBEAT_S = 15.0


# --- the pipeline ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """What is built and how it runs."""

    name: str
    device: str
    dtype: torch.dtype
    image: int
    steps: int
    guidance: float
    max_length: int  # the tokenizer's padding length = the text encoder's positions
    unet: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)


def full_size() -> Size:
    """SD 2.1 (the 512x512 base model's configs), fp16 on CUDA."""
    return Size(
        "sd2.1", "cuda", torch.float16, image=512, steps=20, guidance=7.5, max_length=77,
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                  act_fn="silu", norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0),
        text=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                  layer_norm_eps=1e-5),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                 block_out_channels=(128, 256, 512, 512), sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4))


def tiny_size() -> Size:
    """Tiny configs (``examples/stable_diffusion.py``'s), fp32 on the CPU."""
    return Size(
        "tiny", "cpu", torch.float32, image=32, steps=3, guidance=7.5, max_length=32,
        unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=(4, 8), use_linear_projection=True, norm_num_groups=32),
        text=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32, projection_dim=32, layer_norm_eps=1e-5),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
                 block_out_channels=(32, 64), sample_size=32,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))


def build_tokenizer(max_length: int):
    """The character-level CLIP tokenizer of ``examples/stable_diffusion.py`` (no download), padding to
    ``max_length`` as SD's tokenizer pads to 77."""
    sys.path.insert(0, str(ROOT / "examples"))
    from stable_diffusion import _write_tokenizer_files
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="sd_bench_tok_") as tmp:  # read when the tokenizer is made
        folder = _write_tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                             pad_token="<|endoftext|>")


def build_pipeline(size: Size, seed: int = SEED):
    """The eager pipeline: the same weights in every process for a seed (initialised on ``size.device`` from
    torch's seeded generators, then cast)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(size.max_length)
    torch.manual_seed(seed)
    with torch.device(size.device):
        unet = UNet2DConditionModel(**size.unet)
        vae = AutoencoderKL(**size.vae)
        # bos/eos/pad as the tokenizer numbers them: <|startoftext|> 0, <|endoftext|> 1.
        text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **size.text))
    modules = [m.to(size.device, size.dtype).eval().requires_grad_(False) for m in (unet, vae, text_encoder)]
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=modules[1], text_encoder=modules[2], tokenizer=tokenizer, unet=modules[0],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wrap(pipe):
    """The modules wrapped as the seed's user wraps them (DESIGN.md "What a user does"), no per-module config."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pipe.text_encoder = nav.Module(pipe.text_encoder, name="clip",
                                   output_mapping=lambda output: BaseModelOutputWithPooling(**output))
    pipe.unet = nav.Module(pipe.unet, name="unet")
    pipe.vae.decoder = nav.Module(pipe.vae.decoder, name="vae")
    return pipe


class Text2Image:
    """prompt -> image [H, W, 3] float32 in [0, 1]: the callable that is optimized, timed and served."""

    def __init__(self, pipe, size: Size):
        self.pipe, self.size = pipe, size

    def __call__(self, prompt: str) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(SEED)  # the same initial latents in every process
        with torch.no_grad():
            out = self.pipe(prompt, num_inference_steps=self.size.steps, guidance_scale=self.size.guidance,
                            generator=generator, height=self.size.image, width=self.size.image, output_type="np")
        return np.asarray(out.images[0], dtype=np.float32)


def _sync(size: Size) -> None:
    if size.device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], runs: int, size: Size) -> dict:
    """``fn`` run ``runs`` times: seconds of each, median, min, max, and the last result (not in the dict)."""
    times, result = [], None
    for _ in range(runs):
        _sync(size)
        start = time.perf_counter()
        result = fn()
        _sync(size)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times,
            "_result": result}


def unet_calls(pipe, size: Size, blocks: int = 5, calls: int = 20) -> dict:
    """The UNet alone, called as the pipeline calls it (batch 2 under guidance, a mid-schedule timestep): per-call
    milliseconds of ``blocks`` blocks of ``calls`` back-to-back calls, synchronised at each block's ends, as the
    denoising loop runs them. Where ``pipe.unet`` is optimized, also the bound runner on the same tensors without
    navdeploy's routing (``runner_ms``), alternating with the module call block by block: the routing's share."""
    gen = torch.Generator("cpu").manual_seed(SEED)
    latent = size.image // pipe.vae_scale_factor
    x = torch.randn(2, size.unet.get("in_channels", 4), latent, latent, generator=gen).to(size.device, size.dtype)
    e = torch.randn(2, size.max_length, size.unet.get("cross_attention_dim", 1024), generator=gen).to(
        size.device, size.dtype)
    pipe.scheduler.set_timesteps(size.steps, device=size.device)
    t = pipe.scheduler.timesteps[size.steps // 2]
    kwargs = dict(encoder_hidden_states=e, timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                  return_dict=False)

    def block(fn: Callable[[], Any]) -> tuple[float, float]:
        """(wall, host) ms a call over one block; host: the time the loop took to issue the calls, before waiting
        for the GPU (close to the wall time: the calls are bound by the host, not the GPU)."""
        _sync(size)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter()
        _sync(size)
        return (time.perf_counter() - start) * 1000 / calls, (issued - start) * 1000 / calls

    fns = {"unet_ms": lambda: pipe.unet(x, t, **kwargs)}
    handler = getattr(getattr(pipe.unet, "nav_state", None), "handler", None)
    if handler is not None and hasattr(handler, "graphs"):
        key, tensors, _ = handler._graph_key((x, t), kwargs)
        entry = handler.graphs.get(key)
        if entry is not None:
            run = entry[1]
            fns["runner_ms"] = lambda: run(tensors)
    walls: dict[str, list[float]] = {name: [] for name in fns}
    hosts: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(3):
                fn()
        for _ in range(blocks):  # the module call and its runner alternate block by block
            for name, fn in fns.items():
                wall, host = block(fn)
                walls[name].append(wall)
                hosts[name].append(host)
    result: dict = {"calls_per_block": calls}
    for name, wall in walls.items():
        result[name] = {"median_ms": statistics.median(wall), "min_ms": min(wall), "max_ms": max(wall),
                        "blocks_ms": wall, "host_ms": statistics.median(hosts[name])}
    return result


def pipeline_profile(fn: Callable[[], Any], top: int = 25) -> list[str]:
    """Where one pipeline call spends its host time: cProfile's ``top`` functions by own time (profiling slows the
    call; the shares are what count)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()][-top - 1:]


def summary(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "_result"}


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.exists() else 0


# --- results, written as they come ------------------------------------------------------------------------------
class Results:
    """The JSON at ``path``: ``environment`` and a list of phase records, rewritten atomically on every change."""

    def __init__(self, path: Path, mirror: Optional[Path] = None):
        self.path, self.mirror = path, mirror  # mirror: a copy kept up to date too (e.g. in the device's $OUT)
        self._lock = threading.Lock()

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"environment": {}, "phases": []}

    def update(self, change: Callable[[dict], None]) -> None:
        with self._lock:
            data = self.read()
            change(data)
            text = json.dumps(data, indent=2, default=str)
            for path in (self.path, self.mirror):
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    tmp.write_text(text)
                    os.replace(tmp, path)


@contextlib.contextmanager
def phase_record(results: Results, name: str, extra: Optional[dict] = None,
                 progress: Optional[Callable[[], Any]] = None):
    """A phase's record: written at the start (``running``), every HEARTBEAT_S with ``elapsed_s`` (and, while it
    runs, what ``progress()`` returns), and at the end (``ok`` or ``failed`` with the error). The block fills the
    dict it gets."""
    record: dict = {"phase": name, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "pid": os.getpid(), **(extra or {})}
    start = time.perf_counter()
    index: list[int] = []

    def write() -> None:
        record["elapsed_s"] = round(time.perf_counter() - start, 1)
        if progress is not None and record["status"] == "running":
            try:
                record["progress"] = progress()
            except Exception as exc:  # noqa: BLE001 - a half-written file: the next beat reads it again
                record["progress_error"] = repr(exc)[:300]
        elif record["status"] == "ok":
            record.pop("progress", None)  # the finished record has every module's candidates

        def change(data: dict) -> None:
            if not index:
                data["phases"].append(dict(record))
                index.append(len(data["phases"]) - 1)
            else:
                data["phases"][index[0]] = dict(record)
        results.update(change)

    write()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            write()

    threading.Thread(target=beat, daemon=True, name="bench-heartbeat").start()
    try:
        yield record
        if record["status"] == "running":
            record["status"] = "ok"
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
        raise
    finally:
        stop.set()
        write()


# --- phases ------------------------------------------------------------------------------------------------------
@dataclass
class Context:
    size: Size
    workspace: Path
    out: Path
    runs: int
    baseline_modes: list[str]
    serve_requests: int

    @property
    def eager_image_path(self) -> Path:
        return self.out.with_name(self.out.stem + "_eager_image.npy")

    def eager_image(self) -> Optional[np.ndarray]:
        return np.load(self.eager_image_path) if self.eager_image_path.exists() else None

    runners: Optional[tuple[str, ...]] = None  # only for quick checks of this script: the runs use the defaults
    mirror: Optional[Path] = None

    def results(self) -> Results:
        return Results(self.out, self.mirror)

    def config(self) -> nav.OptimizeConfig:
        return nav.OptimizeConfig(workspace=self.workspace, runners=self.runners)  # else navdeploy's defaults


def _against_eager(ctx: Context, image: np.ndarray, record: dict, key: str = "image_max_abs_diff_vs_eager") -> None:
    eager = ctx.eager_image()
    record[key] = max_abs_diff(image, eager) if eager is not None else None
    record["image_finite"] = bool(np.isfinite(image).all())


def phase_eager(ctx: Context, record: dict) -> None:
    start = time.perf_counter()
    pipe = build_pipeline(ctx.size)
    record["build_s"] = time.perf_counter() - start
    record["parameters"] = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                            for name in ("unet", "text_encoder", "vae")}
    t2i = Text2Image(pipe, ctx.size)
    first = timed(lambda: t2i(PROMPT), 1, ctx.size)
    record["first_call_s"] = first["median_s"]
    stats = timed(lambda: t2i(PROMPT), ctx.runs, ctx.size)
    record["pipeline"] = summary(stats)
    image = stats["_result"]
    record["image_finite"] = bool(np.isfinite(image).all())
    record["image_mean"] = float(image.mean())
    ctx.eager_image_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(ctx.eager_image_path, image)
    record["eager_image"] = str(ctx.eager_image_path)
    record["unet_calls"] = unet_calls(pipe, ctx.size)


def candidates_so_far(workspace: Path) -> dict:
    """Every candidate record the workspace's checkpoints hold (module/graph -> records): what a run killed at the
    device call's limit had found, with each candidate's step times."""
    found = {}
    for path in sorted(workspace.glob("*/*/checkpoint.json")):
        data = json.loads(path.read_text())
        found[f"{path.parent.parent.name}/{path.parent.name}"] = [
            {"name": c.get("name"), "status": c.get("status"), "step": c.get("step"),
             "error": (c.get("error") or "")[:300] or None, "times": c.get("times"),
             "screen_ms": (c.get("screen") or {}).get("p50_ms")} for c in data.get("candidates", [])]
    return found


def _module_records(status) -> dict:
    modules = {}
    for name, m in status.modules.items():
        graphs = []
        for g in m.graphs:
            graphs.append({"key": g.key, "selected": g.selected, "candidates": [
                {"name": c.name, "status": c.status, "step": c.step, "error": (c.error or "")[:300] or None,
                 "cached": c.cached, "max_abs_err": c.max_abs_err,
                 "p50_ms": {str(p.batch_size): p.p50_ms for p in c.profile}, "times": c.times}
                for c in g.candidates]})
        modules[name] = {"optimized": m.optimized, "seconds": m.seconds, "bind_s": m.bind_s, "precision": m.precision,
                         "precision_inferred": m.precision_inferred, "reverted": m.reverted, "graphs": graphs}
    return modules


def _optimize(ctx: Context, record: dict) -> tuple[Any, Text2Image]:
    """Build, wrap and optimize; the record gets the figures. Returns (status, the optimized callable)."""
    from navdeploy.config import build_workers

    manifests = list(ctx.workspace.glob("*/manifest.json")) + list(ctx.workspace.glob("*/*/checkpoint.json"))
    record["workspace_had_results"] = bool(manifests)
    record["runners"] = list(ctx.runners) if ctx.runners else "default"
    start = time.perf_counter()
    pipe = wrap(build_pipeline(ctx.size))
    record["build_s"] = time.perf_counter() - start
    record["build_workers"] = {name: build_workers(ctx.config(), ctx.size.device, getattr(pipe, name).__wrapped__)
                               for name in ("unet", "text_encoder")}
    t2i = Text2Image(pipe, ctx.size)
    start = time.perf_counter()
    status = nav.optimize(t2i, [(1, PROMPT)], ctx.config())
    record["optimize_s"] = time.perf_counter() - start
    record["selected"] = status.selected()
    record["modules"] = _module_records(status)
    record["pipeline_check"] = status.pipeline.to_json() if status.pipeline is not None else None
    # Skipped candidates (not installed, a twin not built) are decided again on every run: nothing to cache.
    record["all_cached"] = all(c.cached for m in status.modules.values() for g in m.graphs for c in g.candidates
                               if c.status != "skipped")
    record["workspace_bytes"] = folder_bytes(ctx.workspace)
    record["inductor_cache_bytes"] = folder_bytes(ctx.workspace / "inductor_cache")
    return status, t2i


def _optimized_pipeline(ctx: Context, t2i: Text2Image, record: dict) -> None:
    stats = timed(lambda: t2i(PROMPT), ctx.runs, ctx.size)
    record["optimized_pipeline"] = summary(stats)
    _against_eager(ctx, stats["_result"], record)
    eager = next((p for p in ctx.results().read()["phases"] if p["phase"] == "eager" and p["status"] == "ok"),
                 None)
    if eager is not None:
        record["speedup_vs_eager"] = eager["pipeline"]["median_s"] / stats["median_s"]


def phase_optimize(ctx: Context, record: dict) -> None:
    earlier = [p for p in ctx.results().read()["phases"] if p["phase"] == "optimize" and p["pid"] != os.getpid()]
    if any(p["status"] == "ok" for p in earlier):
        record["status"] = "skipped"  # so a plan can always name it: an optimize now would be the rerun phase
        record["error"] = "the cold optimize finished in an earlier call (its record is above)"
        return
    if earlier and earlier[-1]["status"] == "running":
        record["resumed"] = True  # the earlier optimize was killed: its elapsed_s is the time it had spent
        record["killed_run_elapsed_s"] = earlier[-1].get("elapsed_s")
    _, t2i = _optimize(ctx, record)
    _optimized_pipeline(ctx, t2i, record)
    record["unet_calls"] = unet_calls(t2i.pipe, ctx.size)


def phase_rerun(ctx: Context, record: dict) -> None:
    _, t2i = _optimize(ctx, record)
    _optimized_pipeline(ctx, t2i, record)


def _loaded_pipeline(ctx: Context, record: dict) -> Text2Image:
    """The wrapped pipeline after ``nav.load_optimized`` in this fresh process (load and first-call times recorded)."""
    pipe = wrap(build_pipeline(ctx.size))
    start = time.perf_counter()
    record["loaded"] = nav.load_optimized(ctx.workspace)
    record["load_s"] = time.perf_counter() - start
    t2i = Text2Image(pipe, ctx.size)
    record["first_call_s"] = timed(lambda: t2i(PROMPT), 1, ctx.size)["median_s"]
    return t2i


def phase_load(ctx: Context, record: dict) -> None:
    t2i = _loaded_pipeline(ctx, record)
    stats = timed(lambda: t2i(PROMPT), ctx.runs, ctx.size)
    record["pipeline"] = summary(stats)
    _against_eager(ctx, stats["_result"], record)
    record["unet_calls"] = unet_calls(t2i.pipe, ctx.size)
    record["pipeline_profile"] = pipeline_profile(lambda: t2i(PROMPT))


def phase_baseline(ctx: Context, record: dict, mode: str) -> None:
    compile_mode, _, layout = mode.partition("+")
    record["mode"], record["channels_last"] = compile_mode, layout == "cl"
    record["inductor_cache"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    pipe = build_pipeline(ctx.size)
    if layout == "cl":
        pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode=compile_mode)
    t2i = Text2Image(pipe, ctx.size)
    first = timed(lambda: t2i(PROMPT), 1, ctx.size)
    record["first_call_s"] = first["median_s"]  # compiles the UNet (and records CUDA graphs)
    stats = timed(lambda: t2i(PROMPT), ctx.runs, ctx.size)
    record["pipeline"] = summary(stats)
    record["compile_s_estimate"] = first["median_s"] - stats["median_s"]
    _against_eager(ctx, stats["_result"], record)
    record["unet_calls"] = unet_calls(pipe, ctx.size)
    record["pipeline_profile"] = pipeline_profile(lambda: t2i(PROMPT))


def phase_serve(ctx: Context, record: dict) -> None:
    record["numpy"] = np.__version__
    if int(np.__version__.split(".")[0]) >= 2:
        record["status"] = "skipped"
        record["error"] = ("numpy>=2 here: nav.serve needs numpy<2 (nvidia-pytriton); run this phase with numpy 1.26 "
                           "first on PYTHONPATH")
        return
    from tritonclient.http import InferInput

    from navdeploy.serving import Tensor

    t2i = _loaded_pipeline(ctx, record)
    in_process_image = timed(lambda: t2i(PROMPT), 1, ctx.size)["_result"]
    served_fn = lambda prompt: {"image": t2i(prompt)}
    start = time.perf_counter()
    handle = nav.serve(served_fn, inputs=[Tensor("prompt", str, (1,))],
                       outputs=[Tensor("image", np.float32, (ctx.size.image, ctx.size.image, 3))], name="sd",
                       max_batch_size=0, blocking=False, load_optimized=False, exit_timeout_secs=5)
    record["server_start_s"] = time.perf_counter() - start
    try:
        client = handle.client()

        def request() -> np.ndarray:
            prompt = InferInput("prompt", [1], "BYTES")
            prompt.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
            return client.infer("sd", [prompt]).as_numpy("image")

        first = timed(request, 1, ctx.size)
        record["first_request_s"] = first["median_s"]  # the server thread's first call (CUDA graphs per thread)
        # Alternating, so that both see the same machine: an in-process call, then a request.
        in_process, served, image = [], [], None
        for _ in range(ctx.serve_requests):
            in_process.append(timed(lambda: t2i(PROMPT), 1, ctx.size)["median_s"])
            one = timed(request, 1, ctx.size)
            served.append(one["median_s"])
            image = one["_result"]
        record["in_process"] = {"median_s": statistics.median(in_process), "runs_s": in_process}
        record["requests"] = {"median_s": statistics.median(served), "runs_s": served}
        record["image_shape"] = list(image.shape)
        record["image_max_abs_diff_vs_in_process"] = max_abs_diff(image, in_process_image)
        _against_eager(ctx, image, record)
        record["served_over_in_process"] = record["requests"]["median_s"] / record["in_process"]["median_s"]
        record["served_overhead_ms"] = (record["requests"]["median_s"] - record["in_process"]["median_s"]) * 1e3
    finally:
        handle.stop()


# --- driver ------------------------------------------------------------------------------------------------------
def environment(size: Size) -> dict:
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__, "size": size.name,
           "device": size.device, "dtype": str(size.dtype), "image": size.image, "steps": size.steps,
           "guidance": size.guidance, "cores": len(os.sched_getaffinity(0)), "command": " ".join(sys.argv)}
    if size.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def run_phase(ctx: Context, name: str, args: argparse.Namespace) -> int:
    results = ctx.results()

    def describe(data: dict) -> None:
        if not data.get("environment"):
            data["environment"] = environment(ctx.size)

    results.update(describe)
    fn = {"eager": phase_eager, "optimize": phase_optimize, "rerun": phase_rerun, "load": phase_load,
          "serve": phase_serve}.get(name)
    try:
        if name == "baseline":
            with phase_record(results, name, {"mode": args.baseline_mode}) as record:
                phase_baseline(ctx, record, args.baseline_mode)
        else:
            progress = (lambda: candidates_so_far(ctx.workspace)) if name in ("optimize", "rerun") else None
            with phase_record(results, name, progress=progress) as record:
                fn(ctx, record)
    except Exception:  # noqa: BLE001 - the record holds the error; the driver goes on with the next phase
        traceback.print_exc()
        return 1
    print(json.dumps({k: v for k, v in record.items() if k not in ("modules", "traceback")}, default=str)[:3000],
          flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--phases", default="all", help=f"comma-separated, of {', '.join(PHASES)}; or all")
    parser.add_argument("--workspace", required=True, help="the navdeploy workspace (kept between phases)")
    parser.add_argument("--out", required=True, help="the results JSON (phases are appended)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU in fp32 (a check of the code)")
    parser.add_argument("--runs", type=int, default=None, help="timed pipeline runs per measurement (5; tiny 2)")
    parser.add_argument("--serve-requests", type=int, default=None, help="timed requests (10; tiny 3)")
    parser.add_argument("--baseline-modes", default="reduce-overhead",
                        help="torch.compile modes of the by-hand baseline, comma-separated; '+cl' adds channels-last")
    parser.add_argument("--runners", default=None,
                        help="comma-separated runners instead of the default set: only to check this script quickly")
    parser.add_argument("--mirror", default=None, help="a second path kept up to date with the results JSON")
    parser.add_argument("--run-phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tiny_size() if args.tiny else full_size()
    if size.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --tiny for the CPU check")
    ctx = Context(size, Path(args.workspace).resolve(), Path(args.out).resolve(),
                  args.runs or (2 if args.tiny else 5), [m for m in args.baseline_modes.split(",") if m],
                  args.serve_requests or (3 if args.tiny else 10),
                  tuple(r for r in args.runners.split(",") if r) if args.runners else None,
                  Path(args.mirror).resolve() if args.mirror else None)
    if args.run_phase:
        return run_phase(ctx, args.run_phase, args)
    phases = PHASES if args.phases == "all" else tuple(p for p in args.phases.split(",") if p)
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; use {', '.join(PHASES)} or all")
    code = 0
    for name in phases:
        for mode in (ctx.baseline_modes if name == "baseline" else [None]):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--run-phase", name]
            env = dict(os.environ)
            cache = None
            if mode is not None:
                cmd += ["--baseline-mode", mode]
                # As a user's first run: an empty inductor cache of its own.
                cache = tempfile.mkdtemp(prefix="sd_baseline_inductor_")
                env["TORCHINDUCTOR_CACHE_DIR"] = cache
            print(f"== phase {name}{f' ({mode})' if mode else ''}", flush=True)
            code |= subprocess.run(cmd, env=env).returncode
            if cache:
                shutil.rmtree(cache, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
