"""Scripts given bad inputs end in one line `error: ...` naming the flag, file or key, with exit code 2,
and change nothing on disk; --debug shows the traceback. The cases fail before any model is built."""

import fcntl
import json
import os
import subprocess
import sys

import pytest

from lqseg_jax.cli import report_errors
from lqseg_jax.data_pipelines.sources import DataError
from lqseg_jax.train.config import ConfigError, load_config
from tests.train.test_multiprocess import env


def run(repo, *args):
    p = subprocess.run(
        [sys.executable, *args], cwd=repo, env=env(1), capture_output=True, text=True, timeout=300
    )
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[-1]


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_degrade_refuses_its_input_as_output(tmp_path, synthetic_root, repo):
    before = tree(synthetic_root)
    last = run(repo, "scripts/degrade.py", "--root", str(synthetic_root), "--out", str(synthetic_root))
    assert last == (
        f"error: --out {synthetic_root} is, lies inside or holds --root {synthetic_root}; writing there would "
        "change the input (expected a separate output folder)"
    )
    assert tree(synthetic_root) == before


def test_train_on_a_held_workdir_and_a_mistyped_key(tmp_path, repo):
    workdir = tmp_path / "run"
    workdir.mkdir()
    fd = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b'{"host": "elsewhere", "pid": 4242, "started": "today"}')
    try:
        last = run(
            repo, "scripts/train.py", "--config", "configs/daformer.py:tiny", "--workdir", str(workdir)
        )
    finally:
        os.close(fd)
    assert last.startswith(f"error: workdir {workdir} is in use by pid 4242 on host elsewhere (since today)")
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]

    other = tmp_path / "other"
    last = run(repo, "scripts/train.py", "--config", "configs/daformer.py:tiny", "--workdir", str(other),
               "--config.total_step=3")  # fmt: skip
    assert last.startswith("error: --config.total_step: the config has no field 'total_step'; did you mean "
                           "--config.total_steps")  # fmt: skip
    assert not other.exists()


def test_eval_on_a_mistyped_workdir_creates_nothing(tmp_path, repo):
    missing = tmp_path / "typo"
    last = run(repo, "scripts/eval.py", "--config", "configs/daformer.py:tiny", "--workdir", str(missing))
    assert last == f"error: workdir {missing} does not exist"
    assert not missing.exists()


def test_wrapper_prints_the_message_only_and_debug_shows_the_traceback(capsys, monkeypatch):
    @report_errors
    def main(argv=None):
        err = DataError("label /data/x.png is empty (0 bytes; expected a single-channel PNG)")
        err.add_note("grain: the note that used to be the last line")
        raise err

    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err
        == "error: label /data/x.png is empty (0 bytes; expected a single-channel PNG)\n"
    )
    monkeypatch.setenv("LQSEG_DEBUG", "1")
    with pytest.raises(DataError):
        main([])

    @report_errors
    def library_bug(argv=None):
        return {}["missing"]  # a KeyError raised outside our code keeps its traceback

    monkeypatch.delenv("LQSEG_DEBUG")
    with pytest.raises(KeyError):
        library_bug([])


def test_unknown_config_key_suggests_the_close_one():
    with pytest.raises(
        ConfigError,
        match=r"config\.ema\.decy: the config has no field 'ema\.decy'; did you mean config\.ema\.decay",
    ):
        load_config("configs/daformer.py:tiny", **{"ema.decy": 0.9})
    with pytest.raises(
        ConfigError, match=r"config\.lr: the config has no field 'lr'; did you mean config\.optimizer\.lr\?"
    ):
        load_config("configs/daformer.py:tiny", lr=0.1)  # the same field name in another section
    with pytest.raises(ConfigError, match=r"config file .*configs/nope\.py does not exist"):
        load_config("configs/nope.py")


def test_zero_byte_label_is_named_with_its_path(tmp_path):
    from lqseg_jax.data_pipelines import sources, synthetic

    root = synthetic.write_dataset(tmp_path, num_train=1, num_val=1, progress=False)
    label = root / "annotations" / "training" / "synth_00000.png"
    label.write_bytes(b"")
    with pytest.raises(
        DataError, match=rf"label {label} is empty \(0 bytes; expected a single-channel PNG\)"
    ):
        sources.ade20k_source(root, "training", num_classes=10)[0]


