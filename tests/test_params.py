"""The one params schema: defaults are valid, bad keys and values are errors that name the key."""

from pathlib import Path

import pytest
import yaml

from weak2full.errors import InvalidParameterError
from weak2full.params import Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["params.yaml", "params.smoke.yaml", "params.mri.yaml", "params.ct.yaml"])
def test_shipped_params_files_validate(name):
    path = ROOT / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    params = load_params(path)
    assert isinstance(params, Params)


def test_params_yaml_states_every_default_explicitly():
    # params.yaml is the user's map of every knob: it must list every key the schema knows.
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    defaults = Params().model_dump(mode="json")

    def keys(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from keys(v, prefix + k + ".")

    assert set(keys(defaults)) == set(keys(raw))


def test_unknown_key_names_the_key():
    with pytest.raises(InvalidParameterError, match=r"Unknown key 'pseudo_masks\.crf\.comapt'"):
        parse_params({"pseudo_masks": {"crf": {"comapt": 5}}})


def test_unknown_section_names_the_section():
    with pytest.raises(InvalidParameterError, match=r"Unknown key 'train_clasifier'"):
        parse_params({"train_clasifier": {"epochs": 1}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(InvalidParameterError, match=r"'train_classifier\.epochs' parameter.*Got 'many'"):
        parse_params({"train_classifier": {"epochs": "many"}})


def test_impossible_value_names_key():
    with pytest.raises(InvalidParameterError, match=r"'pseudo_masks\.crf\.bilateral_sxy' parameter"):
        parse_params({"pseudo_masks": {"crf": {"bilateral_sxy": 0}}})


def test_fg_must_exceed_bg():
    with pytest.raises(InvalidParameterError, match=r"fg must be greater than bg"):
        parse_params({"pseudo_masks": {"fg": 0.2, "bg": 0.3}})


def test_thresholds_outside_unit_interval():
    with pytest.raises(InvalidParameterError, match=r"'pseudo_masks\.fg' parameter"):
        parse_params({"pseudo_masks": {"fg": 1.5}})


def test_real_source_needs_a_path():
    with pytest.raises(InvalidParameterError, match=r"set data\.path"):
        parse_params({"data": {"source": "ct-ich"}})


def test_bad_window_width():
    with pytest.raises(InvalidParameterError, match=r"'input\.windows' parameter.*width > 0"):
        parse_params({"input": {"windows": [[40, 0]]}})


def test_every_error_is_reported_at_once():
    with pytest.raises(InvalidParameterError) as info:
        parse_params({"common": {"seed": -1}, "cams": {"batch_size": 0}})
    assert "common.seed" in str(info.value) and "cams.batch_size" in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(InvalidParameterError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("common: [unclosed\n")
    with pytest.raises(InvalidParameterError, match="not valid YAML"):
        load_params(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(InvalidParameterError, match="mapping of sections"):
        load_params(scalar)


def test_invalid_parameter_error_is_a_value_error():
    assert issubclass(InvalidParameterError, ValueError)


def test_params_files_are_what_the_schema_generates():
    # params.yaml and the presets are generated from the schema defaults (tools/write_params.py), so a
    # changed default cannot silently drift from the file users edit.
    import runpy

    render = runpy.run_path(str(ROOT / "tools" / "write_params.py"))["render"]
    for name, text in render().items():
        assert (ROOT / name).read_text() == text, f"{name} is stale: run python tools/write_params.py"
