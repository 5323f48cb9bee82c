"""Ship a pseudo-label dataset: one folder others can ``dvc import`` / ``dvc get`` and load.

``dist/<name>/`` holds

* ``pseudo_labels.h5``: the pseudo-masks with everything needed to use them without our dataset.h5:
  ``mask`` uint8 (N,H,W) 0 / k / 255 ignore, ``label`` uint8 (N,K) image labels, ``patient``, ``slice``,
  ``split``, ``fg_fraction``, ``ignore_fraction``, ``trusted`` (uint8 (N,): 0 where the slice's map
  peaked too weakly to be trusted; our segmenter skips those); attributes ``kind="pseudo_labels"``,
  ``classes``;
* ``nifti/<patient>.nii.gz``: one mask volume per patient (z last, as NIfTI tools expect), optional;
* ``card.json`` and ``card.md``: where it came from (source, git revision, the params of every stage, a
  hash of the inputs), its measured quality on the annotated subset, class balance, ignore fraction, and
  how to load it.

:func:`load_pseudo_labels` is the loader; it checks the card before trusting the arrays.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from weak2full import __version__
from weak2full.errors import InvalidInputError
from weak2full.h5 import SCHEMA_VERSION, DatasetFile, atomic_output, file_sha256, open_checked, trusted_flags
from weak2full.params import Params

__all__ = ["run", "load_pseudo_labels", "PseudoLabels", "CARD_FIELDS"]

# Fields every card must carry; the loader refuses a card without them.
CARD_FIELDS = (
    "name",
    "weak2full_version",
    "source",
    "provenance",
    "git_revision",
    "params",
    "input_sha256",
    "n_slices",
    "n_patients",
    "image_size",
    "classes",
    "class_balance",
    "ignore_fraction",
    "quality",
    "files",
)


def _git_revision(cwd: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InvalidInputError(f"{path}: metrics file does not exist (run the stage that writes it).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: not valid JSON ({exc}).") from None


def run(
    params: Params,
    dataset: Path,
    pseudo: Path,
    metrics: list[Path],
    out_root: Path,
    repo_root: Path = Path("."),
) -> Path:
    """Write ``out_root/<export.name>/`` atomically and return its path."""
    name = params.export.name
    out = Path(out_root) / name
    data = DatasetFile(dataset)
    with data, open_checked(pseudo, "pseudo_masks") as pm:
        n = pm["mask"].shape[0]
        if n != data.n or pm["mask"].shape[1:] != (data.height, data.width):
            raise InvalidInputError(
                f"{pseudo}: {n} pseudo-masks of {pm['mask'].shape[1:]} do not match {dataset} "
                f"({data.n} slices of {(data.height, data.width)}); re-run pseudo_masks."
            )
        classes = json.loads(pm.attrs["classes"])
        labels = data.labels_for(classes)
        fg = pm["fg_fraction"][:]
        ignore = pm["ignore_fraction"][:]
        trusted = trusted_flags(pm, pseudo, n)
        quality = {Path(m).stem: _read_json(Path(m)) for m in metrics}
        card = {
            "name": name,
            "weak2full_version": __version__,
            "source": data.source,
            "provenance": json.loads(data.h5.attrs.get("provenance", "{}")),
            "git_revision": _git_revision(repo_root),
            "params": params.model_dump(mode="json"),
            "input_sha256": {"dataset.h5": file_sha256(dataset), "pseudo_masks.h5": file_sha256(pseudo)},
            "n_slices": int(n),
            "n_patients": int(len(np.unique(data.patient))),
            "image_size": [int(data.height), int(data.width)],
            "pixel_spacing": data.pixel_spacing,
            "classes": classes,
            "class_balance": {
                c: {"positive_slices": int(labels[:, k].sum()), "share": float(labels[:, k].mean())}
                for k, c in enumerate(classes)
            },
            "ignore_fraction": float(ignore.mean()),
            "foreground_fraction": float(fg.mean()),
            "untrusted_slices": int((trusted == 0).sum()),
            "quality": quality,
            "files": {"pseudo_labels.h5": "masks, labels, patient/slice/split, trusted flags"},
        }
        with atomic_output(out) as tmp:
            tmp.mkdir()
            with h5py.File(tmp / "pseudo_labels.h5", "w", track_order=True) as f:
                h, w = data.height, data.width
                for key, arr in (("mask", None), ("label", labels), ("patient", data.patient),
                                 ("slice", data.slice), ("split", data.split),
                                 ("fg_fraction", fg), ("ignore_fraction", ignore), ("trusted", trusted)):
                    if key == "mask":
                        ds = f.create_dataset("mask", (n, h, w), np.uint8, chunks=(1, h, w),
                                              compression="gzip", track_times=False)
                        for s in range(0, n, 512):  # stream: memory bounded whatever N is
                            ds[s : s + 512] = pm["mask"][s : s + 512]
                    else:
                        f.create_dataset(key, data=arr, track_times=False)
                f.attrs["kind"] = "pseudo_labels"
                f.attrs["schema_version"] = SCHEMA_VERSION
                f.attrs["classes"] = json.dumps(classes)
            if params.export.nifti:
                card["files"]["nifti/"] = "one uint8 mask volume per patient, (H, W, slices)"
                _write_nifti(tmp / "nifti", pm["mask"], data.patient, data.pixel_spacing)
            card["files"]["card.json"] = "this card"
            (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
            (tmp / "card.md").write_text(_card_markdown(card))
            if out.exists():  # os.replace cannot replace a non-empty folder
                shutil.rmtree(out)
    return out


def _write_nifti(folder: Path, masks: h5py.Dataset, patient: np.ndarray, spacing) -> None:
    import nibabel as nib

    folder.mkdir()
    dy, dx = (spacing or [1.0, 1.0])[:2]
    for pid in np.unique(patient):
        idx = np.flatnonzero(patient == pid)
        vol = masks[idx[0] : idx[-1] + 1]  # a patient's slices are contiguous
        img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(vol, (1, 2, 0))), np.diag([dy, dx, 1.0, 1.0]))
        img.header.set_xyzt_units("mm")
        nib.save(img, folder / f"{int(pid):05d}.nii.gz")


def _card_markdown(card: dict) -> str:
    q = card["quality"]
    lines = [
        f"# Pseudo-label dataset `{card['name']}`",
        "",
        f"Made by weak2full {card['weak2full_version']} at git revision `{card['git_revision']}` "
        f"from the `{card['source']}` source: {card['n_slices']} slices of {card['n_patients']} patients, "
        f"{card['image_size'][0]}x{card['image_size'][1]} pixels.",
        "",
        "Masks are pseudo-labels made from image-level labels (heatmap CAMs refined by a dense CRF), not "
        "expert outlines: 0 background, k = the k-th class below, 255 uncertain (ignore when training).",
        "",
        "## Classes and balance",
        "",
        "| class | positive slices | share |",
        "|---|---|---|",
    ]
    for c, b in card["class_balance"].items():
        lines.append(f"| {c} | {b['positive_slices']} | {b['share']:.3f} |")
    lines += [
        "",
        f"Mean ignore fraction: {card['ignore_fraction']:.4f}; mean foreground fraction: "
        f"{card.get('foreground_fraction', float('nan')):.4f}. Untrusted slices (`trusted` 0: the map "
        f"peaked too weakly, so the mask is likely off the bleed): {card.get('untrusted_slices', 0)}.",
        "",
        "## Measured quality on the annotated subset",
        "",
        "```json",
        json.dumps(q, indent=2, sort_keys=True),
        "```",
        "",
        "## How to load",
        "",
        "```python",
        "from weak2full.export import load_pseudo_labels",
        f"ds = load_pseudo_labels('{card['name']}')   # the folder",
        "ds.mask[:10], ds.label[:10], ds.card['quality']",
        "```",
        "",
        "or with h5py alone: `h5py.File('pseudo_labels.h5')['mask']`. Get it into another DVC repo with",
        f"`dvc import <this repo url> dist/{card['name']}`.",
        "",
        "## Inputs (sha256)",
        "",
    ]
    lines += [f"- `{k}`: `{v}`" for k, v in card["input_sha256"].items()]
    return "\n".join(lines) + "\n"


@dataclass
class PseudoLabels:
    """A loaded pseudo-label dataset. Arrays are read into memory; use ``h5`` paths for large data."""

    card: dict
    classes: list[str]
    mask: np.ndarray  # (N, H, W) uint8, 0 / k / 255
    label: np.ndarray  # (N, K) uint8
    patient: np.ndarray
    slice: np.ndarray
    split: np.ndarray
    trusted: np.ndarray  # (N,) uint8, 0 where the slice's map peaked too weakly to be trusted


def load_pseudo_labels(folder: str | Path) -> PseudoLabels:
    """Load ``dist/<name>/`` (or an imported copy), checking the card and the arrays agree."""
    folder = Path(folder)
    card_path = folder / "card.json"
    if not card_path.is_file():
        raise InvalidInputError(f"{card_path}: no dataset card; is {folder} a weak2full pseudo-label export?")
    card = _read_json(card_path)
    missing = [k for k in CARD_FIELDS if k not in card]
    if missing:
        raise InvalidInputError(f"{card_path}: the card lacks the fields {missing}.")
    h5_path = folder / "pseudo_labels.h5"
    with open_checked(h5_path, "pseudo_labels") as f:
        arrays = {k: f[k][:] for k in ("mask", "label", "patient", "slice", "split")}
        arrays["trusted"] = trusted_flags(f, h5_path, arrays["mask"].shape[0])
    if arrays["mask"].shape[0] != card["n_slices"]:
        raise InvalidInputError(
            f"{h5_path}: {arrays['mask'].shape[0]} slices, but the card says {card['n_slices']}."
        )
    return PseudoLabels(card=card, classes=list(card["classes"]), **arrays)
