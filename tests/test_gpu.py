"""The engine on CUDA equals the CPU float64 result; run with ``nox -s gpu``.

Skipped without a CUDA device. Tolerances: float32 with TensorFloat-32 off agrees to
float32 rounding; TF32 matmuls keep 10 bits of mantissa (about 1e-3 relative); bf16
autocast keeps 8 (4e-3 per operation, averaged over the 50 steps and summed in float32).
"""

import pytest
import torch

from engine import integrated_gradients
from engine.model import TitanicMLP

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
]

TOLERANCE = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 1e-2}


def job(order: str, rows: int = 179):
    torch.manual_seed(0)
    net = TitanicMLP(order).double().eval()
    x = torch.rand(rows, 5, dtype=torch.float64)
    baselines = torch.stack([x.mean(0), torch.rand(5, dtype=torch.float64),
                             torch.zeros(5, dtype=torch.float64),
                             torch.ones(5, dtype=torch.float64)])
    return net, x, baselines


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("order", ["article", "conventional"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("hoist", [True, "affine", False], ids=["kinks", "affine", "plain"])
def test_cuda_equals_cpu_float64(order, precision, hoist):
    net, x, baselines = job(order)
    expected = integrated_gradients(net, x, baselines, n_steps=50)

    cuda_net = TitanicMLP(order).cuda().eval()
    cuda_net.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    actual = integrated_gradients(cuda_net, x.float().cuda(), baselines.float().cuda(),
                                  n_steps=50, precision=precision, hoist=hoist)

    assert actual.device.type == "cuda"
    assert relative_error(actual, expected) <= TOLERANCE[precision]


@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_compiled_and_graph_replay_on_cuda_equal_cpu_float64(mode):
    net, x, baselines = job("article")
    expected = integrated_gradients(net, x, baselines, n_steps=50)
    cuda_net = TitanicMLP("article").cuda().eval()
    cuda_net.load_state_dict({k: v.float() for k, v in net.state_dict().items()})

    for _ in range(2):  # the second call replays what the first compiled or captured
        actual = integrated_gradients(cuda_net, x.float().cuda(), baselines.float().cuda(),
                                      n_steps=50, compile=mode, internal_batch_size=4000)

    assert relative_error(actual, expected) <= TOLERANCE["fp32"]


def test_deterministic_algorithms_on_cuda_give_the_same_attributions():
    # Lightning's deterministic=True turns this on for a whole fit, callbacks included;
    # torch then refuses a floating-point cumsum on CUDA, which the closed form needs.
    net, x, baselines = job("article")
    cuda_net = TitanicMLP("article").cuda().eval()
    cuda_net.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    args = (cuda_net, x.float().cuda(), baselines.float().cuda())
    free = integrated_gradients(*args, n_steps=50)

    torch.use_deterministic_algorithms(True)
    try:
        fixed = integrated_gradients(*args, n_steps=50)
    finally:
        torch.use_deterministic_algorithms(False)

    assert relative_error(fixed, free) <= 1e-6


def test_cuda_chunks_follow_a_small_budget():
    net, x, baselines = job("conventional", rows=2000)
    cuda_net = TitanicMLP("conventional").cuda().eval()
    cuda_net.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    # A first call allocates cuBLAS's workspaces, which are not the chunks' memory.
    integrated_gradients(cuda_net, x[:8].float().cuda(), baselines.float().cuda(), n_steps=50,
                         hoist=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()

    integrated_gradients(cuda_net, x.float().cuda(), baselines.float().cuda(), n_steps=50,
                         memory_budget=32 << 20, hoist=False)

    # 400,000 points would need ~1 GB of activations at once; the budget caps the chunks.
    # Allow the (B, N, F) outputs and sums and allocator rounding on top of the budget.
    assert torch.cuda.max_memory_allocated() - before <= 2 * (32 << 20)
