"""`scripts/convert.py rass` on a RASS-shaped checkpoint built here from PyTorch references at the tiny
config: diffusers UNet (peft-style stage-2 LoRA keys) and AutoencoderKL, transformers CLIPTextModel,
detectron2 BottleneckBlock projections and the detectron2 Mask2Former head skeleton, plus RAM/DAPE/JPEG
keys that must be skipped. The converted backbone reproduces the torch forward (VAE features -> UNet
up-block features -> nearest resize -> projections -> grouped sums) with the LoRA adapters active.
"""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from transformers import CLIPTextConfig as TorchCLIPConfig
from transformers import CLIPTextModel as TorchCLIP

from lqseg_jax.convert.common import CheckpointError
from lqseg_jax.convert.diffusers_sd import convert_unet, convert_vae, load_sd_component, save_component
from lqseg_jax.convert.rass import convert_rass
from lqseg_jax.models.tracing import abstract_model
from lqseg_jax.systems.prompts import byte_level_clip_tokenizer, write_byte_level_tokenizer
from lqseg_jax.systems.rass import RASSSystem, model_config
from lqseg_jax.train.config import load_config
from tests.models.test_mask2former_parity import detectron2_sem_seg_head
from tests.models.test_sd_lora import peft_lora_state, rass_reference_groups

REPO = Path(__file__).resolve().parents[2]
RANK, ALPHA = 4, 8.0
# rass.md section 1: res2 = P0(vae1), res3 = P1(vae3) + P4(up2) + P5(up3), res4 = P3(up1), res5 = P2(up0)
GROUPS = {"res2": ([0], 4), "res3": ([1, 4, 5], 8), "res4": ([3], 16), "res5": ([2], 32)}


pytestmark = pytest.mark.usefixtures("fast_compile")


def micro_rass_config() -> ml_collections.ConfigDict:
    """configs/rass.py:tiny narrowed further (one cross-attention block each way, one decoder layer): the
    same structure, compiles faster."""
    c = load_config("configs/rass.py:tiny")
    m = c.model
    m.unet = ml_collections.ConfigDict(
        dict(
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * 3,
            up_block_types=("UpBlock2D",) * 3 + ("CrossAttnUpBlock2D",),
            layers_per_block=1,
            attention_head_dim=1,
            cross_attention_dim=16,
            norm_num_groups=4,
            use_linear_projection=True,
        )
    )
    m.vae = ml_collections.ConfigDict(
        dict(
            down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
        )
    )
    m.text_encoder.hidden_size = 16
    m.text_encoder.intermediate_size = 32
    m.text_encoder.num_hidden_layers = 1
    m.projection = ml_collections.ConfigDict(dict(dim=32, norm_groups=4))
    m.head = ml_collections.ConfigDict(
        dict(
            conv_dim=32,
            mask_dim=32,
            enc_layers=1,
            enc_heads=2,
            enc_ffn_dim=32,
            hidden_dim=32,
            num_queries=8,
            dec_heads=2,
            dec_ffn_dim=32,
            dec_layers=1,
            train_num_points=64,
            max_targets=6,
        )
    )
    return c


