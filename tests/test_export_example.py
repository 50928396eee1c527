"""Exporters get an example where every captured-varying axis is larger than 1, so none is specialised."""

from __future__ import annotations

import torch

from navdeploy.candidates.build import export_example
from navdeploy.capture.recorder import Recorder


class Pool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, mask):
        return (self.proj(x) * mask.unsqueeze(-1)).sum(1)


def _calls():
    return [(1, (torch.randn(1, seq, 4), torch.ones(1, seq))) for seq in (1, 3, 5)]


def test_axes_that_varied_are_grown_past_one_in_the_example():
    module = Pool().eval()
    recorder = Recorder("pool", 1, None)  # one kept sample: the first call, sequence length 1
    for _, (x, mask) in _calls():
        recorder.record(module, (x, mask), {})
    (graph,) = recorder.finish()
    assert [tuple(t.shape) for t in graph.samples[0].inputs] == [(1, 1, 4), (1, 1)]
    example = export_example(graph, max_batch_size=8)
    assert [tuple(t.shape) for t in example] == [(2, 2, 4), (2, 2)]  # batch and sequence both past 1
    out = module(*example)  # still a consistent call
    assert out.shape == (2, 4)



def test_a_batch_axis_that_cannot_grow_stays_static():
    """max_batch_size=1: the batch axis is not dynamic (torch.export refuses a Dim of min 1, max 1)."""
    recorder = Recorder("one", 2, None)
    recorder.record(Pool().eval(), (torch.randn(1, 3, 4), torch.ones(1, 3)), {})
    (graph,) = recorder.finish()
    assert graph.batching and graph.dynamic_axes(1) == [{}, {}]
    assert [tuple(t.shape) for t in export_example(graph, max_batch_size=1)] == [(1, 3, 4), (1, 3)]