def test_converter_file_errors_name_the_file_and_advise_only_what_helps(tmp_path):
    from lqseg_jax.convert.common import CheckpointError, load_safetensors, torch_load

    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(
        CheckpointError, match=rf"{junk} could not be read by torch\.load.*pass --trust-pickle"
    ):
        torch_load(junk, trust_pickle=False)
    with pytest.raises(CheckpointError) as passed:
        torch_load(junk, trust_pickle=True)
    assert str(junk) in str(passed.value) and "--trust-pickle" not in str(passed.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b"{not json")
    with pytest.raises(CheckpointError, match=rf"{bad} is not a readable safetensors file"):
        load_safetensors(bad)


def test_half_an_array_record_shard_is_named(tmp_path):
    from lqseg_jax.data_pipelines import records, synthetic
    from lqseg_jax.data_pipelines.ade20k import prepare_ade20k

    root = synthetic.write_dataset(tmp_path / "ds", num_train=1, num_val=2, progress=False)
    prepare_ade20k(root, tmp_path / "rec", ["validation"], workers=1, progress=False)
    (shard,) = (tmp_path / "rec" / "validation").glob("*.array_record")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(
        DataError, match=rf"shard {shard} cannot be opened .*expected a complete ArrayRecord file"
    ):
        records.RecordSource(tmp_path / "rec" / "validation")


@pytest.mark.parametrize(
    "flag, expected",
    [
        (
            "--config.optimizer.lr=abc",
            "error: flag --config.optimizer.lr=abc: could not convert string to float: 'abc' (expected a number, "
            "like --config.optimizer.lr=0.0006)",
        ),
        (
            "--confg.total_steps=3",
            "error: unknown flag --confg.total_steps; did you mean --config.total_steps",
        ),
    ],
)
def test_flag_parsing_errors_name_the_flag_and_the_close_match(tmp_path, repo, flag, expected):
    workdir = tmp_path / "run"
    last = run(
        repo, "scripts/train.py", "--config", "configs/daformer.py:tiny", "--workdir", str(workdir), flag
    )
    assert last.startswith(expected), last
    assert not workdir.exists()


def test_print_config_prints_the_resolved_config_and_creates_nothing(tmp_path, repo):
    p = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "configs/demo.py:rass", "--config.total_steps=7",
         "--print_config", "--workdir", str(tmp_path / "run")],
        cwd=repo, env=env(1), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout)
    assert printed == json.loads(load_config("configs/demo.py:rass", total_steps=7).to_json_best_effort())
    assert printed["total_steps"] == 7 and printed["system"] == "rass"
    assert not (tmp_path / "run").exists()


def test_a_bad_image_or_label_in_prepared_records_is_named_with_its_record_and_shard(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from lqseg_jax.data_pipelines import records
    from lqseg_jax.data_pipelines.pipeline import with_origin
    from lqseg_jax.data_pipelines.transforms import Decode

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    label = png(np.full((4, 4), 200, np.uint8))
    image = png(np.zeros((4, 4, 3), np.uint8))
    meta = {"dataset": "ade20k", "split": "val", "num_classes": 10, "label_map": "identity"}
    records.write_split(tmp_path, "val", [("a.png", b"junk", label), ("b.png", image, label)], count=2,
                        num_shards=1, metadata=meta, progress=False)  # fmt: skip
    source = records.RecordSource(tmp_path / "val")
    (shard,) = (tmp_path / "val").glob("*.array_record")
    examples = with_origin(source).map(Decode(source.label_map, source.num_classes))  # as the pipelines read
    with pytest.raises(DataError, match=rf"corrupt or unreadable image a\.png \(record 0 of {shard}\)"):
        examples[0]
    with pytest.raises(DataError, match=rf"label of b\.png \(record 1 of {shard}\) has raw values \[200\]"):
        examples[1]
