"""Prompt mode "ram" in training: the frozen tagger and text encoder come into the jitted train step with the
device batch (never into the train state), the tags are those of the clean crop, and
config.prompt.ram.train_mode runs the tagger as the original's training does (drop-path and dropout on:
ram.md 1.6), with tags drawn from the step's key."""

import dataclasses

import jax
import numpy as np
import pytest

from lqseg_jax.convert.ram import convert_file
from lqseg_jax.data_pipelines.pipeline import train_dataset
from lqseg_jax.data_pipelines.sources import build_source
from lqseg_jax.data_pipelines.streams import train_augment
from lqseg_jax.systems.base import FROZEN
from lqseg_jax.systems.prompts import write_byte_level_tokenizer
from lqseg_jax.train.trainer import Trainer
from tests.models.test_ram_convert import NARROW, fake_tag_files, rass_like_state
from tests.systems.test_rass import micro_config

pytestmark = pytest.mark.usefixtures("fast_compile")


def test_train_step_tags_the_clean_crop_in_train_mode(tmp_path, synthetic_root):
    tags, _ = fake_tag_files(tmp_path)
    thr = tmp_path / "thr.txt"
    thr.write_text("\n".join(["0.5"] * 4585))  # at the random tagger's sigmoids: dropout flips tags
    convert_file("rass.pth", tmp_path / "ram", tags, thr, NARROW, state_dict=rass_like_state()[0])
    config = micro_config(synthetic_root)
    config.prompt.mode = "ram"
    config.prompt.ram.path = str(tmp_path / "ram")
    config.prompt.ram.model = dataclasses.asdict(NARROW)
    config.prompt.ram.train_mode = True
    config.model.tokenizer = str(write_byte_level_tokenizer(tmp_path / "tokenizer"))
    trainer = Trainer(config)
    system = trainer.system
    state = trainer.init_state()
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert not any("tagging_head" in n or "visual_encoder" in n or "final_layer_norm" in n for n in names)

    source = build_source("ade20k", synthetic_root, "training", num_classes=config.model.num_classes)
    dataset = train_dataset(
        source, train_augment(config.data), seed=0, global_batch=config.batch_size, num_threads=1
    )
    batch = trainer.device_batch(next(iter(dataset)))
    assert set(batch[FROZEN]) == {"ram", "text_encoder"} and "text_emb" not in batch

    # eval mode (no key): deterministic; train mode: drop-path and dropout drawn from the key
    masks = jax.jit(
        lambda b, k: [
            system.ram_tag_mask(b, b["image"], None),
            *(system.ram_tag_mask(b, b["image"], jax.random.fold_in(k, i)) for i in (0, 1)),
        ]
    )(batch, jax.random.key(0))
    evaluation, draw0, draw1 = map(np.asarray, masks)  # (8, K) each
    assert 0 < evaluation.sum() < evaluation.size
    assert (draw0 != draw1).sum() > 0 and (draw0 != evaluation).sum() > 0 and (draw1 != evaluation).sum() > 0

    state, metrics = trainer.train_step(state, batch, trainer.step_rng(0))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
