"""Refign's evaluation and prediction protocols (refign.md section 9), driven by config.eval.

Evaluation (`evaluate_protocol`, `scripts/eval.py --protocol val|test`):
    val   config.eval.split with the config's eval fields, as training-time evaluation: for Refign-DAFormer
          on ACDC / Dark Zurich the image resized to 540x960 (PIL bilinear, antialiased) and the label with it
          (PIL nearest; eval.resize_labels), whole inference, logits at 540x960.
    test  refign's `test` stage: eval.test_split (default eval.split: ACDC / Dark Zurich test on their val
          split, RobotCar on its test split) with the labels at full resolution; the image as in val (540x960
          for DAFormer), the logits resized bilinearly (align_corners False, no antialias: x2 for 1080x1920
          labels) to the label's size before the argmax.
    Both then evaluate every eval.extra_sets entry (Dark Zurich: Nighttime Driving, 1080x1920 labels, and
    BDD100k-night, 720x1280), always with full-resolution labels and the same image resize (refign tests
    them only in its test stage, with that rule). HRDA* keeps full-resolution images and slides 1080x1080
    windows every 420 pixels (eval.mode "slide") for all of them. mIoU follows eval.present_classes_only:
    over the classes with ground-truth pixels (refign's `over_present_classes`: RobotCar), or over all 19,
    a class with union 0 scoring 0 (refign's default IoU: ACDC, Dark Zurich and the extra sets).

    Results: OUT/metrics.json, OUT/per_class_iou.txt and OUT/pictures/ for the main split (as before); each
    extra set in OUT/<name>/ alike; with extra sets also OUT/summary.json =
    {"protocol", "step", "sets": {"<split or name>": {"mIoU", "num_images", "split", "source"}}}.

Prediction (`predict_split`, `scripts/eval.py --predict`): every image of eval.predict_split (default "test":
ACDC test 2000 images, Dark Zurich test 151; unlabelled) of the evaluated dataset, resized as evaluation
resizes it, scores resized (bilinear) to the image's own size (1080x1920 for both) and argmaxed, written as
refign's predict stage writes them: OUT/preds/<Dataset>/<image file name> (8-bit train ids 0..18, the
Cityscapes trainId table) and OUT/color_preds/<Dataset>/<image file name> (the same ids as a palette PNG with
the Cityscapes colours), <Dataset> as refign names it (ACDC, DarkZurich, RobotCar), a non-PNG image name
getting the suffix .png. Both benchmark servers score train ids at 1920x1080: zip the preds/ACDC files for
ACDC (acdc.vision.ee.ethz.ch/submit); for Dark Zurich (CodaLab competition 3783, files matched by
<sequence>_frame_<frame>*.png) OUT/DarkZurich_<split>_submission.zip is written too, with the three top-level
folders that server requires (darkzurich_submission).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data_pipelines.sources import DataError
from ..data_pipelines.streams import eval_source
from ..data_pipelines.transforms import decode_image
from .evaluate import evaluate

PROTOCOLS = ("val", "test")
# refign's dataset class names, the folder names of its predictions (combined_data_module.py)
DATASET_NAMES = {
    "acdc": "ACDC",
    "darkzurich": "DarkZurich",
    "robotcar": "RobotCar",
    "cityscapes": "Cityscapes",
    "nighttimedriving": "NighttimeDriving",
    "bdd100k-night": "BDD100kNight",
}
EXTRA_SET_FIELDS = {"source", "root", "split", "options"}


def extra_set_source(config, name: str):
    """The labelled source of config.eval.extra_sets[name] (fields source, root, split, options)."""
    spec = config.eval.extra_sets[name]
    unknown = set(spec.keys()) - EXTRA_SET_FIELDS
    if unknown or not spec.get("source") or not spec.get("root"):
        raise ValueError(
            f"config.eval.extra_sets.{name}: expected fields source, root (and split, options), got "
            f"{sorted(spec.keys())}"
        )
    options = spec.get("options")
    return eval_source(
        config,
        spec.get("split") or "test",
        kind=spec.source,
        root=spec.root,
        options=options.to_dict() if options else None,
    )


def evaluate_protocol(trainer, state, out_dir: str | Path, protocol: str = "val", *, progress: bool = True):
    """{set name: summary} of the main split under `protocol` (module docstring) and of every extra set,
    their results written under out_dir; the main split's key is its split name."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    cfg, out_dir = trainer.config, Path(out_dir)
    e = cfg.eval
    split = e.split if protocol == "val" else (e.test_split or e.split)
    sets = {}  # name -> (source, split, out, resize_labels)
    sets[split] = (eval_source(cfg, split), split, out_dir, e.resize_labels if protocol == "val" else False)
    for name in e.extra_sets.keys():
        if name in sets:
            raise ValueError(f"config.eval.extra_sets.{name}: the name is the main split's")
        source = extra_set_source(cfg, name)
        sets[name] = (source, e.extra_sets[name].get("split") or "test", out_dir / name, False)
    results = {}
    for name, (source, set_split, out, resize_labels) in sets.items():
        results[name] = evaluate(
            trainer,
            state,
            out,
            progress=progress,
            source=source,
            split=set_split,
            resize_labels=resize_labels,
        )
        results[name]["source"], results[name]["split"] = source.description, set_split
    if len(sets) > 1 and jax.process_index() == 0:
        record = {
            "protocol": protocol,
            "step": int(state.step),
            "sets": {
                name: {k: r[k] for k in ("mIoU", "num_images", "split", "source")}
                for name, r in results.items()
            },
        }
        (out_dir / "summary.json").write_text(json.dumps(record, indent=2))
    return results


