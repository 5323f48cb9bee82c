"""Fault injection: SIGKILL the stages of the smoke chain at points of their work, then `dvc repro` again.

Two copies of this checkout become git + DVC repos with the smoke params (train_classifier and
train_segmenter get 2 epochs, so that a resume checkpoint exists mid-training). ``clean`` runs `dvc repro`
once, uninterrupted. ``faulted`` runs `dvc repro` again and again; each run watches the repo for real
progress (a temporary output appearing, a resume checkpoint written, a log folder created) and SIGKILLs
at the first pending point, either the whole session (dvc and the stage: a crash, a power cut) or the
stage process alone (the OOM killer); the last run finishes. No hook in the library: the points are
files the stages write anyway.

The tests then check that every point was hit; that after each kill no half-written file sat under a
final name, DVC listed the killed stage as not up to date, and no process of the stage survived; that
each killed stage re-ran exactly once more and no finished stage re-ran; that the final outputs equal the
uninterrupted run's byte for byte (which, with the stages that restarted from scratch, is also the chain
run twice: determinism); and that a damaged output is detected by DVC and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

# The same environment as the end-to-end test: PATH, PYTHONPATH=src, git identity.
from test_dvc_e2e import _env

from weak2full.errors import InvalidInputError
from weak2full.h5 import open_checked
from weak2full.models import load_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# Two epochs where the kill lands mid-training; everything else is params.smoke.yaml.
OVERRIDES = {"train_classifier": {"epochs": 2}, "train_segmenter": {"epochs": 2}}
# Outputs that must come out byte-identical (dvclive logs carry timestamps, the export card a git revision).
COMPARED = [
    "data/prepared/dataset.h5", "data/cams/cams.h5", "data/cams/gap_cam.h5", "data/pseudo/pseudo_masks.h5",
    "models/classifier.pt", "models/gap_cam.pt", "models/segmenter.pt", "models/oracle.pt",
    "metrics/classifier.json", "metrics/baseline_cam.json", "metrics/pseudo_masks.json",
    "metrics/calibration.json", "metrics/evaluate.json", "plots/evaluate/dice_vs_threshold.csv",
    "plots/calibration/calibration.csv",
]
DETERMINISM = ["data/prepared/dataset.h5", "data/cams/cams.h5", "data/pseudo/pseudo_masks.h5",
               "metrics/evaluate.json", "metrics/pseudo_masks.json"]
HDF5_KINDS = {"data/prepared/dataset.h5": "dataset", "data/cams/cams.h5": "cams",
              "data/cams/gap_cam.h5": "cams", "data/pseudo/pseudo_masks.h5": "pseudo_masks"}


# --------------------------------------------------------------------------------------- the points


def temporary_of(rel: str) -> Callable[[Path, float], bool]:
    """The stage has started writing ``rel``: its ``.<name>.tmp-<pid>`` exists (atomic_output)."""
    folder, name = os.path.split(rel)

    def seen(repo: Path, since: float) -> bool:
        d = repo / folder
        return d.is_dir() and any(p.name.startswith(f".{name}.tmp-") for p in d.iterdir())

    return seen


def exists(rel: str) -> Callable[[Path, float], bool]:
    return lambda repo, since: (repo / rel).exists()


def written_since(rel: str) -> Callable[[Path, float], bool]:
    def seen(repo: Path, since: float) -> bool:
        try:
            return (repo / rel).stat().st_mtime >= since
        except FileNotFoundError:
            return False

    return seen


@dataclass
class Kill:
    stage: str
    where: str  # what the stage was doing, for messages and docs/RELIABILITY.md
    when: Callable[[Path, float], bool]
    session: bool  # True: dvc and the stage die together; False: the stage process alone


KILLS = [
    # Writing dataset.h5 takes milliseconds on smoke data; drawing the montage after it takes longer.
    Kill("prepare", "dataset.h5 written, montage not yet", exists("data/prepared/dataset.h5"), session=True),
    Kill("train_classifier", "mid-training, after epoch 1 of 2 (resume checkpoint written)",
         exists("models/.classifier.resume.pt"), session=False),
    Kill("baseline_cam", "after its last epoch, before the final checkpoint",
         exists("models/.gap_cam.resume.pt"), session=True),
    Kill("train_oracle", "training started, no checkpoint yet", exists("dvclive/train_oracle"),
         session=False),
    Kill("cams@heatmap", "writing cams.h5", temporary_of("data/cams/cams.h5"), session=True),
    Kill("pseudo_masks", "writing pseudo_masks.h5 through its process pool",
         temporary_of("data/pseudo/pseudo_masks.h5"), session=False),
    Kill("train_segmenter", "mid-training, after epoch 1 of 2 (resume checkpoint written)",
         exists("models/.segmenter.resume.pt"), session=True),
    Kill("evaluate", "evaluate.json written, plots and report not yet",
         written_since("metrics/evaluate.json"), session=True),
]


# ------------------------------------------------------------------------------------------ plumbing


def sh(*cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def make_repo(dest: Path) -> Path:
    """This checkout's files (tracked and new, as in the working tree) as a fresh git + DVC repo."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    params = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
    for section, values in OVERRIDES.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-qm", "smoke params", cwd=dest)
    return dest


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(d.name)] = (int(fields[1]), fields[0], cmd)
    return out


