"""match_call: a call matches a known spec exactly when flattening it again would give that spec, and then it
hands out the same tensors in the same order. Checked on every pair of a set of calls that differ in one detail
each (a constant's type or sign, a key's order, a container's type, a cache's layers and lengths)."""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch

from navdeploy.capture.match import match_call
from navdeploy.capture.pytree import flatten_call

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, EncoderDecoderCache, GPT2Config  # noqa: E402


@dataclass
class Options:
    scale: float


def _cache(layers: int, length: int, fill: bool = True) -> DynamicCache:
    cache = DynamicCache(config=GPT2Config(n_layer=layers))
    if fill:
        for i in range(layers):
            cache.update(torch.randn(2, 4, length, 8), torch.randn(2, 4, length, 8), i)
    return cache


def _calls() -> dict[str, tuple[tuple, dict]]:
    ids = torch.ones(2, 1, dtype=torch.long)
    mask = torch.ones(2, 7, dtype=torch.long)
    step = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
    return {
        "decode": ((), {**step, "past_key_values": _cache(2, 6)}),
        "decode, longer cache": ((), {**step, "past_key_values": _cache(2, 9)}),
        "decode, other layer count": ((), {**step, "past_key_values": _cache(3, 6)}),
        "prefill, empty cache": ((), {**step, "past_key_values": _cache(2, 0, fill=False)}),
        "use_cache=1 (int, not bool)": ((), {**step, "use_cache": 1, "past_key_values": _cache(2, 6)}),
        "encoder-decoder cache": ((), {**step, "past_key_values": EncoderDecoderCache(_cache(2, 6), _cache(2, 5))}),
        "float mask dtype": ((), {**step, "attention_mask": mask.float(), "past_key_values": _cache(2, 6)}),
        "positional list": (([ids, mask],), {}),
        "positional tuple": (((ids, mask),), {}),
        "dict": (({"a": ids, "b": mask},), {}),
        "dict, keys swapped": (({"b": mask, "a": ids},), {}),
        "ordered dict": ((OrderedDict(a=ids, b=mask),), {}),
        "zero": (([ids, 0.0],), {}),
        "negative zero": (([ids, -0.0],), {}),
        "string constant": (([ids, "greedy"],), {}),
        "dataclass": ((Options(0.5), ids), {}),
        "None": (([ids, None],), {}),
    }


def test_a_call_matches_a_spec_exactly_when_flattening_it_gives_that_spec():
    calls = _calls()
    flat = {name: flatten_call(args, kwargs, "m") for name, (args, kwargs) in calls.items()}
    checked = 0
    for (known, (spec, _)), (name, (args, kwargs)) in itertools.product(flat.items(), calls.items()):
        tensors = match_call(spec, args, kwargs)
        again, expected = flat[name]
        same = _text(again) == _text(spec)
        if known == name and name != "dataclass":  # a dataclass is always flattened again (never matched)
            assert tensors is not None, name
        if tensors is not None:
            assert same, f"{name!r} matched the spec of {known!r}, which flattening it does not give"
            assert len(tensors) == len(expected) and all(a is b for a, b in zip(tensors, expected)), name
            checked += 1
        else:
            assert not same or name == "dataclass", f"{name!r} did not match its own structure ({known!r})"
    assert checked >= len(calls) - 1


def _text(spec) -> str:
    """A spec as spec_key reads it (its JSON: True is not 1, -0.0 is not 0.0)."""
    return json.dumps(spec, sort_keys=True, default=str)


def test_negative_and_positive_zero_do_not_match_each_other():
    ids = torch.ones(1, 2)
    spec, _ = flatten_call(([ids, 0.0],), {}, "m")
    assert match_call(spec, ([ids, 0.0],), {}) is not None
    assert match_call(spec, ([ids, -0.0],), {}) is None
