"""The shared mechanics of every attack: eval mode, targeting, eps-ball projection, clipping,
seeding, batching, the attack losses and EOT-averaged input gradients."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.registry import Registry
from histoshield.specs import parse_number


def parse_eps(text: str | float | Sequence[float | str]) -> list[float]:
    """Parse '0,1/255,2/255,0.0314' (or a number or a list) into eps values in pixel units."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        parts: list[Any] = [text]
    elif isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
    else:
        parts = list(text)
    out = [parse_value(p, "eps", context=text, example="0,1/255,8/255,0.0314") for p in parts]
    if not out:
        raise HistoshieldError("no eps given: use e.g. --eps 0,1/255,8/255")
    return out


def parse_value(
    text: str | float, what: str, *, context: Any = None, example: str = "2/255"
) -> float:
    """Parse one number or fraction >= 0 ('1/255', '0.0314'); `what` names it in errors."""
    value = parse_number(text, what, context=context, example=example)
    if value < 0:
        raise HistoshieldError(f"{what} must be >= 0, got {text!r}: use e.g. {example}")
    return value


def resolve_class(value: int | str, classes: Sequence[str] | None, what: str = "target") -> int:
    """Turn a class index or name into an index, with a clear error for unknown classes."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        if classes is None or value not in list(classes):
            known = ", ".join(classes) if classes else "unknown (model has no class names)"
            raise HistoshieldError(f"unknown {what} class {value!r}: choose one of {known}")
        return list(classes).index(value)
    index = int(value)
    if index < 0 or (classes is not None and index >= len(classes)):
        n = len(classes) if classes is not None else "?"
        raise HistoshieldError(f"{what} class index {index} is out of range for {n} classes")
    return index


LOSSES = ("margin", "ce")

# Every attack class registers itself here (`@register`); `histoshield.attacks` imports them all.
REGISTRY: Registry[type[Attack]] = Registry("attack")
register = REGISTRY.register


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{k≠y} z_k - z_y per image: > 0 exactly when the image is misclassified.

    The logit margin (Carlini & Wagner 2017) is linear in the logits, so its input gradient
    never vanishes however confident the model; it is valid for 2 classes (unlike DLR).
    """
    z_y = logits.gather(1, y[:, None])[:, 0]
    return logits.scatter(1, y[:, None], float("-inf")).amax(1) - z_y


def attack_loss(
    loss: str, logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None
) -> torch.Tensor:
    """Per-image objective an attack ascends: away from the label `y`, or towards `t`."""
    if loss == "ce":
        if t is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, t, reduction="none")
    if t is None:
        return margin_loss(logits, y)
    return -margin_loss(logits, t)


def check_loss(loss: str) -> str:
    """`loss` must be one of LOSSES (case-insensitive)."""
    key = str(loss).strip().lower()
    if key not in LOSSES:
        raise HistoshieldError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return key


def check_steps(steps: int, name: str = "steps") -> int:
    """Steps/iterations must be a positive integer."""
    if int(steps) != steps or steps < 1:
        raise HistoshieldError(f"{name} must be an integer >= 1, got {steps!r}")
    return int(steps)


