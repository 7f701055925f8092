"""What a run leaves in its workdir besides checkpoints: the resolved config (config.json, config.<step>.json
on a resume with another config) and TensorBoard events that show each step once after a resume."""

import json
import struct
import time

from lqseg_jax.train.config import load_config
from lqseg_jax.train.loop import MetricWriter, write_run_config


def read_events(path):
    """The Event protos of one TensorBoard event file: TFRecord framing (uint64 length, uint32 length crc,
    payload, uint32 payload crc), each payload an Event."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (n,) = struct.unpack_from("<Q", data, at)
        events.append(Event.FromString(data[at + 12 : at + 12 + n]))
        at += 12 + n + 4
    return events


def tensorboard_view(logdir, tag):
    """{step: value} of `tag` as TensorBoard shows it: files read in name (time) order; a SessionLog.START
    event at step S (tensorboardX's purge_step) drops the values already read at steps >= S."""
    shown = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                shown = {s: v for s, v in shown.items() if s < event.step}
            for value in event.summary.value:
                if value.tag == tag:
                    shown.setdefault(event.step, []).append(value.simple_value)
    return shown


def test_resumed_run_shows_each_step_once_in_metrics_and_tensorboard(tmp_path):
    first = MetricWriter(tmp_path)
    for step in range(1, 9):  # the interrupted run logged up to 8; its last checkpoint is step 4
        first.write(step, {"loss": float(step)})
    first.close()
    time.sleep(1.1)  # event file names hold the second they were opened in (a real resume takes longer)
    resumed = MetricWriter(tmp_path, start_step=4)
    for step in range(5, 9):
        resumed.write(step, {"loss": 10.0 + step})
    resumed.close()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    expected = {1: [1.0], 2: [2.0], 3: [3.0], 4: [4.0], 5: [15.0], 6: [16.0], 7: [17.0], 8: [18.0]}
    assert tensorboard_view(tmp_path / "tb", "loss") == expected
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: [r["loss"]] for r in lines} == expected and len(lines) == 8


def test_config_json_at_start_and_per_resume_only_when_it_changes(tmp_path):
    config = load_config("configs/daformer.py:tiny", total_steps=40)
    assert write_run_config(tmp_path, config, 0) == tmp_path / "config.json"
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 40
    assert write_run_config(tmp_path, config, 20) == tmp_path / "config.json"  # same config: nothing new
    changed = load_config("configs/daformer.py:tiny", total_steps=40, log_every=5)
    assert write_run_config(tmp_path, changed, 20) == tmp_path / "config.20.json"
    assert write_run_config(tmp_path, changed, 30) == tmp_path / "config.20.json"  # in effect since 20
    assert write_run_config(tmp_path, config, 30) == tmp_path / "config.30.json"
    assert json.loads((tmp_path / "config.json").read_text())["log_every"] != 5
    assert json.loads((tmp_path / "config.20.json").read_text())["log_every"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.20.json", "config.30.json", "config.json"]
