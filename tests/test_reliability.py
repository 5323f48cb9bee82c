"""Hostile inputs, a full disk and hostile files, each through a real stage script where that is cheap.

Every case asserts a message naming the file or key, a non-zero exit and no output written. Stage scripts
run in this process through ``runpy`` (the same argparse -> ``run_stage`` -> exit code path, without a
second torch import); ``prepare`` and the disk-full case run as real subprocesses. Cases covered elsewhere
are listed in docs/RELIABILITY.md, with their tests, instead of being repeated here.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import runpy
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from test_importers import refuses, write_ct_ich, write_ct_ich_png, write_nifti_cases, write_rsna
from test_pseudo_masks import write_cams
from test_train import TINY, tiny_dataset

from weak2full import losses, train
from weak2full.data import SliceDataset
from weak2full.errors import InvalidInputError, InvalidParameterError, OutputWriteError
from weak2full.h5 import atomic_output
from weak2full.models import create_model, load_model, model_config, save_checkpoint
from weak2full.params import parse_params
from weak2full.runtime import seed_everything

ROOT = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
# Tiny networks for 32x32 inputs (tiny_dataset): they build in milliseconds.
TINY_PARAMS = {
    "common": {"device": "cpu"},
    "train_classifier": {**TINY, "epochs": 1, "decoder_channels": [8], "heatmap_size": 32},
    "baseline_cam": {**TINY, "epochs": 1},
}


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny networks gain nothing from more, and a shared, busy CPU makes OpenMP
    threads wait on each other (measured here: 15 s instead of 1 s for the same tiny training)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def stage(monkeypatch, capsys):
    """``stage(name, *args)`` runs stages/<name>.py as ``__main__``; returns (exit code, stderr)."""

    def run(name: str, *args) -> tuple[int, str]:
        script = ROOT / "stages" / f"{name}.py"
        monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(script), run_name="__main__")
        return exc.value.code, capsys.readouterr().err

    return run


def params_file(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def files_in(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def prepare_subprocess(tmp_path: Path, params: Path, fsize_limit: int | None = None):
    """stages/prepare.py as its own process (it imports no torch: about a second)."""
    out = tmp_path / "out"

    def limit():  # in the child only: a real file-size limit, as a full disk would stop the writes
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "prepare.py"), "--params", str(params),
         "--out", str(out / "dataset.h5"), "--montage", str(out / "montage.png")],
        capture_output=True, text=True, timeout=300, env=env, preexec_fn=limit if fsize_limit else None,
    )
    return res, out


def classifier_args(tmp_path: Path, dataset: Path, params: Path) -> list:
    out = tmp_path / "out"
    return ["--params", params, "--dataset", dataset, "--out", out / "classifier.pt",
            "--metrics", out / "classifier.json", "--live", out / "live"]


# ------------------------------------------------------------------------------------- params files


@pytest.mark.parametrize(
    "section, message",
    [
        ({"pseudo_masks": {"crf": {"comapt": 5}}},
         r"Unknown key 'pseudo_masks\.crf\.comapt' in .*params\.yaml"),
        ({"data": {"image_size": "large"}},
         r"The 'data\.image_size' parameter in .*params\.yaml.*Got 'large'"),
    ],
    ids=["unknown_key", "wrong_type"],
)
def test_bad_params_stop_the_stage_before_any_work(tmp_path, section, message):
    raw = json.loads(json.dumps(SMOKE))
    for name, values in section.items():
        raw[name] = _merge(raw[name], values)
    res, out = prepare_subprocess(tmp_path, params_file(tmp_path / "params.yaml", raw))
    assert res.returncode == 2, res.stderr
    assert re.search("prepare: error: " + message, res.stderr), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and files_in(out) == []


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_heatmap_size_that_does_not_divide_the_input(tmp_path, stage):
    dataset = tiny_dataset(tmp_path / "dataset.h5")  # 32 x 32 slices
    sections = json.loads(json.dumps(TINY_PARAMS))
    sections["train_classifier"]["heatmap_size"] = 24
    params = params_file(tmp_path / "params.yaml", sections)
    code, err = stage("train_classifier", *classifier_args(tmp_path, dataset, params))
    assert code == 2
    assert "The 'train_classifier.heatmap_size' parameter must divide the input side 32" in err
    assert "Got 24 instead" in err and files_in(tmp_path / "out") == []


# -------------------------------------------------------------------------------------- HDF5 inputs


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_hdf5_input(tmp_path, stage, damage):
    dataset = tiny_dataset(tmp_path / "dataset.h5")
    cams = tmp_path / "cams.h5"
    with h5py.File(dataset, "r") as f:
        n = f["image"].shape[0]
    write_cams(cams, np.zeros((n, 1, 16, 16)), np.zeros((n, 1)), ["any"])
    whole = cams.read_bytes()
    damaged = {"truncated": whole[: len(whole) // 2], "garbage": b"not HDF5 " * 100, "empty": b""}
    cams.write_bytes(damaged[damage])
    out = tmp_path / "out"
    params = params_file(tmp_path / "params.yaml", {"pseudo_masks": {"workers": 1}})
    code, err = stage("pseudo_masks", "--params", params, "--dataset",
                      dataset, "--cams", cams, "--out", out / "pseudo.h5", "--metrics", out / "m.json",
                      "--calibration", out / "c.json", "--plots", out / "plots")
    assert code == 2
    assert f"pseudo_masks: error: {cams}: not a readable HDF5 file" in err and "truncated" in err
    assert files_in(out) == []


def test_dataset_of_another_schema_version(tmp_path, stage):
    dataset = tiny_dataset(tmp_path / "dataset.h5")
    with h5py.File(dataset, "a") as f:
        f.attrs["schema_version"] = 2
    params = params_file(tmp_path / "params.yaml", TINY_PARAMS)
    code, err = stage("train_classifier", *classifier_args(tmp_path, dataset, params))
    assert code == 2
    assert f"{dataset}: schema version 2, this weak2full reads version 1; re-run the stage" in err
    assert files_in(tmp_path / "out") == []


def test_class_list_that_disagrees_between_stages(tmp_path, stage):
    dataset = tiny_dataset(tmp_path / "dataset.h5")
    with h5py.File(dataset, "r") as f:
        n = f["image"].shape[0]
    gap = tmp_path / "gap_cam.h5"  # made by a run whose common.classes had a second class
    write_cams(gap, np.zeros((n, 2, 4, 4)), np.zeros((n, 2)), ["any", "subdural"], method="gap_cam",
               normalisation="max")
    out = tmp_path / "out"
    code, err = stage(
        "evaluate", "--params", params_file(tmp_path / "params.yaml", {}), "--dataset", dataset,
        "--heatmap-cams", gap, "--gap-cams", gap, "--pseudo", tmp_path / "p.h5", "--segmenter",
        tmp_path / "s.pt", "--oracle", tmp_path / "o.pt", "--out", out / "evaluate.json", "--plots",
        out / "plots", "--report", out / "index.html",
    )
    assert code == 2
    assert f"{gap}: classes ['any', 'subdural'] differ from common.classes ['any']" in err
    assert files_in(out) == []


def test_empty_annotated_subset_in_evaluate_says_nothing_to_score(tmp_path, stage):
    dataset = tiny_dataset(tmp_path / "dataset.h5")
    with h5py.File(dataset, "a") as f:
        f["has_mask"][...] = f["split"][:] == 1  # val annotated, no test slice annotated
    out = tmp_path / "out"
    code, err = stage(
        "evaluate", "--params", params_file(tmp_path / "params.yaml", {}), "--dataset", dataset,
        "--heatmap-cams", tmp_path / "c.h5", "--gap-cams", tmp_path / "g.h5", "--pseudo", tmp_path / "p.h5",
        "--segmenter", tmp_path / "s.pt", "--oracle", tmp_path / "o.pt", "--out", out / "evaluate.json",
        "--plots", out / "plots", "--report", out / "index.html",
    )
    assert code == 2
    assert f"evaluate: error: nothing to score: {dataset} has no annotated test slices" in err
    assert "nan" not in err.lower() and files_in(out) == []


def test_zero_positive_slices_in_train(tmp_path, stage):
    dataset = tiny_dataset(tmp_path / "dataset.h5")
    with h5py.File(dataset, "a") as f:  # train slices: no bleed, no label
        train_rows = f["split"][:] == 0
        label, mask = f["label"][:], f["mask"][:]
        label[train_rows] = 0
        mask[train_rows] = 0
        f["label"][...], f["mask"][...] = label, mask
    params = params_file(tmp_path / "params.yaml", TINY_PARAMS)
    code, err = stage("train_classifier", *classifier_args(tmp_path, dataset, params))
    assert code == 2
    assert f"{dataset}: no positive slice for classes ['any'] among the 16 train slices" in err
    assert files_in(tmp_path / "out") == []


# -------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", ["segmenter", "other_encoder"])
def test_checkpoint_from_another_architecture(tmp_path, stage, make_params, kind):
    dataset = tiny_dataset(tmp_path / "dataset.h5")
    p = make_params(**TINY_PARAMS)
    ckpt = tmp_path / "classifier.pt"
    if kind == "segmenter":  # a segmenter checkpoint handed to the cams stage
        seg = make_params(train_segmenter={"encoder": "resnet18", "decoder_channels": [8, 8, 8, 8, 8]})
        config = model_config("segmenter", seg.train_segmenter, 3, 1, 0)
        save_checkpoint(ckpt, create_model("segmenter", config), "segmenter", config, ["any"], input={})
        message = f"checkpoint {ckpt} holds a 'segmenter' network, not a classifier with maps"
    else:  # a heatmap checkpoint whose weights come from a resnet18 while its config says resnet10t
        config = model_config("heatmap", p.train_classifier, 3, 1, 32)
        other = create_model("heatmap", {**config, "encoder": "resnet18"})
        save_checkpoint(ckpt, other, "heatmap", config, ["any"], input=p.input.model_dump(mode="json"),
                        heatmap_size=32)
        message = f"checkpoint {ckpt} does not match its own config"
    out = tmp_path / "out"
    code, err = stage("cams", "--params", params_file(tmp_path / "params.yaml", TINY_PARAMS), "--model", ckpt,
                      "--dataset", dataset, "--out", out / "cams.h5")
    assert code == 2 and message in err
    assert files_in(out) == []


def _fit(dataset: Path, p, state_path: Path, stop_at_validation: int | None = None) -> dict:
    """train.fit on the tiny data with a loss that draws from every global generator (as dropout or a
    random crop would); returns the last epoch's weights."""
    seed_everything(0)
    model = create_model("gap_cam", model_config("gap_cam", p, 3, 1, 32))
    input_params = parse_params({}).input
    train_set = SliceDataset(dataset, np.arange(16), input_params, ["any"], "label", p.augment)
    calls = {"n": 0}

    class Interrupted(Exception):
        pass

    def loss_fn(out, y):
        noise = float(torch.rand(())) + np.random.rand() + random.random()
        return losses.gap_cam_loss(out, y) * (1.0 + 0.1 * noise)

    def validate(m):
        calls["n"] += 1
        if calls["n"] == stop_at_validation:
            raise Interrupted
        return {"score": 0.0}

    try:
        train.fit(model, train_set, loss_fn, validate, p, select_key="score", seed=0,
                  device=torch.device("cpu"), live_dir=None, state_path=state_path)
    except Interrupted:
        return {}
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_restores_every_random_state(tmp_path, make_params, capsys):
    dataset = tiny_dataset(tmp_path / "dataset.h5")
    p = make_params(baseline_cam={**TINY, "epochs": 2}).baseline_cam
    full = _fit(dataset, p, tmp_path / ".full.resume.pt")
    state = tmp_path / ".r.resume.pt"
    assert _fit(dataset, p, state, stop_at_validation=2) == {} and state.is_file()  # died in epoch 2
    resumed = _fit(dataset, p, state)
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # bit for bit, not merely close


