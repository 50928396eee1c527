"""Every code sample of the reference text (../shared/reference/inplace-optimize.md) runs with
``import navdeploy as nav``.

The samples are read from the reference file itself, so a changed sample is tested as it now reads. What the
harness changes, and only that:
  * ``import model_navigator as nav`` -> ``import navdeploy as nav``;
  * ``"cuda"`` -> ``"cpu"`` (these machines have no GPU);
  * hub downloads are replaced by small offline stand-ins with the same attributes and call patterns
    (``torch.hub.load`` -> a small CNN; ``StableDiffusionPipeline`` -> a tiny pipeline with
    ``text_encoder`` / ``unet`` / ``vae.decoder``; ``nemo_asr`` -> a tiny encoder/decoder model);
  * names a fragment uses without defining (``dataloader``, ``config``, ``model``) are provided;
  * before a statement that calls ``nav.optimize``, wrapped modules that have no ``optimize_config`` get a
    small one (one format, batch sizes 1-2, short profiling) so the file runs in seconds. Samples that set
    their own per-module configs keep them.
In-process tests run with ``NAVIGATOR_USE_MULTIPROCESSING=False`` (the reference's own switch); the
``__main__`` guidance is tested with real scripts and spawned workers.
"""

from __future__ import annotations

import ast
import gc
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import navdeploy as nav
from navdeploy.formats.registry import known_runner_names
from navdeploy.inplace import registry
from navdeploy.inplace.registry import registered_modules

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "inplace-optimize.md"
if not REFERENCE.exists():
    pytest.skip(f"reference text not found at {REFERENCE}", allow_module_level=True)
TEXT = REFERENCE.read_text()
PYTHON = re.findall(r"```python\n(.*?)```", TEXT, re.S)
BASH = re.findall(r"```(?:bash|shell)\n(.*?)```", TEXT, re.S)


def block(marker: str) -> str:
    """The one python sample containing ``marker``."""
    found = [b for b in PYTHON if marker in b]
    assert len(found) == 1, f"expected one sample with {marker!r} in {REFERENCE}, found {len(found)}"
    return found[0]


def env_setting(name: str, value: str | None = None) -> tuple[str, str]:
    """``NAME=value`` as the reference's shell samples write it."""
    for b in BASH:
        for m in re.finditer(rf"^(?:export\s+)?({name})=(\S+)", b, re.M):
            if value is None or m.group(2) == value:
                return m.group(1), m.group(2)
    raise AssertionError(f"{name}={value or '...'} not found in the reference's shell samples")


def adapt(code: str) -> str:
    code = code.replace("import model_navigator as nav", "import navdeploy as nav")
    return code.replace('"cuda"', '"cpu"')


def fast_config(workspace: Path) -> nav.OptimizeConfig:
    return nav.OptimizeConfig(workspace=workspace, target_formats=(nav.Format.TORCHSCRIPT,), batch_sizes=(1, 2),
                              max_batch_size=2, profile_time_s=0.05)


