"""configs/demo.py: every variant `make demo` may run loads, on the same data and schedule."""

import pytest

from lqseg_jax.train.config import load_config
from tests.helpers import load_script


@pytest.mark.parametrize("variant", ["daformer", "mask2former", "rass"])
def test_demo_variants_share_data_and_schedule(variant):
    cfg = load_config(f"configs/demo.py:{variant}")
    assert cfg.data.root == "data/synthetic" and cfg.data.synthetic.enabled
    assert (cfg.total_steps, cfg.batch_size, tuple(cfg.data.crop)) == (300, 8, (96, 96))
    assert cfg.system == {"daformer": "daformer", "mask2former": "mask2former", "rass": "rass"}[variant]


def test_unknown_demo_variant_is_named():
    with pytest.raises(ValueError, match=r"configs/demo.py variants: .*got 'segformer'"):
        load_config("configs/demo.py:segformer")


def test_uda_demo_pair_differs_only_in_the_target_loss():
    """`scripts/demo.py --variants uda` trains configs/refign.py:tiny,no_refign and :tiny,source_only: the
    same network, data, steps and evaluation; only uda.enabled differs."""
    uda, source_only = (
        load_config("configs/refign.py:tiny,no_refign"),
        load_config("configs/refign.py:tiny,source_only"),
    )
    assert uda.uda.enabled and not source_only.uda.enabled
    source_only.uda.enabled = True
    assert uda.to_dict() == source_only.to_dict()
    assert uda.eval.source == "acdc" and uda.eval.root == uda.data.target_root


def test_refign_demo_rows_differ_only_in_the_refign_switches():
    """`scripts/demo.py --variants refign` adds rows 1 and 6 (configs/refign.py:tiny,row1 and :tiny) to the UDA
    run: the same network, data, steps and evaluation; only config.uda.refign differs."""
    uda, row1, row6 = (load_config(f"configs/refign.py:tiny{flag}") for flag in (",no_refign", ",row1", ""))
    assert not uda.uda.refign.use_refign
    assert row1.uda.refign.use_refign and not row1.uda.refign.use_align and row1.uda.refign.gamma == 0
    r6 = row6.uda.refign
    assert r6.use_refign and r6.use_align and r6.adapt_to_ref and r6.gamma == 0.25
    assert not (r6.disable_P or r6.disable_M)
    for cfg in (row1, row6):
        cfg.uda.refign = uda.uda.refign
        assert cfg.to_dict() == uda.to_dict()


def test_make_demo_runs_both_systems_and_groups_expand_without_repeats(tmp_path):
    """`make demo` (the default --variants) trains tiny RASS and the shortened Refign row 1, which needs no
    alignment network; the adaptation group is the four-run comparison at the same steps."""
    demo = load_script("demo")
    assert demo.planned_runs(demo.DEFAULT_VARIANTS, tmp_path) == [
        ("rass", "configs/demo.py:rass"),
        ("refign", "configs/demo.py:refign"),
    ]
    quick, row1 = load_config("configs/demo.py:refign"), load_config("configs/refign.py:tiny,row1")
    assert (quick.total_steps, quick.batch_size, quick.checkpoint.every) == (100, 4, 100)
    assert quick.uda.refign.use_refign and not quick.uda.refign.use_align
    for cfg in (quick, row1):
        cfg.total_steps = cfg.batch_size = cfg.checkpoint.every = cfg.log_every = 0
    assert quick.to_dict() == row1.to_dict()  # otherwise configs/refign.py:tiny,row1 as it is
    assert [name for name, _ in demo.planned_runs("uda,refign_row1,uda", tmp_path)] == [
        "source_only",
        "uda",
        "refign_row1",
    ]
    (tmp_path / "uawarpc" / "export").mkdir(parents=True)
    (tmp_path / "uawarpc" / "export" / "meta.json").write_text("{}")  # row 6's network: no training here
    assert demo.planned_runs("adaptation", tmp_path) == [
        ("source_only", "configs/refign.py:tiny,source_only"),
        ("uda", "configs/refign.py:tiny,no_refign"),
        ("refign_row1", "configs/refign.py:tiny,row1"),
        ("refign_row6", "configs/refign.py:tiny"),
    ]


def test_unknown_demo_script_variant_is_named_before_anything_runs(tmp_path):
    demo = load_script("demo")
    with pytest.raises(ValueError, match=r"--variants: each of .*uawarpc; got 'segformer'"):
        demo.planned_runs("uawarpc,segformer", tmp_path)
    assert not (tmp_path / "uawarpc").exists()