@pytest.mark.parametrize("found", ["garbage", "other_params", "other_data"])
def test_a_foreign_resume_state_is_not_trusted(tmp_path, make_params, capsys, found):
    dataset = tiny_dataset(tmp_path / "dataset.h5")
    p = make_params(baseline_cam={**TINY, "epochs": 2}).baseline_cam
    state = tmp_path / ".r.resume.pt"
    if found == "garbage":
        state.write_bytes(b"\x00" * 64)
    elif found == "other_params":  # a run with another learning rate died after epoch 1
        _fit(dataset, p.model_copy(update={"lr": 1e-4}), state, stop_at_validation=2)
    else:  # a run died after epoch 1, then prepare re-ran and changed one slice
        _fit(dataset, p, state, stop_at_validation=2)
        with h5py.File(dataset, "a") as f:
            f["image"][0] = f["image"][0] + 1
    assert state.is_file()
    again = _fit(dataset, p, state)
    said = capsys.readouterr().out
    assert f"not resuming: {state}" in said and "starting over" in said
    clean = _fit(dataset, p, tmp_path / ".clean.resume.pt")
    assert all(torch.equal(clean[k], again[k]) for k in clean)


# ---------------------------------------------------------------------------------------- disk full


def test_disk_full_while_writing_the_dataset(tmp_path):
    params = params_file(tmp_path / "params.yaml", SMOKE)  # dataset.h5 of about 1.8 MB
    res, out = prepare_subprocess(tmp_path, params, fsize_limit=256 << 10)
    assert res.returncode == 2, res.stderr
    dataset = out / "dataset.h5"
    assert res.stderr.strip().splitlines()[-1] == (
        f"prepare: error: {dataset}: could not be written (File too large); nothing was written there (the "
        "previous file, if any, is unchanged). Free some space, then re-run the stage."
    )
    assert files_in(out) == []  # neither the dataset, nor its temporary file, nor the montage


