"""RASS: restoration-adapted SD 2.1 features + Mask2Former for low-quality images (rass.md).

Model: `lqseg_jax.models.rass_backbone.RASS` (SD VAE encoder + UNet at t = 1 with rank-4 LoRA, feature
projections, Mask2Former head). Per step, on the device batch:
  HQ = the raw 0-255 RGB image (pixel mean/std are never applied, as in the original)
  LQ = HQ degraded on the device (`System.training_images`: the second-order Real-ESRGAN model of
       `config.degradation`, on by default here), else HQ
  outputs = model(LQ / 127.5 - 1, text embeddings, key); loss = Mask2Former criterion (class, mask BCE,
  dice, deep supervision). `loss` keeps HQ as the restoration target for future losses.
Prediction: the same backbone in sliding windows (`model.slide_inference`), the head once, Mask2Former
semantic inference (softmax classes x sigmoid masks) at the input size.

Trainable (the `trainable` filter): the stage-2 LoRA factors, the whole unet.conv_in, the feature
projections and the head. Frozen (in the train state's `rest`): the UNet base weights, the VAE.

Text: the frozen CLIP text encoder is NOT in the model or the train state. In modes "empty", "fixed" and
"tags" it belongs to this system's `PromptProvider`, which runs on the host side (`host_batch`): each distinct prompt is encoded once and
cached, and the batch carries "text_emb" (b, 77, d). Keeping it out of the state saves its 340M
parameters (1.4 GB fp32) in every checkpoint and in the optimizer's bookkeeping, and it is never
differentiated. It is (re)loaded from the config's paths when a prompt is first needed (training, resume,
evaluation), or initialised from `config.seed` for configs trained from scratch.

Pretrained weights (`config.model.pretrained`):
  path: a `scripts/convert.py rass` output (OUT/model + OUT/text_encoder): the released RASS weights,
        whose UNet base layers hold the SCR weights already merged (scr.pkl is not released);
  sd:   a `scripts/convert.py sd` output (unet/, vae/, text_encoder/, tokenizer/) to train from SD 2.1.
        A UNet converted with peft adapters (e.g. an SCR restoration LoRA) has them merged into its base
        weights first, as RASS does (merge_and_unload), then gets fresh stage-2 adapters.
`config.model.tokenizer` names the CLIP tokenizer folder (default: pretrained.sd/tokenizer; a byte-level
tokenizer for configs without pretrained text weights).

Prompt mode "ram" (config.prompt.ram): RASS's own prompts, built inside the jitted train and evaluation
steps. The converted RAM tagger (`scripts/convert.py ram`, or OUT/ram of `convert.py rass --tag-list
--thresholds`; default pretrained.path/ram) and the CLIP text encoder are this system's frozen networks
(`frozen_networks`: loaded once, replicated, never in the train state or a checkpoint; they reach the step
as batch[FROZEN]). In the step the tagger sees each whole image as it reaches the system (the clean augmented
crop in training, the padded low-quality canvas in evaluation: ram.md 1.2), its tag mask becomes the prompt's
token ids on the device (`prompts.assemble_ids`: the ids the tokenizer gives the cleaned tag string), and
the text encoder embeds them: no host round trip and no strings. The tagger runs in eval mode
(deterministic tags) unless config.prompt.ram.train_mode, which reproduces the original's training quirk
(ram.md 1.6): drop-path and dropout on, drawn from the step's key. `tag` is the host path of the same tags
(scripts/tag.py writes them as a tags file for mode "tags").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.clip_text import CLIPTextModel, _encode_ids, load_tokenizer, tokenize
from ..models.lora import LoRAParam, apply_lora, lora_layout, merge_lora
from ..models.mask2former import Mask2FormerCriterion, rass_config, semantic_inference
from ..models.ram import RAM, RAMConfig, preprocess, tag_strings, threshold_mask
from ..models.rass_backbone import RASS, RASSConfig
from .base import FROZEN, System, pixel_accuracy
from .prompts import PromptProvider, PromptTokens, assemble_ids, byte_level_clip_tokenizer, prompt_tokens

_UNET_CONV_IN = ("backbone", "feature_extractor", "sd", "unet", "conv_in")


def rass_trainable(path: tuple, variable: Any) -> bool:
    """RASS's trained set (ras.py set_train + the detectron2 head): LoRA factors, unet.conv_in, the feature
    projections, the Mask2Former head."""
    if not isinstance(variable, nnx.Param):
        return False
    if isinstance(variable, LoRAParam):
        return True
    names = tuple(str(p) for p in path)
    return names[:1] == ("sem_seg_head",) or "feature_projections" in names or names[:5] == _UNET_CONV_IN


def model_config(config) -> RASSConfig:
    """The RASSConfig of an experiment config (config.model)."""
    m = config.model
    proj = m.projection
    head = dataclasses.replace(
        rass_config(**m.head.to_dict()),
        num_classes=m.num_classes,
        dtype=m.dtype,
        in_channels=(proj.dim,) * 4,
    )
    return RASSConfig(
        unet=m.unet.to_dict(),
        vae=m.vae.to_dict(),
        head=head,
        projection_dim=proj.dim,
        projection_groups=proj.norm_groups,
        lora_rank=m.lora.rank,
        lora_alpha=m.lora.alpha,
        timestep=m.timestep,
        dtype=m.dtype,
        remat=m.remat,
    )


class RASSSystem(System):
    trainable = staticmethod(rass_trainable)

    def __init__(self, config):
        super().__init__(config)
        self.model_config = model_config(config)
        self.criterion = Mask2FormerCriterion(self.model_config.head)
        self._prompts: PromptProvider | None = None
        self._text: tuple | None = None
        self._tagger: tuple | None = None
        self._prompt_tokens: PromptTokens | None = None

    def build_model(self, rngs: nnx.Rngs) -> RASS:
        return RASS(self.model_config, rngs=rngs)

    # ------------------------------------------------------------------ prompts (host side)
    def text_encoder_and_tokenizer(self) -> tuple[CLIPTextModel, Any]:
        """The frozen CLIP text encoder and its tokenizer, from the config's paths (module docstring)."""
        from ..convert.diffusers_sd import load_sd_component

        m = self.config.model
        p = m.pretrained
        folder = Path(p.path) if p.path else Path(p.sd) if p.sd else None
        if folder is not None:
            text_encoder = load_sd_component(folder / "text_encoder")
            tok_dir = m.tokenizer or (str(Path(p.sd) / "tokenizer") if p.sd else "")
            if not tok_dir:
                raise ValueError(
                    f"config.model.tokenizer is empty: the text encoder of {folder} needs the SD 2.1 tokenizer "
                    "folder (a `scripts/convert.py sd` output's tokenizer/, or the diffusers folder's)"
                )
            tokenizer = load_tokenizer(tok_dir)
        else:
            text_encoder = CLIPTextModel(m.text_encoder.to_dict(), rngs=nnx.Rngs(self.config.seed))
            max_len = text_encoder.config.max_position_embeddings
            tokenizer = load_tokenizer(m.tokenizer) if m.tokenizer else byte_level_clip_tokenizer(max_len)
        cross = self.model_config.unet_config.cross_dims[0]
        if text_encoder.config.hidden_size != cross:
            raise ValueError(
                f"text encoder width {text_encoder.config.hidden_size} != UNet cross_attention_dim {cross}"
            )
        if len(tokenizer) > text_encoder.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens, the text encoder's vocabulary {text_encoder.config.vocab_size}"
            )
        return text_encoder, tokenizer

    def frozen_outside_model(self) -> dict[str, nnx.Module]:
        from ..models.tracing import abstract_model

        text = self.config.model.text_encoder.to_dict()
        out = {"text_encoder": abstract_model(lambda: CLIPTextModel(text, rngs=nnx.Rngs(0)))}
        if self.config.prompt.mode == "ram":
            ram = RAMConfig(**self.config.prompt.ram.model.to_dict())
            out["ram_tagger"] = abstract_model(lambda: RAM(ram, rngs=nnx.Rngs(0)))
        return out

    @property
    def text(self) -> tuple[CLIPTextModel, Any]:
        """`text_encoder_and_tokenizer()`, loaded once."""
        if self._text is None:
            self._text = self.text_encoder_and_tokenizer()
        return self._text

    @property
    def prompts(self) -> PromptProvider:
        if self._prompts is None:
            text_encoder, tokenizer = self.text
            max_len = tokenizer.model_max_length

            def encode(prompt: str) -> np.ndarray:
                ids = tokenize(tokenizer, [prompt], max_len)  # (1, tokens)
                return np.asarray(_encode_ids(text_encoder, jnp.asarray(ids, jnp.int32)))[0]  # (tokens, d)

            pc = self.config.prompt
            self._prompts = PromptProvider(
                pc.mode,
                encode,
                text=pc.text,
                tags_file=pc.tags_file,
                suffix=pc.suffix,
                cache_size=pc.cache_size,
            )
        return self._prompts

    # ------------------------------------------------------------------ RAM tags (prompt mode "ram")
    def ram_folder(self) -> Path:
        """The converted tagger: config.prompt.ram.path, else model.pretrained.path/ram."""
        r, p = self.config.prompt.ram, self.config.model.pretrained
        if r.path:
            return Path(r.path)
        if p.path:
            return Path(p.path) / "ram"
        raise ValueError(
            "prompt mode 'ram' needs a converted RAM tagger: config.prompt.ram.path (a `scripts/convert.py ram` "
            "output) or config.model.pretrained.path holding ram/ (`convert.py rass --tag-list --thresholds`)"
        )

    @property
    def tagger(self) -> tuple:
        """(RAM, tag list, thresholds (K,), jitted (RAM, uint8 images, thresholds) -> (b, K) bool)."""
        if self._tagger is None:
            from ..convert.ram import load_ram

            r = self.config.prompt.ram
            model, tags, thresholds = load_ram(self.ram_folder(), dtype=jnp.dtype(r.dtype))
            fp16, size = bool(r.fp16_sigmoid), model.config.image_size
            # two programs: the squash resize compiles per image size, the network once per batch size
            squash = jax.jit(lambda images: preprocess(images.astype(jnp.float32) / 255.0 * 2.0 - 1.0, size))
            network = nnx.jit(lambda ram, x, thr: threshold_mask(ram(x), thr, fp16_sigmoid=fp16))

            def mask(ram: RAM, images: jax.Array, thr: jax.Array) -> jax.Array:
                return network(ram, squash(images), thr)  # (b, K)

            self._tagger = (model, tags, jnp.asarray(thresholds), mask)
        return self._tagger

    def tag(self, images: np.ndarray) -> list[str]:
        """RAM tags of whole uint8 images (b, h, w, 3) as RASS's generate_tag writes them: 'tag1, tag2'."""
        model, tags, thresholds, mask = self.tagger
        return tag_strings(np.asarray(mask(model, jnp.asarray(images), thresholds)), tags)

    def frozen_networks(self) -> dict[str, nnx.Module]:
        """Prompt mode "ram": the tagger and the text encoder, which build the prompts inside the steps."""
        if self.config.prompt.mode != "ram":
            return {}
        return {"ram": self.tagger[0], "text_encoder": self.text[0]}

    @property
    def prompt_tokens(self) -> PromptTokens:
        """Every tag's prompt ids and the suffix's (prompts.prompt_tokens), for the tagger's tag list."""
        if self._prompt_tokens is None:
            text_encoder, tokenizer = self.text
            if tokenizer.model_max_length > text_encoder.config.max_position_embeddings:
                raise ValueError(
                    f"tokenizer model_max_length {tokenizer.model_max_length} exceeds the text encoder's "
                    f"{text_encoder.config.max_position_embeddings} positions"
                )
            self._prompt_tokens = prompt_tokens(tokenizer, self.tagger[1], self.config.prompt.suffix)
        return self._prompt_tokens

    def ram_tag_mask(self, batch: dict, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Prompt mode "ram", inside a jitted step: which tags the frozen tagger (batch[FROZEN]["ram"]) gives
        whole images (b, h, w, 3) in [0, 255], (b, K) bool. Given `key` and config.prompt.ram.train_mode,
        the tagger runs in train mode (drop-path, dropout drawn from `key`)."""
        r = self.config.prompt.ram
        ram = batch[FROZEN]["ram"]
        if key is not None and r.train_mode:
            ram = nnx.clone(ram)  # this step's own copy, switched to train mode and seeded from the step
            ram.train()
            nnx.reseed(ram, dropout=key, default=key)  # a tagger built with nnx.Rngs(seed) draws from default
        x = images.astype(jnp.float32) / 255.0 * 2.0 - 1.0  # (b, h, w, 3) in [-1, 1], as RASS feeds RAM
        logits = ram(preprocess(x, ram.config.image_size))  # (b, K)
        return threshold_mask(logits, self.tagger[2], fp16_sigmoid=bool(r.fp16_sigmoid))  # (b, K)

    def ram_text_embeddings(self, batch: dict, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The prompt embeddings (b, tokens, d) of `ram_tag_mask`'s tags: ids assembled on the device, the
        frozen text encoder (batch[FROZEN]["text_encoder"]), no gradient."""
        ids = assemble_ids(self.ram_tag_mask(batch, images, key), self.prompt_tokens)  # (b, tokens)
        text = batch[FROZEN]["text_encoder"](ids)  # (b, tokens, d)
        return jax.lax.stop_gradient(text.astype(jnp.float32))

    def host_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.config.prompt.mode == "ram":
            return batch  # the prompts are built in the step (ram_text_embeddings)
        if self.config.prompt.mode == "tags":
            if "name" not in batch:
                raise ValueError(
                    f"prompt mode 'tags' needs the image names in the batch (key 'name'); the batch has "
                    f"{sorted(batch)}"
                )
            names = list(batch["name"])
        else:
            names = [""] * len(batch["image"])
        return {**batch, "text_emb": self.prompts(names)}  # (b, tokens, d) float32

    # ------------------------------------------------------------------ device side
    def loss(self, model, batch, rng):
        lq, _hq = self.training_images(batch, rng)  # (b, H, W, 3) in [0, 255]; _hq: the clean target
        k_latent, k_criterion = jax.random.fold_in(rng, 1), jax.random.fold_in(rng, 2)
        if self.config.prompt.mode == "ram":  # tags of the clean crop (ram.md 1.2)
            text = self.ram_text_embeddings(batch, batch["image"], jax.random.fold_in(rng, 3))
        else:
            text = batch["text_emb"]  # (b, tokens, d) from host_batch
        outputs = model(lq / 127.5 - 1.0, text, k_latent)  # LQ mapped to [-1, 1]
        loss, metrics = self.criterion.loss(outputs, batch["label"], k_criterion)
        scores = semantic_inference(outputs, batch["label"].shape[1:3])  # (b, H, W, K)
        metrics = {k: v for k, v in metrics.items() if k in ("loss_ce", "loss_mask", "loss_dice")}
        return loss, {**metrics, "pixel_acc": pixel_accuracy(jnp.argmax(scores, -1), batch["label"])}

    def predict_batch(self, model, batch):
        """Class scores (b, H, W, K) for batch["image"] (uint8) with batch["text_emb"] (prompt mode "ram": the
        tags of batch["image"], the whole padded canvas); sliding-window backbone when
        config.model.slide_inference. The posterior sample uses a key from config.seed."""
        x = batch["image"].astype(jnp.float32) / 255.0 * 2.0 - 1.0  # (b, H, W, 3)
        key = jax.random.key(self.config.seed)
        if self.config.prompt.mode == "ram":
            text = self.ram_text_embeddings(batch, batch["image"])  # (b, tokens, d)
        else:
            text = batch["text_emb"]  # (b, tokens, d)
        outputs = model(x, text, key, slide=self.config.model.slide_inference)
        return semantic_inference(outputs, x.shape[1:3], padded_hw=x.shape[1:3])  # (b, H, W, K)

    def predict(self, model, images):
        """Scores for images alone: the prompt of modes "empty" and "fixed" is the same for every image."""
        if self.config.prompt.mode in ("tags", "ram"):
            raise ValueError(
                f"prompt mode {self.config.prompt.mode!r} needs per-image prompts: use predict_batch with "
                "batch['text_emb'] (from host_batch)"
            )
        with jax.ensure_compile_time_eval():
            emb = self.prompts([""])  # (1, tokens, d)
        text = jnp.broadcast_to(jnp.asarray(emb), (images.shape[0], *emb.shape[1:]))
        return self.predict_batch(model, {"image": images, "text_emb": text})

    # ------------------------------------------------------------------ pretrained weights
    def has_pretrained(self) -> bool:
        p = self.config.model.pretrained
        return bool(p.path or p.sd)

    def load_pretrained(self, model: RASS) -> str:
        from ..convert.common import CheckpointError, load_converted
        from ..convert.diffusers_sd import load_sd_component

        p = self.config.model.pretrained
        if p.path:
            meta = load_converted(Path(p.path) / "model", model)
            if meta.get("format") != "rass":
                raise CheckpointError(
                    f"{p.path}/model was not written by `convert.py rass` ({meta.get('format')!r})"
                )
            return f"RASS weights {p.path} (UNet with merged SCR weights; source {meta.get('source', '?')})"
        sd = model.backbone.feature_extractor.sd
        unet = load_sd_component(Path(p.sd) / "unet")
        merged = merge_lora(unet) if lora_layout(unet) else 0
        if self.model_config.lora_rank:
            apply_lora(
                unet,
                self.model_config.lora_rank,
                self.model_config.lora_alpha,
                rngs=nnx.Rngs(self.config.seed),
            )
        nnx.update(sd.unet, nnx.state(unet, nnx.Param))
        nnx.update(sd.vae, nnx.state(load_sd_component(Path(p.sd) / "vae"), nnx.Param))
        note = f", {merged} adapted layers merged into the UNet base weights" if merged else ""
        return f"SD UNet and VAE from {p.sd}{note}; new stage-2 LoRA adapters, projections and head"
