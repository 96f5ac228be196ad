"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019, "Certified Adversarial Robustness via
Randomized Smoothing").

The smoothed classifier g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I), with x in [0,1] pixel
space. If the top class has probability ≥ p_A > 1/2, g is constant within the L2 ball of radius
σ·Φ⁻¹(p_A). CERTIFY (their Algorithm 1) guesses the top class from n0 noisy samples, counts it
in n fresh samples, and takes p_A as the one-sided (1−α) Clopper–Pearson lower bound; PREDICT
abstains unless a two-sided binomial test between the top two classes rejects at level α.

`clip=True` (default) clips x + δ to [0,1] before the base classifier, matching how the
Gaussian-noise defense trains; the guarantee still holds because clipping is part of the base
classifier f. Noise is drawn from a generator seeded with `seed`, so results are reproducible;
`reseed(seed)` restarts it (certify seeds it per image, so an image's noise does not depend on
which images were certified before it, or on which torchrun rank certifies it).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm
from torch import nn

from histoshield.errors import HistoshieldError

ABSTAIN = -1


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1−alpha) Clopper–Pearson lower bound on a binomial proportion k/n."""
    if k <= 0:
        return 0.0
    return float(beta_dist.ppf(alpha, k, n - k + 1))


class Smoothed:
    """Monte-Carlo randomized smoothing around a base classifier (images → logits)."""

    def __init__(
        self,
        model: nn.Module,
        sigma: float,
        num_classes: int | None = None,
        *,
        seed: int = 0,
        clip: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if not sigma > 0:
            raise HistoshieldError(f"smoothing sigma must be > 0 (got {sigma})")
        if num_classes is None:
            classes = getattr(model, "classes", None)
            if not classes:
                raise HistoshieldError("Smoothed needs num_classes (the model has no .classes)")
            num_classes = len(classes)
        self.model = model
        self.sigma = float(sigma)
        self.num_classes = int(num_classes)
        self.clip = clip
        self.device = torch.device(device) if device is not None else _model_device(model)
        # noise is drawn on the model's device: CPU sampling would dominate GPU certification
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

    def reseed(self, seed: int) -> None:
        """Restart the noise generator at `seed`."""
        self.generator.manual_seed(int(seed))

    @torch.no_grad()
    def sample_counts(self, x: torch.Tensor, num: int, batch: int = 256) -> np.ndarray:
        """Class counts of the base classifier over `num` noisy copies of one image."""
        x = _one_image(x).to(self.device)
        was_training = self.model.training
        self.model.eval()
        counts = np.zeros(self.num_classes, dtype=np.int64)
        try:
            remaining = int(num)
            while remaining > 0:
                b = min(int(batch), remaining)
                remaining -= b
                noise = torch.randn(
                    (b, *x.shape), generator=self.generator, device=self.device, dtype=x.dtype
                )
                noisy = x.unsqueeze(0) + noise * self.sigma
                if self.clip:
                    noisy = noisy.clamp(0.0, 1.0)
                pred = self.model(noisy).argmax(dim=1).cpu().numpy()
                counts += np.bincount(pred, minlength=self.num_classes)[: self.num_classes]
        finally:
            self.model.train(was_training)
        return counts

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch: int = 256) -> int:
        """Smoothed prediction, or -1 (abstain) when the top two classes are not separated."""
        check_settings(n=n, alpha=alpha, batch=batch)
        counts = self.sample_counts(x, n, batch)
        top2 = np.argsort(counts)[::-1][:2]
        n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]]) if len(top2) > 1 else 0
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch: int = 256
    ) -> tuple[int, float]:
        """(class, certified L2 radius), or (-1, 0.0) when p_A's lower bound is below 1/2."""
        check_settings(n=n, n0=n0, alpha=alpha, batch=batch)
        c_a = int(np.argmax(self.sample_counts(x, n0, batch)))
        n_a = int(self.sample_counts(x, n, batch)[c_a])
        p_a = lower_confidence_bound(n_a, n, alpha)
        if p_a < 0.5:
            return ABSTAIN, 0.0
        return c_a, self.sigma * float(norm.ppf(p_a))


def check_settings(*, n: int, alpha: float, n0: int | None = None, batch: int = 1) -> None:
    """Refuse sample counts, alpha or batch sizes that cannot certify (batch 0 would never end)."""
    if n < 1 or (n0 is not None and n0 < 1):
        raise HistoshieldError(f"smoothing needs n >= 1 and n0 >= 1 samples (got n={n}, n0={n0})")
    if not 0 < alpha < 1:
        raise HistoshieldError(f"smoothing alpha must be in (0, 1) (got {alpha})")
    if batch < 1:
        raise HistoshieldError(f"smoothing batch must be >= 1 noisy copies (got {batch})")


def _one_image(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise HistoshieldError(f"smoothing takes one image (3,H,W); got shape {tuple(x.shape)}")
    return x


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
