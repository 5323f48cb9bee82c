"""The DVC workflow users live in, with real git and real DVC in temporary directories.

One module-scoped clone runs the smoke chain once; the tests then check what users rely on: a second
`dvc repro` runs nothing, `dvc exp run -S` re-runs only what reads the changed param, `dvc push` to a
local remote, and `dvc import` of the exported pseudo-label dataset into another repo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from weak2full.export import load_pseudo_labels
from weak2full.params import load_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = os.environ.copy()
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    # Relative on purpose: each DVC run (workspace or experiment temp dir) imports its own src/.
    env["PYTHONPATH"] = "src"
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_SITE_CACHE_DIR"] = str(Path(env.get("TMPDIR", "/tmp")) / "weak2full-dvc-site-cache")
    for k, v in (("GIT_AUTHOR_NAME", "test"), ("GIT_AUTHOR_EMAIL", "test@localhost"),
                 ("GIT_COMMITTER_NAME", "test"), ("GIT_COMMITTER_EMAIL", "test@localhost")):
        env.setdefault(k, v)
    return env


def sh(*cmd: str, cwd: Path, env: dict | None = None) -> str:
    res = subprocess.run(list(cmd), cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, text=True,
                         timeout=900)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout + res.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh clone with the smoke params committed and the chain reproduced once."""
    work = tmp_path_factory.mktemp("e2e")
    repo = work / "repo"
    sh("git", "clone", "-q", str(ROOT), str(repo), cwd=work)
    shutil.copy(repo / "params.smoke.yaml", repo / "params.yaml")
    sh("git", "commit", "-qam", "smoke params", cwd=repo)
    # Each stage logs the params.yaml keys it reads (tests/params_log/sitecustomize.py).
    reads = work / "params-read"
    reads.mkdir()
    log = {"PYTHONPATH": f"{ROOT / 'tests' / 'params_log'}{os.pathsep}src",
           "WEAK2FULL_PARAMS_LOG": str(reads)}
    out = sh("dvc", "repro", cwd=repo, env=log)
    assert "evaluate" in ran_stages(out) and "export" in ran_stages(out), out
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "reproduced", cwd=repo)
    return repo


def test_every_param_a_stage_reads_is_one_of_its_dvc_params(repo):
    """dvc.yaml's params lists are what makes `dvc exp run -S key=value` re-run the right stages: a key a
    stage reads but does not list would leave its output stale. Each stage of the smoke chain logged the
    keys it read (the branches the smoke params take; conditional reads elsewhere are not seen)."""
    listed: dict[str, list[str]] = {}
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        stage = stage.get("do", stage)
        script = re.search(r"stages/(\w+)\.py", stage["cmd"]).group(1)
        listed[script] = [k for p in stage.get("params", []) for k in ([p] if isinstance(p, str) else
                                                                       [x for v in p.values() for x in v])]
    logs = sorted((repo.parent / "params-read").glob("*.txt"))
    seen = {f.name.split("-")[0] for f in logs}
    assert {"prepare", "train_classifier", "cams", "pseudo_masks", "train_segmenter", "evaluate"} <= seen
    for f in logs:
        stage = f.name.split("-")[0]
        keys = f.read_text().splitlines()[1:]
        assert keys, f"{f.name}: no params read"
        missing = [k for k in keys if not any(k == h or k.startswith(h + ".") for h in listed[stage])]
        assert not missing, f"stage {stage} reads {missing}, which its dvc.yaml params do not list"


def test_first_repro_writes_every_output(repo):
    for rel in ("data/prepared/dataset.h5", "data/cams/cams.h5", "data/cams/gap_cam.h5",
                "data/pseudo/pseudo_masks.h5", "models/segmenter.pt", "models/oracle.pt",
                "metrics/evaluate.json", "reports/index.html"):
        assert (repo / rel).is_file(), rel
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    for method in ("gap_cam", "heatmap", "pseudo_mask", "segmenter", "cascade", "oracle"):
        assert "dice_pos" in metrics[method], method
    assert metrics["cascade"]["threshold"] == metrics["segmenter"]["threshold"]
    assert metrics["cascade"]["fp_slice_rate"] <= metrics["segmenter"]["fp_slice_rate"]
    assert "weak_over_full" in metrics
    # Patient-bootstrap intervals beside the figures (the smoke split may leave one undefined: null).
    for method in ("gap_cam", "heatmap", "pseudo_mask", "segmenter", "cascade", "oracle"):
        ci = metrics[method]["dice_pos_ci95"]
        assert ci is None or 0.0 <= ci["low"] <= ci["high"] <= 1.0, (method, ci)
    assert "weak_over_full_ci95" in metrics


def test_second_repro_runs_nothing(repo):
    out = sh("dvc", "repro", cwd=repo)
    assert ran_stages(out) == set(), out
    assert "up to date" in out


def test_experiment_reruns_only_what_reads_the_param(repo):
    out = sh("dvc", "exp", "run", "-n", "compat7", "-S", "pseudo_masks.crf.compat=7", cwd=repo)
    ran = ran_stages(out)
    assert "pseudo_masks" in ran, out
    assert ran <= {"pseudo_masks", "train_segmenter", "evaluate", "export"}, ran
    shown = sh("dvc", "exp", "show", "--json", cwd=repo)
    names = json.dumps(json.loads(shown[shown.index("["):]))
    assert "compat7" in names and "workspace" in names
    _reset(repo)


def test_queued_sweep_runs_in_temporary_copies_without_retraining(repo):
    # Queued runs see only tracked files; cached outputs (models, dvclive logs) are restored, not rebuilt.
    sh("dvc", "exp", "run", "--queue", "-S", "pseudo_masks.bg=0.05,0.3", cwd=repo)
    out = sh("dvc", "exp", "run", "--run-all", cwd=repo)
    ran = ran_stages(out)
    assert "pseudo_masks" in ran, out
    assert ran <= {"pseudo_masks", "train_segmenter", "evaluate", "export"}, ran
    table = sh("dvc", "exp", "show", "--csv", cwd=repo)
    assert "pseudo_masks.bg" in table and "dice_pos" in table
    _reset(repo)


def _reset(repo: Path) -> None:
    """Back to the committed state for the other tests."""
    sh("git", "checkout", "--", ".", cwd=repo)
    sh("dvc", "checkout", "-q", cwd=repo)


def test_push_and_import_the_exported_dataset(repo, tmp_path):
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)
    sh("git", "commit", "-qam", "local remote", cwd=repo)
    sh("dvc", "push", "-q", cwd=repo)
    assert any(remote.rglob("*")), "dvc push wrote nothing"

    name = load_params(repo / "params.yaml").export.name
    other = tmp_path / "consumer"
    other.mkdir()
    sh("git", "init", "-q", cwd=other)
    sh("dvc", "init", "-q", cwd=other)
    sh("dvc", "import", str(repo), f"dist/{name}", "-o", "labels", cwd=other)
    imported = load_pseudo_labels(other / "labels")
    original = json.loads((repo / "dist" / name / "card.json").read_text())
    assert imported.card == original
    assert imported.mask.shape[0] == original["n_slices"]
    assert imported.card["quality"]["evaluate"]["pseudo_mask"]["dice_pos"] == \
        original["quality"]["evaluate"]["pseudo_mask"]["dice_pos"]
