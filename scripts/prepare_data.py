"""Prepares datasets as grain-readable ArrayRecord files (format: lqseg_jax/data_pipelines/records.py).

    python scripts/prepare_data.py ade20k --src ADEChallengeData2016.zip --out data/ade20k_records
    python scripts/prepare_data.py ade20k --src data/RealLQ --out data/reallq_records --splits validation

Writes OUT/<split>/records.json and OUT/<split>/<split>-*.array_record per split, labels already mapped to
detectron2 ids (raw - 1, 0 -> 255). Point config.data.root at OUT: build_source uses the records for a split
that has them. Re-running replaces a split atomically.
"""

import argparse
import os

from lqseg_jax.data_pipelines.ade20k import prepare_ade20k


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
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    results = prepare_ade20k(
        args.src,
        args.out,
        splits,
        workers=args.workers,
        shard_size_mb=args.shard_size_mb,
        progress=not args.no_progress,
    )
    for split, meta in results.items():
        print(f"{split}: {meta['count']} examples in {len(meta['shards'])} shard(s) under {args.out}/{split}")


if __name__ == "__main__":
    main()