def check_predict_out(config, out_dir: str | Path) -> None:
    """Refuses a prediction folder that is or lies inside the evaluated dataset's folder (eval.root)."""
    root = Path(config.eval.root or config.data.root)
    o, r = Path(out_dir).resolve(), root.resolve()
    if o == r or r in o.parents:
        raise ValueError(
            f"--out {Path(out_dir).absolute()} is or lies inside the dataset folder {root.absolute()} "
            "(expected a folder outside it: the dataset is never written to)"
        )


def predict_split(trainer, state, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Writes the predictions of eval.predict_split (module docstring) under out_dir; refuses an out_dir
    that is or lies inside the dataset folder. Returns {"dataset", "split", "num_images", "preds",
    "color_preds"} (the two folders)."""
    from ..predict import Predictor

    cfg, out_dir = trainer.config, Path(out_dir)
    e = cfg.eval
    check_predict_out(cfg, out_dir)
    kind = e.source or cfg.data.source
    source = eval_source(cfg, e.predict_split)
    dataset = DATASET_NAMES.get(kind, kind)
    label_dir, colour_dir = out_dir / "preds" / dataset, out_dir / "color_preds" / dataset
    # the image's scale as evaluation resizes it, scores at the image's own size, no padding of the input
    predictor = Predictor(trainer, state, image_bucket=e.image_bucket or 1, output_bucket=1)
    pal = predictor.palette.reshape(-1).tolist()  # (768,) the P-mode palette
    names: list[str] = []  # output file name per input, in source order
    owner: dict[str, str] = {}  # output file name -> the image it came from

    def inputs():
        for i in range(len(source)):
            record = source[i]
            file_name = Path(record["name"]).with_suffix(".png").name
            if file_name in owner:
                raise DataError(
                    f"{source.description}: images {owner[file_name]} and {record['name']} would both be "
                    f"written as {file_name} (refign writes predictions by file name)"
                )
            owner[file_name] = record["name"]
            names.append(file_name)
            yield record["name"], decode_image(record["image"], record.get("image_path") or record["name"])

    label_dir.mkdir(parents=True, exist_ok=True)
    colour_dir.mkdir(parents=True, exist_ok=True)
    show = progress and jax.process_index() == 0
    bar = tqdm(total=len(source), desc=f"predict {e.predict_split}", unit="img", disable=not show)
    for k, ids in predictor.predict_many(inputs()):  # ids (h, w) uint8 train ids
        if jax.process_index() == 0:
            Image.fromarray(ids, mode="L").save(label_dir / names[k])
            colour = Image.fromarray(ids, mode="P")
            colour.putpalette(pal)
            colour.save(colour_dir / names[k])
        bar.update()
    bar.close()
    record = {
        "dataset": dataset,
        "split": e.predict_split,
        "num_images": len(names),
        "preds": str(label_dir),
        "color_preds": str(colour_dir),
    }
    if kind == "darkzurich" and jax.process_index() == 0:
        record["submission"] = str(out_dir / f"{dataset}_{e.predict_split}_submission.zip")
        darkzurich_submission(label_dir, names, Path(record["submission"]))
    return record


def darkzurich_submission(label_dir: Path, names: list[str], zip_path: Path) -> None:
    """The zip Dark Zurich's CodaLab server takes: top-level folders labelTrainIds/ (the train-id PNGs),
    labelTrainIds_invalid/ (the same: no pixel declared invalid, so UIoU = IoU) and confidence/ (uint16 PNGs,
    65535 = confidence 1 everywhere: only the server's average UIoU reads them), the files flat, named as
    the images. IoU, the number refign reports, comes from labelTrainIds alone."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for name in names:
            data = (label_dir / name).read_bytes()
            z.writestr(f"labelTrainIds/{name}", data)
            z.writestr(f"labelTrainIds_invalid/{name}", data)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            buf = io.BytesIO()
            Image.fromarray(np.full((h, w), 65535, np.uint16)).save(buf, format="PNG")
            z.writestr(f"confidence/{name}", buf.getvalue())
