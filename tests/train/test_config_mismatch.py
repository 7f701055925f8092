"""Checkpointer.check_config's comparison: which differences between a checkpoint's config and the current
one refuse a restore, and which do not (a field added to base_config since the checkpoint was written)."""

from lqseg_jax.train.checkpoint import config_mismatch, config_to_dict
from lqseg_jax.train.config import load_config


def _dicts():
    config = config_to_dict(load_config("configs/daformer.py:tiny"))
    return config, config_to_dict(load_config("configs/daformer.py:tiny"))


def test_equal_configs_have_no_difference():
    saved, current = _dicts()
    assert config_mismatch(saved, current) == []


def test_a_field_the_checkpoint_predates_is_no_difference_at_its_default():
    saved, current = _dicts()
    del saved["model"]["scan_blocks"]  # written before the option existed
    assert config_mismatch(saved, current) == []
    current["model"]["scan_blocks"] = True  # the old run did not have this behaviour
    assert config_mismatch(saved, current) == [
        "model.scan_blocks: checkpoint has '<absent>', config has True"
    ]


def test_changed_and_removed_fields_are_named():
    saved, current = _dicts()
    current["model"]["backbone"] = "mit_b1"
    del current["model"]["drop_path_rate"]
    assert config_mismatch(saved, current) == [
        "model.backbone: checkpoint has 'mit_b0', config has 'mit_b1'",
        f"model.drop_path_rate: checkpoint has {saved['model']['drop_path_rate']!r}, config has '<absent>'",
    ]


def test_a_section_absent_from_both_is_equal_and_from_one_is_named():
    saved, current = _dicts()
    assert config_mismatch(saved, current, ("uda",)) == []
    current["uda"] = {"ema_momentum": 0.99}
    assert config_mismatch(saved, current, ("uda",)) == [
        "uda.ema_momentum: checkpoint has '<absent>', config has 0.99"
    ]
