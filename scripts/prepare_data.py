"""Prepares datasets as grain-readable ArrayRecord files (format: lqseg_jax/data_pipelines/records.py).

    python scripts/prepare_data.py ade20k --src ADEChallengeData2016.zip --out data/ade20k_records
    python scripts/prepare_data.py ade20k --src data/RealLQ --out data/reallq_records --splits validation

Refign's datasets (lqseg_jax/data_pipelines/refign_sources.py; each split's count is checked):
    python scripts/prepare_data.py cityscapes --src data/Cityscapes --out data/cityscapes_records
    python scripts/prepare_data.py acdc --src data/ACDC --out data/acdc_records
    python scripts/prepare_data.py darkzurich --src data/DarkZurich --out data/darkzurich_records \\
        --pair-list refign/data_modules/datasets/lists/zurich_dn_pair_train.csv
    python scripts/prepare_data.py nighttimedriving --src data/NighttimeDrivingTest --out data/ntd_records
    python scripts/prepare_data.py bdd100k-night --src data/bdd100k --out data/bdd_night_records \\
        --night-list refign/data_modules/datasets/lists/images_trainval_night_correct_filenames.txt
    python scripts/prepare_data.py robotcar --src data/RobotCar --out data/robotcar_records
    python scripts/prepare_data.py megadepth --src data/MegaDepth --out data/megadepth_records \\
        --train-scenes refign/data_modules/datasets/lists/train_scenes_MegaDepth.txt \\
        --val-scenes refign/data_modules/datasets/lists/validation_scenes_MegaDepth.txt
    python scripts/prepare_data.py robotcar-matching --src data/RobotCar --out data/robotcar_matching_records

Writes OUT/<split>/records.json and OUT/<split>/<split>-*.array_record per split, labels already mapped to
detectron2 ids (raw - 1, 0 -> 255) for ADE20K, to Cityscapes train ids for Refign's datasets, whose splits
also get manifest.json (image, label, reference, for matching pairs the number of matches, per record,
relative to --src). Point config.data.root at OUT: build_source uses the records for a split that has
them. Re-running replaces a split atomically.
"""

import argparse
import os

from lqseg_jax.cli import add_debug_flag, check_output_outside_input, report_errors, setup_logging
from lqseg_jax.data_pipelines import refign_matching, refign_sources
from lqseg_jax.data_pipelines.ade20k import prepare_ade20k

REFIGN_HELP = {
    "cityscapes": "Cityscapes (leftImg8bit/ and gtFine/ extracted into one folder); train also gets the "
    "rare-class statistics",
    "acdc": "ACDC (rgb_anon/ and gt/ extracted into one folder); image + reference (+ label) per record",
    "darkzurich": "Dark Zurich (rgb_anon/ and gt/); train pairs from --pair-list",
    "nighttimedriving": "Nighttime Driving test (NighttimeDrivingTest/ folder)",
    "bdd100k-night": "BDD100k-night: the 87 images of --night-list from the bdd100k/ folder",
    "robotcar": "RobotCar segmentation (segmented_images/{training,validation,testing}/{imgs,annos}) and "
    "the unlabelled pairs of correspondence_data/*.mat (split pairs; needs h5py)",
    "megadepth": "MegaDepth: train/val pairs from the D2-Net scene_info (--train-scenes, --val-scenes) and "
    "the 1600 test pairs (Test/test1600Pairs.csv)",
    "robotcar-matching": "RobotCar matching test: test6511.csv and images/",
}
REFIGN_OPTIONS = {"darkzurich": ("pair_list",), "bdd100k-night": ("night_list",), "acdc": ("conditions",)}


