"""The original's way of degrading a batch, re-implemented for `benchmarks/degradation.py`.

RASS (rass/modeling/backbone/rass_backbone.py, `feed_data`) degrades the images of a batch one at a time in
a Python loop: it samples three kernels with numpy/scipy on the host (basicsr `random_mixed_kernels`,
`circular_lowpass_kernel`), then runs torch ops on the device: `filter2D` (reflect pad + grouped conv2d),
`F.interpolate`, basicsr's Gaussian / Poisson noise (`torch.unique` per image to count grey levels,
`torch.poisson`) and DiffJPEG (YCbCr, 4:2:0, 8 x 8 DCT, tensordot-based). This module does the same with
torch on the images' device (the CPU, or CUDA when the benchmark finds one). It is written from the
description of those functions, for timing (and replayed with our draws in the degradation tests); it is
not imported by the package.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special

# -- kernels (numpy on the host, as basicsr) ---------------------------------------------------------------


def _mixed_kernel(rng: np.random.Generator, size, st):
    family = random.choices(list(st.kernel_list), list(st.kernel_prob))[0]
    ax = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(ax, ax)
    sigma_x = rng.uniform(*st.blur_sigma)
    if family.endswith("aniso"):
        sigma_y = rng.uniform(*st.blur_sigma)
        theta = rng.uniform(*st.rotation_range)
    else:
        sigma_y, theta = sigma_x, 0.0
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    inv = np.linalg.inv(rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T)
    q = inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy
    if family in ("iso", "aniso"):
        kernel = np.exp(-0.5 * q)
    else:
        lo, hi = st.betag_range if family.startswith("generalized") else st.betap_range
        beta = rng.uniform(lo, 1) if rng.uniform() < 0.5 else rng.uniform(1, hi)
        kernel = np.exp(-0.5 * q**beta) if family.startswith("generalized") else 1 / (q**beta + 1)
    return kernel / kernel.sum()


def _sinc(cutoff, size):
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size]
    r = np.hypot(x - c, y - c)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    kernel[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
    return kernel / kernel.sum()


def _pad21(kernel):
    p = (21 - kernel.shape[0]) // 2
    return np.pad(kernel, ((p, p), (p, p)))


def _stage_kernel(rng, st, sizes):
    size = random.choice(sizes)
    if rng.uniform() < st.sinc_prob:
        lo, hi = st.sinc_omega_small if size < st.sinc_small_below else st.sinc_omega_large
        return _pad21(_sinc(rng.uniform(lo, hi), size))
    return _pad21(_mixed_kernel(rng, size, st))


def random_kernels(rng, cfg):
    sizes = list(cfg.kernel_sizes)
    k1 = _stage_kernel(rng, cfg.stage1, sizes)
    k2 = _stage_kernel(rng, cfg.stage2, sizes)
    if rng.uniform() < cfg.final.sinc_prob:
        sinc = _pad21(_sinc(rng.uniform(*cfg.final.sinc_omega), random.choice(sizes)))
    else:
        sinc = np.zeros((21, 21))
        sinc[10, 10] = 1
    return [torch.tensor(k, dtype=torch.float32) for k in (k1, k2, sinc)]  # host tensors, as basicsr's


# -- torch ops ----------------------------------------------------------------------------------------------


def filter2d(img, kernel):
    b, c, h, w = img.shape
    k = kernel.shape[-1]
    img = F.pad(img, (k // 2,) * 4, mode="reflect")
    out = F.conv2d(
        img.view(1, b * c, h + k - 1, w + k - 1), kernel.view(1, 1, k, k).repeat(b * c, 1, 1, 1), groups=b * c
    )
    return out.view(b, c, h, w)


def _gray(img):
    return 0.2989 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]  # torchvision rgb_to_grayscale


def _poisson_noise(img):
    img = torch.clamp((img * 255.0).round(), 0, 255) / 255.0
    vals = 2 ** math.ceil(math.log2(len(torch.unique(img))))
    return torch.poisson(img * vals) / vals - img


def add_noise(rng, img, st):
    """basicsr's random_add_{gaussian,poisson}_noise_pt: colour noise is always computed, grey noise too
    when drawn, and the grey one replaces the colour one."""
    gray = rng.uniform() < st.gray_noise_prob
    if rng.uniform() < st.gaussian_noise_prob:
        sigma = rng.uniform(*st.noise_range)
        noise = torch.randn(img.shape, device=img.device) * sigma / 255.0
        if gray:
            noise = torch.randn((1, 1, *img.shape[2:]), device=img.device) * sigma / 255.0
    else:
        scale = rng.uniform(*st.poisson_scale_range)
        noise = _poisson_noise(img)
        if gray:
            noise = _poisson_noise(_gray(img))
        noise = noise * scale
    return torch.clamp(img + noise, 0, 1)


_Y = np.array(
    [[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
     [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
     [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float32,
).T  # fmt: skip
_C = np.full((8, 8), 99, np.float32)
_C[:4, :4] = np.array([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]).T


class DiffJPEG:
    """DiffJPEG(differentiable=False) as basicsr: torch.round, float tables, zero padding to 16."""

    def __init__(self, device="cpu"):
        x = np.arange(8)
        cos = np.cos((2 * x[:, None] + 1) * x[None, :] * np.pi / 16)  # (x, u)
        alpha = np.array([1 / np.sqrt(2)] + [1] * 7)
        self.dct = torch.tensor(np.einsum("xu,yv->xyuv", cos, cos), dtype=torch.float32, device=device)
        self.scale = torch.tensor(np.outer(alpha, alpha) * 0.25, dtype=torch.float32, device=device)
        self.alpha = torch.tensor(np.outer(alpha, alpha), dtype=torch.float32, device=device)
        self.y, self.c = torch.tensor(_Y, device=device), torch.tensor(_C, device=device)
        self.rgb2ycc = torch.tensor(
            [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], device=device
        ).T
        self.ycc2rgb = torch.tensor(
            [[1.0, 0.0, 1.402], [1, -0.344136, -0.714136], [1, 1.772, 0]], device=device
        ).T

        self.shift = torch.tensor([0.0, 128, 128], device=device)

    def _blocks(self, plane):
        b, h, w = plane.shape
        return plane.view(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(b, -1, 8, 8)

    def _merge(self, blocks, h, w):
        b = blocks.shape[0]
        return blocks.view(b, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(b, h, w)

    def _codec(self, plane, table):
        coef = self.scale * torch.tensordot(self._blocks(plane) - 128, self.dct, dims=2)
        coef = torch.round(coef / table) * table
        return torch.tensordot(coef * self.alpha, self.dct.permute(2, 3, 0, 1), dims=2) * 0.25 + 128

    def __call__(self, x, quality):
        factor = 5000.0 / quality if quality < 50 else 200.0 - quality * 2
        factor /= 100.0
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (16 - w % 16) % 16, 0, (16 - h % 16) % 16))
        hp, wp = x.shape[-2:]
        ycc = torch.tensordot(x.permute(0, 2, 3, 1) * 255, self.rgb2ycc, dims=1) + self.shift
        y = ycc[..., 0]
        cb = F.avg_pool2d(ycc[..., 1].unsqueeze(1), 2).squeeze(1)
        cr = F.avg_pool2d(ycc[..., 2].unsqueeze(1), 2).squeeze(1)
        y = self._merge(self._codec(y, self.y * factor), hp, wp)
        cb = self._merge(self._codec(cb, self.c * factor), hp // 2, wp // 2)
        cr = self._merge(self._codec(cr, self.c * factor), hp // 2, wp // 2)
        up = lambda p: p.repeat_interleave(2, 1).repeat_interleave(2, 2)  # noqa: E731
        ycc = torch.stack([y, up(cb), up(cr)], dim=-1) - self.shift
        rgb = torch.tensordot(ycc, self.ycc2rgb, dims=1).permute(0, 3, 1, 2)
        return (rgb.clamp(0, 255) / 255)[:, :, :h, :w]


_MODES = ("area", "bilinear", "bicubic")


def _scale(rng, st):
    kind = random.choices(["up", "down", "keep"], list(st.resize_prob))[0]
    if kind == "up":
        return rng.uniform(1, st.resize_range[1])
    if kind == "down":
        return rng.uniform(st.resize_range[0], 1)
    return 1.0


def degrade_one(rng, jpeger, gt, cfg):
    """One image (1, 3, H, W) in [0, 1] through the second-order model, as RASS's `feed_data`."""
    k1, k2, sinc = (k.to(gt.device) for k in random_kernels(rng, cfg))  # host -> device, per image
    h, w = gt.shape[2:]
    out = filter2d(gt, k1)
    out = F.interpolate(out, scale_factor=_scale(rng, cfg.stage1), mode=random.choice(_MODES))
    out = add_noise(rng, out, cfg.stage1)
    out = jpeger(torch.clamp(out, 0, 1), rng.uniform(*cfg.stage1.jpeg_range))
    if rng.uniform() < cfg.stage2.blur_prob:
        out = filter2d(out, k2)
    s2 = _scale(rng, cfg.stage2)
    out = F.interpolate(out, size=(int(h * s2), int(w * s2)), mode=random.choice(_MODES))
    out = add_noise(rng, out, cfg.stage2)
    if rng.uniform() < cfg.final.order_a_prob:
        out = filter2d(F.interpolate(out, size=(h, w), mode=random.choice(_MODES)), sinc)
        out = jpeger(torch.clamp(out, 0, 1), rng.uniform(*cfg.final.jpeg_range))
    else:
        out = jpeger(torch.clamp(out, 0, 1), rng.uniform(*cfg.final.jpeg_range))
        out = filter2d(F.interpolate(out, size=(h, w), mode=random.choice(_MODES)), sinc)
    return torch.clamp((out * 255.0).round(), 0, 255) / 255.0


@torch.no_grad()
def degrade_batch(rng, jpeger, images, cfg):
    """images (B, 3, H, W) float32 in [0, 1] on the CPU or a CUDA device; the per-image loop of the original.
    Returns when the device has finished."""
    out = torch.cat([degrade_one(rng, jpeger, images[i : i + 1], cfg) for i in range(images.shape[0])])
    if out.is_cuda:
        torch.cuda.synchronize()
    return out