def test_disk_full_while_saving_a_checkpoint_keeps_the_old_one(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous checkpoint")
    model = torch.nn.Linear(256, 256)  # about 260 kB of weights
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        with pytest.raises(OutputWriteError, match=f"{path}: could not be written"):
            save_checkpoint(path, model, "heatmap", {}, ["any"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_bytes() == b"previous checkpoint" and files_in(tmp_path) == ["model.pt"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next_writer(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f".out.h5.tmp-{int(dead.stdout)}"  # what SIGKILL leaves behind
    live = tmp_path / f".out.h5.tmp-{os.getppid()}"  # another writer, still running
    stale.write_bytes(b"half")
    live.write_bytes(b"busy")
    with atomic_output(tmp_path / "out.h5") as tmp:
        tmp.write_bytes(b"whole")
    assert files_in(tmp_path) == sorted([live.name, "out.h5"])


# ----------------------------------------------------------------------------------------- security


def _outside(tmp_path: Path, source_file: Path) -> Path:
    """Move ``source_file`` out of the data root and leave a symbolic link to it in its place."""
    target = tmp_path / "elsewhere" / source_file.name
    target.parent.mkdir(exist_ok=True)
    source_file.rename(target)
    source_file.symlink_to(target)
    return target


@pytest.mark.parametrize("source", ["ct-ich", "ct-ich-csv", "ct-ich-png", "rsna", "nifti-folder"])
def test_source_files_must_stay_inside_the_data_root(tmp_path, make_params, source):
    if source.startswith("ct-ich") and source != "ct-ich-png":
        root = write_ct_ich(tmp_path / "data")
        link = root / ("hemorrhage_diagnosis_raw_ct.csv" if source == "ct-ich-csv" else "ct_scans/049.nii")
    elif source == "ct-ich-png":
        root = write_ct_ich_png(tmp_path / "data")
        link = root / "image" / "0.png"
    elif source == "rsna":
        root = write_rsna(tmp_path / "data")
        link = root / "stage_2_train" / "ID_000000a.dcm"
    else:
        root = write_nifti_cases(tmp_path / "data")
        link = root / "case1"  # a whole case folder linked from elsewhere
    target = _outside(tmp_path, link)
    resolved = target.resolve() if link.name != "case1" else (target / "FLAIR.nii.gz").resolve()
    name = "ct-ich" if source == "ct-ich-csv" else source
    refuses(make_params, tmp_path, name, root, re.escape(f"resolves to {resolved}, outside the data root "
                                                         f"{root.resolve()} (data.path)"))


def test_export_name_cannot_leave_dist():
    with pytest.raises(InvalidParameterError, match=r"The 'export\.name' parameter .*Got '\.\./outside'"):
        parse_params({"export": {"name": "../outside"}})


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickles_are_never_run(tmp_path, make_params, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "classifier.pt"
    torch.save({"arch": "heatmap", "config": {}, "state_dict": _Payload(marker)}, hostile)
    with pytest.raises(InvalidInputError, match=f"{hostile} is not a readable weak2full checkpoint"):
        load_model(hostile)
    p = make_params(baseline_cam={**TINY, "encoder_weights": str(hostile)}).baseline_cam
    with pytest.raises(InvalidInputError, match=f"encoder_weights file {hostile}"):
        create_model("gap_cam", model_config("gap_cam", p, 3, 1, 32), p.encoder_weights)
    state = tmp_path / ".r.resume.pt"
    torch.save({"fingerprint": _Payload(marker)}, state)
    _fit(tiny_dataset(tmp_path / "dataset.h5"), make_params(baseline_cam=TINY).baseline_cam, state)
    assert f"not resuming: {state} is unreadable" in capsys.readouterr().out
    assert not marker.exists()


def test_no_code_reads_data_files_with_eval_or_pickle():
    """Static guard: text from data files is parsed (json, yaml.safe_load, csv), never evaluated, and
    torch.load always runs with weights_only=True."""
    forbidden = [
        r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"\bpickle\.loads?\(", r"\bmarshal\.loads?\(",
        r"\bshelve\.", r"\byaml\.(load|unsafe_load|full_load)\(", r"allow_pickle\s*=\s*True",
    ]
    found = []
    for path in sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            hits = [p for p in forbidden if re.search(p, code)]
            if "torch.load(" in code and "weights_only=True" not in code:
                hits.append("torch.load without weights_only=True")
            found += [f"{path.relative_to(ROOT)}:{i}: {h}" for h in hits]
    assert found == []
