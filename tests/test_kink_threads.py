"""The closed form's numba loops split the pairs over threads and give one thread's numbers."""

import logging
import multiprocessing
import os
import queue as queue_module
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import engine.kink_loops
from engine import integrated_gradients
from tests.test_chunk_loop import titanic_job

ROOT = Path(__file__).resolve().parents[1]

numba = engine.kink_loops.numba
pytestmark = [
    pytest.mark.skipif(numba is None or numba.config.DISABLE_JIT,
                       reason="the loops run only where numba compiles"),
    pytest.mark.skipif(numba is not None and numba.config.NUMBA_NUM_THREADS < 2,
                       reason="numba's pool has one thread (NUMBA_NUM_THREADS or one CPU)"),
]


@pytest.fixture(autouse=True)
def pool_on(monkeypatch):
    """The pool as in a fresh process with a fast threading layer, whatever the
    environment's (``NUMBA_THREADING_LAYER=workqueue`` leaves one thread after a launch)."""
    monkeypatch.setattr(engine.kink_loops, "_NO_POOL", [])
    monkeypatch.setattr(numba, "threading_layer", lambda: "omp")


@pytest.fixture
def block_launches(monkeypatch):
    """Counts the launches of the loops in the thread pool, with their block counts."""
    launches = []
    for name in ("_forward_blocks", "_backward_blocks"):
        original = getattr(engine.kink_loops, name)

        def counted(*args, original=original, name=name):
            launches.append((name, args[-1]))
            return original(*args)

        monkeypatch.setattr(engine.kink_loops, name, counted)
    return launches


@pytest.fixture
def two_threads():
    """Torch at two threads, as the pool's thread count follows it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def job(rows: int = 60):
    return titanic_job(dtype=torch.float32, rows=rows, seed=3)


def one_thread(monkeypatch, net, x, baselines):
    monkeypatch.setattr(engine.kink_loops, "PARALLEL", False)
    try:
        return integrated_gradients(net, x, baselines, n_steps=50)
    finally:
        monkeypatch.setattr(engine.kink_loops, "PARALLEL", True)


@pytest.mark.usefixtures("two_threads")
def test_blocks_of_pairs_give_one_threads_numbers(block_launches, monkeypatch):
    net, x, baselines = job()

    pooled = integrated_gradients(net, x, baselines, n_steps=50)
    assert block_launches == [("_forward_blocks", 2), ("_backward_blocks", 2)]
    block_launches.clear()
    serial = one_thread(monkeypatch, net, x, baselines)

    assert block_launches == []
    # Each pair is computed by the same code either way: equal, not close.
    assert torch.equal(pooled, serial)


@pytest.mark.usefixtures("two_threads")
def test_a_few_pairs_stay_in_one_thread(block_launches):
    net, x, baselines = job(rows=3)  # 12 pairs

    integrated_gradients(net, x, baselines, n_steps=50)

    assert block_launches == []


def test_the_pool_follows_torchs_thread_count(block_launches):
    net, x, baselines = job()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        integrated_gradients(net, x, baselines, n_steps=50)
    finally:
        torch.set_num_threads(saved)

    assert block_launches == []


@pytest.mark.usefixtures("two_threads")
def test_a_launch_while_the_pool_runs_stays_in_one_thread(block_launches, monkeypatch):
    net, x, baselines = job()
    expected = one_thread(monkeypatch, net, x, baselines)

    with engine.kink_loops._POOL_BUSY:
        attributions = integrated_gradients(net, x, baselines, n_steps=50)

    assert block_launches == []
    assert torch.equal(attributions, expected)


@pytest.mark.usefixtures("two_threads")
def test_threads_explaining_at_once_get_their_own_numbers(monkeypatch):
    jobs = [job(rows=60 + 10 * i) for i in range(3)]
    expected = [one_thread(monkeypatch, *j) for j in jobs]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(jobs))}
    failures = []

    def explain(i):
        try:
            for _ in range(5):
                results[i].append(integrated_gradients(*jobs[i], n_steps=50))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(error)

    threads = [threading.Thread(target=explain, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert failures == []
    for i, got in results.items():
        assert len(got) == 5
        assert all(torch.equal(g, expected[i]) for g in got)


@pytest.mark.usefixtures("two_threads")
def test_a_forked_process_stays_in_one_thread(block_launches, monkeypatch):
    net, x, baselines = job()
    engine.kink_loops._forked()  # what os.register_at_fork runs in a child

    integrated_gradients(net, x, baselines, n_steps=50)

    assert block_launches == []


def small_job():
    """64 pairs on a narrow network: torch's own operations stay in one thread (a forked
    child hangs in torch's first parallel one), the loops' pool would not."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1)).eval()
    return net, torch.randn(64, 5), torch.zeros(1, 5)