def run(code: str, ns: dict, workspace: Path) -> dict:
    """Execute a sample statement by statement in ``ns``; see the module docstring for what the harness adds."""
    code = adapt(code)
    for stmt in ast.parse(code).body:
        source = ast.get_source_segment(code, stmt)
        if "nav.optimize(" in source:
            for m in registered_modules():
                if m.optimize_config is None:
                    m.optimize_config = fast_config(workspace)
        exec(compile(ast.Module([stmt], type_ignores=[]), str(REFERENCE), "exec"), ns)
    return ns


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    ws = tmp_path / "workspace"
    monkeypatch.setenv("NAVDEPLOY_WORKSPACE", str(ws))
    name, value = env_setting("NAVIGATOR_USE_MULTIPROCESSING")
    monkeypatch.setenv(name, value)
    monkeypatch.delenv("NAVDEPLOY_USE_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("NAVDEPLOY_CONSOLE_OUTPUT", raising=False)
    monkeypatch.delenv("NAVIGATOR_CONSOLE_OUTPUT", raising=False)
    yield ws
    # The samples reuse names ("clip", "unet", ...): free them for the next sample, also when this one failed
    # and pytest's traceback still holds its pipeline.
    gc.collect()
    registry.clear()


# --- offline stand-ins ---------------------------------------------------------------------------------

class TinyTextEncoder(nn.Module):
    """Returns a transformers BaseModelOutputWithPooling, like CLIPTextModel."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        h = self.proj(self.embed(input_ids)).tanh()
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=h[:, -1])


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.cond = nn.Linear(16, 4)

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
        bias = self.cond(encoder_hidden_states.mean(1))[:, :, None, None]
        out = self.conv(sample) * torch.cos(timestep.float() / 1000) + bias
        return {"sample": out} if return_dict else (out,)


class TinyVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.Upsample(scale_factor=2), nn.Tanh())

    def decode(self, z):
        return self.decoder(z / 0.18215)


class TinyStableDiffusionPipeline:
    """What the sample touches of diffusers' StableDiffusionPipeline: from_pretrained, scheduler, to(),
    text_encoder, unet, vae.decoder, and __call__(prompt)."""

    def __init__(self, dtype=torch.float32):
        from diffusers import DPMSolverMultistepScheduler

        torch.manual_seed(0)
        self.text_encoder, self.unet, self.vae = TinyTextEncoder().eval(), TinyUNet().eval(), TinyVAE().eval()
        self.scheduler = DPMSolverMultistepScheduler()
        self.to(dtype=dtype)

    @classmethod
    def from_pretrained(cls, name, torch_dtype=torch.float32, variant=None):
        return cls(torch_dtype)

    def to(self, device=None, dtype=None):
        for m in (self.text_encoder, self.unet, self.vae):
            m.to(device=device, dtype=dtype)
        return self

    def __call__(self, prompt, num_inference_steps=2):
        ids = torch.tensor([[ord(c) % 64 for c in prompt[:8].ljust(8)]])
        hidden = self.text_encoder(ids).last_hidden_state
        dtype = self.unet.conv.weight.dtype
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            noise = self.unet(latents, t, encoder_hidden_states=hidden.to(dtype), return_dict=False)[0]
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
        return self.vae.decode(latents)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


class TinyASR(nn.Module):
    """Stands in for nemo's EncDecCTCModelBPE: an encoder and a decoder called from forward()."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Conv1d(16, 32, 3, padding=1), nn.ReLU())
        self.decoder = nn.Conv1d(32, 8, 1)

    @classmethod
    def from_pretrained(cls, name):
        return cls().eval()

    def forward(self, audio):
        return self.decoder(self.encoder(audio)).log_softmax(1)


# --- Stable Diffusion ------------------------------------------------------------------------------------

def test_stable_diffusion_sample_then_load_optimized(workspace, choose_candidate):
    ns = run(block("def get_pipeline"), {}, workspace)  # imports diffusers/transformers as the sample does
    ns["StableDiffusionPipeline"] = TinyStableDiffusionPipeline  # no hub download
    run(block("def get_dataloader"), ns, workspace)
    reference = TinyStableDiffusionPipeline()(ns["get_dataloader"]()[0][1])

    run(block("pipe = get_pipeline()"), ns, workspace)  # pipe = get_pipeline(); ...; nav.optimize(pipe, dataloader)
    pipe = ns["pipe"]
    assert all(isinstance(m, nav.Module) for m in (pipe.text_encoder, pipe.unet, pipe.vae.decoder))
    assert {m.name for m in (pipe.text_encoder, pipe.unet, pipe.vae.decoder)} == {"clip", "unet", "vae"}
    for name in ("clip", "unet", "vae"):
        assert (workspace / name / "manifest.json").is_file()
    # Eager may win a module this tiny; the path under test is the optimized one: output_mapping rebuilds the
    # HF class from the runner's dict. Choose TorchScript in the manifest as a user could.
    choose_candidate(pipe.text_encoder, workspace, "TorchScriptCPU")
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    assert type(pipe.text_encoder(torch.zeros(1, 8, dtype=torch.long))) is BaseModelOutputWithPooling
    torch.testing.assert_close(pipe(ns["get_dataloader"]()[0][1]), reference, atol=1e-4, rtol=1e-3)

    run(block("nav.load_optimized()"), ns, workspace)
    assert pipe.text_encoder.is_optimized
    torch.testing.assert_close(pipe(ns["get_dataloader"]()[0][1]), reference, atol=1e-4, rtol=1e-3)


def test_quantized_module_sample_with_a_pipeline_config(workspace):
    ns = {"StableDiffusionPipeline": TinyStableDiffusionPipeline, "torch": torch, "nav": nav,
          "quantize_int_8_bits": lambda module: module,  # "we assumed we have a given function"
          "BaseModelOutputWithPooling": __import__("transformers.modeling_outputs",
                                                   fromlist=["BaseModelOutputWithPooling"]).BaseModelOutputWithPooling}
    run(block("quantize_int_8_bits(pipe.unet)"), ns, workspace)
    pipe = ns["pipe"]
    assert pipe.unet.precision == "int8" and pipe.unet.conv.weight.dtype == torch.float16
    # The sample loads the pipeline in fp16 and gives the text encoder no precision: it is read from its weights.
    assert pipe.text_encoder.precision == "fp16" and pipe.text_encoder.precision_inferred
    run(block("def get_dataloader"), ns, workspace)
    ns.update(model=pipe, dataloader=ns["get_dataloader"](), config=fast_config(workspace))
    run(block("nav.optimize(model, dataloader, config=config)"), ns, workspace)
    for name in ("clip", "unet", "vae"):
        manifest = (workspace / name / "manifest.json").read_text()
        assert '"selected": ' in manifest
    assert '"precision": "int8"' in (workspace / "unet" / "manifest.json").read_text()  # int8 kept


# --- ResNet18 ------------------------------------------------------------------------------------------

def test_resnet18_sample_then_load_optimized(workspace, monkeypatch):
    monkeypatch.setattr(torch.hub, "load", lambda *args, **kwargs: small_cnn())  # no hub download
    ns = run(block("torch.hub.load"), {}, workspace)
    run(block("torch.rand(1, 3, 224, 224"), ns, workspace)
    assert len(ns["dataloader"]) == 150
    run(block('nav.Module(resnet18, name="resnet18")'), ns, workspace)
    resnet18 = ns["resnet18"]
    manifest = (workspace / "resnet18" / "manifest.json").read_text()
    assert "TorchScriptCPU" in manifest
    run(block("nav.load_optimized()"), ns, workspace)
    x = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(resnet18(x), resnet18.__wrapped__(x), atol=1e-4, rtol=1e-3)


# --- per-module configuration (nemo) ---------------------------------------------------------------------

def test_per_module_configuration_sample(workspace):
    if "TensorRT" not in known_runner_names():
        pytest.xfail("the sample names the 'TensorRT' runner, which this navdeploy does not register")
    ns = {"nav": nav, "nemo_asr": types.SimpleNamespace(models=types.SimpleNamespace(EncDecCTCModelBPE=TinyASR)),
          "dataloader": [(1, torch.randn(1, 16, 20)), (2, torch.randn(2, 16, 20))]}
    run(block("nemo_asr.models"), ns, workspace)
    pipe = ns["pipe"]
    assert pipe.encoder.optimize_config.runners == ("TensorRT",)  # the sample's own configs are kept
    assert pipe.decoder.optimize_config.runners == ("TensorRT", "OnnxCUDA")
    manifest = (workspace / "encoder" / "manifest.json").read_text()
    # On a CPU machine the CUDA runners the sample asks for do not apply: eager (the baseline) is selected.
    assert '"selected": "TorchCPU"' in manifest and '"runner": "OnnxCPU"' not in manifest
    x = torch.randn(2, 16, 20)
    torch.testing.assert_close(pipe(x), pipe.__class__.forward(pipe, x))


# --- custom forward function -----------------------------------------------------------------------------

def test_forward_func_sample(workspace):
    ns = {"nav": nav, "nn": nn, "dataloader": [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))],
          "config": fast_config(workspace)}
    run(block("class SentenceTransformer"), ns, workspace)
    pipe = ns["pipe"]
    assert (workspace / "transformer" / "manifest.json").is_file()  # not the reference's FileNotFoundError
    x = torch.randn(2, 4)
    torch.testing.assert_close(pipe.encode(x), x + 1)