class Attack:
    """Base attack: subclasses implement `perturb(x, y, t)` for one batch on the model's device.

    `y` holds true labels, `t` the target labels (None for untargeted). The base class puts the
    model in eval mode (restored afterwards), never touches the caller's tensors, splits into
    batches, draws all randomness from `self.generator` (seeded per call, so a seed gives the same
    result), and projects the output into the eps-ball and [0,1] as a last guard.

    Args (common to every attack; each attack's own are in its class docstring):
        model (nn.Module, required): maps (N,3,H,W) images in [0,1] to (N,C) logits (a `HistoModel`
            does its own normalisation). Its `classes` and `default_eot` are used when present.
        eps (float | None, default 8/255): perturbation budget in pixel units, in the attack's
            `norm`; None = unbounded (minimum-norm attacks). Must be finite and >= 0.
        target (int | str | None, default None): class index or name to push every image
            towards; None = untargeted (away from the true label).
        classes (list[str] | None, default model.classes): class names, to resolve `target`.
        seed (int, default 0): seeds `self.generator` anew on every call: same seed, same output.
        eot (int | None, default model.default_eot or 1): gradients averaged per step
            (Expectation over Transformation, for randomized models).
        batch_size (int | None, default None): images per `perturb` call; None = all at once.

    Shape:
        - images: (N, 3, H, W) float in [0, 1]; labels: (N,) true class indices (long).
        - output: same shape, dtype and device as images, inside B_norm(images, eps) ∩ [0, 1].

    Capabilities (class attributes, read by the harness instead of attack names): `norm`
    ("linf", "l2" or None), `iterative`, `black_box` (outputs only, no gradients), `randomized`
    (result depends on `seed`), `minimum_norm` (searches the smallest perturbation; eps only
    caps it), `supports_targeted`. After a call, `queries` holds per-image model queries (black-box
    attacks, else None) and `grad_stats` counts all-zero / NaN input gradients.

    Example:
        >>> import torch
        >>> class Noise(Attack):  # a custom attack: only `perturb` is needed
        ...     name = "noise-example"
        ...     def perturb(self, x, y, t):
        ...         return x + 2 * self.eps * (2 * self.rand_like(x) - 1)  # overshoots the ball
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
        >>> adv = Noise(model, eps=4 / 255, seed=1)(x, y)  # the base projects it back
        >>> adv.shape, bool((adv - x).abs().max() <= 4 / 255 + 1e-6)
        (torch.Size([2, 3, 8, 8]), True)
        >>> torch.equal(adv, Noise(model, eps=4 / 255, seed=1)(x, y))  # seeded
        True
    """

    name = "attack"
    loss = "margin"  # what `objective` ascends (see attack_loss); LossAttack makes it a parameter
    norm: str | None = "linf"  # geometry of eps: "linf", "l2", or None (no eps)
    supports_targeted = True
    # Capabilities, read by the harness and the self-checks instead of attack names:
    iterative = False  # ascends its loss over several steps inside the eps-ball
    black_box = False  # uses only the model's outputs (no gradients)
    randomized = False  # draws random starts/proposals (its result depends on the seed)
    minimum_norm = False  # searches the smallest perturbation; eps only caps the result
    # True when `perturb`'s last operation already is the eps-ball ∩ [0,1] projection: the
    # final guard would then be a no-op pass over the batch, so it is skipped (hot path).
    output_in_ball = False

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None = 8 / 255,
        target: int | str | None = None,
        classes: Sequence[str] | None = None,
        seed: int = 0,
        eot: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.model = model
        if eps is not None:
            eps = float(eps)
            if not math.isfinite(eps) or eps < 0:
                raise HistoshieldError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps = eps
        self.classes = list(classes) if classes is not None else getattr(model, "classes", None)
        self.target = None if target is None else resolve_class(target, self.classes)
        self.seed = int(seed)
        self.eot = check_steps(eot if eot is not None else getattr(model, "default_eot", 1), "eot")
        self.batch_size = None if batch_size is None else check_steps(batch_size, "batch_size")
        self.generator: torch.Generator | None = None
        self.queries: torch.Tensor | None = None  # model queries per image (black-box attacks)
        self.grad_stats = {"n": 0, "zero": 0, "nan": 0}

    # ---- public -------------------------------------------------------------------------
    @property
    def targeted(self) -> bool:
        """True when the attack pushes images towards `target` rather than away from the label."""
        return self.target is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return adversarial images for `images` (N,3,H,W in [0,1]) with true `labels` (N,)."""
        x, y = self._check_inputs(images, labels)
        t = None
        if self.target is not None:
            if bool((y == self.target).any()):
                raise HistoshieldError(
                    f"target class {self._class_name(self.target)} equals the true label of "
                    f"{int((y == self.target).sum())} image(s): attack only other classes "
                    "(e.g. --only) or pick another target"
                )
            t = torch.full_like(y, self.target)
        # Only modules actually in training mode are switched (usually none: one traversal
        # instead of two recursive .train() walks per call), and exactly those are restored.
        training = [m for m in self.model.modules() if m.training]
        if training:
            self.model.eval()
        self.grad_stats = {"n": 0, "zero": 0, "nan": 0}
        queries = []
        try:
            device = _device_of(self.model, x)
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
            out = []
            bs = self.batch_size or len(x)
            for i in range(0, len(x), bs):
                xb = x[i : i + bs].to(device)
                yb = y[i : i + bs].to(device)
                tb = None if t is None else t[i : i + bs].to(device)
                self.queries = None
                adv = self.perturb(xb, yb, tb).detach()
                if not self.output_in_ball:
                    adv = self.project(xb, adv)
                if adv.data_ptr() == xb.data_ptr():  # never hand back the caller's storage
                    adv = adv.clone()
                out.append(adv.to(images.device))
                if self.queries is not None:
                    queries.append(self.queries.detach().cpu())
        finally:
            for m in training:
                m.training = True
        self.queries = torch.cat(queries) if queries else None
        if len(out) == 1:  # one batch: no concatenation copy
            return out[0]
        return torch.cat(out) if out else x.clone()

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Attack one batch; implemented by each attack."""
        raise NotImplementedError

    # ---- helpers for subclasses -----------------------------------------------------------
    def linf_box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel bounds of B∞(x, eps) ∩ [0,1]: computed once per batch, then every
        projection is one `clamp(adv, lo, hi)` instead of max, min and a [0,1] clip."""
        eps = float(self.eps or 0.0)
        return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)

    def project(self, x: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """Project `adv` into the eps-ball around `x` (in the attack's norm) and into [0,1]."""
        if self.eps is not None and self.norm == "linf":
            return torch.clamp(adv, *self.linf_box(x))
        if self.eps is not None and self.norm == "l2":
            delta = adv - x
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            factor = (self.eps / norms).clamp(max=1.0).view(-1, 1, 1, 1)
            adv = x + delta * factor
        return adv.clamp(0.0, 1.0)

    def objective(self, logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None):
        """Per-image loss the attack ascends: `self.loss` away from the label or to the target."""
        return attack_loss(self.loss, logits, y, t)

    def input_grad(
        self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, loss_fn=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """EOT-averaged gradient of the summed objective w.r.t. the input only, and the logits.

        Summed (not mean) loss keeps each image's gradient independent of the batch size;
        `autograd.grad` on the input alone never accumulates parameter gradients.
        """
        loss_fn = loss_fn or self.objective
        x = x.detach().requires_grad_(True)
        logits = self.model(x)
        (grad,) = torch.autograd.grad(loss_fn(logits, y, t).sum(), x)
        if self.eot > 1:
            for _ in range(self.eot - 1):
                logits = self.model(x)
                grad += torch.autograd.grad(loss_fn(logits, y, t).sum(), x)[0]
            grad /= self.eot
        return grad, logits.detach()

    def record_grad(self, grad: torch.Tensor) -> None:
        """Count images whose input gradient is all zero or has NaNs (gradient-masking signs)."""
        # One reduction: the per-image max |g| is NaN iff the image has a NaN, 0 iff all are
        # zero (isnan().any() was a second pass; linalg.vector_norm(inf) is ~20x slower on CPU).
        peak = grad.detach().flatten(1).abs().amax(dim=1)
        nan, zero = torch.stack([peak.isnan().sum(), (peak == 0).sum()]).tolist()
        self.grad_stats["n"] += len(peak)
        self.grad_stats["nan"] += nan
        self.grad_stats["zero"] += zero

    def rand_like(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform [0,1) noise from the attack's seeded generator."""
        return torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise from the attack's seeded generator."""
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def num_classes(self, x: torch.Tensor) -> int:
        """Number of model outputs (from `classes` when known, else one forward pass)."""
        if self.classes is not None:
            return len(self.classes)
        with torch.no_grad():
            return int(self.model(x[:1]).shape[1])

    def library_seed(self) -> int:
        """A seed for library attacks that reseed torch's global RNG (we fork it around them)."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator).item())

    # ---- internals ------------------------------------------------------------------------
    def _class_name(self, index: int) -> str:
        if self.classes is not None and 0 <= index < len(self.classes):
            return f"{self.classes[index]!r}"
        return str(index)

    def _check_inputs(self, images: torch.Tensor, labels: torch.Tensor):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise HistoshieldError(f"attack input must be an RGB batch (N,3,H,W), got {shape}")
        if not images.is_floating_point():
            raise HistoshieldError("attack input must be float in [0,1]: convert with to_float")
        if images.numel():
            lo, hi = torch.aminmax(images.detach())  # one pass over the batch, one sync
            if not bool((lo >= 0) & (hi <= 1)):  # NaN fails too
                raise HistoshieldError("attack input must lie in [0,1]: convert with to_float")
        labels = torch.as_tensor(labels, device=images.device).long().reshape(-1)
        if len(labels) != len(images):
            raise HistoshieldError(f"{len(images)} images but {len(labels)} labels")
        # No defensive copy: attacks never write into x (checked for every attack in tests),
        # and __call__ never returns the caller's storage.
        return images.detach(), labels

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, target={self.target}, seed={self.seed})"


class LossAttack(Attack):
    """Base for gradient attacks that take `loss="margin"` (default) or `loss="ce"`.

    Args:
        loss (str, default "margin"): "margin" (max_{k≠y} z_k - z_y) or "ce" (cross-entropy),
            ascended away from the label, or its negative towards the target; plus `Attack`'s.

    Why margin by default: with a confident model the softmax saturates to exactly 1.0 in float32,
    the cross-entropy gradient is then exactly 0, sign(0) = 0, and a CE attack leaves the image
    unchanged — robustness that is only saturation. The margin's gradient never vanishes. For 2
    classes CE = softplus(margin), so ∇CE = σ(margin)·∇margin points the same way wherever CE's
    gradient is not zero: sign steps are the paper's, minus the saturation failure.
    """

    def __init__(self, model: nn.Module, *, loss: str = "margin", **common: Any) -> None:
        super().__init__(model, **common)
        self.loss = check_loss(loss)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, loss={self.loss})"


def _device_of(model: nn.Module, x: torch.Tensor) -> torch.device:
    for p in model.parameters():
        return p.device
    return x.device


class LibraryAttack(Attack):
    """Base for attacks delegated to torchattacks: forks torch's RNG so their global reseeding
    neither leaks out nor depends on what ran before."""

    def run_library(self, atk, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Run a torchattacks attack deterministically on one batch."""
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.library_seed())
            return atk(x, labels).detach()
