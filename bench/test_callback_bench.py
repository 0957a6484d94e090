"""Cost of one attribution snapshot during training, at the Titanic job's size.

    pytest bench/test_callback_bench.py --benchmark-only

One snapshot explains 179 test rows against 4 baselines with 50 steps: 35,800 path
points, one forward and one backward. A training epoch of the same model sees 713 rows
forward and backward and 179 rows forward, so a snapshot is about 40 times the arithmetic
of an epoch; compare the two timings below.
"""

from __future__ import annotations

import pytest
import torch

from engine.callbacks import AttributionCallback
from engine.model import TitanicMLP

N_TEST, N_TRAIN, N_FEATURES = 179, 713, 5
BASELINES = ("mean-base", "random-base", "zero-base", "one-base")
FEATURES = ("Pclass", "Sex", "Age", "SibSp", "Fare")


@pytest.fixture(scope="module")
def model() -> TitanicMLP:
    torch.manual_seed(404)
    return TitanicMLP().train()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_snapshot_of_the_titanic_job(benchmark, model, compiled):
    generator = torch.Generator().manual_seed(0)
    rows = torch.rand(N_TEST, N_FEATURES, generator=generator)
    baselines = torch.rand(len(BASELINES), N_FEATURES, generator=generator)
    callback = AttributionCallback(rows, baselines, BASELINES, FEATURES, n_steps=50,
                                   compile=compiled)
    callback.explain(model)  # compiles, when asked to, before the timing starts

    attributions, _ = benchmark(callback.explain, model)

    assert attributions.shape == (len(BASELINES), N_TEST, N_FEATURES)


def test_one_training_epoch_of_the_same_model(benchmark, model):
    # The arithmetic of an epoch without Lightning's bookkeeping: two batches of Adam steps
    # on the training rows and a forward pass over the test rows.
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(N_TRAIN, N_FEATURES, generator=generator)
    labels = torch.randint(0, 2, (N_TRAIN,), generator=generator).float()
    test_rows = torch.rand(N_TEST, N_FEATURES, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.BCELoss()

    def epoch() -> None:
        for start in range(0, N_TRAIN, 512):
            optimizer.zero_grad()
            batch = slice(start, start + 512)
            loss_fn(model(features[batch]).squeeze(-1), labels[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            model(test_rows)

    benchmark(epoch)