def _descendants(pid: int) -> list[int]:
    procs = _processes()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (pp, _, _) in procs.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def _alive(pids) -> list[int]:
    procs = _processes()
    return [p for p in pids if p in procs and procs[p][1] != "Z"]


@dataclass
class Run:
    returncode: int
    output: str
    kill: Kill | None = None
    killed_pids: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)  # processes of the stage alive 10 s after the kill
    status: dict = field(default_factory=dict)  # `dvc status --json` right after
    damaged: list[str] = field(default_factory=list)  # outputs under a final name that do not read whole


def repro(repo: Path, pending: list[Kill], log: Path) -> Run:
    """`dvc repro`, killed at the first pending point it reaches (or run to the end)."""
    since = time.time() - 1.0  # mtime granularity
    with open(log, "w") as out:
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        fired, pids = None, []
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            fired = next((k for k in pending if k.when(repo, since)), None)
            if fired is not None:
                pids = _kill(proc.pid, fired)
                break
            time.sleep(0.02)  # a few stat calls: cheap even on a busy machine
        if proc.poll() is None and fired is None:
            proc.kill()
        proc.wait(timeout=120)
    run = Run(proc.returncode, log.read_text(), fired, pids)
    if fired is not None:
        end = time.time() + 10
        while _alive(pids) and time.time() < end:
            time.sleep(0.2)
        run.survivors = _alive(pids)
        for p in run.survivors:  # leave nothing running, whatever the test says
            os.kill(p, signal.SIGKILL)
        status = sh("dvc", "status", "--json", cwd=repo, check=False)
        run.status = (json.loads(status.stdout) if status.returncode == 0
                      else {"dvc status failed": status.stderr})
        run.damaged = damaged_outputs(repo)
    return run


def _kill(dvc: int, kill: Kill) -> list[int]:
    """SIGKILL the session (dvc and everything under it) or the stage's own process; return the pids of
    the stage's processes (the stage and its pool workers), which must all die."""
    procs = _processes()
    below = [p for p in _descendants(dvc) if p in procs]
    stage = [p for p in below if "stages/" in procs[p][2] and "python" in procs[p][2].split(" ")[0]]
    main = [p for p in stage if procs[p][0] not in stage]  # not a pool worker
    for p in ([dvc] + below) if kill.session else main:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stage


