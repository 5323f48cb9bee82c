"""Readers for the real data layouts that ``prepare`` turns into ``dataset.h5``.

Each importer is one function ``load(root: Path, data: DataParams) -> Source``. It checks the layout up
front (missing files, CSV rows without files, files without rows, bad names) and then hands out one
:class:`Volume` at a time, so that a few hundred 512x512 CT volumes never sit in memory together; ``prepare``
resamples each volume to ``data.image_size`` as it arrives. Errors name the file and the problem
(:class:`~weak2full.errors.InvalidInputError`); nothing is written by an importer.

=================  ===============================================================================
``ct-ich``         PhysioNet CT-ICH: ``ct_scans/NNN.nii``, ``masks/NNN.nii``, the diagnosis CSV
``ct-ich-png``     its PNG export: ``image/<row>.png``, ``label/<row>.png`` (brain window 40/120) + the CSV
``rsna``           RSNA ICH: DICOM files + ``stage_2_train.csv`` (slice labels only, no masks)
``nifti-folder``   ``<case>/<image>.nii(.gz)`` + ``<case>/mask.nii(.gz)``, or ``images/`` + ``masks/``
=================  ===============================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from weak2full.errors import InvalidInputError
from weak2full.importers import ct_ich, ct_ich_png, nifti_folder, rsna
from weak2full.importers._common import CLASSES, SUBTYPES, Source, Volume
from weak2full.importers.resample import resample_volume

__all__ = ["CLASSES", "IMPORTERS", "SUBTYPES", "Source", "Volume", "load_source", "resample_volume"]

IMPORTERS: dict[str, Callable[..., Source]] = {
    "ct-ich": ct_ich.load,
    "ct-ich-png": ct_ich_png.load,
    "rsna": rsna.load,
    "nifti-folder": nifti_folder.load,
}


def load_source(data) -> Source:
    """Open ``data.path`` with the importer of ``data.source`` (a :class:`~weak2full.params.DataParams`)."""
    if data.source not in IMPORTERS:
        raise InvalidInputError(f"no importer for source '{data.source}'; choose one of {list(IMPORTERS)}.")
    root = Path(data.path)
    if not root.is_dir():
        raise InvalidInputError(
            f"data.path {root} does not exist or is not a folder (source '{data.source}')."
        )
    return IMPORTERS[data.source](root, data)
