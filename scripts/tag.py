"""Writes the RAM tags of a dataset split to a tags file, for prompt mode "tags" (precomputed RASS prompts).

    python scripts/tag.py --config configs/rass.py:paper --ram converted/rass/ram --split validation \\
        --data-root data/ADEChallengeData2016 --out tags/ade_val.json

Each image goes through the config's evaluation resize and padding (configs/rass.py:paper: short side 512,
zeros to a multiple of 8), one image per batch, and the converted tagger (`scripts/convert.py ram`, or OUT/ram
of `convert.py rass --tag-list --thresholds`) tags the whole padded image as prompt mode "ram" does in
evaluation. Output: JSON {image id (file stem): "tag1, tag2, ..."} in tag-list order. Training tags cannot
be precomputed exactly: RASS tags each augmented crop.
"""

import argparse
import json
from pathlib import Path

import jax
from tqdm.auto import tqdm

from lqseg_jax.cli import add_debug_flag, report_errors, setup_logging
from lqseg_jax.data_pipelines.pipeline import eval_batches
from lqseg_jax.data_pipelines.sources import build_source
from lqseg_jax.data_pipelines.synthetic import ensure_data
from lqseg_jax.data_pipelines.transforms import EvalCanvas
from lqseg_jax.eval.evaluate import eval_resize
from lqseg_jax.systems import get_system
from lqseg_jax.systems.prompts import image_id
from lqseg_jax.train.config import load_config


def tag_split(config, split: str, out: str | Path, *, progress: bool = True) -> dict[str, str]:
    """Tags every image of `split` (config.data) and writes the JSON tags file `out`; returns its content."""
    if jax.process_count() != 1:
        raise ValueError(f"scripts/tag.py runs in one process; found {jax.process_count()}")
    system = get_system(config)
    if not hasattr(system, "tag"):
        raise ValueError(f"config system {config.system!r} has no RAM tagger (expected 'rass')")
    ensure_data(config)
    e = config.eval
    source = build_source(config.data.source, config.data.root, split, num_classes=config.model.num_classes)
    steps, batches = eval_batches(
        source, eval_resize(e), canvas=EvalCanvas(e.label_bucket, e.image_bucket), global_batch=1
    )
    tags: dict[str, str] = {}
    for batch in tqdm(batches, total=steps, desc=f"tagging {split}", disable=not progress):
        for name, text, valid in zip(batch["name"], system.tag(batch["image"]), batch["valid"], strict=True):
            if valid:
                tags[image_id(name)] = text
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tags, indent=1))
    return tags


@report_errors
def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="experiment config file[:variant] (its eval resize)")
    parser.add_argument(
        "--ram", default="", help="converted tagger folder (default: the config's prompt.ram)"
    )
    parser.add_argument("--split", default="", help="dataset split (default: config.eval.split)")
    parser.add_argument("--data-root", default="", help="dataset folder (default: config.data.root)")
    parser.add_argument("--out", required=True, help="tags file to write (JSON)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    setup_logging()
    config = load_config(args.config)
    config.prompt.mode = "ram"
    if args.ram:
        config.prompt.ram.path = args.ram
    if args.data_root:
        config.data.root = args.data_root
    split = args.split or config.eval.split
    tags = tag_split(config, split, args.out)
    print(f"{len(tags)} images of {split} tagged -> {args.out}")


if __name__ == "__main__":
    main()
