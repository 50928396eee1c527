"""Optimize a small image classifier (built in code, random weights) on CPU, then reuse it.

    python examples/image_classifier.py
"""

import torch
from torch import nn

import navdeploy as nav


def build_classifier() -> nn.Module:
    """A ResNet-style CNN small enough to optimize in seconds."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def main() -> None:
    model = nav.Module(build_classifier(), name="classifier")
    dataloader = [(1, torch.randn(1, 3, 64, 64)) for _ in range(4)]
    status = nav.optimize(model, dataloader)
    print("selected runner:", status.selected()["classifier"], "| runs now:", status.in_use()["classifier"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        print("optimized output:", model(x)[0, :4])
        print("eager output:    ", model.__wrapped__(x)[0, :4])


if __name__ == "__main__":
    main()
