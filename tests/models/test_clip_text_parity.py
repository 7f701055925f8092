"""Our CLIPTextModel against transformers' (PyTorch) on two tiny random configs, max abs diff <= 1e-4.

Token ids hold a start token, words, an end token and "!" padding (id 0) as SD 2.1's tokenizer writes
them; the causal mask is what keeps padding from changing the word positions.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPTextConfig as TorchConfig
from transformers import CLIPTextModel as TorchCLIP

from lqseg_jax.convert.diffusers_sd import convert_text_encoder

TINY_A = dict(  # SD 2.x style: exact GELU, 77 positions
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    bos_token_id=97,
    eos_token_id=98,
    pad_token_id=0,
)
TINY_B = dict(  # SD 1.x style: quick GELU, other widths; loaded from transformers-4 keys (text_model.*)
    vocab_size=50,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=20,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-6,
    bos_token_id=48,
    eos_token_id=49,
    pad_token_id=0,
)


def sd_ids(rng, vocab, length, bos, eos, n_words):
    ids = np.zeros((length,), np.int64)  # "!" padding
    ids[0], ids[n_words + 1] = bos, eos
    ids[1 : n_words + 1] = rng.integers(1, vocab - 2, size=n_words)
    return ids


@pytest.mark.parametrize("config", [TINY_A, TINY_B], ids=["A_gelu", "B_quick_gelu_text_model_prefix"])
def test_clip_text_matches_transformers(config):
    torch.manual_seed(0)
    ref = TorchCLIP(TorchConfig(**config)).eval()
    rng = np.random.default_rng(0)
    length = config["max_position_embeddings"]
    ids = np.stack(
        [
            sd_ids(rng, config["vocab_size"], length, config["bos_token_id"], config["eos_token_id"], n)
            for n in (3, 9)
        ]
    )
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).last_hidden_state.numpy()

    state = ref.state_dict()
    if config is TINY_B:
        state = {f"text_model.{k}": v for k, v in state.items()}
        state["text_model.embeddings.position_ids"] = torch.arange(length)[None]
    model = convert_text_encoder(state, config)
    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids, jnp.int32))
    assert out.shape == (2, length, config["hidden_size"])
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=0)
