"""Parameters of the second-order Real-ESRGAN degradation model: `get_config(preset)`.

"rass" (the default) is RASS's preset/train_realesrnet_x1_get_degration.yml exactly (rass.md section 4):

| stage  | blur                                         | resize (up / down / keep)               | noise                                              | JPEG     |
|--------|----------------------------------------------|-----------------------------------------|----------------------------------------------------|----------|
| 1      | always; sinc p 0.1; sigma [0.2, 3]           | p [0.2, 0.7, 0.1], U(1, 1.5) / U(0.15, 1) | Gaussian p 0.5 sigma [1, 30]/255, else Poisson scale [0.05, 3]; gray p 0.4 | q U(30, 95) |
| 2      | p 0.8; sinc p 0.1; sigma [0.2, 1.5]          | p [0.3, 0.4, 0.3], U(1, 1.2) / U(0.3, 1)  | Gaussian p 0.5 sigma [1, 25]/255, else Poisson scale [0.05, 2.5]; gray p 0.4 | -      |
| final  | resize back + sinc (p 0.8, cut-off U(pi/3, pi)), and JPEG q U(30, 95), in order A (resize+sinc, JPEG) or B (JPEG, resize+sinc) with p 0.5 each; round to 8 bits |

Both blur stages: kernel size uniform over {7, 9, ..., 21} (padded to 21), families iso / aniso /
generalized_iso / generalized_aniso / plateau_iso / plateau_aniso with p [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
rotation U(-pi, pi), beta_g [0.5, 4], beta_p [1, 2]; a sinc's cut-off is U(pi/3, pi) below size 13, else
U(pi/5, pi). Every resize picks area / bilinear / bicubic with p 1/3.

Severity presets for robustness curves change only these fields (everything else as "rass"):

| field                          | light         | medium        | heavy         | rass          |
|--------------------------------|---------------|---------------|---------------|---------------|
| stage1.blur_sigma              | [0.2, 1.5]    | [0.2, 2.2]    | [1.0, 4.0]    | [0.2, 3.0]    |
| stage2.blur_sigma              | [0.2, 0.8]    | [0.2, 1.1]    | [0.5, 2.0]    | [0.2, 1.5]    |
| stage2.blur_prob               | 0.5           | 0.8           | 1.0           | 0.8           |
| stage1.resize_range            | [0.5, 1.2]    | [0.3, 1.35]   | [0.15, 1.5]   | [0.15, 1.5]   |
| stage1.resize_prob (up/down/keep) | [0.2, 0.4, 0.4] | [0.2, 0.6, 0.2] | [0.1, 0.9, 0.0] | [0.2, 0.7, 0.1] |
| stage2.resize_range            | [0.7, 1.1]    | [0.5, 1.15]   | [0.3, 1.2]    | [0.3, 1.2]    |
| stage1.noise_range (Gaussian, /255) | [1, 8]   | [1, 18]       | [10, 40]      | [1, 30]       |
| stage2.noise_range             | [1, 6]        | [1, 15]       | [8, 35]       | [1, 25]       |
| stage1.poisson_scale_range     | [0.05, 0.8]   | [0.05, 1.8]   | [1.0, 4.0]    | [0.05, 3.0]   |
| stage2.poisson_scale_range     | [0.05, 0.6]   | [0.05, 1.5]   | [0.8, 3.5]    | [0.05, 2.5]   |
| stage1 / final jpeg_range      | [70, 95]      | [45, 95]      | [15, 45]      | [30, 95]      |
| final.sinc_prob                | 0.5           | 0.8           | 1.0           | 0.8           |

"light" and "medium" stay inside RASS's training distribution in strength, "heavy" goes past it (stronger
blur and noise, JPEG quality down to 15, almost always downscaled). The presets change only numbers, so
they share one compiled `degrade` per image shape.

Other field: noise_rng, the random bits of the per-pixel noise: "hash" (default, fast on CPUs) or
"threefry" (jax.random); see noise.py.
"""

from __future__ import annotations

import math

import ml_collections

