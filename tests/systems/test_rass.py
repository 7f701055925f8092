"""RASS system: prompts, sliding-window stitching, one train step (what trains, what stays frozen), the
robustness-curve evaluation on a tiny run, and the full-size parameter counts against PyTorch references."""

import json
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from PIL import Image
from transformers import CLIPTextConfig as TorchCLIPConfig
from transformers import CLIPTextModel as TorchCLIP

from lqseg_jax.data_pipelines.pipeline import train_dataset
from lqseg_jax.data_pipelines.sources import build_source
from lqseg_jax.data_pipelines.streams import train_augment
from lqseg_jax.eval.robustness import robustness_curve
from lqseg_jax.models.clip_text import SD21_TEXT_ENCODER
from lqseg_jax.models.rass_backbone import OUT_STRIDES, slide_features, slide_windows
from lqseg_jax.models.sd_unet import SD21_BASE_UNET
from lqseg_jax.models.sd_vae import SD21_BASE_VAE
from lqseg_jax.models.tracing import abstract_model
from lqseg_jax.systems.prompts import PromptProvider, clean_caption
from lqseg_jax.systems.rass import RASSSystem, model_config
from lqseg_jax.train.config import load_config
from lqseg_jax.train.mesh import path_name
from lqseg_jax.train.optim import decay_mask, lr_multipliers
from lqseg_jax.train.trainer import Trainer
from tests.models.test_mask2former_parity import detectron2_sem_seg_head
from tests.models.test_sd_lora import rass_reference_groups
from tests.systems.test_rass_convert import TorchBottleneck, micro_rass_config

pytestmark = pytest.mark.usefixtures("fast_compile")


# ------------------------------------------------------------------------------------------------ prompts


def test_caption_cleanup_is_rass_encode_prompt():
    # ras.py encode_prompt: strip("[] ,"), drop "'", commas -> spaces (RAM tags joined with ", ")
    assert clean_caption("sky, tree, road, ") == "sky  tree  road"
    assert clean_caption("['sky', 'tree'], ") == "sky  tree"
    assert clean_caption(", ") == ""


def test_prompt_modes_cache_and_missing_id(tmp_path):
    calls = []

    def encode(prompt):
        calls.append(prompt)
        return np.full((3, 2), len(calls), np.float32)

    tags = tmp_path / "tags.json"
    tags.write_text(json.dumps({"ADE_val_1": "sky, tree", "ADE_val_2": "road", "ADE_val_3": "sky, tree"}))
    p = PromptProvider("tags", encode, tags_file=tags, suffix="", cache_size=2)
    names = ["x/ADE_val_1.jpg", "ADE_val_2.png", "ADE_val_3.jpg", "ADE_val_1.jpg"]
    emb = p(names)
    assert emb.shape == (4, 3, 2) and emb.dtype == np.float32
    assert calls == ["sky  tree", "road"]  # one encoder call per distinct prompt
    np.testing.assert_array_equal(emb[0], emb[2])
    np.testing.assert_array_equal(emb[0], emb[3])
    p(["ADE_val_1.jpg"])
    assert len(calls) == 2
    with pytest.raises(KeyError, match=r"image id 'ADE_val_9'.*tags\.json"):
        p(["ADE_val_9.jpg"])

    fixed = PromptProvider("fixed", encode, text="a photo, of things", suffix="high quality", cache_size=2)
    assert fixed.prompt("anything.jpg") == "a photo  of things  high quality"
    fixed(["a", "b", "c"])
    assert calls[-1] == "a photo  of things  high quality" and len(calls) == 3
    assert PromptProvider("empty", encode).prompt("z.png") == ""

    lru = PromptProvider("fixed", encode, text="q")
    lru.cache_size = 1
    lru._cache.clear()
    for text in ("a", "b", "a"):
        lru.text = text
        lru(["img"])
    assert calls[-3:] == ["a", "b", "a"]  # "a" was evicted by "b"
    with pytest.raises(ValueError, match="needs a tags file"):
        PromptProvider("tags", encode)
    with pytest.raises(ValueError, match="prompt mode must be one of"):
        PromptProvider("dape", encode)


# ------------------------------------------------------------------------------------- sliding windows


class Patches(nnx.Module):
    """A stand-in feature extractor: one stride-s patch conv per output feature, plus a key-dependent
    offset, so that every window's output (and its key) can be recomputed directly."""

    def __init__(self, rngs):
        self.convs = nnx.List(
            [nnx.Conv(3, 5, (s, s), strides=(s, s), rngs=rngs) for s in OUT_STRIDES.values()]
        )

    def __call__(self, x, text_emb, key):
        noise = jax.random.normal(key, ())
        return {
            name: conv(x) + noise + text_emb.mean()
            for (name, _), conv in zip(OUT_STRIDES.items(), self.convs, strict=True)
        }


