"""The reference's Stable Diffusion flow on a CPU machine, with a tiny pipeline built from configs.

A ``diffusers.StableDiffusionPipeline`` is assembled from small configs with random (seeded) weights: a UNet,
a VAE, a CLIP text encoder and a CLIP tokenizer made from a tiny vocabulary written to a temporary folder.
The three modules are wrapped exactly as ``reference/inplace-optimize.md`` does (including the
``output_mapping`` to ``BaseModelOutputWithPooling``), optimized with the reference's dataloader, and the
optimized image is compared with the eager one (same generator seed, few inference steps).

The UNet is marked ``precision="int8"`` (the reference's pre-quantized module): navdeploy never casts it and
verifies it against the int8 tolerances. With ``quantize=True`` (the default of ``main``) its ``nn.Linear``
layers really hold int8 weights first (``quantize_int_8_bits``, per-channel weight-only int8). The text encoder gets a
per-module ``optimize_config`` as in the reference's "Per module configuration".

    python examples/stable_diffusion.py            # optimize, compare, then serve it with PyTriton
    python examples/stable_diffusion.py --no-serve

Serving it from the command line (a fresh process: the modules are rebound from the workspace first):

    python -c "import sys; sys.path.insert(0, 'examples'); import stable_diffusion as sd; sd.serve_pipeline()"
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import navdeploy as nav
from navdeploy.serving import Tensor

PROMPT = "a photo of an astronaut riding a horse on mars"
IMAGE_SIZE = 32
STEPS = 2
SEED = 0
# The image is the end of a few UNet steps and a VAE decode: fp32 runners reorder reductions, and the int8
# UNet is verified with atol/rtol 0.1 per call, so the image is compared with a looser bound than a single module.
IMAGE_ATOL = 2e-2

# Modules whose config is not set per module use this one (the example keeps the defaults of OptimizeConfig
# otherwise; tests pass a faster config).
TEXT_ENCODER_FORMATS = (nav.Format.ONNX, nav.Format.TORCHSCRIPT)
TEXT_ENCODER_RUNNERS = ("OnnxCPU", "TorchScriptCPU")


# --- a tiny CLIP tokenizer ------------------------------------------------------------------------------
def _write_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt for a character-level CLIP BPE: every letter and digit, alone and word-final."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    tokens = ["<|startoftext|>", "<|endoftext|>", "!", ",", "."] + chars + [c + "</w>" for c in chars] + \
        ["!</w>", ",</w>", ".</w>"]
    # A few merges so common words become single tokens (and BPE is exercised), all present in the vocab.
    merges = ["o n", "t h", "th e</w>", "h o", "ho r", "hor s", "hors e</w>", "m a", "ma r", "mar s</w>"]
    for merge in merges:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def build_tokenizer(folder: Optional[Path] = None):
    from transformers import CLIPTokenizer

    if folder is None:  # the tokenizer reads its files once, as it is made: a temporary folder serves
        with tempfile.TemporaryDirectory(prefix="tiny_clip_tok_") as temporary:
            return build_tokenizer(Path(temporary))
    folder = _write_tokenizer_files(Path(folder))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32,
                         pad_token="<|endoftext|>")


# --- the pipeline ------------------------------------------------------------------------------------------
def build_eager_pipeline(seed: int = 0, quantize: bool = False):
    """A StableDiffusionPipeline of tiny random modules (deterministic for a seed), nothing wrapped yet."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64), latent_channels=4,
        layers_per_block=1, norm_num_groups=32, sample_size=IMAGE_SIZE,
    )
    text_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, layer_norm_eps=1e-5, vocab_size=len(tokenizer), max_position_embeddings=32,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    # As the reference does: a multistep solver from the pipeline's scheduler config.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if quantize:
        pipe.unet = quantize_int_8_bits(pipe.unet)
    return pipe


# --- a pre-quantized module: int8 weights ----------------------------------------------------------------
class Int8Linear(torch.nn.Module):
    """``nn.Linear`` with int8 weights (symmetric, per output channel) dequantized on the fly."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        self.register_buffer("weight_int8", torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight_int8.to(x.dtype) * self.scale, self.bias)


def quantize_int_8_bits(module: torch.nn.Module) -> torch.nn.Module:
    """Every ``nn.Linear`` of ``module`` replaced by :class:`Int8Linear` (in place; returns ``module``).

    ``torch.ao.quantization.quantize_dynamic`` would be the stock choice, but its packed parameters are not
    tensors in ``state_dict()``, and navdeploy's module fingerprint hashes those tensors only (docs/workspace.md)."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            quantize_int_8_bits(child)
    return module


