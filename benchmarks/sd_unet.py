"""UNet forward+backward: ours (JAX, bf16 compute, fp32 params) against diffusers (PyTorch, SDPA, bf16
autocast, fp32 params) on the same machine in one run.

One step = forward at timestep 1 on a (batch, latent, latent, 4) latent with (batch, 77, d) text states,
loss = mean(sample^2) + mean of each up-block feature^2 (RASS consumes those features), gradient of every
parameter. Random weights (speed only). Default: the SD 2.1-base UNet at latent 64x64, batch 2; `--small`
(automatic without a GPU) uses a narrow 4-block UNet of the same layout; `--tiny` one resnet per block too
(configs/rass.py's tiny UNet, the CPU smoke run of benchmarks/gpu_suite.py).

The last line is a JSON object; "torch_over_jax" > 1 means ours is faster. Its "roofline" entries carry the
step's FLOPs as torch.utils.flop_counter counts diffusers' step (matrix products, convolutions, attention,
forward and backward; the same arithmetic as ours); "xla_flops" is XLA's cost analysis of our compiled step.

    python benchmarks/sd_unet.py [--small | --tiny] [--batch 2] [--latent 64] [--steps 5] [--remat]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from torch.utils.flop_counter import FlopCounterMode

from lqseg_jax.models.sd_unet import SD21_BASE_UNET, UNet2DConditionModel

SMALL_UNET = dict(  # the SD 2.1 layout (4 blocks, 2 resnets each, linear projection), 10x narrower
    SD21_BASE_UNET,
    block_out_channels=[32, 64, 128, 128],
    attention_head_dim=[1, 2, 4, 4],
    cross_attention_dim=64,
    norm_num_groups=16,
)
TINY_UNET = dict(SMALL_UNET, layers_per_block=1, cross_attention_dim=32, norm_num_groups=8)
TINY_UNET.update(block_out_channels=[32, 32, 64, 64], attention_head_dim=[1, 1, 2, 2])


def time_steps(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def jax_step(config, batch, latent, tokens, remat):
    model = UNet2DConditionModel(config, dtype=jnp.bfloat16, remat=remat, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p, x, ctx):
        out, feats = nnx.merge(graphdef, p)(x, 1, ctx)
        loss = jnp.mean(out.astype(jnp.float32) ** 2)
        return loss + sum(jnp.mean(f.astype(jnp.float32) ** 2) for f in feats)

    grad = jax.jit(jax.grad(loss_fn))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, latent, latent, 4)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(batch, tokens, config["cross_attention_dim"])), jnp.float32)
    t0 = time.perf_counter()
    compiled = grad.lower(params, x, ctx).compile()  # the jit call below reuses this executable
    jax.block_until_ready(grad(params, x, ctx))
    compile_s = time.perf_counter() - t0
    try:
        cost = compiled.cost_analysis()
    except NotImplementedError as err:  # a backend without cost analysis
        print(f"no XLA cost analysis here: {err}")
        cost = None
    xla_flops = ((cost[0] if isinstance(cost, list | tuple) else cost) or {}).get("flops")
    return (lambda: jax.block_until_ready(grad(params, x, ctx))), compile_s, xla_flops


def torch_step(config, batch, latent, tokens, device):
    unet = TorchUNet(**{k: v for k, v in config.items() if not k.startswith("_")}).to(device).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    ctx = torch.randn(batch, tokens, config["cross_attention_dim"], generator=g).to(device)
    t = torch.ones(batch, device=device)
    feats = []
    for block in unet.up_blocks:
        block.register_forward_hook(lambda m, i, o: feats.append(o))

    def step():
        feats.clear()
        unet.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = unet(x, t, ctx).sample
            loss = (out.float() ** 2).mean() + sum((f.float() ** 2).mean() for f in feats)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="narrow UNet (automatic without a GPU)")
    parser.add_argument("--tiny", action="store_true", help="narrow UNet, one resnet per block")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", action="store_true", help="rematerialise each UNet block (ours)")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    small = args.small or args.tiny or not on_gpu
    config = TINY_UNET if args.tiny else SMALL_UNET if small else SD21_BASE_UNET
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(batch=args.batch, latent=args.latent, tokens=args.tokens)

    jax_fn, compile_s, xla_flops = jax_step(config, **shape, remat=args.remat)
    jax_ms = time_steps(jax_fn, args.steps, args.warmup)
    step = torch_step(config, **shape, device=device)
    torch_ms = time_steps(step, args.steps, args.warmup)
    with FlopCounterMode(display=False) as counter:  # one more step, counted (not timed)
        step()
    flops = counter.get_total_flops()
    jax_med, torch_med = statistics.median(jax_ms), statistics.median(torch_ms)
    print(f"jax   ({jax.devices()[0].device_kind}): median {jax_med:.1f} ms  (compile {compile_s:.1f} s)")
    print(f"torch ({device}): median {torch_med:.1f} ms")
    result = {
        "benchmark": "sd_unet_fwd_bwd_bf16",
        "config": "tiny" if args.tiny else "small" if small else "sd21_base",
        "batch": args.batch,
        "latent": args.latent,
        "remat": args.remat,
        "jax_device": jax.devices()[0].device_kind,
        "torch_device": str(device),
        "jax_ms": round(jax_med, 2),
        "torch_ms": round(torch_med, 2),
        "torch_over_jax": round(torch_med / jax_med, 3),
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "flops": flops,
        "xla_flops": xla_flops,
        "roofline": [
            {"name": "ours fwd+bwd (bf16)", "ms": jax_med, "flops": flops},
            {"name": "diffusers fwd+bwd (bf16 autocast)", "ms": torch_med, "flops": flops},
        ],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