class TorchBottleneck(torch.nn.Module):
    """detectron2 BottleneckBlock(norm="GN", stride 1), transcribed: detectron2 Conv2d = conv + `norm`."""

    def __init__(self, cin, cout, mid, groups):
        super().__init__()

        def conv(i, o, k):
            c = torch.nn.Conv2d(i, o, k, padding=k // 2, bias=False)
            c.norm = torch.nn.GroupNorm(groups, o)
            return c

        self.shortcut = conv(cin, cout, 1) if cin != cout else None
        self.conv1, self.conv2, self.conv3 = conv(cin, mid, 1), conv(mid, mid, 3), conv(mid, cout, 1)

    def forward(self, x):
        def run(c, t):
            return c.norm(F.conv2d(t, c.weight, None, 1, c.padding))

        out = F.relu(run(self.conv1, x))
        out = F.relu(run(self.conv2, out))
        out = run(self.conv3, out)
        return F.relu(out + (run(self.shortcut, x) if self.shortcut is not None else x))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Torch modules, the RASS-keyed state dict, and the merged-LoRA torch UNet."""
    config = micro_rass_config()
    mc = model_config(config)
    m = config.model
    torch.manual_seed(0)
    unet = TorchUNet(**m.unet.to_dict()).eval()
    vae = TorchVAE(**m.vae.to_dict(), up_block_types=("UpDecoderBlock2D",) * 4).eval()
    text = TorchCLIP(
        TorchCLIPConfig(**m.text_encoder.to_dict(), pad_token_id=0, bos_token_id=512, eos_token_id=513)
    ).eval()
    dims = mc.feature_dims
    d, groups = mc.projection_dim, mc.projection_groups
    projections = torch.nn.ModuleList(
        [torch.nn.Sequential(TorchBottleneck(c, d, d // 4, groups)) for c in dims]
    ).eval()
    head = detectron2_sem_seg_head(mc.head)
    with torch.no_grad():  # norm scales/biases off their defaults too, so that misplaced keys show
        for module in (unet, vae, text, projections):
            for name, p in module.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        for p in head.parameters():
            p.normal_()

    # peft layout of RASS's stage-2 adapters (rename written here), merged copy for the torch forward
    peft, merged = peft_lora_state(unet, rass_reference_groups(unet), std=0.1)
    unet.load_state_dict(merged)

    fe = "backbone.feature_extractor."
    sd = {f"{fe}sd.unet.{k}": v for k, v in peft.items()}
    sd.update({f"{fe}sd.vae.{k}": v for k, v in vae.state_dict().items()})  # decoder, post_quant_conv too
    sd.update(
        {
            f"{fe}sd.text_encoder.{k if k.startswith('text_model.') else 'text_model.' + k}": v
            for k, v in text.state_dict().items()
        }
    )
    sd.update({f"{fe}feature_projections.{k}": v for k, v in projections.state_dict().items()})
    sd.update({f"sem_seg_head.{k}": v for k, v in head.state_dict().items()})
    empty = torch.ones(mc.head.num_classes + 1)
    empty[-1] = mc.head.no_object_weight
    sd["criterion.empty_weight"] = empty
    sd[f"{fe}ram.visual_encoder.layers.0.blocks.0.attn.qkv.weight"] = torch.zeros(6, 2)
    sd[f"{fe}ram.label_embed"] = torch.zeros(3, 2)
    sd[f"{fe}dape.visual_encoder.patch_embed.proj.lora_A.weight"] = torch.zeros(2, 2)
    sd["backbone.jpeger.c_quantize.c_table"] = torch.zeros(8, 8)
    return dict(config=config, unet=unet, vae=vae, text=text, projections=projections, state_dict=sd)


def run_convert_script(argv):
    spec = importlib.util.spec_from_file_location("convert_script", REPO / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def torch_backbone(ref, image: np.ndarray, ctx: torch.Tensor, eps: np.ndarray) -> dict[str, np.ndarray]:
    """res2..res5 (NCHW) of the torch reference; posterior sample = mean + std * eps (eps given, NHWC)."""
    vae, unet, proj = ref["vae"], ref["unet"], ref["projections"]
    vae_feats, up_feats = [], []
    hooks = [b.register_forward_hook(lambda m, i, o: vae_feats.append(o)) for b in vae.encoder.down_blocks]
    hooks += [b.register_forward_hook(lambda m, i, o: up_feats.append(o)) for b in unet.up_blocks]
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(image)).latent_dist
        latent = (
            dist.mean + dist.std * torch.from_numpy(eps.transpose(0, 3, 1, 2))
        ) * vae.config.scaling_factor
        unet(latent, 1, ctx)
        feats = [vae_feats[1], vae_feats[3], *up_feats]
        h, w = image.shape[2:]
        out = {}
        for name, (indices, s) in GROUPS.items():
            out[name] = sum(proj[i](F.interpolate(feats[i], size=(h // s, w // s))) for i in indices).numpy()
    for hook in hooks:
        hook.remove()
    return out


def test_converted_checkpoint_reproduces_torch_backbone(reference, tmp_path):
    ref = reference
    torch.save({"model": ref["state_dict"], "iteration": 159999}, tmp_path / "rass.pth")
    out = tmp_path / "converted"
    config_file = tmp_path / "micro.py"  # the CLI takes a config file: one that returns the micro config
    config_file.write_text(
        "from tests.systems.test_rass_convert import micro_rass_config\n\n\n"
        "def get_config(arg=None):\n    return micro_rass_config()\n"
    )
    run_convert_script(
        ["rass", "--src", str(tmp_path / "rass.pth"), "--out", str(out), "--config", str(config_file)]
    )
    meta = json.loads((out / "model" / "meta.json").read_text())
    assert meta["format"] == "rass"
    assert meta["skipped"] == {
        "ram (RAM tagger)": 2,
        "dape (DAPE tagger)": 1,
        "jpeger (degradation JPEG)": 1,
        "sd.vae.decoder": sum(k.startswith("decoder.") for k in ref["vae"].state_dict()),
        "sd.vae.post_quant_conv": 2,
    }

    # evaluation set-up: the system loads OUT/model into the model and OUT/text_encoder for its prompts
    config = micro_rass_config()
    config.model.pretrained.path = str(out)
    write_byte_level_tokenizer(tmp_path / "tokenizer")  # stands in for SD 2.1's tokenizer folder
    config.model.tokenizer = str(tmp_path / "tokenizer")
    config.prompt.mode = "fixed"
    config.prompt.text = "sky, road, tree"
    system = RASSSystem(config)
    assert system.has_pretrained()
    model = abstract_model(lambda: system.build_model(nnx.Rngs(0)))
    assert "merged SCR" in system.load_pretrained(model)
    emb = system.host_batch({"image": np.zeros((2, 8, 8, 3), np.uint8)})["text_emb"]  # (2, 77, 16)
    ids = byte_level_clip_tokenizer()(
        ["sky  road  tree"], max_length=77, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ref_emb = ref["text"](ids).last_hidden_state.numpy()  # (1, 77, 16)
    np.testing.assert_allclose(emb, np.repeat(ref_emb, 2, axis=0), atol=1e-4, rtol=0)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 514, size=(2, 77))  # the byte-level vocabulary of the tiny configs
    with torch.no_grad():
        ctx = ref["text"](torch.from_numpy(ids)).last_hidden_state
    text_j = load_sd_component(out / "text_encoder")
    ctx_j = nnx.jit(lambda m, i: m(i))(text_j, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(np.asarray(ctx_j), ctx.numpy(), atol=1e-4, rtol=0)

    image = rng.uniform(-1, 1, size=(2, 3, 64, 96)).astype(np.float32)  # non-square; up0 is 1x2 -> 2x3
    key = jax.random.key(7)
    eps = np.array(jax.random.normal(key, (2, 8, 12, 4), jnp.float32))  # what the posterior sample draws
    expected = torch_backbone(ref, image, ctx, eps)
    backbone = nnx.jit(lambda m, x, c, k: m.backbone(x, c, k))
    x_j, ctx_j = jnp.asarray(image.transpose(0, 2, 3, 1)), jnp.asarray(ctx.numpy())
    ours = backbone(model, x_j, ctx_j, key)
    for name, value in expected.items():
        err = float(np.abs(np.asarray(ours[name]) - value.transpose(0, 2, 3, 1)).max())
        print(f"{name} {value.shape}: max |diff| {err:.2e} (max |ref| {np.abs(value).max():.2f})")
        assert err <= 1e-4, (name, err)

    # the LoRA factors are active: zeroing them moves the features far beyond the tolerance
    lora = nnx.state(model, nnx.Any(nnx.PathContains("lora_A"), nnx.PathContains("lora_B")))
    nnx.update(model, jax.tree.map(jnp.zeros_like, lora))
    plain = backbone(model, x_j, ctx_j, key)
    assert float(np.abs(np.asarray(plain["res3"]) - expected["res3"].transpose(0, 2, 3, 1)).max()) > 1e-2


def test_unmatched_keys_and_shapes_are_errors(reference):
    ref = reference
    sd = ref["state_dict"]
    config = ref["config"]
    key = "backbone.feature_extractor.feature_projections.4.0.conv2.weight"
    bad = dict(sd, **{key: torch.zeros(3, 3, 3, 3)})
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for 'backbone\.feature_extractor\.feature_projections\.4\.0\.conv2\.weight'",
    ):
        convert_rass(bad, config)
    extra = dict(
        sd, **{"backbone.feature_extractor.sd.unet.conv_in.lora_A.scr.weight": torch.zeros(4, 4, 3, 3)}
    )
    with pytest.raises(CheckpointError, match=r"(?s)1 unexpected.*conv_in\.lora_A\.scr\.weight"):
        convert_rass(extra, config)
    wrong = dict(sd, **{"criterion.empty_weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match="empty_weight"):
        convert_rass(wrong, config)


def test_training_start_from_sd_folders_merges_adapters(reference, tmp_path):
    """model.pretrained.sd: a `convert.py sd` output whose UNet carries peft adapters (an SCR-like LoRA) is
    merged into the base weights (merge_and_unload), then gets fresh stage-2 adapters (A random, B = 0)."""
    ref = reference
    config = micro_rass_config()
    fe = "backbone.feature_extractor.sd."
    sd = ref["state_dict"]
    unet_peft = {k[len(fe + "unet.") :]: v for k, v in sd.items() if k.startswith(fe + "unet.")}
    unet_cfg, vae_cfg = config.model.unet.to_dict(), config.model.vae.to_dict()
    save_component(tmp_path / "unet", "unet", convert_unet(unet_peft, unet_cfg), unet_cfg, "test")
    vae_sd = {k[len(fe + "vae.") :]: v for k, v in sd.items() if k.startswith(fe + "vae.")}
    save_component(tmp_path / "vae", "vae", convert_vae(vae_sd, vae_cfg), vae_cfg, "test")
    config.model.pretrained.sd = str(tmp_path)
    system = RASSSystem(config)
    model = abstract_model(lambda: system.build_model(nnx.Rngs(0)))
    assert "adapted layers merged" in system.load_pretrained(model)

    unet = model.backbone.feature_extractor.sd.unet
    merged = {k: v.numpy() for k, v in ref["unet"].state_dict().items()}  # the torch UNet holds W + s B A
    conv = unet.down_blocks[0].resnets[0].conv1
    np.testing.assert_allclose(
        np.asarray(conv.base_layer.kernel[...]),
        merged["down_blocks.0.resnets.0.conv1.weight"].transpose(2, 3, 1, 0),
        atol=1e-6,
    )
    q = unet.up_blocks[3].attentions[0].transformer_blocks[0].attn2.to_q
    np.testing.assert_allclose(
        np.asarray(q.base_layer.kernel[...]),
        merged["up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_q.weight"].T,
        atol=1e-6,
    )
    assert list(q.lora_A) == ["default_decoder_s2"]
    assert not np.any(np.asarray(q.lora_B["default_decoder_s2"].kernel[...]))  # fresh adapters start at B = 0
    assert np.std(np.asarray(q.lora_A["default_decoder_s2"].kernel[...])) > 0.1
    vae = model.backbone.feature_extractor.sd.vae
    np.testing.assert_array_equal(
        np.asarray(vae.quant_conv.kernel[...]), vae_sd["quant_conv.weight"].numpy().transpose(2, 3, 1, 0)
    )
