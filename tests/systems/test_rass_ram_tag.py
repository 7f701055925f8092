"""scripts/tag.py: the RAM tags of a split, as prompt mode "ram" computes them in evaluation (the padded
canvas of each image, one per batch), written as a tags file that prompt mode "tags" reads back."""

import importlib.util
import json

import numpy as np
import pytest

from lqseg_jax.convert.ram import convert_file
from lqseg_jax.data_pipelines.pipeline import eval_batches
from lqseg_jax.data_pipelines.sources import build_source
from lqseg_jax.data_pipelines.transforms import EvalCanvas
from lqseg_jax.eval.evaluate import eval_resize
from lqseg_jax.systems.prompts import PromptProvider, clean_caption, image_id
from lqseg_jax.systems.rass import RASSSystem
from tests.conftest import REPO
from tests.models.test_ram_convert import NARROW, fake_tag_files, rass_like_state
from tests.systems.test_rass import micro_config

pytestmark = pytest.mark.usefixtures("fast_compile")


def test_tag_script_writes_the_evaluation_tags(tmp_path, synthetic_root):
    tags, _ = fake_tag_files(tmp_path)
    thr = tmp_path / "thr.txt"
    thr.write_text("\n".join(["0.45"] * 4585))  # low enough that the flat synthetic scenes get tags
    convert_file("rass.pth", tmp_path / "ram", tags, thr, NARROW, state_dict=rass_like_state()[0])
    config_file = tmp_path / "micro.py"
    config_file.write_text(
        "from tests.systems.test_rass import micro_config\n\n\n"
        "def get_config(arg=None):\n    return micro_config('unused')\n"
    )
    spec = importlib.util.spec_from_file_location("tag_script", REPO / "scripts" / "tag.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "tags" / "val.json"
    argv = ["--config", str(config_file), "--ram", str(tmp_path / "ram"), "--data-root", str(synthetic_root)]
    script.main([*argv, "--out", str(out)])
    written = json.loads(out.read_text())

    config = micro_config(synthetic_root)
    config.prompt.mode = "ram"
    config.prompt.ram.path = str(tmp_path / "ram")
    system = RASSSystem(config)
    source = build_source("ade20k", synthetic_root, "validation", num_classes=config.model.num_classes)
    e = config.eval
    _, batches = eval_batches(
        source, eval_resize(e), canvas=EvalCanvas(e.label_bucket, e.image_bucket), global_batch=1
    )
    batch = next(batches)  # the first image's padded canvas, as the evaluation step gets it
    name = batch["name"][0]
    assert len(written) == len(source) == 6
    assert written[image_id(name)] == system.tag(batch["image"])[0] != ""
    assert len({*written.values()}) > 1  # tags differ between images

    provider = PromptProvider("tags", lambda p: np.zeros((1, 1)), tags_file=out)
    assert provider.prompt(name) == clean_caption(f"{written[image_id(name)]}, ")