# --- console output and the torch.compile cache variables ----------------------------------------------------

@pytest.mark.parametrize("value", ["detailed", "logs"])
def test_console_output_settings(workspace, monkeypatch, capsys, value):
    name, value = env_setting("NAVIGATOR_CONSOLE_OUTPUT", value)
    monkeypatch.setenv(name, value)
    module = nav.Module(nn.Linear(3, 3).eval(), name=f"ref_console_{value}")
    nav.optimize(module, [(1, torch.randn(1, 3))], fast_config(workspace))
    err = capsys.readouterr().err
    assert "TorchScriptCPU" in err
    if value == "detailed":
        assert "verify" in err  # each step with its time
    else:
        assert f"optimizing ref_console_{value}" in err  # log records on the console
    assert "TorchScriptCPU" in (workspace / f"ref_console_{value}" / "navdeploy.log").read_text()


def _script(tmp_path: Path, guard: str, body: str, name: str) -> Path:
    header = textwrap.dedent(f"""
        import torch
        import navdeploy as nav

        model = nav.Module(torch.nn.Linear(4, 4).eval(), name={name!r})
        dataloader = [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))]
        config = nav.OptimizeConfig(workspace={str(tmp_path / 'ws')!r}, target_formats=(nav.Format.TORCHSCRIPT,),
                                    batch_sizes=(1, 2), max_batch_size=2, profile_time_s=0.05)
    """)
    code = header + (guard + textwrap.indent(body, "    ") if guard else body)
    path = tmp_path / f"optimize_{name}.py"
    path.write_text(code)
    return path


