"""A Triton model's tensors are named by position (input__0, ...), in the order the capture flattens the call
(keyword arguments sorted by name), not the order of the call: config.pbtxt says which argument each one is, and a
client that follows it gets eager's outputs."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime
import torch

import navdeploy as nav
from navdeploy.triton import export_model_repository


class TwoTowers(torch.nn.Module):
    """Called with keywords in the order input_ids, pixel_values, attention_mask: two int64 inputs of one shape
    that a client could swap without any error."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(30, 8)
        self.pixels = torch.nn.Linear(12, 8)

    def forward(self, input_ids, pixel_values, attention_mask):
        text = (self.embed(input_ids) * attention_mask[..., None]).sum(1)
        return {"text_embeds": text, "image_embeds": self.pixels(pixel_values)}


def test_config_names_the_argument_of_each_tensor_and_a_client_following_it_gets_eager(tmp_path):
    torch.manual_seed(0)
    module = nav.Module(TwoTowers().eval(), name="two_towers")
    ids, mask = torch.randint(0, 30, (2, 5)), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pixels = torch.randn(2, 12)
    config = nav.OptimizeConfig(workspace=tmp_path / "ws", runners=("OnnxCPU",), target_formats=(nav.Format.ONNX,),
                                batch_sizes=(2,), max_batch_size=2, profile_time_s=0.05, pipeline_repeats=0)
    with torch.no_grad():
        nav.optimize(lambda: module(input_ids=ids, pixel_values=pixels, attention_mask=mask), [(2, ())], config)
        eager = module.__wrapped__(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    repo = export_model_repository(tmp_path / "repo", workspace=tmp_path / "ws")
    text = (repo / "two_towers" / "config.pbtxt").read_text()
    named = dict(re.findall(r'# (\S+)\n\s*name: "(\S+)"', text))  # argument -> tensor name
    assert set(named) == {"input_ids", "pixel_values", "attention_mask", "text_embeds", "image_embeds"}, text
    assert named["attention_mask"] == "input__0" and named["input_ids"] == "input__1"  # sorted, not call order
    session = onnxruntime.InferenceSession(str(repo / "two_towers" / "1" / "model.onnx"))
    feed = {named["input_ids"]: ids.numpy(), named["attention_mask"]: mask.numpy(),
            named["pixel_values"]: pixels.numpy()}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    for field in ("text_embeds", "image_embeds"):
        np.testing.assert_allclose(outputs[named[field]], eager[field].numpy(), atol=1e-5, rtol=1e-4)
