"""Blur kernels of the Real-ESRGAN degradation model, in closed form and sampled per image on the device.

Families (basicsr.data.degradations; `q = [x y] S^-1 [x y]^T` with x the column and y the row offset from
the kernel centre, `S = R diag(sigma_x^2, sigma_y^2) R^T` and R the rotation by theta):

| family                       | k(x, y) before normalisation   | isotropic: sigma_y = sigma_x, theta = 0 |
|------------------------------|--------------------------------|-----------------------------------------|
| iso / aniso                  | exp(-q / 2)                    | iso                                     |
| generalized_iso / _aniso     | exp(-q^beta / 2)               | generalized_iso                         |
| plateau_iso / _aniso         | 1 / (1 + q^beta)               | plateau_iso                             |
| sinc (circular low-pass)     | wc J1(wc r) / (2 pi r), wc^2 / (4 pi) at r = 0 | always isotropic        |

Every kernel is built on its own odd size k x k, normalised to sum 1 there, and zero-padded to 21 x 21
(here: evaluated on the 21 x 21 grid and masked outside the central k x k, which is the same thing).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MAX_KERNEL_SIZE = 21
KERNEL_FAMILIES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_BESSEL_NODES = 96  # trapezoid nodes on [0, 2 pi): error ~ |J_96(x)|, below 1e-20 for x <= 45


def bessel_j1(x: jax.Array) -> jax.Array:
    """Bessel function J1 from Bessel's integral J1(x) = 1/(2 pi) int_0^2pi cos(t - x sin t) dt.

    The trapezoid rule over a full period of a smooth periodic integrand converges geometrically; with 96
    nodes it is exact to float32 for |x| <= 45 (the sinc kernels need x <= pi * 10 * sqrt(2) = 44.4).
    """
    t = jnp.arange(_BESSEL_NODES, dtype=jnp.float32) * (2 * math.pi / _BESSEL_NODES)  # (n,)
    x = jnp.asarray(x, jnp.float32)
    return jnp.mean(jnp.cos(t - x[..., None] * jnp.sin(t)), axis=-1)  # (...)


def _grid() -> tuple[jax.Array, jax.Array]:
    ax = jnp.arange(MAX_KERNEL_SIZE, dtype=jnp.float32) - MAX_KERNEL_SIZE // 2
    y, x = jnp.meshgrid(ax, ax, indexing="ij")  # y: row offset, x: column offset
    return x, y  # (21, 21) each


def _normalise_in_window(kernel: jax.Array, size: jax.Array) -> jax.Array:
    x, y = _grid()
    radius = (jnp.asarray(size) - 1) // 2
    inside = (jnp.abs(x) <= radius) & (jnp.abs(y) <= radius)  # (21, 21)
    kernel = jnp.where(inside, kernel, 0.0)
    return kernel / jnp.sum(kernel)  # (21, 21)


def quadratic_form(sigma_x: jax.Array, sigma_y: jax.Array, theta: jax.Array) -> jax.Array:
    """q = [x y] S^-1 [x y]^T on the 21 x 21 grid, S = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T."""
    x, y = _grid()
    c, s = jnp.cos(theta), jnp.sin(theta)
    u = c * x + s * y  # coordinate along the first principal axis
    v = -s * x + c * y  # coordinate along the second principal axis
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2  # (21, 21)


def gaussian_kernel(size, sigma_x, sigma_y, theta) -> jax.Array:
    """Bivariate (an)isotropic Gaussian, exp(-q/2), on a size x size window padded to 21 x 21."""
    return _normalise_in_window(jnp.exp(-0.5 * quadratic_form(sigma_x, sigma_y, theta)), size)


def generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, beta) -> jax.Array:
    """Generalized Gaussian, exp(-q^beta / 2) (beta = 1: Gaussian)."""
    q = quadratic_form(sigma_x, sigma_y, theta)
    return _normalise_in_window(jnp.exp(-0.5 * q**beta), size)


def plateau_kernel(size, sigma_x, sigma_y, theta, beta) -> jax.Array:
    """Plateau-shaped kernel, 1 / (1 + q^beta)."""
    q = quadratic_form(sigma_x, sigma_y, theta)
    return _normalise_in_window(1.0 / (q**beta + 1.0), size)


def sinc_kernel(size, omega_c) -> jax.Array:
    """Circular low-pass (2-D sinc) filter with cut-off omega_c (radians, pi = Nyquist)."""
    x, y = _grid()
    r = jnp.sqrt(x**2 + y**2)
    r_safe = jnp.where(r > 0, r, 1.0)
    kernel = omega_c * bessel_j1(omega_c * r_safe) / (2 * math.pi * r_safe)
    kernel = jnp.where(r > 0, kernel, omega_c**2 / (4 * math.pi))
    return _normalise_in_window(kernel, size)


def pulse_kernel() -> jax.Array:
    """The identity filter: 1 at the centre of the 21 x 21 window."""
    c = MAX_KERNEL_SIZE // 2
    return jnp.zeros((MAX_KERNEL_SIZE, MAX_KERNEL_SIZE), jnp.float32).at[c, c].set(1.0)


class Draws:
    """Hands out one image's uniforms U(0, 1) one at a time, from a single jax.random call.

    Drawing every scalar of an image from one vector keeps the compiled program small (each separate
    jax.random call is a separate threefry computation for XLA to compile).
    """

    def __init__(self, key: jax.Array, n: int):
        self._u = jax.random.uniform(key, (n,), jnp.float32)
        self._next = 0

    def uniform(self, lo=0.0, hi=1.0) -> jax.Array:
        if self._next == self._u.shape[0]:
            raise RuntimeError(f"Draws: all {self._next} uniforms used; allocate more")
        u = self._u[self._next]
        self._next += 1
        return lo + (hi - lo) * u

    def bernoulli(self, p) -> jax.Array:
        return self.uniform() < p

    def choice(self, probs) -> jax.Array:
        """Index i with probability probs[i] (inverse CDF)."""
        cdf = jnp.cumsum(jnp.asarray(probs, jnp.float32))
        return jnp.minimum(jnp.sum(self.uniform() * cdf[-1] >= cdf), len(probs) - 1).astype(jnp.int32)


def sample_sinc_omega(draws: Draws, size, small_range, large_range, small_below) -> jax.Array:
    """Cut-off of a sinc kernel: from small_range when size < small_below, else from large_range."""
    lo = jnp.where(size < small_below, small_range[0], large_range[0])
    hi = jnp.where(size < small_below, small_range[1], large_range[1])
    return draws.uniform(lo, hi)


def sample_blur_kernel(draws: Draws, cfg, kernel_sizes: tuple[int, ...]) -> jax.Array:
    """One random blur kernel (21, 21) as basicsr's `random_mixed_kernels` / `circular_lowpass_kernel`.

    `cfg` (a stage of the degradation config) holds sinc_prob, sinc_omega_small, sinc_omega_large,
    sinc_small_below, kernel_list, kernel_prob, blur_sigma, rotation_range, betag_range, betap_range.
    Runs under vmap (one image per call); uses 9 draws.
    """
    size = jnp.asarray(kernel_sizes, jnp.int32)[draws.choice((1.0,) * len(kernel_sizes))]
    omega = sample_sinc_omega(draws, size, cfg.sinc_omega_small, cfg.sinc_omega_large, cfg.sinc_small_below)
    sinc = sinc_kernel(size, omega)

    family_ids = jnp.asarray([KERNEL_FAMILIES.index(f) for f in cfg.kernel_list], jnp.int32)
    family = family_ids[draws.choice(cfg.kernel_prob)]
    anisotropic = (family == 1) | (family == 3) | (family == 5)
    sigma_x = draws.uniform(*cfg.blur_sigma)
    sigma_y = jnp.where(anisotropic, draws.uniform(*cfg.blur_sigma), sigma_x)
    theta = jnp.where(anisotropic, draws.uniform(*cfg.rotation_range), 0.0)
    # beta: half the time below 1, half above (basicsr draws U(lo, 1) or U(1, hi) with probability 1/2)
    plateau = family >= 4
    beta_lo = jnp.where(plateau, cfg.betap_range[0], cfg.betag_range[0])
    beta_hi = jnp.where(plateau, cfg.betap_range[1], cfg.betag_range[1])
    below = draws.bernoulli(0.5)
    u = draws.uniform()
    beta = jnp.where(below, beta_lo + (1.0 - beta_lo) * u, 1.0 + (beta_hi - 1.0) * u)

    mixed = jnp.select(
        [family <= 1, family <= 3],
        [
            gaussian_kernel(size, sigma_x, sigma_y, theta),
            generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, beta),
        ],
        plateau_kernel(size, sigma_x, sigma_y, theta, beta),
    )
    return jnp.where(draws.bernoulli(cfg.sinc_prob), sinc, mixed)  # (21, 21)


def sample_final_sinc(draws: Draws, cfg, kernel_sizes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The final sinc filter: (on, kernel (21, 21)). With probability cfg.sinc_prob a sinc of random size
    and cut-off from cfg.sinc_omega, else the pulse (identity; `on` is False). Uses 3 draws."""
    size = jnp.asarray(kernel_sizes, jnp.int32)[draws.choice((1.0,) * len(kernel_sizes))]
    omega = draws.uniform(*cfg.sinc_omega)
    on = draws.bernoulli(cfg.sinc_prob)
    return on, jnp.where(on, sinc_kernel(size, omega), pulse_kernel())  # (), (21, 21)