def get_pipeline(seed: int = 0, quantize: bool = False, unet_config: Optional[nav.OptimizeConfig] = None,
                 text_encoder_config: Optional[nav.OptimizeConfig] = None,
                 vae_config: Optional[nav.OptimizeConfig] = None):
    """The tiny pipeline with its modules wrapped as the reference wraps them."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pipe = build_eager_pipeline(seed, quantize)
    pipe.text_encoder = nav.Module(
        pipe.text_encoder,
        name="clip",
        # Converts the module's output dict back to the HuggingFace output class.
        output_mapping=lambda output: BaseModelOutputWithPooling(**output),
    )
    pipe.unet = nav.Module(
        pipe.unet,
        name="unet",
        precision="int8",
    )
    pipe.vae.decoder = nav.Module(
        pipe.vae.decoder,
        name="vae",
    )
    # Per module configuration (reference): modules with their own optimize_config keep it.
    pipe.text_encoder.optimize_config = text_encoder_config or nav.OptimizeConfig(
        target_formats=TEXT_ENCODER_FORMATS, runners=TEXT_ENCODER_RUNNERS)
    if unet_config is not None:
        pipe.unet.optimize_config = unet_config
    if vae_config is not None:
        pipe.vae.decoder.optimize_config = vae_config
    return pipe


def get_dataloader():
    # Please mind, the first element in tuple need to be a batch size
    return [(1, PROMPT)]


def generate(pipe, prompt: Any = PROMPT, seed: int = SEED, steps: int = STEPS) -> np.ndarray:
    """Images as float32 [B, H, W, 3] in [0, 1] for a fixed generator seed."""
    # One generator per prompt: an image depends on its prompt and the seed only, not on what it is batched with.
    count = 1 if isinstance(prompt, str) else len(prompt)
    generator = [torch.Generator("cpu").manual_seed(seed) for _ in range(count)]
    with torch.no_grad():
        out = pipe(prompt, num_inference_steps=steps, generator=generator, height=IMAGE_SIZE, width=IMAGE_SIZE,
                   output_type="np")
    return np.asarray(out.images, dtype=np.float32)


class Text2Image:
    """``pipe`` as a callable the optimizer and the server both use: prompt(s) -> images."""

    def __init__(self, pipe, steps: int = STEPS, seed: int = SEED):
        self.pipe, self.steps, self.seed = pipe, steps, seed

    def __call__(self, prompt: Any) -> np.ndarray:
        return generate(self.pipe, prompt, self.seed, self.steps)


# What `nav.serve` needs to know about Text2Image: one string per request, one image per request.
SERVE_INPUTS = [Tensor("prompt", str, (1,))]
SERVE_OUTPUTS = [Tensor("image", np.float32, (IMAGE_SIZE, IMAGE_SIZE, 3))]


def make_server_pipeline() -> Text2Image:
    """The wrapped pipeline as a served callable (``nav.serve`` runs ``nav.load_optimized()`` on it first);
    for ``navdeploy serve examples/stable_diffusion.py:make_server_pipeline --factory``."""
    served = Text2Image(get_pipeline(quantize=True))
    served.navdeploy_serve = {"inputs": SERVE_INPUTS, "outputs": SERVE_OUTPUTS, "name": "stable_diffusion",
                              "max_batch_size": 4}
    return served


def serve_pipeline(workspace: Optional[str] = None, **kwargs: Any):
    """Serve the optimized pipeline (blocking until Ctrl+C / SIGTERM) from a workspace an earlier run filled."""
    served = make_server_pipeline()
    return nav.serve(served, **{**served.navdeploy_serve, "workspace": workspace, **kwargs})


def main(workspace: Optional[str] = None, config: Optional[nav.OptimizeConfig] = None, quantize: bool = True,
         unet_config: Optional[nav.OptimizeConfig] = None, vae_config: Optional[nav.OptimizeConfig] = None,
         text_encoder_config: Optional[nav.OptimizeConfig] = None) -> dict:
    if workspace is not None:
        config = (config or nav.OptimizeConfig()).replace(workspace=workspace)
    pipe = get_pipeline(quantize=quantize, unet_config=unet_config, vae_config=vae_config,
                        text_encoder_config=text_encoder_config)
    eager = generate(pipe)
    dtypes_before = {n: t.dtype for n, t in pipe.unet.state_dict().items()}
    start = time.perf_counter()
    if config is None:
        status = nav.optimize(pipe, get_dataloader())
    else:
        status = nav.optimize(pipe, get_dataloader(), config=config)
    seconds = time.perf_counter() - start
    optimized = generate(pipe)
    dtypes_after = {n: t.dtype for n, t in pipe.unet.state_dict().items()}
    diff = float(np.abs(optimized - eager).max())
    return {"pipeline": pipe, "status": status, "eager": eager, "optimized": optimized, "max_abs_diff": diff,
            "unet_dtypes_kept": dtypes_before == dtypes_after, "optimize_s": seconds,
            "selected": status.selected()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default=None)
    parser.add_argument("--no-quantize", action="store_true", help="keep the UNet in fp32 (still marked int8)")
    parser.add_argument("--no-serve", action="store_true", help="skip serving through PyTriton")
    args = parser.parse_args()
    result = main(workspace=args.workspace, quantize=not args.no_quantize)
    print(f"selected: {result['selected']}")
    print(f"optimized vs eager image: max abs diff {result['max_abs_diff']:.2e} (tolerance {IMAGE_ATOL:.0e})")
    assert result["max_abs_diff"] <= IMAGE_ATOL
    if not args.no_serve:
        from tritonclient.http import InferInput

        served_pipe = Text2Image(result["pipeline"])
        with nav.serve(served_pipe, inputs=SERVE_INPUTS, outputs=SERVE_OUTPUTS, name="stable_diffusion",
                       max_batch_size=4, blocking=False, load_optimized=False) as server:
            prompt = InferInput("prompt", [1, 1], "BYTES")
            prompt.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
            image = server.client().infer("stable_diffusion", [prompt]).as_numpy("image")
        served = float(np.abs(image - result["optimized"]).max())
        print(f"served image vs in-process optimized: max abs diff {served:.2e}")
