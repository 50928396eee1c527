"""What an optimized module says when a call runs eagerly: which argument and axis is out of range, how a new
structure differs from the captured calls, and one warning per kind of reason, not one per module."""

from __future__ import annotations

import warnings

import torch

import navdeploy as nav

CONFIG = nav.OptimizeConfig(runners=("TorchScriptCPU",), use_multiprocessing=False, batch_sizes=(1, 2),
                            max_batch_size=2, profile_time_s=0.05)


class Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None, scale=1.0):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.out(h).mean(1) * scale


def _messages(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "navdeploy" in str(w.message)]


def test_fallback_warnings_name_the_argument_and_come_once_per_kind(isolated_env, choose_candidate):
    with isolated_env("fallback_warnings") as ws:
        torch.manual_seed(0)
        module = nav.Module(Masked().eval(), name="fallback_warnings")
        ids, mask = torch.randint(0, 50, (2, 5)), torch.ones(2, 5)
        with torch.no_grad():
            nav.optimize(module, [(2, (ids, {"attention_mask": mask}))], config=CONFIG)
        choose_candidate(module, ws, "TorchScriptCPU")
        eager = module.__wrapped__

        def call(i, **kwargs):
            out = module(i, **kwargs)
            torch.testing.assert_close(out, eager(i, **kwargs))

        with torch.no_grad():
            assert _messages(lambda: call(ids, attention_mask=mask)) == []
            long_ids, long_mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
            (first,) = _messages(lambda: call(long_ids, attention_mask=long_mask))
            assert "input 'args[0]': size 7 of axis 1 is outside the captured range [5, 5]" in first
            # another length of the same axis: the same kind, already said
            assert _messages(lambda: call(ids[:, :3], attention_mask=mask[:, :3])) == []
            # the batch limit is another kind: its own warning, naming max_batch_size as the fix
            (batch,) = _messages(lambda: call(ids.repeat(2, 1), attention_mask=mask.repeat(2, 1)))
            assert "batch size 4" in batch and "max_batch_size=2" in batch
            assert "OptimizeConfig(max_batch_size=...)" in batch
            # a keyword left out (what HF does with an all-ones attention_mask): said which
            (structure,) = _messages(lambda: call(ids))
            assert "new input structure" in structure
            assert "keyword attention_mask is not passed here (the captured calls pass it)" in structure
            (constant,) = _messages(lambda: call(ids, attention_mask=mask, scale=2.0))
            assert "keyword scale is new here" in constant
            assert _messages(lambda: call(ids)) == []  # that structure was said already
            (dtype,) = _messages(lambda: call(ids, attention_mask=mask.half()))
            assert "attention_mask: a float16 tensor of rank 2 here, a float32 tensor of rank 2" in dtype
