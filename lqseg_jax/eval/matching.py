"""Sparse matching metrics of UAWarpC (refign.md 3.10; refign helpers/metrics.py SparseEPE, after
DenseMatching) and the evaluation loop over a matching set.

Per image, with the flow target -> reference (H, W, 2) and the uncertainty u = 1 - P (H, W) at the padded
size: a correspondence (x_ref, y_ref, x, y) is valid when round(x), round(y) and round(x_ref), round(y_ref)
all lie in [0, W) x [0, H) (round half to even, as torch.round); g = (x_ref - x, y_ref - y); the estimate is
the flow at the nearest pixel (round(y), round(x)); EPE_k = |g - f|_2 (float32).
- AEPE = mean over images with >= 1 valid point of mean_k EPE_k;
- PCK-t (t = 1, 3, 5, 10) = sum_images #{EPE_k <= t} / sum_images #valid (pooled);
- AUSE (per image, averaged over the same images): q_t = t / 50, t = 0..49; the sparsification curve
  S_t = mean EPE over the points with -u >= quantile(-u, q_t) (linear interpolation, as torch.quantile),
  S_50 = 0; the oracle O_t the same with -EPE for -u; both divided by max(O) + 1e-6;
  AUSE = |trapz(S) - trapz(O)| over x = 0, 0.02, ..., 1.
Pre-processing (`prepare_pair`): both images resized with PIL lanczos so that the short side is 480 (long =
int(480 long / short), points scaled by new / old per axis), normalised, padded bottom-right with 0 to the
larger height and width of the two. Validation during training (refign's MegaDepth val: `dims` 480x720) resizes
both images to fixed `dims` (h, w) instead (lanczos, points scaled per axis), eval.dims.

`evaluate_state(trainer, state)`: a train state on config.eval's matching set (scripts/eval_matching.py, and
the training loop every config.eval_every steps through UAWarpCSystem.training_evaluation).
`export_state(trainer, state, out, source)`: the network as a converted folder (stage 2's starting point, or
Refign's alignment network, config.uda.refign.alignment.path), its architecture fields in meta.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

THRESHOLDS = (1, 3, 5, 10)
AUSE_INTERVALS = 50


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """refign Resize(short): (h', w') with the short side `short` and long = int(short * long / short_old)."""
    if min(h, w) == short:
        return h, w
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def resize_short_side(image: np.ndarray, points: np.ndarray, short: int) -> tuple[np.ndarray, np.ndarray]:
    """image (h, w, 3) uint8 lanczos-resized to the short side `short`; points (n, 2) x, y scaled per axis."""
    return resize_to(image, points, short_side_size(*image.shape[:2], short))


def resize_to(image: np.ndarray, points: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """image (h, w, 3) uint8 lanczos-resized to size (h', w'); points (n, 2) x, y scaled per axis."""
    h, w = image.shape[:2]
    nh, nw = int(size[0]), int(size[1])
    if (nh, nw) == (h, w):
        return image, points
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.LANCZOS))
    return resized, points * np.array([nw / w, nh / h], np.float32)


def pad_bottom_right(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """x (h0, w0, c) padded with 0 at the bottom and right to (h, w, c)."""
    return np.pad(x, ((0, h - x.shape[0]), (0, w - x.shape[1]), (0, 0)))


def prepare_pair(
    example: dict, short_side: int, mean, std, dims: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target, reference) normalised float32 (H, W, 3), padded to a common size, and the matches (n, 4)
    x_ref, y_ref, x, y in their pixels. `dims` (h, w): both resized to it; else short_side (0 keeps the
    stored size)."""
    image, ref, m = example["image"], example["reference"], np.asarray(example["matches"], np.float32)
    pts_ref, pts = m[:, :2], m[:, 2:]
    if dims:
        image, pts = resize_to(image, pts, tuple(dims))
        ref, pts_ref = resize_to(ref, pts_ref, tuple(dims))
    elif short_side:
        image, pts = resize_short_side(image, pts, short_side)
        ref, pts_ref = resize_short_side(ref, pts_ref, short_side)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    h, w = max(image.shape[0], ref.shape[0]), max(image.shape[1], ref.shape[1])
    trg = pad_bottom_right((image.astype(np.float32) - mean) / std, h, w)
    src = pad_bottom_right((ref.astype(np.float32) - mean) / std, h, w)
    return trg, src, np.concatenate([pts_ref, pts], 1)


