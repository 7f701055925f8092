"""The RAM converter on a rass.pth-shaped state dict built from ram_ckpt_keys.txt's 1,290 names per tagger
(RAM and DAPE prefixes), at a narrow config with the real depths (2, 2, 18, 2) and 4,585 tags, so every
name is the real one; the file's full-size shapes of the loaded keys are checked against our full-size
model's shapes (abstract, no memory). fp16 tensors, as in rass.pth.
"""

import re

import numpy as np
import pytest
import torch
from flax import nnx

from lqseg_jax.convert.common import CheckpointError
from lqseg_jax.convert.ram import (
    DAPE_PREFIX,
    DAPE_REASON,
    RAM_PREFIX,
    convert_file,
    load_ram,
    read_tag_list,
    read_thresholds,
)
from lqseg_jax.models.ram import RAM, RAMConfig
from lqseg_jax.models.tracing import abstract_model
from tests.models.test_ram_parity import read_keys_file

NARROW = RAMConfig(
    image_size=96, embed_dim=4, num_heads=(1, 1, 1, 1), window_size=3,
    embed_width=8, hidden_size=8, head_heads=4, intermediate_size=8,
)  # fmt: skip


def torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Our parameters under their torch names and layouts (kernel -> weight transposed, scale -> weight)."""
    out = {}
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names, shape = [str(p) for p in path], tuple(leaf.shape)
        if names[-1] == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        if names[-1] in ("kernel", "scale"):
            names[-1] = "weight"
        out[".".join(names)] = shape
    return out


def fake_tag_files(tmp_path, n: int = 4585):
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(f"tag {i}" for i in range(n)))  # no trailing newline, as RAM's file
    thr = tmp_path / "thr.txt"
    thr.write_text("\n".join(str(0.65 + 0.3 * (i % 2)) for i in range(n)) + "\n")
    return tags, thr


def rass_like_state(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({prefixed key: fp16 tensor} for RAM and DAPE, RAM's USE tensors by unprefixed key)."""
    rng = np.random.default_rng(seed)
    shapes = torch_shapes(abstract_model(lambda: RAM(NARROW, rngs=nnx.Rngs(0))))
    rows = read_keys_file()
    one = {}
    for key, _, tag in rows:
        if tag == "USE":  # torch-like scales (unit norms, fan-in weights), so that the tags vary by image
            shape = shapes[key]
            if re.search(r"norm.*\.weight$|LayerNorm\.weight$", key):
                value = 1.0 + 0.1 * rng.normal(size=shape)
            elif len(shape) >= 2 and key != "label_embed":
                value = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))
            else:
                value = rng.normal(size=shape) * (1.0 if key == "label_embed" else 0.1)
            one[key] = torch.from_numpy(value.astype(np.float16))
        elif tag == "LORA":
            one[key] = (
                torch.zeros(3, 2, dtype=torch.float16) if key.endswith("lora_B") else torch.ones(2, 4).half()
            )
        elif tag in ("SKIP", "BUF"):
            one[key] = torch.from_numpy(rng.normal(size=(2,)).astype(np.float16))
    for key, _, tag in rows:
        if tag == "TIED":
            one[key] = one[key.replace("tag_encoder", "tagging_head")].clone()
    dape = {k: (v + 1 if k.endswith("lora_B") else v) for k, v in one.items()}  # DAPE's trained LoRA
    sd = {**{RAM_PREFIX + k: v for k, v in one.items()}, **{DAPE_PREFIX + k: v for k, v in dape.items()}}
    sd["backbone.feature_extractor.sd.unet.conv_in.weight"] = torch.zeros(
        2
    )  # other RASS keys: not the tagger's
    return sd, {k: v for k, v in one.items() if k in shapes}


def test_keys_file_shapes_fit_the_full_size_model():
    ours = torch_shapes(abstract_model(lambda: RAM(RAMConfig(), rngs=nnx.Rngs(0))))
    use = {k: s for k, s, t in read_keys_file() if t == "USE"}
    assert use == ours  # the 366 loaded keys, names and full-size shapes