PRESETS = ("rass", "light", "medium", "heavy")
KERNEL_LIST = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _stage(**overrides) -> ml_collections.ConfigDict:
    stage = ml_collections.ConfigDict(
        dict(
            blur_prob=1.0,
            kernel_list=KERNEL_LIST,
            kernel_prob=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
            sinc_prob=0.1,
            sinc_omega_small=(math.pi / 3, math.pi),  # cut-off range for kernel sizes < sinc_small_below
            sinc_omega_large=(math.pi / 5, math.pi),
            sinc_small_below=13,
            blur_sigma=(0.2, 3.0),
            rotation_range=(-math.pi, math.pi),
            betag_range=(0.5, 4.0),
            betap_range=(1.0, 2.0),
            resize_prob=(0.2, 0.7, 0.1),  # up, down, keep
            resize_range=(0.15, 1.5),  # down from U(lo, 1), up from U(1, hi)
            resize_mode_prob=(1 / 3, 1 / 3, 1 / 3),  # area, bilinear, bicubic
            gaussian_noise_prob=0.5,
            noise_range=(1.0, 30.0),  # Gaussian sigma on the 0-255 scale
            poisson_scale_range=(0.05, 3.0),
            gray_noise_prob=0.4,
        )
    )
    stage.update(overrides)
    return stage


def get_config(preset: str | None = "rass") -> ml_collections.ConfigDict:
    """The degradation parameters of `preset` ("rass" by default; "light", "medium", "heavy")."""
    preset = preset or "rass"
    if preset not in PRESETS:
        raise ValueError(f"degradation preset: expected one of {PRESETS}, got {preset!r}")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.noise_rng = "hash"  # per-pixel noise bits: "hash" (fast on CPUs) or "threefry" (jax.random), noise.py
    c.kernel_sizes = tuple(range(7, 22, 2))
    c.stage1 = _stage(jpeg_range=(30.0, 95.0))
    c.stage2 = _stage(
        blur_prob=0.8,
        blur_sigma=(0.2, 1.5),
        resize_prob=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        noise_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5),
    )
    # the second stage's JPEG is the final one (RASS's jpeg_range2)
    c.final = ml_collections.ConfigDict(
        dict(
            sinc_prob=0.8,
            sinc_omega=(math.pi / 3, math.pi),
            resize_mode_prob=(1 / 3, 1 / 3, 1 / 3),
            jpeg_range=(30.0, 95.0),
            order_a_prob=0.5,  # A: [resize back + sinc] then JPEG; B: JPEG then [resize back + sinc]
        )
    )
    if preset != "rass":
        _apply_severity(c, preset)
    return c


_SEVERITY = {
    "light": dict(
        s1_sigma=(0.2, 1.5), s2_sigma=(0.2, 0.8), s2_blur=0.5, s1_resize=(0.5, 1.2), s1_resize_prob=(0.2, 0.4, 0.4),
        s2_resize=(0.7, 1.1), s1_noise=(1.0, 8.0), s2_noise=(1.0, 6.0), s1_poisson=(0.05, 0.8),
        s2_poisson=(0.05, 0.6), jpeg=(70.0, 95.0), final_sinc=0.5,
    ),
    "medium": dict(
        s1_sigma=(0.2, 2.2), s2_sigma=(0.2, 1.1), s2_blur=0.8, s1_resize=(0.3, 1.35), s1_resize_prob=(0.2, 0.6, 0.2),
        s2_resize=(0.5, 1.15), s1_noise=(1.0, 18.0), s2_noise=(1.0, 15.0), s1_poisson=(0.05, 1.8),
        s2_poisson=(0.05, 1.5), jpeg=(45.0, 95.0), final_sinc=0.8,
    ),
    "heavy": dict(
        s1_sigma=(1.0, 4.0), s2_sigma=(0.5, 2.0), s2_blur=1.0, s1_resize=(0.15, 1.5), s1_resize_prob=(0.1, 0.9, 0.0),
        s2_resize=(0.3, 1.2), s1_noise=(10.0, 40.0), s2_noise=(8.0, 35.0), s1_poisson=(1.0, 4.0),
        s2_poisson=(0.8, 3.5), jpeg=(15.0, 45.0), final_sinc=1.0,
    ),
}  # fmt: skip


def _apply_severity(c: ml_collections.ConfigDict, preset: str) -> None:
    s = _SEVERITY[preset]
    c.stage1.blur_sigma, c.stage2.blur_sigma, c.stage2.blur_prob = s["s1_sigma"], s["s2_sigma"], s["s2_blur"]
    c.stage1.resize_range, c.stage1.resize_prob = s["s1_resize"], s["s1_resize_prob"]
    c.stage2.resize_range = s["s2_resize"]
    c.stage1.noise_range, c.stage2.noise_range = s["s1_noise"], s["s2_noise"]
    c.stage1.poisson_scale_range, c.stage2.poisson_scale_range = s["s1_poisson"], s["s2_poisson"]
    c.stage1.jpeg_range = c.final.jpeg_range = s["jpeg"]
    c.final.sinc_prob = s["final_sinc"]
