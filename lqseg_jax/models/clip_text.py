"""CLIP text encoder (transformers `CLIPTextModel`) in Flax NNX, and SD prompt encoding.

Attribute names mirror transformers 5 (`embeddings.token_embedding`, `encoder.layers.0.self_attn.q_proj`,
`mlp.fc1`, `final_layer_norm`); checkpoints written by transformers 4 carry a `text_model.` prefix, which
the converter strips (as transformers 5 does on load). Pre-LN transformer with a causal mask; returns
last_hidden_state after final_layer_norm. SD 2.1 uses the OpenCLIP ViT-H text tower in this form
(`SD21_TEXT_ENCODER`: 23 layers, width 1024, 16 heads, MLP 4096, exact GELU, 77 positions).

`encode_prompts` tokenizes as SD pipelines and RASS do: padding="max_length" to the tokenizer's
model_max_length (77), truncation. The SD 2.x tokenizer pads with "!" (token id 0), unlike SD 1.x which
pads with <|endoftext|> (49407); both come from the checkpoint's tokenizer/ folder, so loading that folder
with `load_tokenizer` reproduces the right one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lqseg_jax.models.sd_unet import LayerNorm

Dtype = Any

# stabilityai/stable-diffusion-2-1-base, text_encoder/config.json (340,387,840 parameters).
SD21_TEXT_ENCODER: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}

_ACTS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers CLIPTextConfig fields that shape the text tower (same names); others are ignored."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """From `text_encoder/config.json`: generic HF keys (ids, dropout 0, init, dtype, ...) are ignored."""
        if config.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(
                f"CLIP text config: model_type '{config['model_type']}', expected 'clip_text_model'"
            )
        for key in ("dropout", "attention_dropout"):
            if config.get(key, 0.0) != 0.0:
                raise ValueError(
                    f"CLIP text config: '{key}' = {config[key]} not supported (inference-style, 0.0)"
                )
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields})

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(
                f"CLIP text config: hidden_act '{self.hidden_act}' not supported (expected {list(_ACTS)})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIP text config: hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads"
            )


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])  # (t,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]  # (b, t, d)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.k_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, -1)  # (b, t, heads, d/heads)
        k = self.k_proj(x).reshape(b, t, self.num_heads, -1)  # (b, t, heads, d/heads)
        v = self.v_proj(x).reshape(b, t, self.num_heads, -1)  # (b, t, heads, d/heads)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (b, t, heads, d/heads), fp32 softmax
        return self.out_proj(out.reshape(b, t, d))  # (b, t, d)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTS[self.act](self.fc1(x)))  # (b, t, d)


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))  # (b, t, d)
        return x + self.mlp(self.layer_norm2(x))  # (b, t, d)


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)  # (b, t, d)
        return x


class CLIPTextModel(nnx.Module):
    """transformers CLIPTextModel: input_ids (b, t) -> last_hidden_state (b, t, hidden_size)."""

    def __init__(
        self, config: CLIPTextConfig | Mapping[str, Any], *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        cfg = config if isinstance(config, CLIPTextConfig) else CLIPTextConfig.from_dict(config)
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"CLIPTextModel: input_ids must be (batch, tokens <= {self.config.max_position_embeddings}), "
                f"got shape {input_ids.shape}"
            )
        x = self.embeddings(input_ids)  # (b, t, d)
        return self.final_layer_norm(self.encoder(x))  # (b, t, d)


@nnx.jit
def _encode_ids(text_encoder: CLIPTextModel, input_ids: jax.Array) -> jax.Array:
    return text_encoder(input_ids)


def load_tokenizer(path: str | Path):
    """transformers CLIPTokenizer from a folder (a pipeline's tokenizer/, or a pipeline root holding one)."""
    from transformers import CLIPTokenizer

    path = Path(path)
    if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if not (path / "vocab.json").exists() or not (path / "merges.txt").exists():
        raise FileNotFoundError(f"no CLIP tokenizer at {path} (expected vocab.json and merges.txt)")
    return CLIPTokenizer.from_pretrained(str(path))


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> np.ndarray:
    """SD-style token ids: pad to max_length with the tokenizer's pad token, truncate: (b, max_length)."""
    return tokenizer(
        list(prompts), max_length=max_length, padding="max_length", truncation=True, return_tensors="np"
    ).input_ids


def encode_prompts(text_encoder: CLIPTextModel, tokenizer, prompts: Sequence[str]) -> jax.Array:
    """Prompts -> last_hidden_state (B, model_max_length, hidden) ((B, 77, 1024) for SD 2.1)."""
    if isinstance(prompts, str):
        raise TypeError("encode_prompts: prompts must be a sequence of strings, got one string")
    max_length = tokenizer.model_max_length
    if max_length > text_encoder.config.max_position_embeddings:
        raise ValueError(
            f"encode_prompts: tokenizer model_max_length {max_length} exceeds the text encoder's "
            f"{text_encoder.config.max_position_embeddings} positions"
        )
    ids = tokenize(tokenizer, prompts, max_length)  # (b, max_length)
    return _encode_ids(text_encoder, jnp.asarray(ids, jnp.int32))  # (b, max_length, hidden)
