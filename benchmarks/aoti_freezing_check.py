"""Does Inductor's freezing make an AOTInductor CPU package faster, and does navdeploy's rule
(``navdeploy.formats.aoti.freezes``: freeze where most matmul weights are at least 192 wide) pick the faster build?

Real modules built from configs (random weights): BERT encoders 128, 256, 384 (MiniLM's shape: 6 layers, 12 heads,
intermediate 1536) and 768 wide, a GPT-2 of width 256 (transformers' Conv1D layers), the bench's ViT (192 wide, 197
tokens an image), and the bench's tiny SD UNet and CLIP text encoder. Each module runs in its own process: one
torch.export (batch and sequence dynamic for the encoders, batch for ViT), an AOTInductor package built without and
with freezing, then eager and both packages timed alternately (7 rounds of 10 calls, medians) at each shape.

Usage: python benchmarks/aoti_freezing_check.py [--only bert128,minilm384]
(writes benchmarks/results/aoti_freezing_cpu.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENCODERS = {"bert128": (128, 4, 2, 512), "bert256": (256, 2, 4, 1024), "minilm384": (384, 6, 12, 1536),
            "bert768": (768, 2, 12, 3072)}
MODULES = (*ENCODERS, "gpt2_256", "vit192", "sd_unet", "sd_clip")


def _module(which: str):
    """(module, example inputs, dynamic shapes or None, the shapes timed: a list of input lists)."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def ids(b: int, s: int) -> list:
        return [torch.randint(0, 1000, (b, s)), torch.ones(b, s, dtype=torch.int64)]

    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=128)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq})
    sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
    import bench_pipelines

    if which in ENCODERS:
        return bench_pipelines.bert_encoder(*ENCODERS[which]), ids(2, 16), dynamic, [ids(1, 12), ids(8, 20)]
    if which == "gpt2_256":
        from transformers import GPT2Config, GPT2Model

        gpt2 = GPT2Model(GPT2Config(vocab_size=1000, n_embd=256, n_layer=2, n_head=4, bos_token_id=0,
                                    eos_token_id=0)).eval()

        class Decoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.gpt2 = gpt2

            def forward(self, input_ids, mask):
                return self.gpt2(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state

        return Decoder().eval(), ids(2, 16), dynamic, [ids(1, 12), ids(8, 20)]
    if which == "vit192":
        from transformers import ViTConfig, ViTForImageClassification

        vit = ViTForImageClassification(ViTConfig(image_size=224, patch_size=16, num_hidden_layers=4, hidden_size=192,
                                                  num_attention_heads=3, intermediate_size=768, num_labels=10)).eval()

        class Classifier(nn.Module):
            def __init__(self):
                super().__init__()
                self.vit = vit

            def forward(self, pixels):
                return self.vit(pixel_values=pixels).logits

        def images(b: int) -> list:
            return [torch.randn(b, 3, 224, 224)]

        return Classifier().eval(), images(2), ({0: batch},), [images(1), images(4)]
    spec = bench_pipelines.SPECS["sd_guidance"]
    spec.device = "cpu"
    pipe = spec.build()["pipe"]
    if which == "sd_unet":
        module, inputs = bench_pipelines.sd_unet_call(pipe)
        return module, inputs, None, [inputs]

    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.text = pipe.text_encoder

        def forward(self, input_ids):
            return self.text(input_ids, return_dict=False)[0]

    config = pipe.text_encoder.config
    inputs = [torch.randint(0, config.vocab_size, (2, config.max_position_embeddings))]
    return Text().eval(), inputs, None, [inputs]


def _child(which: str, precision: str) -> dict:
    import torch

    from navdeploy.candidates.precision import CAST_DTYPES
    from navdeploy.formats.aoti import freezes
    from navdeploy.formats.inductor_probe import warm_cpu_isa

    warm_cpu_isa()
    module, example, dynamic, shapes = _module(which)
    if precision != "fp32":
        dtype = CAST_DTYPES[precision]

        def cast(inputs: list) -> list:
            return [t.to(dtype) if t.is_floating_point() else t for t in inputs]

        module, example, shapes = module.to(dtype), cast(example), [cast(inputs) for inputs in shapes]
    result: dict = {"module": which, "precision": precision, "rule_freezes": freezes(module, precision),
                    "threads": torch.get_num_threads()}
    with torch.no_grad():
        program = torch.export.export(module, tuple(example), dynamic_shapes=dynamic)
        runners = {"eager": module}
        for frozen in (False, True):
            folder = tempfile.mkdtemp(prefix="navdeploy-freeze-")
            start = time.perf_counter()
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(folder, "m.pt2"),
                inductor_configs={"freezing": frozen, "aot_inductor.check_lowerbound": False})
            result[f"build_s_{'frozen' if frozen else 'plain'}"] = round(time.perf_counter() - start, 1)
            runners["frozen" if frozen else "plain"] = torch._inductor.aoti_load_package(path)
        result["shapes"] = []
        for inputs in shapes:
            times: dict = {name: [] for name in runners}
            for run in runners.values():
                for _ in range(5):
                    run(*inputs)
            for _ in range(7):
                for name, run in runners.items():
                    start = time.perf_counter()
                    for _ in range(10):
                        run(*inputs)
                    times[name].append((time.perf_counter() - start) / 10 * 1e3)
            ms = {name: round(statistics.median(values), 3) for name, values in times.items()}
            result["shapes"].append({"shape": [list(t.shape) for t in inputs], **{f"{k}_ms": v for k, v in ms.items()},
                                     "frozen_over_plain": round(ms["frozen"] / ms["plain"], 3)})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MODULES), help="comma-separated: " + ", ".join(MODULES))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: the module and its float inputs cast to bf16, as navdeploy's bf16 candidates")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.child, args.precision)))
        return
    rows = []
    print(f"{'module':<11}{'rule':>8}{'shape':>22}{'eager ms':>10}{'plain ms':>10}{'frozen ms':>10}"
          f"{'frozen/plain':>14}")
    for which in args.only.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", which, "--precision", args.precision],
                              capture_output=True, text=True, timeout=900)
        line = next((s for s in done.stdout.splitlines() if s.startswith("RESULT ")), None)
        if line is None:
            print(f"{which}: failed\n{done.stderr[-2000:]}")
            continue
        row = json.loads(line[len("RESULT "):])
        rows.append(row)
        for point in row["shapes"]:
            rule = "freeze" if row["rule_freezes"] else "plain"
            shape = "x".join(str(d) for d in point["shape"][0])
            print(f"{which:<11}{rule:>8}{shape:>22}{point['eager_ms']:>10.3f}{point['plain_ms']:>10.3f}"
                  f"{point['frozen_ms']:>10.3f}{point['frozen_over_plain']:>14.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.node(),
              "precision": args.precision,
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "rows": rows}
    name = "aoti_freezing_cpu.json" if args.precision == "fp32" else f"aoti_freezing_cpu_{args.precision}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
