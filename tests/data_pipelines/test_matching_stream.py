"""UAWarpC's pair stream (data_pipelines/matching_stream.py) through streams.train_stream, and the configs."""

import numpy as np
import pytest

from lqseg_jax.data_pipelines import matching_stream as ms
from lqseg_jax.data_pipelines.streams import ensure_data, train_stream
from lqseg_jax.train.config import load_config


def test_pair_augment_resizes_with_lanczos_and_swaps():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = ms.PairAugment((16, 16), swap_prob=0.0)({"image": image, "reference": ref}, rng)
    np.testing.assert_array_equal(out["image"], ms.lanczos(image, (16, 16)))
    np.testing.assert_array_equal(out["image_ref"], ms.lanczos(ref, (16, 16)))
    swapped = ms.PairAugment((16, 16), swap_prob=1.0)({"image": image, "reference": ref}, rng)
    np.testing.assert_array_equal(swapped["image"], out["image_ref"])


def test_matching_pipeline_writes_synthetic_pairs_and_streams_batches(tmp_path, repo):
    root = tmp_path / "syn"
    config = load_config(
        f"{repo / 'configs' / 'uawarpc.py'}:tiny",
        **{"data.root": str(root), "data.synthetic.num_target_train": 3, "data.synthetic.num_target_val": 1,
           "data.synthetic.height": 24, "data.synthetic.width": 32},
    )  # fmt: skip
    ensure_data(config)
    assert len(ms.matching_source("synthetic", root, "train")) == 9  # 3 pairs x 3 conditions
    stream = train_stream(config)
    assert stream.index_per_step == 8
    it = iter(stream.dataset)
    first = next(it)
    assert set(first) == {"image", "image_ref"}
    assert (
        first["image"].shape == first["image_ref"].shape == (8, 64, 64, 3)
        and first["image"].dtype == np.uint8
    )
    again = next(iter(train_stream(config).dataset))
    np.testing.assert_array_equal(first["image"], again["image"])  # seeded: the same stream on a rerun


def test_configs():
    stage1, stage2 = (load_config(f"configs/uawarpc.py:{v}") for v in ("stage1", "stage2"))
    from lqseg_jax.systems.uawarpc import warp_spec

    s1, s2 = warp_spec(stage1), warp_spec(stage2)
    assert (s1.t_hom, s1.t_tps, s1.t_afftps, s1.elastic) == (0.333, 0.333, 0.08, False)
    assert (s2.t_hom, s2.t_tps, s2.t_afftps, s2.elastic) == (0.4, 0.4, 0.26, True)
    assert not stage1.uawarpc.visibility_mask and stage2.uawarpc.visibility_mask
    assert tuple(stage2.optimizer.schedule.milestones) == (100_000, 150_000, 200_000)
    assert stage1.uawarpc.weight_decay == 4e-4 and stage1.optimizer.weight_decay == 0.0
    assert tuple(stage1.data.size) == (750, 750) and tuple(stage1.uawarpc.crop) == (520, 520)
    with pytest.raises(ValueError, match="variants"):
        load_config("configs/uawarpc.py:stage3")
    with pytest.raises(ValueError, match="matching source"):
        ms.matching_source("kitti", "x", "test")
