"""Prompt mode "ram": `scripts/convert.py rass --tag-list --thresholds` on a RASS-shaped checkpoint whose
ram.* / dape.* keys carry ram_ckpt_keys.txt's 1,290 names each (narrow widths, real depths, 4,585 tags),
then the converted model evaluated by scripts/eval.py (its own process) on the synthetic data with prompts
tagged on the device from each whole padded image, inside the evaluation step; the prompt of each image is
the cleaned, CLIP-encoded tag string of the converted tagger.
"""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lqseg_jax.convert.rass import convert_file as convert_rass_file
from lqseg_jax.eval.evaluate import load_converted_state
from lqseg_jax.models.ram import preprocess, tag_strings, threshold_mask
from lqseg_jax.systems.base import FROZEN
from lqseg_jax.systems.prompts import clean_caption, write_byte_level_tokenizer
from tests.conftest import REPO
from tests.models.test_ram_convert import NARROW, fake_tag_files, rass_like_state
from tests.systems.test_rass import micro_config
from tests.systems.test_rass_convert import micro_rass_config, reference, run_convert_script  # noqa: F401
from tests.train.test_multiprocess import env

pytestmark = pytest.mark.usefixtures("fast_compile")


def micro_ram_config():
    """The micro RASS with the narrow tagger (for the convert CLI's --config)."""
    c = micro_rass_config()
    c.prompt.ram.model = dataclasses.asdict(NARROW)
    return c


def micro_ram_eval_config(root, tokenizer):
    """The micro RASS on the synthetic data in prompt mode "ram" with the narrow tagger."""
    config = micro_config(root)
    config.prompt.ram.model = dataclasses.asdict(NARROW)
    config.prompt.mode = "ram"
    config.model.tokenizer = str(tokenizer)
    return config


def test_convert_with_tagger_then_evaluate_with_ram_prompts(reference, tmp_path, synthetic_root):  # noqa: F811
    sd = {k: v for k, v in reference["state_dict"].items() if ".ram." not in k and ".dape." not in k}
    sd.update({k: v for k, v in rass_like_state()[0].items() if ".ram." in k or ".dape." in k})
    torch.save({"model": sd}, tmp_path / "rass.pth")
    tags, thr = fake_tag_files(tmp_path)
    config_file = tmp_path / "micro_ram.py"
    config_file.write_text(
        "from tests.systems.test_rass_ram import micro_ram_config\n\n\n"
        "def get_config(arg=None):\n    return micro_ram_config()\n"
    )
    out = tmp_path / "converted"
    argv = ["rass", "--src", str(tmp_path / "rass.pth"), "--out", str(out), "--config", str(config_file)]
    with pytest.raises(ValueError, match="both --tag-list and --thresholds"):
        convert_rass_file(tmp_path / "rass.pth", out, micro_ram_config(), tag_list=tags)
    run_convert_script([*argv, "--tag-list", str(tags), "--thresholds", str(thr)])
    skipped = json.loads((out / "model" / "meta.json").read_text())["skipped"]
    assert skipped["ram (RAM tagger)"] == 1290 and skipped["dape (DAPE tagger)"] == 1290
    assert skipped["ram: tied tag_encoder copies (checked equal)"] == 32
    assert (out / "ram" / "tag_list.txt").read_text().splitlines() == tags.read_text().splitlines()

    config = micro_ram_eval_config(synthetic_root, write_byte_level_tokenizer(tmp_path / "tokenizer"))
    trainer, _ = load_converted_state(config, out)
    system = trainer.system
    assert system.ram_folder() == out / "ram"

    # the tags of an image: the converted tagger on the whole image in [-1, 1], thresholded in index order
    image = np.random.default_rng(0).integers(0, 256, size=(8, 40, 56, 3), dtype=np.uint8)
    ram, tag_list, thresholds, _ = system.tagger
    x = jnp.asarray(image, jnp.float32) / 255.0 * 2.0 - 1.0
    direct = nnx.jit(lambda m, x, t: threshold_mask(m(preprocess(x, NARROW.image_size)), t))
    mask = np.asarray(direct(ram, x, thresholds))  # (8, 4585)
    expected = tag_strings(mask, tag_list)
    assert system.tag(image) == expected
    assert 0 < mask.sum() < mask.size and expected[0] != expected[1]  # some tags fire, per image
    # in the step: the frozen tagger and text encoder ride in the device batch; the prompt ids are assembled
    # on the device; the embeddings equal the host path's (tokenizer on the cleaned string, text encoder)
    batch = trainer.device_batch({"image": image})
    assert set(batch) == {"image", FROZEN} and set(batch[FROZEN]) == {"ram", "text_encoder"}
    emb = jax.jit(lambda b: system.ram_text_embeddings(b, b["image"]))(batch)  # (8, 77, 16)
    provider = system.prompts
    for i in range(8):
        host = provider.embedding(clean_caption(f"{expected[i]}, "))  # (77, 16)
        np.testing.assert_allclose(np.asarray(emb[i]), host, rtol=1e-5, atol=1e-5)
    assert not np.allclose(emb[0], emb[1], atol=1e-3)
    with pytest.raises(ValueError, match="per-image prompts"):
        system.predict(None, image)

    # acceptance: scripts/eval.py on the converted folder, in its own process, prompts from the tagger
    eval_config = tmp_path / "micro_ram_eval.py"
    eval_config.write_text(
        "from tests.systems.test_rass_ram import micro_ram_eval_config\n\n\n"
        "def get_config(arg=None):\n"
        f"    return micro_ram_eval_config({str(synthetic_root)!r}, {str(tmp_path / 'tokenizer')!r})\n"
    )
    cmd = [sys.executable, "scripts/eval.py", "--config", str(eval_config), "--converted", str(out)]
    p = subprocess.run(
        [*cmd, "--out", str(tmp_path / "eval")],
        cwd=REPO,
        env=env(1, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["num_images"] == 6 and np.isfinite(summary["mIoU"]) and "mIoU" in p.stdout
    assert (tmp_path / "eval" / "metrics.json").exists()
