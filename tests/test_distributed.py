"""torch.distributed: DDP training under torchrun keeps the ranks in step, sharded stages give one
process's bytes, and the launcher param picks how dvc.yaml starts a stage.

The torchrun tests start real processes (2 CPU ranks, gloo). Run as a script under torchrun, this file
is also the worker of :func:`test_ddp_ranks_agree_after_a_step`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train import tiny_dataset

from weak2full import cams, distributed, pseudo_masks
from weak2full.errors import InvalidParameterError
from weak2full.launch import command
from weak2full.params import parse_params

ROOT = Path(__file__).resolve().parents[1]
# A smoke-sized heatmap classifier on tiny_dataset's 32x32 slices.
CLASSIFIER = {"encoder": "resnet10t", "decoder_channels": [16, 8], "heatmap_size": 32, "batch_size": 4,
              "steps_per_epoch": 1, "epochs": 1, "val_negative_ratio": None}
SECTIONS = {
    "common": {"device": "cpu", "launcher": "torchrun", "nproc": 2},
    "train_classifier": CLASSIFIER,
    "cams": {"batch_size": 4, "chunk_size": 8},  # 24 slices: 3 chunks, 1 on rank 0 and 2 on rank 1
    "pseudo_masks": {"chunk_size": 8, "calibration": {"fg_grid": [0.5, 0.7], "bg_grid": [0.1],
                                                      "compat_grid": [3.0]}},
}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _run(*cmd, cwd) -> None:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"


def _torchrun(*args, cwd) -> None:
    _run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, cwd=cwd)


# ------------------------------------------------------------------------------------------ fast


def test_shards_cover_every_row_once_in_whole_chunks():
    for n, chunk, ranks in [(24, 8, 2), (100, 7, 3), (5, 8, 4), (64, 16, 4)]:
        parts = [distributed.shard(n, chunk, ranks, r) for r in range(ranks)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # contiguous, in rank order
        assert all(start % chunk == 0 for start, _ in parts)


def test_thread_count_is_the_cpu_share_capped_by_omp_num_threads(monkeypatch):
    from weak2full.runtime import set_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert set_threads() == 4  # every CPU this process may use
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_threads() == 2  # torchrun: the ranks on the machine share them
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads() == 1  # the user's cap, as torch itself reads it
        monkeypatch.setenv("OMP_NUM_THREADS", "8")
        assert set_threads() == 2  # a cap above the share changes nothing
        monkeypatch.setenv("OMP_NUM_THREADS", "")
        assert set_threads() == 2  # set but empty: no cap
    finally:
        torch.set_num_threads(before)


def test_sharded_batches_split_each_global_batch(monkeypatch):
    from weak2full.data import BalancedBatchSampler

    sampler = BalancedBatchSampler(np.arange(40) < 10, 8, steps=5, positive_fraction=0.5, seed=3)
    whole = list(sampler)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        shares.append(list(distributed.ShardedBatches(sampler, 8)))
    for batch, a, b in zip(whole, *shares):
        assert len(a) == len(b) == 4 and sorted(a + b) == sorted(batch)
    with pytest.raises(InvalidParameterError, match="multiple of the number of processes"):
        distributed.ShardedBatches(sampler, 7)


def test_launcher_param_picks_the_command(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    plain, torchrun = tmp_path / "plain.yaml", tmp_path / "torchrun.yaml"
    plain.write_text(yaml.safe_dump({}))
    torchrun.write_text(yaml.safe_dump({"common": {"launcher": "torchrun", "nproc": 3}}))
    cmd = command("stages/cams.py", ["--params", str(plain), "--out", "x"])
    assert cmd == [sys.executable, "stages/cams.py", "--params", str(plain), "--out", "x"]
    cmd = command("stages/cams.py", [f"--params={torchrun}"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                       "stages/cams.py", f"--params={torchrun}"]


# ------------------------------------------------------------------------------------------ torchrun


def _worker(dataset: Path, out: Path) -> None:
    """Under torchrun: one step of the smoke classifier through train.fit; each rank saves its weights."""
    from weak2full import losses, train
    from weak2full.data import SliceDataset
    from weak2full.models import create_heatmap
    from weak2full.runtime import seed_everything

    params = parse_params({"common": {"device": "cpu"}, "train_classifier": CLASSIFIER})
    p = params.train_classifier
    device = distributed.init(torch.device("cpu"))
    seed_everything(0)
    model = create_heatmap(p, 3, 1, 32)
    if distributed.is_main():
        torch.save(model.state_dict(), out / "initial.pt")
    train_set = SliceDataset(dataset, np.arange(16), params.input, ["any"], "label", p.augment)
    seen = []

    def loss_fn(output, target):
        seen.append(len(target))
        return losses.heatmap_loss(output, target)

    train.fit(model, train_set, loss_fn, lambda m: {"score": 0.0}, p, select_key="score", seed=0,
              device=device, live_dir=out / "live", state_path=out / "state.pt")
    torch.save({"weights": model.state_dict(), "batches": seen}, out / f"rank{distributed.rank()}.pt")


@pytest.mark.slow
def test_ddp_ranks_agree_after_a_step(tmp_path):
    dataset = tiny_dataset(tmp_path / "dataset.h5")
    _torchrun(__file__, dataset, tmp_path, cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert ranks[0]["batches"] == ranks[1]["batches"] == [2]  # each rank trained on half of a batch of 4
    params = [k for k in w0 if w0[k].is_floating_point() and "running" not in k]
    assert all(torch.equal(w0[k], w1[k]) for k in params)
    assert any(not torch.equal(w0[k], initial[k]) for k in params)  # the step did change the weights
    # rank 0 alone logs and keeps the resume state (the stage removes it once its outputs are written)
    assert (tmp_path / "live" / "metrics.json").is_file() and (tmp_path / "state.pt").is_file()


@pytest.mark.slow
def test_stages_under_torchrun_write_what_one_process_writes(tmp_path):
    dataset = tiny_dataset(tmp_path / "dataset.h5")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(SECTIONS))
    one = parse_params({**SECTIONS, "common": {"device": "cpu"}})  # the same, launched plainly

    def launch(stage: str, *args) -> None:
        _run(sys.executable, "-m", "weak2full.launch", ROOT / "stages" / f"{stage}.py", *args, cwd=tmp_path)

    launch("train_classifier", "--dataset", dataset, "--out", "classifier.pt", "--metrics", "m.json",
           "--live", "live")
    assert set(json.loads((tmp_path / "m.json").read_text())) == {"val", "test"}
    assert (tmp_path / "live" / "metrics.json").is_file()

    launch("cams", "--model", "classifier.pt", "--dataset", dataset, "--out", "cams.h5")
    # With torchrun's one intra-op thread per rank: on the CPU oneDNN may split a small convolution
    # differently with another thread count, and the last bits of a map then differ.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cams.run(one, tmp_path / "classifier.pt", dataset, tmp_path / "cams-one.h5")
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "cams.h5").read_bytes() == (tmp_path / "cams-one.h5").read_bytes()

    launch("pseudo_masks", "--dataset", dataset, "--cams", "cams.h5", "--out", "pm.h5", "--metrics",
           "pm.json", "--calibration", "cal.json")
    pseudo_masks.run(one, dataset, tmp_path / "cams.h5", tmp_path / "pm-one.h5", tmp_path / "pm-one.json",
                     tmp_path / "cal-one.json")
    assert (tmp_path / "pm.h5").read_bytes() == (tmp_path / "pm-one.h5").read_bytes()
    assert (tmp_path / "pm.json").read_text() == (tmp_path / "pm-one.json").read_text()
    assert (tmp_path / "cal.json").read_text() == (tmp_path / "cal-one.json").read_text()
    assert sorted(p.name for p in tmp_path.glob(".*")) == []  # no part file or temporary left


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