def _small_job_in_child(queue):
    # Plain floats: a tensor would travel as shared memory the exiting child takes along.
    queue.put(integrated_gradients(*small_job(), n_steps=8).tolist())


def _small_forward_in_child(queue):
    net, x, _ = small_job()
    with torch.no_grad():
        queue.put(net(x).sum().item())


def _in_forked_child(target, timeout: float):
    """What ``target(queue)`` puts in the queue in a forked child, or None after
    ``timeout`` seconds."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=target, args=(queue,))
    child.start()
    try:
        return queue.get(timeout=timeout)
    except queue_module.Empty:
        return None
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()


@pytest.mark.usefixtures("two_threads")
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs the fork start method")
def test_a_child_forked_after_torchs_threads_ran_finishes(monkeypatch):
    # This process has run torch's OpenMP threads; the child inherits their pool.
    a = torch.randn(512, 512)
    (a @ a).sum()
    monkeypatch.setattr(engine.kink_loops, "PARALLEL", False)
    expected = integrated_gradients(*small_job(), n_steps=8)
    monkeypatch.setattr(engine.kink_loops, "PARALLEL", True)

    # Some BLAS builds hang in a forked child in their smallest products already (MKL on
    # an AMD EPYC, at 64 x 5 by 5 x 16): then there is nothing of the engine's to see.
    if _in_forked_child(_small_forward_in_child, timeout=20) is None:
        pytest.skip("torch's own forward of the small network hangs in a forked child here")
    got = _in_forked_child(_small_job_in_child, timeout=60)

    assert got == expected.tolist()


def test_a_launch_leaves_torchs_thread_count(tmp_path):
    # numba's omp layer sets OpenMP's thread count at its first launch in a process.
    script = tmp_path / "threads.py"
    script.write_text(
        "import torch\n"
        "from engine import integrated_gradients\n"
        "from tests.test_chunk_loop import titanic_job\n"
        "torch.set_num_threads(3)\n"
        "net, x, baselines = titanic_job(dtype=torch.float32, rows=60, seed=3)\n"
        "integrated_gradients(net, x, baselines, n_steps=50)\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("NUMBA_THREADING_LAYER", None)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3"]


@pytest.mark.usefixtures("two_threads")
def test_a_pool_that_fails_to_start_leaves_one_thread(block_launches, monkeypatch, caplog):
    net, x, baselines = job()
    expected = one_thread(monkeypatch, net, x, baselines)

    def no_layer(*args):
        raise ValueError("No threading layer could be loaded.")

    monkeypatch.setattr(engine.kink_loops, "_forward_blocks", no_layer)
    with caplog.at_level(logging.INFO, logger="engine.kink_loops"):
        first = integrated_gradients(net, x, baselines, n_steps=50)
        second = integrated_gradients(net, x, baselines, n_steps=50)

    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert caplog.text.count("run in one thread: No threading layer could be loaded") == 1
    assert block_launches == []


@pytest.mark.usefixtures("two_threads")
def test_a_slow_threading_layer_sends_the_loops_back_to_one_thread(block_launches,
                                                                    monkeypatch, caplog):
    net, x, baselines = job()
    expected = one_thread(monkeypatch, net, x, baselines)
    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")

    with caplog.at_level(logging.INFO, logger="engine.kink_loops"):
        first = integrated_gradients(net, x, baselines, n_steps=50)
        second = integrated_gradients(net, x, baselines, n_steps=50)

    assert torch.equal(first, expected) and torch.equal(second, expected)
    # The first launch shows the layer; every later loop runs in one thread.
    assert block_launches == [("_forward_blocks", 2)]
    assert caplog.text.count("'workqueue' threading layer is slower") == 1


@pytest.mark.usefixtures("two_threads")
def test_the_callers_numba_thread_count_is_restored(block_launches):
    saved = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        integrated_gradients(*job(), n_steps=50)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(saved)
    assert block_launches == [("_forward_blocks", 2), ("_backward_blocks", 2)]
