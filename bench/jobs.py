"""The benchmarked jobs: the article's loop, Captum at its best, and the engine's variants.

Every contender gets the same network, rows, baselines and 50 Gauss-Legendre steps. The
network is the article's (``TitanicMLP``, article layer order) with seeded initial weights:
timings do not depend on the trained values, and skipping training keeps the benchmarks
short. The rows are the Titanic test set (179 passengers), tiled for larger sizes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from captum.attr import IntegratedGradients
from torch import Tensor, nn

from engine import integrated_gradients
from engine.baselines import BASELINE_KINDS, make_baselines
from engine.data import load_titanic, locate_titanic_csv, prepare_titanic
from engine.model import TitanicMLP

N_STEPS = 50
METHOD = "gausslegendre"
SEED = 404
REPO_DATA = Path(__file__).resolve().parent.parent / "data" / "train.csv"

# "plain" runs every layer at every path point; "affine" hoists the affine prefix and runs
# the rest at every point; the others (the default) also integrate through the first
# PReLU and the Linear layer after it in closed form. Compiled variants run each chunk
# as one compiled graph.
ENGINE_VARIANTS = {
    "engine-plain-fp32": dict(hoist=False),
    "engine-plain-bf16": dict(hoist=False, precision="bf16"),
    "engine-plain-compiled": dict(hoist=False, compile=True),
    "engine-plain-compiled-bf16": dict(hoist=False, compile=True, precision="bf16"),
    "engine-affine-fp32": dict(hoist="affine"),
    "engine-affine-compiled": dict(hoist="affine", compile=True),
    "engine-fp32": dict(),
    "engine-bf16": dict(precision="bf16"),
    "engine-compiled": dict(compile=True),
    "engine-compiled-bf16": dict(compile=True, precision="bf16"),
}
CUDA_ONLY_VARIANTS = {
    # Plain: hoisted, the article's network keeps no matmul after the closed form.
    "engine-plain-tf32": dict(hoist=False, precision="tf32"),
    "engine-graphs": dict(compile="reduce-overhead"),
}


@dataclass(frozen=True)
class Job:
    net: nn.Module
    inputs: Tensor
    baselines: Tensor

    @property
    def points(self) -> int:
        return self.inputs.shape[0] * self.baselines.shape[0] * N_STEPS

    @property
    def flops(self) -> float:
        """Nominal FLOPs of the plain path: forward and input-gradient backward per point.

        Hoisted runs do less arithmetic than this; their GFLOP/s is a useful-work rate.
        """
        macs = sum(m.in_features * m.out_features for m in self.net.modules()
                   if isinstance(m, nn.Linear))
        return 2.0 * 2.0 * macs * self.points


def titanic_job(rows: int | None = None, device: str = "cpu") -> Job:
    """The Titanic test set (179 rows), tiled to ``rows``, four baselines, on ``device``."""
    source = REPO_DATA if REPO_DATA.is_file() else locate_titanic_csv()
    data = prepare_titanic(load_titanic(source), source=source)
    inputs = data.test_features.float()
    if rows is not None:
        inputs = inputs.repeat((rows + len(inputs) - 1) // len(inputs), 1)[:rows]
    baselines = make_baselines(BASELINE_KINDS, data.mean_baseline.float(), seed=SEED)
    torch.manual_seed(SEED)
    net = TitanicMLP("article").eval()
    return Job(net.to(device), inputs.contiguous().to(device), baselines.to(device))


def article_forward(net: nn.Module):
    """The article's wrapper: a passenger's feature vector reshaped to a one-row batch."""

    def forward(features: Tensor) -> Tensor:
        return net(features.reshape(-1, features.shape[-1])).reshape(-1)

    return forward


def article_loop(job: Job) -> Tensor:
    """One Captum call per passenger per baseline, as the article wrote it."""
    ig = IntegratedGradients(article_forward(job.net))
    return torch.stack([
        torch.cat([
            ig.attribute(row.unsqueeze(0), base.unsqueeze(0), n_steps=N_STEPS, method=METHOD)
            for row in job.inputs
        ])
        for base in job.baselines
    ])


def captum_per_baseline(job: Job, internal_batch_size: int | None = None) -> Tensor:
    """Captum at its best on shared baselines: one call per baseline over all rows."""
    ig = IntegratedGradients(job.net)
    return torch.stack([
        ig.attribute(job.inputs, base.unsqueeze(0), n_steps=N_STEPS, method=METHOD,
                     internal_batch_size=internal_batch_size)
        for base in job.baselines
    ])


def captum_one_call(job: Job, internal_batch_size: int | None = None) -> Tensor:
    """One Captum call over all rows x baselines, each row with its own baseline."""
    n_baselines, n_rows = job.baselines.shape[0], job.inputs.shape[0]
    inputs = job.inputs.repeat(n_baselines, 1)
    baselines = job.baselines.repeat_interleave(n_rows, dim=0)
    ig = IntegratedGradients(job.net)
    attributions = ig.attribute(inputs, baselines, n_steps=N_STEPS, method=METHOD,
                                internal_batch_size=internal_batch_size)
    return attributions.view(n_baselines, n_rows, -1)


def engine_run(job: Job, **options) -> Tensor:
    return integrated_gradients(job.net, job.inputs, job.baselines, n_steps=N_STEPS,
                                method=METHOD, **options)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_first_call(function, device) -> float:
    """Seconds of one call, synchronised: used to report compile time apart."""
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def measure_matmul_peak(device: str = "cpu", size: int = 2048, repeats: int = 20) -> float:
    """Best fp32 GFLOP/s of a square matmul on ``device``: the machine's reference peak.

    The best of many repeats: on a shared machine a short measurement can land in a slow
    moment and understate the peak, which would flatter every "of peak" figure.
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best / 1e9
