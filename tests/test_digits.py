"""The digits workload: a small CNN on scikit-learn's 8x8 images, explained per pixel."""

import torch
from captum.attr import IntegratedGradients

from engine.digits import DIGITS_BASELINES, accuracy, blurred, digits_baselines, explain_digits
from engine.validate import captum_attributions
from tests.test_core import relative_error


def test_small_cnn_learns_the_digits(digits_cnn):
    net, data = digits_cnn

    # Ten classes: chance is 0.1; a few seconds of training reach well over 0.9.
    assert accuracy(net, data) >= 0.9


def test_blur_keeps_the_mean_brightness_and_smooths():
    torch.manual_seed(50)
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64)

    smooth = blurred(images)

    assert smooth.shape == images.shape
    # Neighbouring pixels differ less after the blur.
    assert (smooth.diff(dim=-1).abs().mean() < images.diff(dim=-1).abs().mean()).item()
    torch.testing.assert_close(smooth.mean(), images.mean(), rtol=0.1, atol=0)


def test_both_baselines_explain_every_pixel_with_small_delta(digits_cnn):
    net, data = digits_cnn
    images = data.test_images[:20]

    attributions, delta, target = explain_digits(net, images, n_steps=64)

    assert attributions.shape == (len(DIGITS_BASELINES), 20, 1, 8, 8)
    assert torch.equal(target, net(images).argmax(1))
    # ReLU kinks make 64 Gauss-Legendre nodes accurate to a few percent of the logit gap.
    with torch.no_grad():
        gap = net(images).gather(1, target[:, None])[:, 0] - torch.stack(
            [net(base).gather(1, target[:, None])[:, 0] for base in digits_baselines(images)])
    assert float((delta.abs() / gap.abs().clamp_min(1e-3)).median()) <= 0.05


def test_digits_attributions_equal_captum(digits_cnn):
    net, data = digits_cnn
    images = data.test_images[:10]
    target = net(images).argmax(1)

    attributions, _, _ = explain_digits(net, images, target=target, n_steps=32)

    zero_base = captum_attributions(net, images, torch.zeros(1, 1, 8, 8), target=target,
                                    n_steps=32, method="gausslegendre")
    blur_base = IntegratedGradients(net).attribute(images, blurred(images), target=target,
                                                    n_steps=32)
    assert relative_error(attributions[0], zero_base[0]) <= 1e-5
    assert relative_error(attributions[1], blur_base) <= 1e-5