def _add_refign_parsers(sub) -> None:
    for name, help_text in REFIGN_HELP.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--src",
            required=True,
            help="the extracted dataset folder, a downloaded .zip, or a folder of the .zip files",
        )
        p.add_argument("--out", required=True, help="output folder (one subfolder per split)")
        p.add_argument(
            "--splits",
            default=",".join({**refign_sources.DEFAULT_SPLITS, **refign_matching.DEFAULT_SPLITS}[name]),
            help="comma-separated (default: %(default)s)",
        )
        p.add_argument(
            "--workers",
            type=int,
            default=min(8, os.cpu_count() or 1),
            help="decode/encode threads (%(default)s)",
        )
        p.add_argument(
            "--shard-size-mb", type=float, default=512, help="target shard size (default: %(default)s)"
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name in refign_sources.LISTERS:
            p.add_argument(
                "--no-count-check",
                dest="check_counts",
                action="store_false",
                help="accept a dataset whose split sizes differ from the published ones (e.g. the synthetic one)",
            )
        if name == "acdc":
            p.add_argument(
                "--conditions",
                type=lambda v: tuple(c for c in v.split(",") if c),
                default=tuple(refign_sources.ACDC_PER_CONDITION),
                help="comma-separated, each checked against its own counts (default: fog,night,rain,snow)",
            )
        if name == "darkzurich":
            p.add_argument(
                "--pair-list",
                help="your copy of refign's data_modules/datasets/lists/zurich_dn_pair_train.csv",
            )
        if name == "bdd100k-night":
            p.add_argument(
                "--night-list",
                required=True,
                help="your copy of refign's data_modules/datasets/lists/images_trainval_night_correct_filenames.txt",
            )
        if name == "megadepth":
            for split, file in (
                ("train", "train_scenes_MegaDepth.txt"),
                ("val", "validation_scenes_MegaDepth.txt"),
            ):
                p.add_argument(
                    f"--{split}-scenes", help=f"your copy of refign's data_modules/datasets/lists/{file}"
                )
            p.add_argument(
                "--skip-missing-scenes",
                action="store_true",
                help="skip listed scenes without scene_info (as refign)",
            )


@report_errors
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    ade = sub.add_parser(
        "ade20k",
        help="ADEChallengeData2016.zip or a folder in its layout (ADE20K, degraded ADE20K-val, RealLQ)",
    )
    ade.add_argument(
        "--src", required=True, help="ADEChallengeData2016.zip, or a folder with images/ and annotations/"
    )
    ade.add_argument("--out", required=True, help="output folder (one subfolder per split)")
    ade.add_argument("--splits", default="training,validation", help="comma-separated (default: %(default)s)")
    ade.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode/encode threads (%(default)s)"
    )
    ade.add_argument(
        "--shard-size-mb", type=float, default=512, help="target shard size (default: %(default)s)"
    )
    ade.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_refign_parsers(sub)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    setup_logging()
    check_output_outside_input(args.out, args.src, src_flag="--src")
    splits = [s for s in args.splits.split(",") if s]
    if args.dataset == "ade20k":
        results = prepare_ade20k(
            args.src,
            args.out,
            splits,
            workers=args.workers,
            shard_size_mb=args.shard_size_mb,
            progress=not args.no_progress,
        )
    elif args.dataset in refign_matching.LISTERS:
        results = refign_matching.prepare_matching(
            args.dataset,
            args.src,
            args.out,
            splits,
            scene_lists={
                "train": getattr(args, "train_scenes", None),
                "val": getattr(args, "val_scenes", None),
            },
            skip_missing_scenes=getattr(args, "skip_missing_scenes", False),
            workers=args.workers,
            shard_size_mb=args.shard_size_mb,
            progress=not args.no_progress,
        )
    else:
        results = refign_sources.prepare(
            args.dataset,
            args.src,
            args.out,
            splits,
            workers=args.workers,
            shard_size_mb=args.shard_size_mb,
            progress=not args.no_progress,
            check_counts=args.check_counts,
            **{k: getattr(args, k) for k in REFIGN_OPTIONS.get(args.dataset, ())},
        )
    for split, meta in results.items():
        print(f"{split}: {meta['count']} examples in {len(meta['shards'])} shard(s) under {args.out}/{split}")


if __name__ == "__main__":
    main()
