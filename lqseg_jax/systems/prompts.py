"""Text prompts for SD-conditioned systems (RASS): image -> prompt -> cached CLIP text embedding, host side.

Modes:
- "empty": every image gets the empty prompt.
- "fixed": every image gets `text`.
- "tags": a JSON file {image id: "tag1, tag2, ..."} (RAM/DAPE tags computed offline), the image id being
  the image file's stem ("ADE_val_00000001" for ".../ADE_val_00000001.jpg"). An id missing from the file
  is an error naming the id and the file.
- "ram": the tags are computed from each image by the RAM tagger inside the jitted step; the prompt's token
  ids are assembled there too (`PromptTokens`, `assemble_ids`) and encoded by the frozen text encoder in the
  same step. `captions(tags)` is the host path for tag strings (scripts, checks).
As RASS builds it (rass/modeling/backbone/feature_projection.py + restoration_adaptation/ras.py
encode_prompt): prompt = f"{tags}, {suffix}" (suffix = MODEL.RASS.pos_prompt_vsd, "" in the release), then
cleaned: strip "[", "]", " " and "," at both ends, drop single quotes, commas -> spaces.

Each distinct cleaned prompt is tokenised and encoded ONCE by the frozen text encoder (one jitted call per
new prompt, always of shape (1, tokens)), and kept in an LRU cache of `cache_size` entries.

On the device (mode "ram"): CLIP's tokenizer splits the cleaned text at whitespace before BPE, and every
tag joined by ", " ends up whitespace-separated after the cleaning, so the ids of a prompt are
<|startoftext|>, each firing tag's own ids in tag-list order, the suffix's ids, truncated to
max_length - 2, <|endoftext|> and padding. `prompt_tokens` tokenises each tag once on the host;
`assemble_ids` builds the ids of a (b, K) tag mask with array ops.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("empty", "fixed", "tags", "ram")


def clean_caption(caption: str) -> str:
    """RASS encode_prompt's cleanup: strip("[] ,"), remove "'", commas -> spaces."""
    caption = caption.strip("[] ,").replace("'", "")
    return " ".join(caption.split(","))


def image_id(name: str) -> str:
    """The tags-file key of an image: its file stem."""
    return Path(str(name)).stem


class PromptProvider:
    """names -> text embeddings (b, tokens, dim) float32, with an LRU cache over distinct prompts.

    `encode(prompt) -> (tokens, dim)` encodes one cleaned prompt (tokenizer + text encoder).
    """

    def __init__(
        self,
        mode: str,
        encode: Callable[[str], np.ndarray],
        *,
        text: str = "",
        tags_file: str | Path = "",
        suffix: str = "",
        cache_size: int = 1024,
    ):
        if mode not in MODES:
            raise ValueError(f"prompt mode must be one of {MODES}, got {mode!r}")
        if cache_size < 1:
            raise ValueError(f"prompt cache_size must be >= 1, got {cache_size}")
        self.mode = mode
        self.text = text
        self.suffix = suffix
        self._encode = encode
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.encoded = 0  # number of encoder calls (one per prompt not in the cache)
        self.tags: dict[str, str] = {}
        self.tags_file = Path(tags_file) if tags_file else None
        if mode == "tags":
            if self.tags_file is None:
                raise ValueError("prompt mode 'tags' needs a tags file (JSON: image id -> 'tag1, tag2')")
            if not self.tags_file.is_file():
                raise FileNotFoundError(f"prompt tags file {self.tags_file} does not exist")
            tags = json.loads(self.tags_file.read_text())
            if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
                raise ValueError(
                    f"prompt tags file {self.tags_file}: expected a JSON object image id -> 'tag1, tag2, ...'"
                )
            self.tags = tags

    def prompt(self, name: str) -> str:
        """The cleaned prompt of image `name` (a file name or path)."""
        if self.mode == "ram":
            raise ValueError("prompt mode 'ram' takes the tags of each image: use captions(tags), not names")
        if self.mode == "empty":
            caption = ""
        elif self.mode == "fixed":
            caption = self.text
        else:
            key = image_id(name)
            if key not in self.tags:
                raise KeyError(f"image id '{key}' (from '{name}') has no tags in {self.tags_file}")
            caption = self.tags[key]
        return clean_caption(f"{caption}, {self.suffix}")

    def embedding(self, prompt: str) -> np.ndarray:
        """(tokens, dim) embedding of a cleaned prompt, from the cache or the encoder."""
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        emb = np.asarray(self._encode(prompt), np.float32)
        self.encoded += 1
        self._cache[prompt] = emb
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

    def captions(self, tags: Sequence[str]) -> np.ndarray:
        """Embeddings (b, tokens, dim) float32 of per-image tag strings ("tag1, tag2", RASS's generate_tag
        output): prompt = clean(f"{tags}, {suffix}"), as RASS builds it."""
        return np.stack(
            [self.embedding(clean_caption(f"{t}, {self.suffix}")) for t in tags]
        )  # (b, tokens, dim)

    def __call__(self, names: Sequence[str]) -> np.ndarray:
        """Embeddings (b, tokens, dim) float32 for the images `names`."""
        return np.stack([self.embedding(self.prompt(n)) for n in names])  # (b, tokens, dim)


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    """Token ids of every tag of a tag list and of the prompt suffix, as RASS's prompt tokenises them."""

    tags: np.ndarray  # (K, L) int32: tag k's ids in its first lengths[k] columns
    lengths: np.ndarray  # (K,) int32
    suffix: np.ndarray  # (S,) int32
    bos: int
    eos: int
    pad: int
    max_length: int


