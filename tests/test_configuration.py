"""Config validation and the versioned JSON round trip."""

from __future__ import annotations

import json

import pytest

from optimum_recon import CalibrationConfig, PruningConfig, __version__
from optimum_recon.configuration import CONFIG_NAME, parse_pattern


@pytest.mark.parametrize("sparsity", [1.5, 1.0, -0.1, "half", True])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match=r"sparsity=.* is not valid"):
        PruningConfig(sparsity=sparsity)


@pytest.mark.parametrize("pattern", ["3:2", "2:2", "0:4", "2-4", "structured", ""])
def test_bad_pattern(pattern):
    with pytest.raises(ValueError, match="pattern=.* is not valid"):
        PruningConfig(pattern=pattern)


def test_nm_pattern_fixes_sparsity():
    assert PruningConfig(pattern="2:4").sparsity == 0.5
    assert parse_pattern("4:8") == (4, 8)
    with pytest.warns(UserWarning, match="sparsity is 0.75"):
        config = PruningConfig(pattern="1:4", sparsity=0.5)
    assert config.sparsity == 0.75 and config.nm == (1, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "obs"}, "method='obs' is not valid: choose one of 'alps', 'magnitude', 'sparsegpt', 'wanda'"),
        ({"reconstruction": "global"}, "reconstruction='global' is not valid"),
        ({"propagation": "dense"}, "propagation='dense' is not valid: choose one of 'global', 'local'"),
        ({"targets": ["q_proj("]}, "targets entry 'q_proj\\(' is not a valid regular expression"),
        ({"block_size": 0}, "block_size=0"),
        ({"dampening": -1}, "dampening=-1"),
    ],
)
def test_bad_fields_name_field_value_and_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"num_samples": 0}, {"seq_len": -5}, {"seed": 1.5}, {"source": " "}])
def test_bad_calibration(kwargs):
    with pytest.raises(ValueError, match="calibration"):
        CalibrationConfig(**kwargs)


def test_json_round_trip_is_versioned(tmp_path):
    config = PruningConfig(sparsity=0.6, method="wanda", targets=["mlp"], ignore=["layers.0."],
                           calibration=CalibrationConfig(source="wikitext2", num_samples=7, seq_len=33, seed=3))
    path = config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["optimum_recon_version"] == __version__
    assert path.endswith(CONFIG_NAME)
    assert PruningConfig.from_pretrained(tmp_path) == config
    assert PruningConfig.from_pretrained(tmp_path / CONFIG_NAME) == config


def test_unknown_keys_from_a_newer_version_are_dropped_with_a_warning(tmp_path):
    data = PruningConfig().to_dict()
    data["future_knob"] = 3
    data["calibration"]["future_source_option"] = True
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="future_knob, calibration.future_source_option.*newer"):
        config = PruningConfig.from_pretrained(tmp_path)
    assert config == PruningConfig()


def test_save_into_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        PruningConfig().save_pretrained(f)


def test_string_regexes_become_lists():
    assert PruningConfig(ignore="lm_head").ignore == ["lm_head"]


def test_every_field_has_its_help_once_and_a_flag():
    from dataclasses import fields

    from optimum_recon.configuration import field_help
    from optimum_recon.recipe import RECIPE_FLAGS

    for cls in (PruningConfig, CalibrationConfig):
        for f in fields(cls):
            assert len(field_help(cls, f.name)) > 10, f.name  # from the class docstring's Args
            assert not f.metadata, f"{cls.__name__}.{f.name}: help belongs in the docstring"
    assert {name for _, name, _ in RECIPE_FLAGS.values()} == {
        f.name for cls in (PruningConfig, CalibrationConfig) for f in fields(cls)} - {"calibration"}
