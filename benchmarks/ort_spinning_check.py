"""How fast is an ONNX Runtime CPU session whose workers never spin, against one whose workers spin between the
operators of a run and stop when it returns (``session.force_spinning_stop``, navdeploy's option), and does either
leave the cores busy for the torch call after it?

Real modules built from configs (random weights): the example CNN at batch 1, a small BERT encoder (4 layers,
hidden 128) at batch 4 x 32 tokens, the bench's tiny SD UNet at batch 2 and its VAE decoder at batch 1. Each
(module, option) pair runs in its own process, twice, alternating: the ORT call's median, and the median of a
small torch CNN called right after each ORT call.

Usage: python benchmarks/ort_spinning_check.py [--only cnn,bert] [--rounds 2]
(writes benchmarks/results/ort_spinning_cpu.json)
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
MODULES = ("cnn", "bert", "unet", "vae")
MODES = ("never spinning", "navdeploy")


def _module(which: str):
    import torch
    from torch import nn

    sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
    torch.manual_seed(0)
    if which == "cnn":
        import image_classifier

        return image_classifier.build_classifier().eval(), [torch.randn(1, 3, 64, 64)]
    if which == "bert":
        from transformers import BertConfig, BertModel

        bert = BertModel(BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=512, max_position_embeddings=128)).eval()

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, ids, mask):
                return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

        return Encoder().eval(), [torch.randint(0, 1000, (4, 32)), torch.ones(4, 32, dtype=torch.int64)]
    import bench_pipelines

    spec = bench_pipelines.SPECS["sd_guidance"]
    spec.device = "cpu"
    pipe = spec.build()["pipe"]
    if which == "unet":
        class UNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.unet = pipe.unet

            def forward(self, sample, t, text):
                return self.unet(sample, t, encoder_hidden_states=text, return_dict=False)[0]

        return UNet().eval(), [torch.randn(2, 4, 16, 16), torch.tensor(10.0), torch.randn(2, 77, 32)]

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = pipe.vae.decoder

        def forward(self, latents):
            return self.decoder(latents)

    return Decoder().eval(), [torch.randn(1, 4, 16, 16)]


def _child(which: str, mode: str, folder: str, calls: int) -> dict:
    import onnxruntime
    import torch

    sys.path.insert(0, str(ROOT))
    from navdeploy.formats.onnx import session_options

    module, inputs = _module(which)
    path = Path(folder) / f"{which}.onnx"
    if not path.exists():
        torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, opset_version=17)
    options = session_options()
    if mode == "never spinning":
        options.add_session_config_entry("session.force_spinning_stop", "0")
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    torch.manual_seed(1)
    neighbour = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(32, 32, 3, padding=1)).eval()
    image = torch.randn(1, 3, 64, 64)
    ort_ms, torch_ms = [], []
    with torch.inference_mode():
        for i in range(calls + 5):
            start = time.perf_counter()
            session.run(None, feeds)
            middle = time.perf_counter()
            neighbour(image)
            end = time.perf_counter()
            if i >= 5:
                ort_ms.append((middle - start) * 1e3)
                torch_ms.append((end - middle) * 1e3)
    return {"module": which, "mode": mode, "ort_ms_p50": statistics.median(ort_ms),
            "torch_after_ms_p50": statistics.median(torch_ms), "calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MODULES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, args.calls)))
        return
    folder = tempfile.mkdtemp(prefix="navdeploy-ort-spinning-")
    rows = []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for which in args.only.split(","):
        for _ in range(args.rounds):
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--child", which, mode, folder, "--calls",
                                      str(args.calls)], capture_output=True, text=True, check=True, env=env).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'module':<8}{'ORT workers':<18}{'ORT p50 ms':>12}{'torch after p50 ms':>20}")
    for r in rows:
        print(f"{r['module']:<8}{r['mode']:<18}{r['ort_ms_p50']:>12.3f}{r['torch_after_ms_p50']:>20.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.node(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "rows": rows}
    (RESULTS / "ort_spinning_cpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
