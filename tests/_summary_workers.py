"""What each process of the summary test runs (importable by name, for run_in_local_processes)."""

import pathlib

import numpy as np

import tpustrat as ts


def write_from_every_process(logdir: str) -> tuple[bool, bool, list[str]]:
    """Every process writes the same loss; returns its flags and the files in its own folder."""
    strategy = ts.TPUStrategy()
    folder = pathlib.Path(logdir) / "run"
    loss = strategy.reduce("mean", ts.PerReplica([np.float32(i) for i in range(8)]))
    with ts.SummaryWriter(folder, every_n_steps=1) as writer:
        wrote = writer.scalars(0, {"loss": loss})
    files = sorted(p.name for p in folder.glob("*")) if folder.exists() else []
    return strategy.should_save_summary, wrote, files
