"""The PNG export of CT-ICH: one brain-windowed PNG per slice, named by its row in the diagnosis CSV.

Layout under ``data.path``::

    image/0.png, image/1.png ...     8-bit slices in the brain window 40/120 (0 = -20 HU, 255 = 100 HU)
    label/0.png, label/1.png ...     8-bit masks, 0 background and 255 (or 1) bleed, one class
    hemorrhage_diagnosis_raw_ct.csv  as for ``ct-ich``; PNG <n> is data row n (0-based, header excluded)

The window is inverted back to HU (``hu = png / 255 * 120 - 20``), so everything outside -20..100 HU is
clipped: bone and air read as 100 and -20. The export carries no pixel spacing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from weak2full.errors import InvalidInputError
from weak2full.importers._common import CLASSES, Source, Volume, binary_mask, check_inside, require_dir
from weak2full.importers.ct_ich import CSV_NAME, read_diagnosis

LEVEL, WIDTH = 40.0, 120.0


def png_to_hu(png: np.ndarray) -> np.ndarray:
    """Invert the export's brain window: 0..255 -> -20..100 HU (float32)."""
    return png.astype(np.float32) / 255.0 * WIDTH + (LEVEL - WIDTH / 2)


def read_png(path: Path) -> np.ndarray:
    """One 8-bit grey PNG as (H, W) uint8; an RGB(A) file is accepted when its colour channels agree."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise InvalidInputError(f"{path}: not a readable PNG ({exc}).") from None
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and (arr[..., :3] == arr[..., :1]).all():
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise InvalidInputError(
            f"{path}: expected an 8-bit greyscale PNG, got shape {arr.shape}, {arr.dtype}."
        )
    return arr


def png_rows(folder: Path) -> dict[int, Path]:
    found = {}
    for path in sorted(folder.glob("*.png")):
        if not path.stem.isdigit():
            raise InvalidInputError(f"{path}: expected a CSV row number as file name (like 0.png).")
        found[int(path.stem)] = path
    return found


def load(root: Path, data) -> Source:
    """Check that CSV rows and PNG files match one to one; volumes load one patient at a time."""
    csv_path = root / CSV_NAME
    check_inside(root, [csv_path])
    table = read_diagnosis(csv_path)
    n_rows = sum(len(t) for t in table.values())
    images = png_rows(require_dir(root / "image", "the CT-ICH PNG export keeps its slices in image/"))
    labels = png_rows(require_dir(root / "label", "the CT-ICH PNG export keeps its masks in label/"))
    check_inside(root, [*images.values(), *labels.values()])
    for folder, files in (("image", images), ("label", labels)):
        rows = set(range(n_rows))
        if rows - set(files):
            missing = sorted(rows - set(files))
            raise InvalidInputError(
                f"{csv_path}: rows {missing[:10]} (0-based) have no file {folder}/<row>.png in {root}."
            )
        if set(files) - rows:
            extra = [files[r].name for r in sorted(set(files) - rows)]
            raise InvalidInputError(
                f"{root / folder}: files {extra[:10]} have no row in {csv_path} ({n_rows} rows)."
            )

    def volumes() -> Iterator[Volume]:
        for patient in sorted(table):
            order = sorted(table[patient])  # slice numbers, increasing
            rows = [table[patient][s][1] for s in order]
            image = [read_png(images[r]) for r in rows]
            mask = [read_png(labels[r]) for r in rows]
            for r, im, m in zip(rows, image, mask):
                if m.shape != im.shape or im.shape != image[0].shape:
                    raise InvalidInputError(
                        f"{labels[r]}: shape {m.shape} does not match {images[r]} {im.shape} "
                        f"(or the other slices of patient {patient}, {image[0].shape})."
                    )
            mask_stack = np.stack([binary_mask(m, str(labels[r])) for r, m in zip(rows, mask)])
            label = np.stack([table[patient][s][0] for s in order])
            origin = f"{root / 'image'} rows {rows[0]}..{rows[-1]} (patient {patient})"
            yield Volume(str(patient), origin, png_to_hu(np.stack(image)), label, mask_stack, None)

    provenance = {
        "files": {"image": len(images), "label": len(labels), "csv_rows": n_rows},
        "window": [LEVEL, WIDTH],
    }
    return Source("ct-ich-png", root, list(CLASSES), ["any"], True, len(table), volumes(), provenance)
