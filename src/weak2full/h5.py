"""HDF5 files of the chain: atomic writing, and checked readers for each stage's file.

The contracts (docs/ARCHITECTURE.md):

* ``dataset.h5``  (prepare): ``image`` int16 (N,H,W) HU; ``patient`` int32 (N,); ``slice`` int32 (N,);
  ``label`` uint8 (N,K); ``mask`` uint8 (N,H,W); ``has_mask`` bool (N,); ``split`` uint8 (N,) 0/1/2;
  attributes ``kind="dataset"``, ``schema_version``, ``classes``, ``mask_classes``, ``masks_complete``,
  ``source``, ``provenance``, ``pixel_spacing``, ``params``.
* ``cams.h5``  (cams): ``cam`` float16 (N,K,S,S) raw class maps (logits), ``prob`` float32 (N,K) image
  probabilities; attributes ``kind="cams"``, ``classes``, ``method``, ``heatmap_size``, ``stride``.
* ``pseudo_masks.h5`` (pseudo_masks): ``mask`` uint8 (N,H,W) 0 background / k class / 255 ignore,
  ``fg_fraction`` float32 (N,), ``ignore_fraction`` float32 (N,); attributes ``kind="pseudo_masks"``,
  ``classes``, ``fg``, ``bg``, ``crf``.

Every writer goes through :func:`atomic_output`: the file appears under its final name only when it is
complete, so an interrupted stage never leaves a file that DVC or the next stage would trust.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from weak2full.errors import InvalidInputError, OutputWriteError

__all__ = [
    "SCHEMA_VERSION",
    "SPLITS",
    "atomic_output",
    "write_json",
    "file_sha256",
    "open_checked",
    "DatasetFile",
    "truth_mask",
    "trusted_flags",
    "write_dataset",
]

SCHEMA_VERSION = 1
SPLITS = {"train": 0, "val": 1, "test": 2}

_REQUIRED = {
    "dataset": ("image", "patient", "slice", "label", "mask", "has_mask", "split"),
    "cams": ("cam", "prob"),
    "pseudo_masks": ("mask", "fg_fraction", "ignore_fraction"),
    "pseudo_labels": ("mask", "label", "patient", "slice", "split"),  # export's shippable file
}


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    On any exception (KeyboardInterrupt and disk-full included) the temporary file is removed and the
    previous ``path``, if any, is left untouched; a full disk or a file-size limit becomes an
    :class:`~weak2full.errors.OutputWriteError` naming ``path``. A process killed outright (SIGKILL, power
    loss) cannot clean up: its temporary file is removed by the next writer of ``path`` once that
    process is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        reason = _out_of_space(exc, tmp)
        _remove(tmp)
        if reason is not None:
            raise OutputWriteError(
                f"{path}: could not be written ({reason}); nothing was written there (the previous file, "
                "if any, is unchanged). Free some space, then re-run the stage."
            ) from exc
        raise


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON with sorted keys (stable diffs in git and dvc), atomically."""
    import json

    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in blocks (dataset files can be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` left beside ``path`` by writers that were killed (their pid is gone)."""
    prefix = f".{path.name}.tmp-"
    for stale in path.parent.iterdir():
        pid = stale.name[len(prefix):] if stale.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            _remove(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _out_of_space(exc: BaseException, tmp: Path) -> str | None:
    """Why writing ``tmp`` failed when the cause is space (disk full, quota, file-size limit), else None.

    h5py and torch do not always keep the errno (HDF5 puts it in the message; torch's zip writer reports
    only a short write), so the message, the size limit and the free space are consulted too.
    """
    if not isinstance(exc, Exception) or isinstance(exc, ValueError):  # interrupts; the project's own errors
        return None
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
        return os.strerror(exc.errno)
    text = str(exc)
    for code in _SPACE_ERRNOS:
        if f"errno = {code}," in text or os.strerror(code) in text:
            return os.strerror(code)
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and tmp.is_file() and tmp.stat().st_size >= limit:
            return os.strerror(errno.EFBIG) + f", the limit is {limit} bytes"
    except (ImportError, OSError):
        pass
    try:
        st = os.statvfs(tmp.parent)
        free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
        if free < 1 << 20:
            return os.strerror(errno.ENOSPC)
    except (AttributeError, OSError):
        pass
    return None


def write_dataset(
    path: str | Path,
    *,
    image: np.ndarray,
    patient: np.ndarray,
    slice_index: np.ndarray,
    label: np.ndarray,
    mask: np.ndarray,
    has_mask: np.ndarray,
    split: np.ndarray,
    classes: Sequence[str],
    mask_classes: Sequence[str],
    masks_complete: bool,
    source: str,
    provenance: dict | None = None,
    pixel_spacing: Sequence[float] | None = None,
    params: dict | None = None,
) -> None:
    """Write ``dataset.h5`` atomically, checking the contract first (shapes, dtypes, value ranges).

    Chunks are one slice each so that a DataLoader reads single slices cheaply; no timestamps are
    stored, so the same arrays give the same bytes.
    """
    path = Path(path)
    n = image.shape[0]
    if n == 0:
        raise InvalidInputError(f"{path}: the dataset is empty (no slices).")
    if image.ndim != 3 or mask.shape != image.shape:
        raise InvalidInputError(f"{path}: image {image.shape} and mask {mask.shape} must both be (N, H, W).")
    for name, arr in (("patient", patient), ("slice", slice_index), ("has_mask", has_mask), ("split", split)):
        if arr.shape != (n,):
            raise InvalidInputError(f"{path}: {name} has shape {arr.shape}, expected ({n},).")
    if label.shape != (n, len(classes)):
        raise InvalidInputError(f"{path}: label has shape {label.shape}, expected ({n}, {len(classes)}).")
    if int(mask.max(initial=0)) > len(mask_classes):
        raise InvalidInputError(
            f"{path}: mask values go up to {int(mask.max())} but there are {len(mask_classes)} mask classes."
        )
    if not set(np.unique(split).tolist()) <= set(SPLITS.values()):
        raise InvalidInputError(f"{path}: split values must be 0 (train), 1 (val) or 2 (test).")
    with atomic_output(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        h, w = image.shape[1:]
        f.create_dataset("image", data=image.astype(np.int16), chunks=(1, h, w), track_times=False)
        f.create_dataset("mask", data=mask.astype(np.uint8), chunks=(1, h, w), track_times=False)
        f.create_dataset("patient", data=patient.astype(np.int32), track_times=False)
        f.create_dataset("slice", data=slice_index.astype(np.int32), track_times=False)
        f.create_dataset("label", data=label.astype(np.uint8), track_times=False)
        f.create_dataset("has_mask", data=has_mask.astype(bool), track_times=False)
        f.create_dataset("split", data=split.astype(np.uint8), track_times=False)
        f.attrs["kind"] = "dataset"
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["classes"] = json.dumps(list(classes))
        f.attrs["mask_classes"] = json.dumps(list(mask_classes))
        f.attrs["masks_complete"] = bool(masks_complete)
        f.attrs["source"] = source
        f.attrs["provenance"] = json.dumps(provenance or {}, sort_keys=True)
        f.attrs["pixel_spacing"] = json.dumps(list(pixel_spacing) if pixel_spacing is not None else None)
        f.attrs["params"] = json.dumps(params or {}, sort_keys=True)


def open_checked(path: str | Path, kind: str) -> h5py.File:
    """Open one of the chain's HDF5 files read-only, checking that it is whole and of the right kind."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: file does not exist (run the stage that writes it first).")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InvalidInputError(f"{path}: not a readable HDF5 file ({exc}); it may be truncated.") from None
    try:
        found = f.attrs.get("kind")
        if found != kind:
            raise InvalidInputError(f"{path}: expected a '{kind}' file, found kind={found!r}.")
        version = int(f.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise InvalidInputError(
                f"{path}: schema version {version}, this weak2full reads version {SCHEMA_VERSION}; "
                "re-run the stage that wrote it."
            )
        missing = [k for k in _REQUIRED[kind] if k not in f]
        if missing:
            raise InvalidInputError(f"{path}: missing datasets {missing}.")
    except BaseException:
        f.close()
        raise
    return f


def _json_attr(f: h5py.File, name: str, default=None):
    raw = f.attrs.get(name)
    if raw is None:
        return default
    return json.loads(raw)


def trusted_flags(f: h5py.File, path: str | Path, n: int) -> np.ndarray:
    """The trust rule's flags of a pseudo_masks.h5 or pseudo_labels.h5, uint8 (n,), 0 where the slice is
    untrusted (weak2full.pseudo_masks.trusted_slices). A file from before the rule has none: every slice
    is trusted."""
    if "trusted" not in f:
        return np.ones(n, np.uint8)
    flags = f["trusted"][:]
    if flags.shape != (n,):
        raise InvalidInputError(f"{path}: trusted flags of shape {flags.shape}, but {n} slices are expected; "
                                "re-run pseudo_masks.")
    return flags


def truth_mask(mask: np.ndarray, mask_classes: Sequence[str], cls: str) -> np.ndarray:
    """Binary truth for one class from a 0/k mask (k indexes ``mask_classes`` from 1).

    ``any`` is the union of all classes. A class missing from ``mask_classes`` cannot be scored.
    """
    if cls == "any":
        return mask > 0
    if list(mask_classes) == ["any"]:
        raise InvalidInputError(
            f"masks of this dataset outline every bleed as one class 'any'; class '{cls}' cannot be scored."
        )
    if cls not in mask_classes:
        raise InvalidInputError(f"class '{cls}' is not among the mask classes {list(mask_classes)}.")
    return mask == (list(mask_classes).index(cls) + 1)


class DatasetFile:
    """Read-only, checked view of ``dataset.h5``.

    Masks are reachable two ways, and the split matters: :meth:`annotated_masks` serves only slices in
    the annotated subset (``has_mask``), the only masks the weak path may read; :meth:`all_masks` is for
    the oracle (the fully supervised ceiling) alone.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open_checked(self.path, "dataset")
        f = self._f
        self.n, self.height, self.width = f["image"].shape
        self.classes: list[str] = list(_json_attr(f, "classes", []))
        self.mask_classes: list[str] = list(_json_attr(f, "mask_classes", []))
        self.masks_complete = bool(f.attrs.get("masks_complete", False))
        self.source = str(f.attrs.get("source", ""))
        self.pixel_spacing = _json_attr(f, "pixel_spacing")
        # Small per-slice vectors are read once; images and masks stay on disk.
        self.patient = f["patient"][:]
        self.slice = f["slice"][:]
        self.label = f["label"][:]
        self.has_mask = f["has_mask"][:].astype(bool)
        self.split = f["split"][:]
        if self.label.shape != (self.n, len(self.classes)):
            raise InvalidInputError(
                f"{self.path}: label has shape {self.label.shape}, expected ({self.n}, {len(self.classes)}) "
                f"for classes {self.classes}."
            )

    # -- per-slice selections
    def indices(self, split: str, annotated: bool | None = None) -> np.ndarray:
        sel = self.split == SPLITS[split]
        if annotated is not None:
            sel &= self.has_mask == annotated
        return np.flatnonzero(sel)

    def class_index(self, cls: str) -> int:
        if cls not in self.classes:
            raise InvalidInputError(f"{self.path}: class '{cls}' not among its classes {self.classes}.")
        return self.classes.index(cls)

    def labels_for(self, classes: Sequence[str]) -> np.ndarray:
        """(N, len(classes)) uint8 image labels for the chosen classes."""
        return self.label[:, [self.class_index(c) for c in classes]]

    # -- bulk data, read lazily
    def images(self, idx) -> np.ndarray:
        """int16 HU slices (len(idx), H, W); idx sorted or a slice."""
        return _take(self._f["image"], idx)

    def annotated_masks(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.size and not self.has_mask[idx].all():
            bad = idx[~self.has_mask[idx]][:5].tolist()
            raise InvalidInputError(
                f"{self.path}: the weak path asked for masks of slices outside the annotated subset, "
                f"e.g. {bad}."
            )
        return _take(self._f["mask"], idx)

    def all_masks(self, idx) -> np.ndarray:
        """Masks of any slice: for the oracle (the ceiling) only."""
        return _take(self._f["mask"], idx)

    @property
    def h5(self) -> h5py.File:
        return self._f

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # DataLoader workers reopen the file lazily instead of pickling a handle
        state = self.__dict__.copy()
        state["_f"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._f = h5py.File(self.path, "r")


def _take(ds: h5py.Dataset, idx) -> np.ndarray:
    if isinstance(idx, slice):
        return ds[idx]
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        return np.empty((0,) + ds.shape[1:], ds.dtype)
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    uniq, inverse = np.unique(sorted_idx, return_inverse=True)
    data = ds[uniq]  # h5py fancy indexing needs increasing, unique indices
    out = np.empty((idx.size,) + ds.shape[1:], ds.dtype)
    out[order] = data[inverse]
    return out