def test_convert_rass_taggers(tmp_path):
    sd, ram = rass_like_state()
    tags, thr = fake_tag_files(tmp_path)
    report = convert_file("rass.pth", tmp_path / "ram", tags, thr, NARROW, state_dict=sd)
    assert report == {
        f"dape ({DAPE_REASON})": 1290,
        "tied tag_encoder copies (checked equal)": 32,
        "Tag2Text captioning (tag_encoder, text_decoder)": 801,  # 799 SKIP + 2 position_ids
        "tagging_head self-attention (deleted by RAM)": 0,
        "buffers (recomputed)": 35,
        "LoRA factors (lora_B == 0)": 56,
    }
    model, tag_list, thresholds = load_ram(tmp_path / "ram")
    assert tag_list == read_tag_list(tags, 4585) and tag_list[3] == "tag 3"
    np.testing.assert_array_equal(thresholds, read_thresholds(thr, 4585))
    np.testing.assert_array_equal(np.asarray(model.label_embed[...]), ram["label_embed"].float().numpy())
    qkv = model.visual_encoder.layers[2].blocks[17].attn.qkv.kernel[...]
    src = ram["visual_encoder.layers.2.blocks.17.attn.qkv.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(qkv), src)
    key = model.tagging_head.encoder.layer[1].crossattention.self.key.kernel[...]
    src = ram["tagging_head.encoder.layer.1.crossattention.self.key.weight"].float().numpy().T
    np.testing.assert_array_equal(np.asarray(key), src)


def test_convert_plain_ram_checkpoint(tmp_path):
    """ram_swin_large_14m.pth: no prefix, no LoRA, the head named vision_multi."""
    _, ram = rass_like_state(1)
    plain = {k.replace("tagging_head.", "vision_multi."): v for k, v in ram.items()}
    tags, thr = fake_tag_files(tmp_path)
    report = convert_file("ram_swin_large_14m.pth", tmp_path / "ram", tags, thr, NARROW, state_dict=plain)
    assert sum(report.values()) == 0
    model, _, _ = load_ram(tmp_path / "ram")
    np.testing.assert_array_equal(np.asarray(model.fc.bias[...]), ram["fc.bias"].float().numpy())


def test_converter_errors(tmp_path):
    sd, _ = rass_like_state()
    tags, thr = fake_tag_files(tmp_path)
    tied = dict(sd)
    tied[RAM_PREFIX + "tag_encoder.encoder.layer.1.output.dense.bias"] = torch.zeros(8, dtype=torch.float16)
    with pytest.raises(CheckpointError, match=r"tag_encoder.encoder.layer.1.output.dense.bias.*differs"):
        convert_file("rass.pth", tmp_path / "a", tags, thr, NARROW, state_dict=tied)
    lora = dict(sd)
    lora[RAM_PREFIX + "visual_encoder.layers.0.blocks.0.attn.qkv.lora_B"] = torch.ones(3, 2).half()
    with pytest.raises(CheckpointError, match=r"lora_B.*not zero"):
        convert_file("rass.pth", tmp_path / "b", tags, thr, NARROW, state_dict=lora)
    table = dict(sd)
    table[RAM_PREFIX + "visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(
        9, 1
    )
    with pytest.raises(CheckpointError, match=r"9 rows, expected .* = 25"):
        convert_file("rass.pth", tmp_path / "c", tags, thr, NARROW, state_dict=table)
    with pytest.raises(CheckpointError, match="neither"):
        convert_file("x.pth", tmp_path / "d", tags, thr, NARROW, state_dict={"foo": torch.zeros(1)})

    (tmp_path / "s").mkdir()
    short, _ = fake_tag_files(tmp_path / "s", 4584)
    with pytest.raises(ValueError, match="4584 lines, expected 4585"):
        convert_file("rass.pth", tmp_path / "e", short, thr, NARROW, state_dict=sd)
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(["0.65"] * 4584 + ["1.5"]))
    with pytest.raises(ValueError, match=r"line 4585 is 1.5, expected a float in \(0, 1\]"):
        read_thresholds(bad, 4585)
    bad.write_text("\n".join(["0.0"] + ["0.65"] * 4584))
    with pytest.raises(ValueError, match=r"line 1 is 0\.0"):
        read_thresholds(bad, 4585)
