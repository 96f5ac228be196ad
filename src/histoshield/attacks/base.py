"""The shared mechanics of every attack: eval mode, targeting, eps-ball projection, clipping,
per-image seeding, batching, pass counting, early stopping, the attack losses and EOT-averaged
input gradients."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.registry import Registry
from histoshield.runtime import image_seed
from histoshield.specs import Param, parse_number


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


def succeeded(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """Per image: the attack has won (misclassified; targeted: predicted as the target)."""
    pred = logits.argmax(1)
    return pred != y if t is None else pred == t


def count(default: int | None) -> Param:
    """A schema entry for an integer >= 1 (steps, restarts, queries, eot, batch size)."""
    return Param(int, default, lambda v: v >= 1, ">= 1")


def real(default: float | None, check=None, rule: str = "", *, fraction: bool = False) -> Param:
    """A schema entry for a number (fractions like 2/255 work); `check` defaults to >= 0."""
    if check is None:
        check, rule = (lambda v: v >= 0), ">= 0"
    return Param(float, default, check, rule, fraction=fraction)


def check_steps(steps: int, name: str = "steps") -> int:
    """Steps/iterations must be a positive integer."""
    if int(steps) != steps or steps < 1:
        raise HistoshieldError(f"{name} must be an integer >= 1, got {steps!r}")
    return int(steps)


class Attack:
    """Base attack: subclasses implement `perturb(x, y, t)` for one batch on the model's device.

    `y` holds true labels, `t` the target labels (None for untargeted). The base class puts the
    model in eval mode (restored afterwards), never touches the caller's tensors, splits into
    batches, and projects the output into the eps-ball and [0,1] as a last guard.

    Randomness is per image: image `index[i]` (the caller's global image index, default its
    position) draws from its own generator seeded with `image_seed(seed, index[i])`, so an image
    gets the same noise whatever batch or torchrun rank it lands in (`rand_like`, `rand_rows`).
    `passes` counts model evaluations per image over the last call: `forward` (no gradient) and
    `forward_backward` (input requires grad), for every attack including library ones.
    `early_stop=True` stops attacking an image once it is misclassified (see `LossAttack.walk`).
    `amp=True` runs the model under bf16 autocast while crafting (the images stay float32 and
    are scored in float32 by the harness); `channels_last=True` hands the model NHWC batches.
    Both are speed options for GPUs; tests bound how much they change the results (docs/scaling.md).

    Args (common to every attack; each attack's own are in its class docstring):
        model (nn.Module, required): maps (N,3,H,W) images in [0,1] to (N,C) logits (a `HistoModel`
            does its own normalisation). Its `classes` and `default_eot` are used when present.
        eps (float | None, default 8/255): perturbation budget in pixel units, in the attack's
            `norm`; None = unbounded (minimum-norm attacks). Must be finite and >= 0.
        target (int | str | None, default None): class index or name to push every image
            towards; None = untargeted (away from the true label).
        classes (list[str] | None, default model.classes): class names, to resolve `target`.
        seed (int, default 0): image i draws from `image_seed(seed, index[i])` (same seed, same
            output).
        eot (int | None, default model.default_eot or 1): gradients averaged per step
            (Expectation over Transformation, for randomized models).
        batch_size (int | None, default None): images per `perturb` call; None = all at once.
        early_stop (bool, default False): stop attacking an image once it is misclassified (the
            harness turns it on for robust-accuracy measurement; see `LossAttack.walk`).
        amp (bool, default False): bf16 autocast while crafting (a GPU speed option).
        channels_last (bool, default False): hand the model NHWC batches (a GPU speed option).

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
    # The typed parameter schema: `params` holds the ones a class adds (or whose default it
    # changes); `schema` (built per subclass by __init_subclass__) is the full set, own first.
    # The one spec parser (`histoshield.specs.parse_spec`) reads it, and so do the serve API,
    # `histoshield attacks` and `accepted_params`; tests check it against the signatures.
    params: ClassVar[dict[str, Param]] = {
        "eps": real(8 / 255, fraction=True),
        "target": Param(str, None),
        "seed": Param(int, 0),
        "eot": count(None),
        "batch_size": count(None),
        "early_stop": Param(bool, False),
        "amp": Param(bool, False),
        "channels_last": Param(bool, False),
    }
    schema: ClassVar[dict[str, Param]] = dict(params)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = dict(vars(cls).get("params", {}))
        inherited = {k: v for k, v in cls.__mro__[1].schema.items() if k not in own}
        cls.schema = {**own, **inherited}

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
        early_stop: bool = False,
        amp: bool = False,
        channels_last: bool = False,
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
        self.early_stop = _check_bool(early_stop, "early_stop")
        self.amp = _check_bool(amp, "amp")
        self.channels_last = _check_bool(channels_last, "channels_last")
        self.index: torch.Tensor | None = None  # global indices of the images in this batch
        # Generators are made on first use (most attacks draw nothing, or only at the start):
        # per image, seeded image_seed(seed, index[i]); per batch (`generator`) from the indices.
        self._device: torch.device | None = None
        self._image_gens: list[torch.Generator | None] = []
        self._generator: torch.Generator | None = None
        self.queries: torch.Tensor | None = None  # model queries per image (black-box attacks)
        self.grad_stats = {"n": 0, "zero": 0, "nan": 0}
        self.passes = {"forward": 0, "forward_backward": 0}

    # ---- public -------------------------------------------------------------------------
    @property
    def targeted(self) -> bool:
        """True when the attack pushes images towards `target` rather than away from the label."""
        return self.target is not None

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return adversarial images for `images` (N,3,H,W in [0,1]) with true `labels` (N,).

        `index` (N,) names each image globally (its randomness derives from seed and index);
        default 0..N-1.
        """
        x, y = self._check_inputs(images, labels)
        index = torch.arange(len(x)) if index is None else torch.as_tensor(index).long().cpu()
        if len(index) != len(x):
            raise HistoshieldError(f"{len(x)} images but {len(index)} image indices")
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
        self.passes = {"forward": 0, "forward_backward": 0}
        hook = self.model.register_forward_pre_hook(self._count_pass)
        queries = []
        try:
            device = _device_of(self.model, x)
            out = []
            bs = self.batch_size or len(x)
            for i in range(0, len(x), bs):
                self._seed_batch(index[i : i + bs], device)
                xb = x[i : i + bs].to(device)
                yb = y[i : i + bs].to(device)
                tb = None if t is None else t[i : i + bs].to(device)
                self.queries = None
                with self._fast(device):
                    adv = self.perturb(self._layout(xb), yb, tb).detach()
                if not self.output_in_ball:
                    adv = self.project(xb, adv)
                if adv.data_ptr() == xb.data_ptr():  # never hand back the caller's storage
                    adv = adv.clone()
                out.append(adv.to(images.device))
                if self.queries is not None:
                    queries.append(self.queries.detach().cpu())
        finally:
            hook.remove()
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
        """Uniform [0,1) noise shaped like the batch `x`, row i from image i's generator."""
        return self.rand_rows(None, x.shape[1:], device=x.device, dtype=x.dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like the batch `x`, row i from image i's generator."""
        return self.rand_rows(None, x.shape[1:], device=x.device, dtype=x.dtype, normal=True)

    def rand_rows(
        self,
        rows: torch.Tensor | None,
        shape: Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        normal: bool = False,
    ) -> torch.Tensor:
        """(len(rows), *shape) uniform (or normal) noise, one draw per batch image `rows`
        (None: every image of the batch) from that image's own generator, so an image's
        draws never depend on which other images share its batch."""
        picked = range(len(self._image_gens)) if rows is None else rows.tolist()
        device = device if device is not None else (self._device or "cpu")
        # Each row is filled in place by its image's generator: the same numbers as
        # torch.rand(shape, generator=g) (which is empty(shape).uniform_(generator=g)), without
        # a tensor per image and the stack copy.
        out = torch.empty((len(picked), *shape), device=device, dtype=dtype)
        for j, r in enumerate(picked):
            row = out[j]
            if normal:
                row.normal_(generator=self._image_gen(r))
            else:
                row.uniform_(generator=self._image_gen(r))
        return out

    @property
    def generator(self) -> torch.Generator | None:
        """The batch's generator (library attacks draw per batch), seeded from the seed and the
        batch's image indices; None outside a call."""
        if self._generator is None and self.index is not None:
            first = int(self.index[0]) if len(self.index) else 0
            batch_seed = image_seed(self.seed, first, salt=f"batch{len(self.index)}")
            self._generator = torch.Generator(device=self._device).manual_seed(batch_seed)
        return self._generator

    def _image_gen(self, row: int) -> torch.Generator:
        """Batch image `row`'s generator, made (seeded from its global index) on first use."""
        g = self._image_gens[row]
        if g is None:
            assert self.index is not None
            seed = image_seed(self.seed, int(self.index[row]))
            g = self._image_gens[row] = torch.Generator(device=self._device).manual_seed(seed)
        return g

    def num_classes(self, x: torch.Tensor) -> int:
        """Number of model outputs (from `classes` when known, else one forward pass)."""
        if self.classes is not None:
            return len(self.classes)
        with torch.no_grad():
            return int(self.model(x[:1]).shape[1])

    def library_seed(self) -> int:
        """A seed for library attacks that reseed torch's global RNG (we fork it around them):
        drawn from the batch generator, which is seeded from the batch's image indices."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator).item())

    # ---- internals ------------------------------------------------------------------------
    def _fast(self, device: torch.device):
        """bf16 autocast on `device` when `amp` (a no-op context otherwise)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _seed_batch(self, index: torch.Tensor, device: torch.device) -> None:
        """Start a batch: its image indices; its per-image generators and batch generator are
        made when first drawn from (an attack that draws nothing makes none)."""
        self.index = index
        self._device = device
        self._image_gens = [None] * len(index)
        self._generator = None

    def _count_pass(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: count images per model call, as gradient passes when the input
        needs a gradient (the caller then runs the backward pass too)."""
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        key = "forward_backward" if torch.is_grad_enabled() and x.requires_grad else "forward"
        self.passes[key] += int(x.shape[0]) if x.ndim else 1

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

    params = {"loss": Param(str, "margin", lambda v: v.lower() in LOSSES, "one of margin, ce")}

    def __init__(self, model: nn.Module, *, loss: str = "margin", **common: Any) -> None:
        super().__init__(model, **common)
        self.loss = check_loss(loss)

    def walk(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None,
        adv: torch.Tensor,
        step: Callable[..., torch.Tensor],
        *,
        steps: int,
        box: tuple[torch.Tensor, torch.Tensor] | None = None,
        state: list[torch.Tensor] | None = None,
        record: bool = True,
        final: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`steps` gradient steps `adv = step(adv, grad, x, box, state)` from `adv` (in place).

        With `early_stop`, the logits of each gradient pass already say which images are
        misclassified at their current point: those are frozen there and leave the batch, so
        later steps cost only the images still standing. An image that is never fooled walks
        exactly the path of the full run, so early stopping can only find more adversarial
        images, never fewer. `state` holds per-image tensors (e.g. momentum) that shrink with
        the batch. `final` adds one forward pass at the last point, returning its objective
        (+inf for images frozen earlier, which always win a comparison). Returns (adv, fooled,
        loss): fooled marks images frozen because they were misclassified.
        """
        n = len(x)
        out = adv  # frozen images are written here; `adv` becomes a smaller copy once one is
        fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        live: torch.Tensor | None = None  # batch rows still attacked (None: all of them)
        state = list(state or [])
        for k in range(steps):
            grad, logits = self.input_grad(adv, y, t)
            if k == 0 and record:
                self.record_grad(grad)
            if self.early_stop:
                hit = self._confirmed(succeeded(logits, y, t), adv, y, t)
                if bool(hit.any()):
                    rows = torch.arange(n, device=x.device) if live is None else live
                    out[rows[hit]] = adv[hit]
                    fooled[rows[hit]] = True
                    keep = ~hit
                    live = rows[keep]
                    if len(live) == 0:
                        return out, fooled, _inf_loss(fooled) if final else None
                    adv, grad, x, y = adv[keep], grad[keep], x[keep], y[keep]
                    t = None if t is None else t[keep]
                    box = None if box is None else (box[0][keep], box[1][keep])
                    state = [s_[keep] for s_ in state]
            adv = step(adv, grad, x, box, state)
        loss = None
        if final:
            with torch.no_grad():
                logits = self.model(adv)
            last = self.objective(logits, y, t)
            if self.early_stop:
                hit = self._confirmed(succeeded(logits, y, t), adv, y, t)
                rows = torch.arange(n, device=x.device) if live is None else live
                fooled[rows[hit]] = True
            loss = _inf_loss(fooled)
            if live is None:
                loss = torch.where(fooled, loss, last)
            else:
                loss[live] = torch.where(fooled[live], loss[live], last)
        if live is not None:
            out[live] = adv
        elif adv is not out:
            out = adv
        return out, fooled, loss

    def _confirmed(
        self, hit: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None
    ) -> torch.Tensor:
        """Under `amp`, re-check bf16 hits in float32 (only those images): an image is frozen
        only if the float32 model — the one that is scored — is fooled too."""
        if not self.amp or not bool(hit.any()):
            return hit
        with torch.autocast(adv.device.type, enabled=False), torch.no_grad():
            ok = succeeded(self.model(adv[hit].float()), y[hit], None if t is None else t[hit])
        hit = hit.clone()
        hit[hit.clone()] = ok
        return hit

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, loss={self.loss})"


def _inf_loss(fooled: torch.Tensor) -> torch.Tensor:
    return torch.full(fooled.shape, float("inf"), device=fooled.device)


def _check_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise HistoshieldError(f"{name} must be true or false, got {value!r}")


def _device_of(model: nn.Module, x: torch.Tensor) -> torch.device:
    for p in model.parameters():
        return p.device
    return x.device


class LibraryAttack(Attack):
    """Base for attacks delegated to torchattacks: forks torch's RNG so their global reseeding
    neither leaks out nor depends on what ran before. They always run in float32 on contiguous
    batches (`amp`/`channels_last` are ignored: torchattacks' FAB reshapes with `.view`, and
    its bookkeeping assumes float32 logits)."""

    def _fast(self, device: torch.device):
        return torch.autocast(device.type, enabled=False)  # also inside an amp ensemble

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    def run_library(self, atk, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Run a torchattacks attack deterministically on one batch."""
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.library_seed())
            return atk(x, labels).detach()
