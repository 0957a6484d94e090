"""A second workload: scikit-learn's bundled 8x8 digits, a small CNN, per-pixel IG.

The digits ship with scikit-learn (no download). ``train_digits_cnn`` trains a two-layer
CNN in a few seconds on a CPU; ``explain_digits`` explains each test image's predicted
class against two baselines at once: an all-black image and a blurred copy of the image
itself (per-row baseline), which keeps coarse shape and removes fine strokes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.core import integrated_gradients
from engine.errors import ArgumentError

__all__ = [
    "DIGITS_BASELINES",
    "DigitsData",
    "DigitsCNN",
    "blurred",
    "digits_baselines",
    "explain_digits",
    "load_digits_data",
    "train_digits_cnn",
]

log = logging.getLogger(__name__)

DIGITS_BASELINES = ("zero-base", "blur-base")


@dataclass(frozen=True)
class DigitsData:
    """Digits as (N, 1, 8, 8) float32 in [0, 1] with labels; a fixed train/test split."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def load_digits_data(test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """scikit-learn's 1,797 digits, scaled from 0..16 to [0, 1], split at random (seeded)."""
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ArgumentError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return DigitsData(images[train], labels[train], images[test], labels[test])


class DigitsCNN(nn.Module):
    """Conv(1->8) -> ReLU -> Conv(8->16) -> ReLU -> pool -> Linear(256 -> 10).

    The logits (not probabilities) are the outputs. ReLU makes the gradient jump along the
    path, so quadrature converges slowly and unevenly across images: the case adaptive
    steps are for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.out = nn.Linear(16 * 4 * 4, 10)

    def forward(self, images: Tensor) -> Tensor:
        hidden = self.act(self.conv1(images))
        hidden = self.pool(self.act(self.conv2(hidden)))
        return self.out(hidden.flatten(1))


def train_digits_cnn(
    data: DigitsData, *, epochs: int = 5, seed: int = 0, batch_size: int = 64
) -> DigitsCNN:
    """Adam on cross-entropy, seeded; returns the network in eval mode on the CPU."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ArgumentError(f"epochs must be a positive integer, got {epochs!r}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsCNN()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    n = len(data.train_labels)

    net.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(net(data.train_images[batch]), data.train_labels[batch])
            loss.backward()
            optimizer.step()
        log.debug("digits epoch %d: last batch loss %.4f", epoch + 1, float(loss.detach()))
    net.eval()
    log.info("digits CNN: test accuracy %.3f", accuracy(net, data))
    return net


def accuracy(net: nn.Module, data: DigitsData) -> float:
    """Share of test images whose largest logit is the label."""
    with torch.no_grad():
        predicted = net(data.test_images).argmax(1)
    return float((predicted == data.test_labels).float().mean())


def blurred(images: Tensor, sigma: float = 1.0) -> Tensor:
    """Gaussian blur of (N, 1, H, W) images, 5x5 kernel, edges replicated."""
    offsets = torch.arange(-2, 3, dtype=images.dtype, device=images.device)
    kernel_1d = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).view(1, 1, 5, 5)
    padded = nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    return nn.functional.conv2d(padded, kernel)


def digits_baselines(images: Tensor, sigma: float = 1.0) -> Tensor:
    """(2, N, 1, 8, 8): the zero image for every row, then each row's blurred copy."""
    return torch.stack([torch.zeros_like(images), blurred(images, sigma)])


def explain_digits(
    net: nn.Module,
    images: Tensor,
    *,
    target: Tensor | None = None,
    n_steps: int = 32,
    sigma: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel IG of each image's class against the zero and blurred baselines.

    Returns
    -------
    attributions : Tensor
        (2, N, 1, 8, 8): baseline kind (``DIGITS_BASELINES``), image, pixel.
    delta : Tensor
        (2, N) completeness gap.
    target : Tensor
        (N,) the class explained: ``target`` or the predicted class.
    """
    if target is None:
        with torch.no_grad():
            target = net(images).argmax(1)
    attributions, delta = integrated_gradients(
        net, images, digits_baselines(images, sigma), target=target, n_steps=n_steps,
        return_convergence_delta=True,
    )
    return attributions, delta, target
