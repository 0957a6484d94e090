"""Rows per second of ``--checkpoint`` attribution in 1 and 2 CPU processes (Lightning DDP).

Each round is the whole command in a subprocess: starting the processes, reading the
file, explaining 200,000 rows x 4 baselines x 50 steps and writing the tables. The
command's own timing of the attribution (without interpreter start-up) is kept in
``extra_info`` beside the end-to-end rate.
"""

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from engine.model import TitanicMLP, save_weights

N_ROWS = 200_000


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from engine.data import locate_titanic_csv

    train = locate_titanic_csv()
    frame = pd.read_csv(train)
    folder = tmp_path_factory.mktemp("bench")
    rows = pd.concat([frame] * (-(-N_ROWS // len(frame))), ignore_index=True).iloc[:N_ROWS]
    rows = rows.assign(PassengerId=np.arange(1, N_ROWS + 1))
    rows.to_csv(folder / "rows.csv", index=False)
    torch.manual_seed(0)
    save_weights(TitanicMLP(), folder / "model.pt")
    return folder, train


@pytest.mark.parametrize("devices", [1, 2])
def test_rows_per_second_in_cpu_processes(benchmark, job, devices):
    folder, train = job
    command = [
        sys.executable, "-m", "engine.attribute", "--data", str(folder / "rows.csv"),
        "--checkpoint", str(folder / "model.pt"), "--reference", str(train),
        "--out", str(folder / f"out{devices}"), "--device", "cpu",
        "--devices", str(devices), "--strategy", "ddp" if devices > 1 else "auto",
    ]

    def run():
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        assert completed.returncode == 0, completed.stderr
        return completed.stdout

    stdout = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)

    seconds = float(re.search(r"computed in ([\d.]+) s", stdout).group(1))
    benchmark.extra_info.update({
        "rows": N_ROWS, "processes": devices,
        "rows_per_second_end_to_end": N_ROWS / benchmark.stats.stats.mean,
        "rows_per_second_attribution": N_ROWS / seconds,
    })
