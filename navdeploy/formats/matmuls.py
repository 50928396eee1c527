"""What a module's weights say about its matmuls: how wide they are, and whether they outweigh its convolutions. The
CPU build and precision rules key on it: oneDNN's prepacked and bf16 matmul kernels pay only where the matrices are
wide enough (formats/aoti.py, candidates/precision.py)."""

import torch


def _matmul_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    # nn.Linear, and transformers' Conv1D of GPT-2-style models
    return [m.weight for m in module.modules() if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]


def mostly_wide_matmuls(module: torch.nn.Module, min_width: int) -> bool:
    """Whether most of the module's matmul weights, counted by elements, are at least ``min_width`` wide on both
    sides: one wide head does not make a narrow body wide."""
    weights = _matmul_weights(module)
    total = sum(w.numel() for w in weights)
    wide = sum(w.numel() for w in weights if min(w.shape) >= min_width)
    return total > 0 and 2 * wide >= total


def mostly_matmuls(module: torch.nn.Module) -> bool:
    """Whether the module's matmul weights outnumber its convolution weights, by elements (a transformer; not a
    UNet or a CNN)."""
    convolutions = sum(m.weight.numel() for m in module.modules()
                       if isinstance(m, torch.nn.modules.conv._ConvNd) and isinstance(m.weight, torch.Tensor))
    matmuls = sum(w.numel() for w in _matmul_weights(module))
    return matmuls > 0 and matmuls >= convolutions
