"""Test instrument (tests/test_dvc_e2e.py): log which params.yaml keys a stage process reads.

Put this folder on PYTHONPATH and set WEAK2FULL_PARAMS_LOG to a folder: every process that runs a
``stages/*.py`` script then records each leaf key it reads from the params that
``weak2full.params.parse_params`` returned (``train_classifier.lr``, ``input.windows``, ...) and writes
them at exit to ``<folder>/<stage>-<pid>.txt``, its command line first. Other processes (dvc itself)
are left alone. Section objects are told apart by identity, so copies and sections built from a
checkpoint (``InputParams(**ckpt["input"])``) are not params.yaml reads and are not logged.
"""

import atexit
import os
import re
import sys
from pathlib import Path

_LOG = os.environ.get("WEAK2FULL_PARAMS_LOG")
_STAGE = re.search(r"stages/(\w+)\.py", " ".join(sys.argv))

if _LOG and _STAGE:
    from pydantic import BaseModel

    import weak2full.params as _params

    _paths: dict[int, str] = {}  # id(section object) -> its dotted path in params.yaml
    _read: set[str] = set()
    _keep: list = []  # the indexed objects stay alive, so their ids stay theirs

    def _index(obj: BaseModel, path: str) -> None:
        _paths[id(obj)] = path
        _keep.append(obj)
        for name in type(obj).model_fields:
            value = object.__getattribute__(obj, name)
            if isinstance(value, BaseModel):
                _index(value, f"{path}.{name}" if path else name)

    _parse = _params.parse_params

    def _parse_and_index(*args, **kwargs):
        params = _parse(*args, **kwargs)
        _index(params, "")
        return params

    def _logged_getattribute(self, name):
        value = object.__getattribute__(self, name)
        if name in type(self).model_fields and not isinstance(value, BaseModel):
            path = _paths.get(id(self))
            if path is not None:
                _read.add(f"{path}.{name}" if path else name)
        return value

    _params.parse_params = _parse_and_index  # load_params calls it through the module
    _params._Section.__getattribute__ = _logged_getattribute

    @atexit.register
    def _write() -> None:
        out = Path(_LOG) / f"{_STAGE.group(1)}-{os.getpid()}.txt"
        out.write_text(" ".join(sys.argv) + "\n" + "".join(f"{k}\n" for k in sorted(_read)))