def _clean_piece(text: str, what: str) -> str:
    """One tag (or the suffix) as it appears in the cleaned prompt, up to whitespace: quotes dropped,
    commas -> spaces. The prompt-wide strip("[] ,") only touches the ends of the first and last pieces,
    where it removes spaces and commas (no token) unless a piece starts or ends with a bracket."""
    piece = text.replace("'", "").replace(",", " ").strip()
    if piece[:1] in ("[", "]") or piece[-1:] in ("[", "]"):
        raise ValueError(
            f"{what} {text!r} starts or ends with a bracket, which RASS's prompt cleaning strips"
        )
    return piece


def prompt_tokens(tokenizer, tag_list: Sequence[str], suffix: str = "") -> PromptTokens:
    """Each tag's ids (cleaned as `clean_caption` cleans it inside a prompt) and the suffix's, by `tokenizer`
    (a transformers CLIPTokenizer, padding to its model_max_length as SD does)."""
    pieces = [_clean_piece(t, f"tag {i}") for i, t in enumerate(tag_list)]
    ids = tokenizer(pieces, add_special_tokens=False).input_ids if pieces else []
    width = max([1, *map(len, ids)])
    table = np.zeros((len(ids), width), np.int32)  # (K, L)
    for k, row in enumerate(ids):
        table[k, : len(row)] = row
    suffix_piece = _clean_piece(suffix, "prompt suffix")
    suffix_ids = tokenizer(suffix_piece, add_special_tokens=False).input_ids if suffix_piece else []
    return PromptTokens(
        tags=table,
        lengths=np.asarray([len(r) for r in ids], np.int32),
        suffix=np.asarray(suffix_ids, np.int32),
        bos=int(tokenizer.bos_token_id),
        eos=int(tokenizer.eos_token_id),
        pad=int(tokenizer.pad_token_id),
        max_length=int(tokenizer.model_max_length),
    )


def assemble_ids(mask: jax.Array, tokens: PromptTokens) -> jax.Array:
    """(b, K) bool tag mask -> (b, max_length) int32 ids of clean_caption(f"{tags joined by ', '}, {suffix}")
    as `tokenize` writes them (bos, content truncated to max_length - 2, eos, padding); jittable."""
    b, num_tags = mask.shape
    if num_tags != len(tokens.lengths):
        raise ValueError(f"assemble_ids: a mask over {num_tags} tags for a tag list of {len(tokens.lengths)}")
    n = tokens.max_length
    last = n - 1  # the latest position of <|endoftext|>; content ends before it
    lengths = jnp.where(mask, jnp.asarray(tokens.lengths), 0)  # (b, K)
    ends = jnp.cumsum(lengths, axis=1)  # (b, K)
    j = jnp.arange(tokens.tags.shape[1])  # (L,)
    pos = 1 + (ends - lengths)[:, :, None] + j  # (b, K, L) position of each tag's j-th id
    pos = jnp.where((j < lengths[:, :, None]) & (pos < last), pos, n)  # n: out of range, dropped
    rows = jnp.arange(b)[:, None]  # (b, 1)
    ids = jnp.full((b, n), tokens.pad, jnp.int32).at[:, 0].set(tokens.bos)  # (b, n)
    tag_ids = jnp.broadcast_to(jnp.asarray(tokens.tags), pos.shape)  # (b, K, L)
    ids = ids.at[rows[:, :, None], pos].set(tag_ids, mode="drop")  # (b, n)
    total = ends[:, -1] if num_tags else jnp.zeros((b,), jnp.int32)  # (b,)
    spos = 1 + total[:, None] + jnp.arange(len(tokens.suffix))  # (b, S)
    spos = jnp.where(spos < last, spos, n)
    ids = ids.at[rows, spos].set(jnp.asarray(tokens.suffix)[None], mode="drop")  # (b, n)
    eos = jnp.minimum(1 + total + len(tokens.suffix), last)  # (b,)
    return ids.at[jnp.arange(b), eos].set(tokens.eos)  # (b, n)


def write_byte_level_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Writes a CLIP tokenizer folder (vocab.json, merges.txt, configs) over single bytes: no BPE merges; 514
    ids: 256 bytes, 256 bytes ending a word, <|startoftext|>, <|endoftext|>; padded with "!" like SD 2.x's.
    For tiny configs trained from scratch, which have no released vocabulary."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]  # GPT-2's byte -> unicode table, as CLIP's BPE uses
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = dict(special, pad_token="!", model_max_length=model_max_length, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(dict(special, pad_token="!")))
    return folder


def byte_level_clip_tokenizer(model_max_length: int = 77):
    """The `write_byte_level_tokenizer` tokenizer, loaded (transformers CLIPTokenizer)."""
    import tempfile

    from ..models.clip_text import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return load_tokenizer(write_byte_level_tokenizer(tmp, model_max_length))