def damaged_outputs(repo: Path) -> list[str]:
    """Chain outputs present under their final name that a reader would not take as whole."""
    bad = []
    for rel, kind in HDF5_KINDS.items():
        if (repo / rel).exists():
            try:
                open_checked(repo / rel, kind).close()
            except InvalidInputError as exc:
                bad.append(f"{rel}: {exc}")
    for path in sorted(p for p in (repo / "models").glob("*.pt") if not p.name.startswith(".")):
        try:
            load_model(path)
        except InvalidInputError as exc:
            bad.append(f"{path.relative_to(repo)}: {exc}")
    for path in sorted((repo / "metrics").glob("*.json")):
        try:
            json.loads(path.read_text())
        except ValueError as exc:
            bad.append(f"{path.relative_to(repo)}: {exc}")
    return bad


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def leftovers(repo: Path) -> list[str]:
    """Temporary outputs and resume states that outlived the chain."""
    found = []
    for p in repo.rglob(".*"):
        rel = p.relative_to(repo)
        if rel.parts[0] in (".git", ".dvc"):
            continue
        if ".tmp-" in p.name or p.name.endswith(".resume.pt"):
            found.append(str(rel))
    return found


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("clean"))
    sh("dvc", "repro", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def faulted(tmp_path_factory, clean) -> dict:
    repo = make_repo(tmp_path_factory.mktemp("faulted"))
    pending, runs = list(KILLS), []
    for i in range(len(KILLS) + 3):
        run = repro(repo, pending, repo.parent / f"repro-{i}.log")
        runs.append(run)
        if run.kill is None:
            break
        pending.remove(run.kill)
    return {"repo": repo, "runs": runs, "pending": pending}


# --------------------------------------------------------------------------------------------- tests


def test_every_kill_point_was_reached(faulted):
    assert [k.stage for k in faulted["pending"]] == [], "never reached: " + ", ".join(
        f"{k.stage} ({k.where})" for k in faulted["pending"])
    last = faulted["runs"][-1]
    assert last.kill is None and last.returncode == 0, last.output[-3000:]


def test_a_killed_stage_leaves_nothing_taken_as_complete(faulted):
    for run in faulted["runs"]:
        if run.kill is None:
            continue
        what = f"{run.kill.stage} killed {run.kill.where}"
        assert run.returncode != 0, what
        assert run.damaged == [], what  # nothing half-written under a final name
        assert run.kill.stage in run.status, f"{what}: dvc status took it as up to date: {run.status}"
        assert run.killed_pids and run.survivors == [], f"{what}: processes {run.survivors} outlived it"


def test_killed_stages_rerun_once_and_finished_ones_never(faulted):
    ran: dict[str, int] = {}
    for run in faulted["runs"]:
        for stage in ran_stages(run.output):
            ran[stage] = ran.get(stage, 0) + 1
    killed = [run.kill.stage for run in faulted["runs"] if run.kill is not None]
    for stage, n in ran.items():
        assert n == 1 + killed.count(stage), f"{stage} ran {n} times, killed {killed.count(stage)} times"
    outputs = "\n".join(run.output for run in faulted["runs"])
    # Training picked up after epoch 1 instead of starting over (the classifier's log name is its arch).
    for desc, model in (("heatmap", "classifier"), ("gap_cam", "gap_cam"), ("segmenter", "segmenter")):
        assert re.search(rf"^{desc}: resuming after epoch 1 from models/\.{model}\.resume\.pt", outputs, re.M)


def test_recovered_outputs_equal_an_uninterrupted_run(clean, faulted):
    repo = faulted["repo"]
    status = sh("dvc", "status", cwd=repo).stdout
    assert "up to date" in status, status
    different = [rel for rel in COMPARED if digest(clean / rel) != digest(repo / rel)]
    assert different == []
    assert leftovers(repo) == []


def test_the_smoke_chain_twice_gives_the_same_bytes(clean, faulted):
    hashes = {rel: (digest(clean / rel), digest(faulted["repo"] / rel)) for rel in DETERMINISM}
    assert all(a == b != "missing" for a, b in hashes.values()), hashes


def test_a_damaged_output_is_rebuilt_by_dvc_repro(clean, faulted):
    repo = faulted["repo"]
    cams = repo / "data/cams/cams.h5"
    data = bytearray(cams.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # raw map bytes: HDF5 itself cannot tell
    tmp = cams.with_name("damaged")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, cams)  # a new file: the DVC cache copy is never touched
    status = json.loads(sh("dvc", "status", "--json", cwd=repo).stdout)
    assert "cams@heatmap" in status, status
    out = sh("dvc", "repro", cwd=repo)
    said = out.stdout + out.stderr
    # DVC restores the stage's output from its run cache (or re-runs it); the bytes are the same again, so
    # nothing downstream re-runs.
    assert set(ran_stages(said)) <= {"cams@heatmap"}, said
    restored = r"Stage 'cams@heatmap' is cached - skipping run, checking out|Running stage 'cams@heatmap'"
    assert re.search(restored, said), said
    assert digest(cams) == digest(clean / "data/cams/cams.h5")
    assert "up to date" in sh("dvc", "status", cwd=repo).stdout
