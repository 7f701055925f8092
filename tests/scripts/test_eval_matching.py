"""scripts/eval_matching.py on a tiny synthetic matching set: the freshly initialised tiny UAWarpC is
evaluated (eval mode, one pair at a time) and the JSON holds AEPE, PCK-1/3/5/10 and AUSE."""

import json

import numpy as np
import pytest

from lqseg_jax.data_pipelines import synthetic_adverse
from lqseg_jax.data_pipelines.matching_stream import flow_matches, matching_source
from tests.helpers import run_script


@pytest.mark.slow
def test_eval_matching_writes_json_and_table(tmp_path, repo, capsys):
    root = tmp_path / "syn"
    synthetic_adverse.write_dataset(
        root,
        num_source=(0, 0),
        num_target=(0, 1),
        conditions=("night", "fog"),
        height=48,
        width=64,
        progress=False,
    )
    source = matching_source("synthetic", root, "val")
    assert len(source) == 2
    pair = source[0]
    m = flow_matches(pair["flow"])
    # the stored flow's correspondences: reference point = target point + flow there
    np.testing.assert_allclose(
        m[:, :2] - m[:, 2:], pair["flow"][m[:, 3].astype(int), m[:, 2].astype(int)], atol=1e-4
    )
    out = tmp_path / "eval"
    run_script(
        repo,
        "eval_matching",
        [
            f"--config={repo / 'configs' / 'uawarpc.py'}:tiny",
            "--init",
            f"--out={out}",
            "--noprogress",
            f"--config.eval.root={root}",
            f"--config.data.root={root}",
        ],
    )
    results = json.loads((out / "matching.json").read_text())
    for key in ("AEPE", "PCK_1", "PCK_3", "PCK_5", "PCK_10", "AUSE"):
        assert np.isfinite(results[key]), key
    assert results["num_images"] == 2 and results["num_correspondences"] > 100
    assert 0 <= results["PCK_1"] <= results["PCK_3"] <= results["PCK_5"] <= results["PCK_10"] <= 1
    assert "PCK-5" in (out / "matching.md").read_text() and "PCK-5" in capsys.readouterr().out