@pytest.mark.parametrize("hw", [(64, 128), (64, 96), (96, 64)])
def test_slide_features_stitch_and_average(hw):
    h, w = hw
    extractor = Patches(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, h, w, 3)), jnp.float32)
    text = jnp.ones((2, 4, 3))
    key = jax.random.key(3)
    out = nnx.jit(slide_features)(extractor, x, text, key)
    crop, windows = slide_windows(h, w)
    assert crop == min(h, w) and len(windows) == 2
    for name, s in OUT_STRIDES.items():
        total = np.zeros((2, h // s, w // s, 5))
        count = np.zeros((h // s, w // s))
        for k, (y, x0) in enumerate(windows):  # each window computed on its own, then placed by hand
            f = np.asarray(
                extractor(x[:, y : y + crop, x0 : x0 + crop], text, jax.random.fold_in(key, k))[name]
            )
            total[:, y // s : (y + crop) // s, x0 // s : (x0 + crop) // s] += f
            count[y // s : (y + crop) // s, x0 // s : (x0 + crop) // s] += 1
        if hw == (64, 128):
            assert count.max() == 1  # windows side by side: a concatenation
        else:
            assert count.max() == 2  # overlap in the middle: the average of both windows
        np.testing.assert_allclose(
            np.asarray(out[name]), total / count[None, :, :, None], rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="does not map onto"):
        slide_features(extractor, jnp.zeros((1, 40, 48, 3)), text[:1], key)


# ------------------------------------------------------------------------------ training and evaluation


def micro_config(root) -> ml_collections.ConfigDict:
    """The micro RASS on the session's synthetic scenes, 64 px crops, degradation off (the train step here
    checks what trains; the degradation has its own tests)."""
    c = micro_rass_config()
    c.degradation.enabled = False
    c.data.root = str(root)
    c.data.synthetic.enabled = False
    c.data.crop = (64, 64)
    c.data.num_threads = 1
    c.eval.num_pictures = 2
    return c


TRAINABLE_PATTERNS = ("lora_A", "lora_B", "sd.unet.conv_in.", "feature_projections.", "sem_seg_head.")


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(jax.device_get(state))}


@pytest.fixture(scope="module")
def trained(synthetic_root):
    """A micro RASS trainer, its initial state (host copies) and the state after one train step."""
    config = micro_config(synthetic_root)
    trainer = Trainer(config)
    # as Trainer.init_state does for pretrained weights: build on the host, place in the state shardings
    model = trainer._new_model()
    model.train()
    _, params, rest = nnx.split(model, trainer.system.trainable, ...)
    sh = trainer.state_sharding
    params, rest = jax.device_put((params, rest), (sh.params, sh.rest))
    state = jax.jit(trainer._state_from_parts, out_shardings=sh)(params, rest)
    before = _flat(state.params), _flat(state.rest)
    source = build_source("ade20k", synthetic_root, "training", num_classes=config.model.num_classes)
    dataset = train_dataset(
        source, train_augment(config.data), seed=0, global_batch=config.batch_size, num_threads=1
    )
    batch = trainer.device_batch(next(iter(dataset)))
    state, metrics = trainer.train_step(state, batch, trainer.step_rng(0))
    return trainer, state, before, batch, jax.device_get(metrics)


def test_train_step_updates_only_the_trainable_set(trained):
    _, state, (params0, rest0), batch, metrics = trained
    assert batch["text_emb"].shape == (8, 77, 16) and batch["text_emb"].dtype == jnp.float32
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    params1, rest1 = _flat(state.params), _flat(state.rest)
    assert all(any(p in name for p in TRAINABLE_PATTERNS) for name in params1), sorted(params1)[:5]
    kinds = {p: [n for n in params1 if p in n] for p in TRAINABLE_PATTERNS}
    assert all(kinds.values()), {p: len(v) for p, v in kinds.items()}
    # Every trainable leaf moved (LoRA A through weight decay at step 1, its gradient being 0 while B = 0),
    # except the mid block's self-attention q/k adapters: at 64 px the mid block sees one token, whose
    # attention weight is 1 whatever q and k, so their gradient is exactly 0.
    unchanged = [n for n in params1 if np.array_equal(params1[n], params0[n])]
    mid_qk = [n for n in params1 if "mid_block" in n and re.search(r"\.attn1\.to_[qk]\.lora_B", n)]
    assert len(mid_qk) == 2 and sorted(unchanged) == sorted(mid_qk), unchanged[:10]

    frozen = [n for n in rest1 if n.endswith(("kernel", "bias", "scale", "embedding"))]
    assert any(n.startswith("backbone.feature_extractor.sd.vae.") for n in frozen)
    assert any("base_layer" in n for n in frozen)  # UNet base weights under the LoRA layers
    assert not any(any(p in n for p in TRAINABLE_PATTERNS) for n in frozen)
    changed = [n for n in frozen if not np.array_equal(rest1[n], rest0[n])]
    assert not changed, changed[:10]


def test_robustness_curve_on_a_tiny_run(trained, tmp_path):
    trainer, state, *_ = trained
    record = robustness_curve(trainer, state, tmp_path, presets=("light",), seed=5, progress=False)
    assert set(record["mIoU"]) == {"clean", "light"} and record["num_images"] == 6 and record["seed"] == 5
    assert all(0.0 <= v <= 100.0 for v in record["mIoU"].values())
    assert json.loads((tmp_path / "robustness.json").read_text()) == record
    with Image.open(tmp_path / "robustness.png") as im:
        assert im.size == (640, 400)
    for name in ("clean", "light"):
        assert json.loads((tmp_path / name / "metrics.json").read_text())["num_images"] == 6
        assert len(list((tmp_path / name / "pictures").glob("*.png"))) == 2
    # The pictures show what the network saw: the degraded input in the left panel under a preset.
    for clean_png in (tmp_path / "clean" / "pictures").glob("*.png"):
        clean, light = (
            np.asarray(Image.open(d / "pictures" / clean_png.name))
            for d in (tmp_path / "clean", tmp_path / "light")
        )
        w = clean.shape[1] // 3
        assert not np.array_equal(clean[:, :w], light[:, :w])
        np.testing.assert_array_equal(clean[:, 2 * w :], light[:, 2 * w :])  # the same ground truth


# ------------------------------------------------------------------------------------------ full size


def _torch_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lora_count(torch_unet, rank: int) -> int:
    """peft LoRA factor sizes for RASS's stage-2 targets: Linear r (in + out), Conv r (in k k + out)."""
    modules = dict(torch_unet.named_modules())
    total = 0
    for name in rass_reference_groups(torch_unet):
        m = modules[name]
        if isinstance(m, torch.nn.Linear):
            total += rank * (m.in_features + m.out_features)
        else:
            total += rank * (m.in_channels * math.prod(m.kernel_size) + m.out_channels)
    return total


def test_full_config_parameter_counts_match_pytorch_references():
    import importlib.util

    from tests.systems.test_rass_convert import REPO

    spec = importlib.util.spec_from_file_location("count_params", REPO / "scripts" / "count_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = load_config("configs/rass.py")
    ours = module.count(config)

    mc = model_config(config)
    public = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        unet = TorchUNet(**public(SD21_BASE_UNET))
        vae = TorchVAE(**public(SD21_BASE_VAE))
        text = TorchCLIP(TorchCLIPConfig(**SD21_TEXT_ENCODER))
        proj = [TorchBottleneck(c, 512, 128, 32) for c in mc.feature_dims]
        head = detectron2_sem_seg_head(mc.head)
    lora = _lora_count(unet, 4)
    n_unet, n_vae_enc = _torch_count(unet), _torch_count(vae.encoder) + _torch_count(vae.quant_conv)
    n_proj, n_head, n_text = sum(_torch_count(p) for p in proj), _torch_count(head), _torch_count(text)
    conv_in = _torch_count(unet.conv_in)
    expected_total = n_unet + lora + n_vae_enc + n_text + n_proj + n_head
    expected_trainable = lora + conv_in + n_proj + n_head
    print(
        f"\nRASS full size: UNet {n_unet:,} + LoRA {lora:,}, VAE encoder {n_vae_enc:,}, CLIP {n_text:,}, "
        f"projections {n_proj:,}, head {n_head:,}; conv_in {conv_in:,} -> total {expected_total:,}, "
        f"trainable {expected_trainable:,} (ours {ours})"
    )
    assert ours == {"total": expected_total, "trainable": expected_trainable}
    assert round(expected_trainable / 1e6, 1) == 27.9  # the paper's Table 1 trainable count


def test_optimizer_groups_follow_detectron2():
    """lr x0.1 for every backbone parameter; weight decay 0 exactly for the parameters of norm layers and
    nn.Embedding modules (detectron2 build_optimizer), judged here by module type, not by name."""
    system = RASSSystem(micro_rass_config())  # the module names of the full model, smaller
    model = abstract_model(lambda: system.build_model(nnx.Rngs(0)))
    _, params, _ = nnx.split(model, system.trainable, ...)
    o = load_config("configs/rass.py").optimizer  # the released recipe (tiny trains all at one rate)
    decay = {
        path_name(p): v
        for p, v in jax.tree_util.tree_flatten_with_path(decay_mask(params, o.no_decay, False))[0]
    }
    mult = {
        path_name(p): v
        for p, v in jax.tree_util.tree_flatten_with_path(lr_multipliers(params, o.lr_mults))[0]
    }
    no_decay_modules = set()
    for path, module in nnx.iter_graph(model):
        if isinstance(module, nnx.GroupNorm | nnx.LayerNorm | nnx.Embed):
            no_decay_modules.add(".".join(map(str, path)))
    for name, d in decay.items():
        assert d == (name.rsplit(".", 1)[0] not in no_decay_modules), name
        assert mult[name] == (0.1 if name.startswith("backbone.") else 1.0), name
    assert "sem_seg_head.pixel_decoder.transformer.level_embed" in decay  # an nn.Parameter: decayed
    assert decay["sem_seg_head.pixel_decoder.transformer.level_embed"]
    assert not decay["sem_seg_head.pixel_decoder.input_proj.0.1.scale"]  # GroupNorm inside a Sequential
