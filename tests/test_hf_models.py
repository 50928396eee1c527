"""Real transformers architectures (built from configs, random weights) through nav.Module."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import navdeploy as nav

transformers = pytest.importorskip("transformers")


def _tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def test_forward_func_keeps_the_signature_generate_reads(request):
    """HF generate reads forward's signature to decide whether to pass position_ids: with a (*args, **kwargs)
    stand-in it stops passing them, and a left-padded batch generates other tokens than the plain model."""
    plain = _tiny_gpt2()
    wrapped = nav.Module(copy.deepcopy(plain), name=f"gpt2_{request.node.name}"[:50], forward_func="forward")
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [11, 12, 13, 14, 15]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # the first row is left-padded
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = plain.generate(**kwargs)
        actual = wrapped.generate(**kwargs)
    assert torch.equal(actual, expected)
    assert inspect.signature(wrapped.forward) == inspect.signature(plain.forward)
    assert wrapped.forward.__name__ == "forward" and wrapped.forward.__doc__ == plain.forward.__doc__