def _quantile_mean(values: np.ndarray, key: np.ndarray, q: float) -> float:
    """Mean of `values` over the points with key >= quantile(key, q) (linear interpolation)."""
    t = np.quantile(key, q, method="linear")
    return float(np.mean(values[key >= t]))


def ause(epe: np.ndarray, uncertainty: np.ndarray, intervals: int = AUSE_INTERVALS) -> float:
    """AUSE of one image's EPEs (n,) ranked by `uncertainty` (n,) (high uncertainty removed first)."""
    epe = np.asarray(epe, np.float32)
    neg_u, neg_e = -np.asarray(uncertainty, np.float32), -epe
    quants = [t / intervals for t in range(intervals)]
    sparse = np.array([_quantile_mean(epe, neg_u, q) for q in quants] + [0.0])
    oracle = np.array([_quantile_mean(epe, neg_e, q) for q in quants] + [0.0])
    top = oracle.max() + 1e-6
    x = np.linspace(0.0, 1.0, intervals + 1)
    return float(abs(np.trapezoid(sparse / top, x) - np.trapezoid(oracle / top, x)))


@dataclasses.dataclass
class MatchingMetrics:
    """Accumulates SparseEPE over images; `compute()` -> {"AEPE", "PCK_1", "PCK_3", "PCK_5", "PCK_10",
    "AUSE"} (AUSE only when uncertainties were given), plus the counts."""

    aepe_sum: float = 0.0
    ause_sum: float = 0.0
    with_uncertainty: bool = True
    pck: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(THRESHOLDS, 0))
    num_valid: int = 0
    num_images: int = 0

    def update(self, flow: np.ndarray, matches: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        """flow (H, W, 2) target -> reference, matches (n, 4) x_ref, y_ref, x, y, uncertainty (H, W)."""
        h, w, _ = flow.shape
        m = np.asarray(matches, np.float32)
        r = np.round(m)  # half to even, as torch.round
        valid = np.all((r >= 0) & (r < np.array([w, h, w, h], np.float32)), axis=1)
        if not valid.any():
            return
        m, r = m[valid], r[valid].astype(np.int64)
        gt = m[:, :2] - m[:, 2:]  # (n, 2)
        est = flow[r[:, 3], r[:, 2]].astype(np.float32)  # (n, 2) nearest pixel
        epe = np.sqrt(np.sum((gt - est) ** 2, axis=1, dtype=np.float32))  # (n,)
        self.aepe_sum += float(np.mean(epe, dtype=np.float64))
        for t in THRESHOLDS:
            self.pck[t] += int(np.sum(epe <= t))
        self.num_valid += len(epe)
        self.num_images += 1
        if uncertainty is None:
            self.with_uncertainty = False
        elif self.with_uncertainty:
            self.ause_sum += ause(epe, uncertainty[r[:, 3], r[:, 2]])

    def compute(self) -> dict[str, float]:
        if not self.num_images:
            raise ValueError("MatchingMetrics: no image had a valid correspondence")
        out = {"AEPE": self.aepe_sum / self.num_images}
        out.update({f"PCK_{t}": self.pck[t] / self.num_valid for t in THRESHOLDS})
        if self.with_uncertainty:
            out["AUSE"] = self.ause_sum / self.num_images
        out.update(num_images=self.num_images, num_correspondences=self.num_valid)
        return out


def evaluate_matching(
    match: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    examples: Sequence[dict],
    *,
    short_side: int = 480,
    mean: Sequence[float],
    std: Sequence[float],
    dims: Sequence[int] = (),
    progress: bool = True,
) -> dict[str, float]:
    """Runs `match(target, reference)` (normalised (1, H, W, 3) -> flow (1, H, W, 2), uncertainty (1, H, W))
    on each example (its "image", "reference", "matches") and returns MatchingMetrics.compute()."""
    metrics = MatchingMetrics()
    for example in tqdm(examples, desc="matching eval", disable=not progress, dynamic_ncols=True):
        trg, src, matches = prepare_pair(example, short_side, mean, std, dims)
        flow, uncert = match(trg[None], src[None])
        metrics.update(np.asarray(flow[0]), matches, np.asarray(uncert[0]))
    return metrics.compute()


def make_match_fn(trainer):
    """Jitted (weights, normalised target (1, H, W, 3), reference) -> (flow (1, H, W, 2), uncertainty 1 - P
    (1, H, W)) of the eval-mode network; one per trainer, so evaluations during training reuse it."""
    cached = getattr(trainer, "_match_fn", None)
    if cached is not None:
        return cached
    import jax
    from flax import nnx

    from ..models.uawarpc import confidence

    graphdef = trainer.eval_graphdef

    @jax.jit
    def match(params, rest, target, reference):
        model = nnx.merge(graphdef, params, rest)
        flow, log_var = model.dense_flow(target, reference)  # (1, H, W, 2), (1, H, W, 1)
        return flow, 1.0 - confidence(log_var)[..., 0]

    trainer._match_fn = match
    return match


class _Sized:
    """An iterable with a length (for the progress bar)."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self):
        return self.n


def evaluate_state(trainer, state, *, progress: bool = False) -> dict[str, float]:
    """MatchingMetrics of `state` (eval mode, EMA weights when the config evaluates them) on config.eval's
    matching set: eval.source at eval.root, split eval.split, its first eval.max_pairs (0: all), resized to
    eval.dims (h, w) or else to the short side eval.short_side (0: the stored size)."""
    from ..data_pipelines.matching_stream import eval_example, matching_source

    config = trainer.config
    e = config.eval
    source = matching_source(e.source, e.root, e.split)
    count = min(len(source), e.max_pairs) if e.max_pairs else len(source)
    match = make_match_fn(trainer)
    params, rest = trainer.eval_params(state), state.rest
    return evaluate_matching(
        lambda target, reference: match(params, rest, target, reference),
        _Sized((eval_example(source[i]) for i in range(count)), count),
        short_side=e.short_side,
        mean=config.data.mean,
        std=config.data.std,
        dims=tuple(e.get("dims", ())),
        progress=progress,
    )


def export_state(trainer, state, out, source: str):
    """The eval-mode network of `state` written with convert.common.save_converted at `out`; meta.json holds
    the architecture to rebuild it: vgg_widths ([] = VGG-16's), coarse_size, head_width."""
    from ..convert.common import save_converted

    m = trainer.config.model
    meta = dict(
        format="uawarpc",
        source=source,
        vgg_widths=list(m.vgg_widths),
        coarse_size=int(m.get("coarse_size", 256)),
        head_width=float(m.get("head_width", 1.0)),
    )
    return save_converted(out, trainer.model_from_state(state), meta)


def format_table(results: dict[str, float], title: str) -> str:
    """A markdown table of the metrics (AEPE px, PCK %, AUSE)."""
    rows = [("AEPE", f"{results['AEPE']:.3f}")]
    rows += [(f"PCK-{t}", f"{100 * results[f'PCK_{t}']:.2f}") for t in THRESHOLDS]
    if "AUSE" in results:
        rows.append(("AUSE", f"{results['AUSE']:.4f}"))
    rows.append(("images / correspondences", f"{results['num_images']} / {results['num_correspondences']}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{title}", f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)
