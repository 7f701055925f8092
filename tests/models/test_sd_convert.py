"""`scripts/convert.py sd` on a tiny random diffusers pipeline folder, end to end like RASS's backbone:
prompt -> CLIP text embedding, image -> VAE posterior and down-block features, latent -> UNet up-block
features, each against the PyTorch pipeline. Plus the errors for wrong keys, shapes, configs and folders.
"""

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from transformers import CLIPTextConfig as TorchCLIPConfig
from transformers import CLIPTextModel as TorchCLIP

from lqseg_jax.convert.common import CheckpointError, to_numpy
from lqseg_jax.convert.diffusers_sd import convert_pipeline, convert_unet, load_sd_component
from lqseg_jax.models.clip_text import encode_prompts, load_tokenizer
from lqseg_jax.models.sd_unet import UNetConfig

REPO = Path(__file__).resolve().parents[2]
UNET = dict(
    block_out_channels=[16, 32, 32],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    attention_head_dim=[1, 2, 2],
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
)
VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[8, 16, 16],
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)
PROMPTS = ["a cat, dog", "road cat road dog a"]


pytestmark = pytest.mark.usefixtures("fast_compile")


def bytes_to_unicode():
    """GPT-2/CLIP byte -> printable character table (the first 256 entries of every CLIP vocab)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> int:
    """A tiny CLIP BPE tokenizer laid out as SD 2.1's tokenizer/ ("!" = id 0 as pad). Returns vocab size."""
    chars = bytes_to_unicode()
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r o", "ro a", "roa d</w>"]
    vocab = [*chars, *(c + "</w>" for c in chars), "ca", "cat</w>", "do", "dog</w>", "ro", "roa", "road</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    # as in the SD 2.1 folder: tokenizer_config says <|endoftext|>, special_tokens_map.json overrides it with "!"
    config = dict(special, pad_token="<|endoftext|>", model_max_length=77, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(dict(special, pad_token="!")))
    return len(vocab)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    vocab = write_tokenizer(root / "src" / "tokenizer")
    torch.manual_seed(0)
    text = TorchCLIP(
        TorchCLIPConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=0,
        )
    ).eval()
    vae, unet = TorchVAE(**VAE).eval(), TorchUNet(**UNET).eval()
    text.save_pretrained(root / "src" / "text_encoder")
    vae.save_pretrained(root / "src" / "vae")
    unet.save_pretrained(root / "src" / "unet")
    return root, text, vae, unet


def run_convert_script(argv):
    spec = importlib.util.spec_from_file_location("convert_script", REPO / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def test_convert_script_reproduces_pytorch_features(pipeline):
    root, text, vae, unet = pipeline
    out = root / "converted"
    run_convert_script(["sd", "--src", str(root / "src"), "--out", str(out)])
    assert json.loads((out / "unet" / "meta.json").read_text())["config"]["cross_attention_dim"] == 32

    # PyTorch: tokenizer -> text encoder; image -> VAE posterior mean x scale -> UNet at t = 1
    tokenizer = load_tokenizer(out)
    ids = tokenizer(
        PROMPTS, max_length=77, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    assert tokenizer.pad_token == "!" and ids[0, -1] == 0  # SD 2.x pads with "!" (id 0), not <|endoftext|>
    image = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    vae_feats, unet_feats = [], []
    hooks = [
        b.register_forward_hook(lambda m, i, o: vae_feats.append(o.numpy())) for b in vae.encoder.down_blocks
    ]
    hooks += [b.register_forward_hook(lambda m, i, o: unet_feats.append(o.numpy())) for b in unet.up_blocks]
    with torch.no_grad():
        ctx = text(ids).last_hidden_state
        mean = vae.encode(torch.from_numpy(image)).latent_dist.mean
        sample = unet(mean * vae.config.scaling_factor, 1, ctx).sample.numpy()
    for h in hooks:
        h.remove()
    nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731

    # ours, rebuilt from the converted folders
    text_j, vae_j, unet_j = (load_sd_component(out / c) for c in ("text_encoder", "vae", "unet"))
    ctx_j = encode_prompts(text_j, tokenizer, PROMPTS)
    assert ctx_j.shape == (2, 77, 32)
    np.testing.assert_allclose(np.asarray(ctx_j), ctx.numpy(), atol=1e-4, rtol=0)

    posterior, feats = nnx.jit(lambda m, x: m.encode(x))(vae_j, jnp.asarray(nhwc(image)))
    np.testing.assert_allclose(np.asarray(posterior.mean), nhwc(mean), atol=1e-4, rtol=0)
    for f, r in zip(feats, vae_feats):
        np.testing.assert_allclose(np.asarray(f), nhwc(r), atol=1e-4, rtol=0)

    latent = posterior.mean * vae_j.config.scaling_factor
    out_j, up = nnx.jit(lambda m, z, c: m(z, 1, c))(unet_j, latent, ctx_j)
    assert [f.shape[-1] for f in up] == [32, 32, 16]
    np.testing.assert_allclose(np.asarray(out_j), nhwc(sample), atol=1e-4, rtol=0)
    for f, r in zip(up, unet_feats):
        np.testing.assert_allclose(np.asarray(f), nhwc(r), atol=1e-4, rtol=0)


def test_wrong_keys_and_shapes_name_the_key(pipeline):
    _, _, _, unet = pipeline
    sd = to_numpy(unet.state_dict())
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    bad = dict(sd, **{key: np.zeros((32, 31), np.float32)})
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for 'down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight'",
    ):
        convert_unet(bad, UNET)
    with pytest.raises(CheckpointError, match=r"(?s)1 unexpected.*up_blocks\.1\.resnets\.0\.conv9\.weight"):
        convert_unet(dict(sd, **{"up_blocks.1.resnets.0.conv9.weight": sd["conv_in.weight"]}), UNET)
    missing = {k: v for k, v in sd.items() if k != "mid_block.resnets.1.conv2.bias"}
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*mid_block\.resnets\.1\.conv2\.bias"):
        convert_unet(missing, UNET)


def test_config_and_folder_errors(tmp_path, pipeline):
    with pytest.raises(ValueError, match="'class_embed_type'"):
        UNetConfig.from_dict(dict(UNET, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="unknown field 'block_channels'"):
        UNetConfig.from_dict({"block_channels": [1]})
    with pytest.raises(ValueError, match="'attention_head_dim' has 2 entries"):
        UNetConfig.from_dict(dict(UNET, attention_head_dim=[1, 2]))
    root = pipeline[0]
    with pytest.raises(FileNotFoundError, match="has no text_encoder/ folder"):
        convert_pipeline(root / "src" / "unet", tmp_path / "x", ["text_encoder"], progress=False)
    with pytest.raises(FileNotFoundError, match=r"no meta\.json"):
        load_sd_component(tmp_path)
