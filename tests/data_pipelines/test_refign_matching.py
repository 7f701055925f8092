"""Matching datasets and RobotCar pairs: the .mat (HDF5) reader, MegaDepth pair sampling against a
restatement of refign's, the test csvs, and prepare_data with a file missing."""

import importlib.util
import io
import re

import h5py
import numpy as np
import pytest
from PIL import Image

from lqseg_jax.data_pipelines import refign_matching as rm
from lqseg_jax.data_pipelines import refign_sources as rs
from lqseg_jax.data_pipelines.records import RecordSource
from lqseg_jax.data_pipelines.sources import DataError


def put(path, seed=0, size=(6, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def main_error(main, argv, capsys) -> str:
    """prepare_data's error: the DataError itself, or its line on stderr under the scripts' error wrapper
    (exit code 2)."""
    try:
        main(argv)
    except DataError as e:
        return str(e)
    except SystemExit as e:
        assert e.code == 2
        return capsys.readouterr().err
    raise AssertionError(f"prepare_data {argv} did not fail")


def prepare_main(repo):
    spec = importlib.util.spec_from_file_location("prepare_data", repo / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_mat(path, ref, img):
    """MATLAB v7.3 char arrays: HDF5 uint16 character codes in a (n, 1) column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["im_i_path"] = np.array([[ord(c)] for c in ref], np.uint16)
        f["im_j_path"] = np.array([[ord(c)] for c in img], np.uint16)
        f["pt_i"] = np.zeros((2, 5))


def test_robotcar_pairs_from_mat_files(tmp_path, repo, capsys):
    root = tmp_path / "RobotCar"
    pairs = [
        ("overcast-reference/rear/1417176458999821.jpg", "night/rear/1418756721422679.jpg"),
        ("overcast-reference/rear/1417177821589597.jpg", "dusk/rear/1416590035279396.jpg"),
    ]
    for k, (ref, img) in enumerate(pairs):
        write_mat(root / f"correspondence_data/correspondence_run1_overcast-15_run2_{k}.mat", ref, img)
        put(root / "images" / ref, k)
        put(root / "images" / img, k + 5)
    assert (
        rs.read_mat_pair(root / "correspondence_data/correspondence_run1_overcast-15_run2_1.mat") == pairs[1]
    )
    got = rs.robotcar_pairs(root)
    assert [(e.reference, e.image) for e in got] == [
        (root / "images" / r, root / "images" / i) for r, i in pairs
    ]
    put(root / "segmented_images/training/imgs/a.png", 1)
    anno = root / "segmented_images/training/annos/a.png"
    anno.parent.mkdir(parents=True)
    Image.fromarray(np.full((6, 8), 26, np.uint8)).save(anno)  # car
    main = prepare_main(repo)
    main(
        [
            "robotcar",
            "--src",
            str(root),
            "--out",
            str(tmp_path / "out"),
            "--splits",
            "train,pairs",
            "--no-progress",
        ]
    )
    assert set(
        np.unique(np.asarray(Image.open(io.BytesIO(RecordSource(tmp_path / "out" / "train")[0]["label"]))))
    ) == {13}
    rec = RecordSource(tmp_path / "out" / "pairs")[1]
    assert rec["reference"] == (root / "images" / pairs[1][0]).read_bytes() and rec["label"] == b""
    (root / "images" / pairs[0][1]).unlink()
    argv = [
        "robotcar",
        "--src",
        str(root),
        "--out",
        str(tmp_path / "o2"),
        "--splits",
        "pairs",
        "--no-progress",
    ]
    assert "1418756721422679.jpg is missing" in main_error(main, argv, capsys)


def refign_sample_new_items(infos, num, seed=400):
    """refign megadepth.py sample_new_items (two views, info not in memory) restated."""
    items = []
    for info in infos:
        valid = (info["image_paths"] != None) & (info["depth_paths"] != None)  # noqa: E711
        paths = info["image_paths"][valid]
        points = info["points3D_id_to_2D"][valid]
        mat = info["overlap_matrix"][valid][:, valid]
        pairs = np.stack(np.where((mat > 0.3) & (mat <= 1.0)), -1)
        if len(pairs) > num:
            pairs = pairs[np.random.RandomState(seed).choice(len(pairs), num, replace=False)]
        for i, j in pairs:
            keys = list(points[i].keys() & points[j].keys())
            items.append(
                {"image_path1": paths[i], "image_path2": paths[j],
                 "m1": [points[i][k] for k in keys], "m2": [points[j][k] for k in keys]}
            )  # fmt: skip
    np.random.RandomState(seed).shuffle(items)
    return items


def make_scene(root, scene, n, seed, suffix):
    rng = np.random.default_rng(seed)
    paths = np.array([f"Undistorted_SfM/{scene}/images/{k:04d}.jpg" for k in range(n)], object)
    depths = np.array([f"phoenix/S6/{scene}/dense0/depths/{k:04d}.h5" for k in range(n)], object)
    paths[1], depths[3] = None, None  # invalid images
    overlap = rng.uniform(0, 1, (n, n))
    pts = np.empty(n, object)
    for k in range(n):
        ids = rng.choice(40, 15, replace=False)
        pts[k] = {int(i): (float(rng.uniform(0, 8)), float(rng.uniform(0, 6))) for i in ids}
    info = {"image_paths": paths, "depth_paths": depths, "overlap_matrix": overlap, "points3D_id_to_2D": pts}
    (root / "scene_info").mkdir(parents=True, exist_ok=True)
    np.savez(root / "scene_info" / f"{scene}{suffix}", **info)
    for k, p in enumerate(paths):
        if p is not None:
            put(root / p, k)
    return info


def test_megadepth_pairs_match_refign_sampling(tmp_path, monkeypatch, repo):
    root = tmp_path / "MegaDepth"
    infos = [make_scene(root, "0001", 7, 0, ".0.npz"), make_scene(root, "0015", 6, 1, ".npz")]  # both names
    (tmp_path / "train_scenes_MegaDepth.txt").write_text("0001\n0015\n")
    monkeypatch.setitem(rm.MEGADEPTH_PAIRS_PER_SCENE, "train", 5)
    got = rm.megadepth_pairs(root, "train", scene_list=tmp_path / "train_scenes_MegaDepth.txt")
    want = refign_sample_new_items(infos, 5)
    assert len(got) == len(want) == 10
    for g, w in zip(got, want, strict=True):
        assert g.reference == root / w["image_path1"] and g.image == root / w["image_path2"]
        rows = sorted(
            tuple(r) for r in np.concatenate([np.float32(w["m1"]), np.float32(w["m2"])], 1).tolist()
        )
        assert sorted(tuple(r) for r in g.matches.tolist()) == rows
    (tmp_path / "val.txt").write_text("0001\n0099\n")
    with pytest.raises(DataError, match=r"0099.0.npz \(or 0099.npz\) is missing.*expected 2 scene files"):
        rm.megadepth_pairs(root, "val", scene_list=tmp_path / "val.txt")
    assert len(rm.megadepth_pairs(root, "val", scene_list=tmp_path / "val.txt", skip_missing_scenes=True)) > 0


def write_csv(path, images, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["scene,source_image,target_image,XA,YA,XB,YB"]
    for scene, src, trg in rows:
        lines.append(f"{scene},{src},{trg},1.5;2,3;4,5;6,7;8.25")
        sub = "." if scene == "/" else scene
        put(images / sub / src, 1)
        put(images / sub / trg, 2)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("kind", ["megadepth", "robotcar-matching"])
def test_matching_test_csv_and_prepare_with_a_missing_file(tmp_path, monkeypatch, kind, repo, capsys):
    root = tmp_path / "data"
    if kind == "megadepth":
        csv_path, images = root / "Test/test1600Pairs.csv", root / "Test/test1600Pairs"
        rows = [("0015", "1.jpg", "2.jpg"), ("/", "3.jpg", "4.jpg")]
        monkeypatch.setitem(rm.EXPECTED, "megadepth", {"test": 2})
    else:
        csv_path, images = root / "test6511.csv", root / "images"
        rows = [("overcast-reference", "1417176458999821.jpg", "1418756721422679.jpg")] * 2
        monkeypatch.setitem(rm.EXPECTED, "robotcar-matching", {"test": 2})
    write_csv(csv_path, images, rows)
    main = prepare_main(repo)
    main([kind, "--src", str(root), "--out", str(tmp_path / "out"), "--splits", "test", "--no-progress"])
    rec = RecordSource(tmp_path / "out" / "test")[1]
    np.testing.assert_array_equal(
        rm.decode_matches(rec["matches"]), np.float32([[1.5, 3, 5, 7], [2, 4, 6, 8.25]])
    )  # (x_ref, y_ref, x, y) = (XA, YA, XB, YB)
    sub = "." if rows[1][0] == "/" else rows[1][0]
    assert rec["image"] == (images / sub / rows[1][2]).read_bytes()
    assert rec["reference"] == (images / sub / rows[1][1]).read_bytes()
    (images / sub / rows[1][2]).unlink()
    argv = [kind, "--src", str(root), "--out", str(tmp_path / "o2"), "--splits", "test", "--no-progress"]
    error = main_error(main, argv, capsys)
    assert re.search(rf"{re.escape(rows[1][2])} is missing.*expected 2", error), error


def test_match_decode_resizes_and_scales_points():
    def png(h, w, seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            buf, "PNG"
        )
        return buf.getvalue()

    matches = np.float32([[10, 20, 30, 40], [0, 0, 99.5, 49.5]])
    record = {
        "name": "p",
        "image": png(50, 100, 0),
        "reference": png(40, 20, 1),
        "matches": rm.encode_matches(matches),
    }
    out = rm.MatchDecode((75, 75))(record)
    assert out["image"].shape == out["reference"].shape == (75, 75, 3)
    # refign: x *= dims[1] / w, y *= dims[0] / h, per image (reference 20x40 -> 75x75, target 100x50 -> 75x75)
    want = np.float32(
        [[10 * 75 / 20, 20 * 75 / 40, 30 * 75 / 100, 40 * 75 / 50], [0, 0, 99.5 * 0.75, 49.5 * 1.5]]
    )
    np.testing.assert_allclose(out["matches"], want, rtol=1e-6)
    plain = rm.MatchDecode()(record)
    np.testing.assert_array_equal(plain["matches"], matches)
    assert plain["reference"].shape == (40, 20, 3)