def _run_scripts(paths: list[Path], env: dict) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, str(p)], cwd=p.parent, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in paths]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_main_guard_guidance_with_spawned_workers(tmp_path):
    guard_main = block('if __name__ == "__main__":').strip().splitlines()[0] + "\n"
    mp_guard = block('mp.current_process().name == "MainProcess"')
    mp_import, mp_if = [line for line in mp_guard.strip().splitlines() if not line.strip().startswith("#")]
    body = textwrap.dedent("""
        status = nav.optimize(model, dataloader, config)
        graph = status.modules[model.name].graphs[0]
        record = graph.candidate("TorchScriptCPU")
        import os
        # Swapped in: the module routes to TorchScript when it won; when eager won (timing noise on a Linear),
        # or the pipeline check put it back to eager, it stays a plain pass-through.
        runs_winner = graph.selected == "TorchScriptCPU" and not status.modules[model.name].reverted
        # Verified is what matters here: a TorchScript Linear can be screened out as no faster than eager.
        print("RESULT", record.verified, record.pid != os.getpid(), model.is_optimized == runs_winner)
    """)
    scripts = [_script(tmp_path, guard_main, body, "ref_guard_main"),
               _script(tmp_path, f"{mp_import}\n{mp_if}\n", body, "ref_guard_mp"),
               _script(tmp_path, "", body, "ref_unguarded")]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_USE_MULTIPROCESSING")}
    env["NAVDEPLOY_CONSOLE_OUTPUT"] = "simple"
    guarded, mp_guarded, unguarded = _run_scripts(scripts, env)
    for result in (guarded, mp_guarded):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "RESULT True True True" in result.stdout  # built in a spawned worker, swapped in
    # Without a guard the worker re-imports the script: navdeploy says so and carries on in-process.
    assert unguarded.returncode == 0, unguarded.stderr[-3000:]
    assert "RESULT True False True" in unguarded.stdout
    assert '__name__ == "__main__"' in unguarded.stderr


@pytest.mark.parametrize("inductor_imported_first", [
    False,
    True,  # importing torch._inductor.config writes torch's default into os.environ: still not the user's choice
], ids=["plain", "inductor-imported-first"])
def test_torch_compile_cache_variables(tmp_path, inductor_imported_first):
    settings = [env_setting("TORCHINDUCTOR_FX_GRAPH_CACHE"), env_setting("TORCHINDUCTOR_AUTOGRAD_CACHE")]
    env = {**os.environ, **dict(settings), "NAVIGATOR_USE_MULTIPROCESSING": "False",
           "NAVDEPLOY_CONSOLE_OUTPUT": "simple"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    early = "import torch._inductor.config" if inductor_imported_first else ""
    code = textwrap.dedent(f"""
        import torch
        {early}
        import navdeploy as nav

        if __name__ == "__main__":
            model = nav.Module(torch.nn.Linear(4, 4).eval(), name="ref_compile_cache")
            config = nav.OptimizeConfig(workspace={str(tmp_path / 'ws')!r}, runners=("TorchCompileCPU",),
                                        batch_sizes=(1,), max_batch_size=1, profile_time_s=0.05, thorough=True)
            status = nav.optimize(model, [(1, torch.randn(1, 4))], config)
            record = status.modules["ref_compile_cache"].graphs[0].candidate("TorchCompileCPU")
            import torch._functorch.config as functorch
            import torch._inductor.config as inductor
            print("RESULT", record.status, record.error, inductor.fx_graph_cache, functorch.enable_autograd_cache)
    """)
    path = tmp_path / "compile_cache.py"
    path.write_text(code)
    (result,) = _run_scripts([path], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESULT ok None True True" in result.stdout, result.stdout[-2000:]
    cache = tmp_path / "ws" / "inductor_cache" / "ref_compile_cache"  # TORCHINDUCTOR_CACHE_DIR: the module's own
    assert cache.is_dir() and (cache / "fxgraph").is_dir() and (cache / "aotautograd").is_dir()
