"""What the web app computes, without HTTP: loaded models, predict, attack, certify, Grad-CAM.

Attacks go through the one harness (`evaluation.harness.run_attacks`, every loaded model a
judge), certification through `evaluation.certify.certify_images`, Grad-CAM through
`evaluation.explain.gradcam`. The adversarial tile is quantised to 8 bits before it is scored:
the predictions shown are those of the PNG the user downloads, not of a float tensor.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.serve.jobs import Job, Watched

# Parameters a client may set in an attack spec, and the cap each one gets from `Limits`.
_CAPPED = {
    "steps": "max_steps",
    "restarts": "max_restarts",
    "max_queries": "max_queries",
    "eot": "max_eot",
    "search_steps": "max_restarts",
}
# Parameters the server sets itself (or that make no sense for one tile).
_RESERVED = ("eps", "seed", "classes", "batch_size", "target")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; everything past these is refused with a 4xx."""

    max_upload_bytes: int = 20_000_000
    max_pixels: int = 50_000_000  # refused at or above (the header is read, nothing decoded)
    tile_size: int = 224  # uploads are resized to this square working tile
    max_eps: float = 16 / 255  # L∞ radius, pixel units
    max_eps_l2: float = 8.0  # L2 radius of L2 attacks, pixel units
    max_steps: int = 100
    max_restarts: int = 2
    max_queries: int = 1000
    max_eot: int = 4
    default_steps: int = 10  # the quick budget when the client gives none
    default_queries: int = 100
    max_certify_n: int = 5000
    job_seconds: float = 120.0  # wall-clock limit of one attack / certify job
    attack_workers: int = 1
    max_jobs: int = 4  # attack + certify jobs queued or running
    predict_workers: int = 2
    max_predicts: int = 16  # predict requests queued or running

    def to_dict(self) -> dict[str, Any]:
        """The limits as the API reports them."""
        return asdict(self)


@dataclass
class Loaded:
    """One model served: a short name, its checkpoint and what it was trained with."""

    name: str
    model: nn.Module
    checkpoint: str
    defense: str | None

    def info(self) -> dict[str, Any]:
        """The model as /api/v1/models lists it."""
        m = self.model
        return {
            "name": self.name,
            "architecture": getattr(m, "name", type(m).__name__),
            "classes": list(m.classes),
            "image_size": getattr(m, "image_size", None),
            "defense": self.defense,
            "checkpoint": Path(self.checkpoint).name,
            "smoothing_sigma": smoothing_sigma(self.defense),
        }


def load_models(checkpoints: list[str | Path], device: str = "cpu") -> list[Loaded]:
    """Load checkpoints with the project's loader; name each by its run folder (best.pt's
    parent, as `histoshield study` lays them out) or its file stem, numbered when repeated."""
    from histoshield.evaluation.predict import load_model

    if not checkpoints:
        raise HistoshieldError("serve needs a checkpoint: -c runs/study/original/best.pt")
    out: list[Loaded] = []
    for ck in checkpoints:
        p = Path(ck)
        model = load_model(p, device)
        base = p.parent.name if p.stem in ("best", "last") and p.parent.name else p.stem
        name, k = base or "model", 2
        while any(o.name == name for o in out):
            name, k = f"{base}-{k}", k + 1
        cfg = (getattr(model, "meta", {}) or {}).get("config") or {}
        defense = cfg.get("defense") if isinstance(cfg, dict) else None
        out.append(Loaded(name, model, str(p), defense))
    return out


def smoothing_sigma(defense: str | None) -> float | None:
    """sigma of a 'gaussian:sigma=…' defense (the model randomized smoothing suits), else None."""
    if not defense:
        return None
    from histoshield import defenses
    from histoshield.specs import parse_spec

    try:
        name, params = parse_spec(defense, defenses.REGISTRY.schemas(), "defense")
    except HistoshieldError:
        return None
    if name != "gaussian":
        return None
    return float(params["sigma"])


def b64png(png: bytes) -> str:
    """base64 text of PNG bytes (what every image field of the API holds)."""
    return base64.b64encode(png).decode("ascii")


def to_tensor(tile: np.ndarray) -> torch.Tensor:
    """uint8 (H,W,3) → float (1,3,H,W) in [0,1]."""
    x = torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1)[None]  # a copy
    return x.float().div_(255.0).contiguous()  # contiguous: torchattacks FAB views its input


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (1,3,H,W) in [0,1] → uint8 (H,W,3), rounded (the lossless PNG's pixels)."""
    a = x[0].detach().clamp(0, 1).permute(1, 2, 0).mul(255.0).round().to(torch.uint8)
    return a.cpu().numpy()


class Service:
    """The models and limits of one server, and the computations its endpoints run."""

    def __init__(self, models: list[Loaded], limits: Limits | None = None) -> None:
        if not models:
            raise HistoshieldError("serve needs at least one model")
        self.models = {m.name: m for m in models}
        self.limits = limits or Limits()
        self._examples: list[dict[str, Any]] | None = None
        # Grad-CAM hooks layers and freezes parameters while it runs: it gets private copies,
        # so predictions and attacks in other threads never see a hooked model
        self._cam_models: dict[str, nn.Module] = {}
        self._cam_lock = threading.Lock()

    # ---- lookups ---------------------------------------------------------------------------
    def model(self, name: str | None) -> Loaded:
        """A served model by name (None: the first one)."""
        if name in (None, ""):
            return next(iter(self.models.values()))
        if name not in self.models:
            raise HistoshieldError(
                f"unknown model {name!r}: choose one of {', '.join(self.models)}"
            )
        return self.models[name]

    def certify_model(self, name: str | None) -> Loaded:
        """The model to certify: the one named, else the first Gaussian-noise-trained one."""
        if name:
            return self.model(name)
        return next((m for m in self.models.values() if smoothing_sigma(m.defense)),
                    self.model(None))  # fmt: skip

    def attacks(self) -> list[dict[str, Any]]:
        """Every registry attack with its norm, eps cap and the budget parameters it takes:
        new attacks appear here (and in the page's menu) without a change to the server."""
        from histoshield import attacks

        out = []
        for name in attacks.available():
            cls = attacks.REGISTRY[name]
            defaults = _defaults(cls)
            params = {k: v for k, v in defaults.items() if k not in _RESERVED}
            out.append(
                {
                    "name": name,
                    "description": (cls.__doc__ or name).strip().splitlines()[0],
                    "norm": cls.norm,
                    "max_eps": self._eps_cap(cls.norm),
                    "gradient_based": not cls.black_box,
                    "params": {k: v for k, v in params.items() if _jsonable(v)},
                    "quick": self._quick(name, {}),
                }
            )
        return out

    def examples(self) -> list[dict[str, Any]]:
        """A few synthetic tiles (half benign, half malignant), rendered once at first use."""
        if self._examples is None:
            import tempfile

            from histoshield.data import synthesize
            from histoshield.data.images import read_rgb
            from histoshield.serve.uploads import png_bytes

            size = self.limits.tile_size
            with tempfile.TemporaryDirectory(prefix="hs-examples-") as tmp:
                ims = synthesize(Path(tmp) / "set", n=4, size=max(16, min(size, 1024)), seed=11)
                self._examples = [
                    {
                        "id": i,
                        "label": r.label,
                        "png": png_bytes(read_rgb(r.path, size)),
                    }
                    for i, r in enumerate(ims.records)
                ]
        return self._examples

    # ---- predict ---------------------------------------------------------------------------
    def predict_all(self, x: torch.Tensor) -> list[dict[str, Any]]:
        """Every model's class, probabilities and p(malignant) for a (1,3,H,W) tile."""
        from histoshield.evaluation.predict import predict_proba

        return [self._prediction(m, predict_proba(m.model, x)[0]) for m in self.models.values()]

    def _prediction(self, m: Loaded, p: torch.Tensor) -> dict[str, Any]:
        from histoshield.data.records import positive_index

        classes = list(m.model.classes)
        if not bool(torch.isfinite(p).all()):
            raise HistoshieldError(f"model {m.name!r} gives NaN or infinite outputs for this tile")
        k = int(p.argmax())
        pos = positive_index(classes)
        return {
            "model": m.name,
            "class": classes[k],
            "probability": float(p[k]),
            "probabilities": {c: float(v) for c, v in zip(classes, p, strict=True)},
            "positive_class": classes[pos],
            "p_malignant": float(p[pos]),
        }

    def predict(self, tile: np.ndarray) -> dict[str, Any]:
        """The predict endpoint's answer for a decoded tile."""
        from histoshield.serve.uploads import png_bytes

        png = png_bytes(tile)
        return {
            "tile": _tile_info(tile, png),
            "predictions": self.predict_all(to_tensor(tile)),
        }

    # ---- attack ----------------------------------------------------------------------------
    def parse_attack(
        self, spec: str, eps_text: str, steps: int | None, seed: int | None, model: str | None
    ) -> dict[str, Any]:
        """Validate an attack request before it is queued: name, params, caps, eps, model."""
        from histoshield import attacks
        from histoshield.attacks import parse_value
        from histoshield.evaluation.harness import check_attack, parse_attack_spec

        if not spec or not spec.strip():
            known = ", ".join(attacks.available())
            raise HistoshieldError(f"no attack given: choose one of {known}")
        name, params = parse_attack_spec(spec)
        if name not in attacks.REGISTRY:
            raise HistoshieldError(
                f"unknown attack {name!r}: choose one of {', '.join(attacks.available())}"
            )
        reserved = [k for k in params if k in _RESERVED]
        if reserved:
            raise HistoshieldError(
                f"attack parameter {reserved[0]!r} is set by the server or its own form field"
            )
        if steps is not None:
            params["steps"] = steps
        params = self._quick(name, params)
        for key, cap_name in _CAPPED.items():
            if key in params:
                cap = getattr(self.limits, cap_name)
                v = params[key]
                if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= cap:
                    raise HistoshieldError(f"{key} must be an integer from 1 to {cap}, got {v!r}")
        cls = attacks.REGISTRY[name]
        eps = parse_value(eps_text, "eps", example="2/255")
        cap = self._eps_cap(cls.norm)
        if not 0 < eps <= cap + 1e-12:
            unit = f"{cap * 255:g}/255" if cls.norm == "linf" else f"{cap:g}"
            raise HistoshieldError(
                f"eps must be in (0, {unit}] for {name} ({cls.norm or 'its own'} norm), "
                f"got {eps_text!r}"
            )
        seed = 0 if seed is None else int(seed)
        if not 0 <= seed < 2**31:
            raise HistoshieldError(f"seed must be an integer from 0 to 2^31-1, got {seed}")
        target = self.model(model)
        check_attack(name, [eps], params, model=target.model)
        return {"attack": name, "eps": eps, "params": params, "seed": seed, "model": target.name}

    def _quick(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """The quick budget: steps / max_queries the client left out, lowered to the server's
        defaults (autoattack-binary's 100 steps and 1000 queries become 10 and 100)."""
        from histoshield import attacks

        defaults = _defaults(attacks.REGISTRY[name])
        out = dict(params)
        quick = {"steps": self.limits.default_steps, "max_queries": self.limits.default_queries}
        for key, value in quick.items():
            if key in defaults and key not in out:
                d = defaults[key]
                out[key] = min(d, value) if isinstance(d, int) else value
        return out

    def _eps_cap(self, norm: str | None) -> float:
        if norm == "linf":
            return self.limits.max_eps
        if norm == "l2":
            return self.limits.max_eps_l2
        return 1.0

    def attack(self, tile: np.ndarray, req: dict[str, Any], job: Job) -> dict[str, Any]:
        """Run one validated attack on a tile: images, every model's predictions, Grad-CAM."""
        from histoshield.evaluation.harness import AttackRun, run_attacks
        from histoshield.evaluation.predict import predict_proba
        from histoshield.serve.uploads import png_bytes

        src = self.models[req["model"]]
        x = to_tensor(tile)
        watched = Watched(src.model, job, _expected_passes(req["params"], len(self.models)))
        y = predict_proba(watched, x).argmax(1)
        judges = {n: (watched if n == src.name else m.model) for n, m in self.models.items()}
        run = AttackRun(req["attack"], req["eps"], dict(req["params"]))
        outcomes = list(
            run_attacks(
                watched, x, y, [run], classes=list(src.model.classes), judges=judges,
                source=src.name, seed=req["seed"], batch_size=1, keep_adv=True,
            )
        )  # fmt: skip
        job.check()
        row = next(o.row for o in outcomes if o.judge == src.name)
        adv8 = to_uint8(outcomes[0].adv)
        if row.norm == "linf":  # rounding must not leave the ball: 2.5/255 stays within 2 levels
            k = math.floor(req["eps"] * 255 + 1e-6)
            lo, hi = tile.astype(np.int16) - k, tile.astype(np.int16) + k
            adv8 = np.clip(adv8.astype(np.int16), lo, hi).astype(np.uint8)
        x_adv = to_tensor(adv8)
        float_class = {o.judge: int(o.p_adv[0].argmax()) for o in outcomes}
        by_judge = {o.judge: o for o in outcomes}
        # the harness scored the clean tile on every judge already: no second pass for it
        clean = [self._prediction(m, by_judge[m.name].p_clean[0]) for m in self.models.values()]
        adversarial = []
        for m in self.models.values():
            pred = self._prediction(m, predict_proba(m.model, x_adv)[0])
            pred["float_prediction_agrees"] = (
                list(m.model.classes).index(pred["class"]) == float_class[m.name]
            )
            adversarial.append(pred)
        delta = adv8.astype(np.int16) - tile.astype(np.int16)
        linf = int(np.abs(delta).max())
        meta = {
            "histoshield:attack": req["attack"],
            "histoshield:eps": f"{req['eps']:.10g}",
            "histoshield:eps_255": f"{req['eps'] * 255:.6g}",
            "histoshield:seed": str(req["seed"]),
            "histoshield:model": src.name,
            "histoshield:checkpoint": Path(src.checkpoint).name,
            "histoshield:params": _spec_params(req["params"]),
            "histoshield:source_sha256": hashlib.sha256(tile.tobytes()).hexdigest(),
        }
        adv_png = png_bytes(adv8, meta)
        amp, pert = _amplified(delta)
        return {
            "attack": {
                "name": req["attack"],
                "description": row.description,
                "eps": req["eps"],
                "eps_255": round(req["eps"] * 255, 4),
                "norm": row.norm,
                "params": req["params"],
                "seed": req["seed"],
                "model": src.name,
                "seconds": row.seconds,
                "queries": row.queries,
            },
            "images": {
                "original": b64png(png_bytes(tile)),
                "adversarial": b64png(adv_png),
                "perturbation": b64png(png_bytes(pert)),
            },
            "perturbation": {
                "amplification": amp,
                "linf_255": linf,
                "l2": float(np.sqrt(((delta / 255.0) ** 2).sum())),
                "changed_pixels": int((delta != 0).any(axis=2).sum()),
            },
            "metadata": meta,
            "clean": clean,
            "adversarial": adversarial,
            "gradcam": self.gradcam(src, x, x_adv) if req.get("gradcam", True) else None,
        }

    # ---- Grad-CAM --------------------------------------------------------------------------
    def gradcam(self, m: Loaded, x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, Any]:
        """Grad-CAM of the malignant class on the clean and adversarial tiles, as overlays."""
        from histoshield.evaluation.explain import default_layer, gradcam
        from histoshield.serve.uploads import png_bytes

        with self._cam_lock:
            if m.name not in self._cam_models:
                self._cam_models[m.name] = copy.deepcopy(m.model).eval()
            model = self._cam_models[m.name]
            try:
                cams = gradcam(model, torch.cat([x, x_adv]), target=None)
                layer = default_layer(model)
            except HistoshieldError as e:
                return {"model": m.name, "error": str(e)}
        tiles = [to_uint8(x), to_uint8(x_adv)]
        clean, adv = (b64png(png_bytes(_overlay(t, c))) for t, c in zip(tiles, cams, strict=True))
        return {"model": m.name, "layer": layer, "target": "malignant", "clean": clean,
                "adversarial": adv}  # fmt: skip

    # ---- certify ---------------------------------------------------------------------------
    def parse_certify(
        self, sigma: float | None, n: int, n0: int, alpha: float, model: str | None
    ) -> dict[str, Any]:
        """Validate a certify request before it is queued."""
        target = self.certify_model(model)
        if sigma is None:
            sigma = smoothing_sigma(target.defense) or 0.25
        if not (isinstance(sigma, float | int) and math.isfinite(sigma) and 0 < sigma <= 1):
            raise HistoshieldError(f"sigma must be in (0, 1] (pixel units), got {sigma!r}")
        cap = self.limits.max_certify_n
        if not 1 <= n <= cap:
            raise HistoshieldError(f"n must be an integer from 1 to {cap}, got {n}")
        if not 1 <= n0 <= cap:
            raise HistoshieldError(f"n0 must be an integer from 1 to {cap}, got {n0}")
        if not 0 < alpha < 1:
            raise HistoshieldError(f"alpha must be in (0, 1), got {alpha}")
        return {"model": target.name, "sigma": float(sigma), "n": n, "n0": n0, "alpha": alpha}

    def certify(self, tile: np.ndarray, req: dict[str, Any], job: Job) -> dict[str, Any]:
        """Randomized-smoothing prediction and certified L2 radius of one tile."""
        from histoshield.defenses.smoothing import ABSTAIN
        from histoshield.evaluation.certify import certify_images
        from histoshield.evaluation.predict import predict_proba

        m = self.models[req["model"]]
        x = to_tensor(tile)
        batch = 128
        passes = math.ceil(req["n0"] / batch) + math.ceil(req["n"] / batch) + 1
        watched = Watched(m.model, job, passes)
        base = int(predict_proba(watched, x).argmax(1)[0])
        t0 = time.perf_counter()
        res = certify_images(
            watched, x, [base], sigma=req["sigma"], n0=req["n0"], n=req["n"],
            alpha=req["alpha"], batch=batch, seed=0, progress=False,
        )  # fmt: skip
        row = res["rows"][0]
        classes = list(m.model.classes)
        abstained = row["prediction"] == ABSTAIN
        dims = x[0].numel()
        return {
            "model": m.name,
            "sigma": req["sigma"],
            "n": req["n"],
            "n0": req["n0"],
            "alpha": req["alpha"],
            "base_prediction": classes[base],
            "prediction": "abstain" if abstained else classes[row["prediction"]],
            "abstained": abstained,
            "radius": row["radius"],
            # the L∞ ball inside the certified L2 ball: ||δ||_2 <= ||δ||_∞ · sqrt(D)
            "radius_linf_255": row["radius"] / math.sqrt(dims) * 255.0,
            "max_radius": res["max_radius"],
            "seconds": round(time.perf_counter() - t0, 3),
        }


def _defaults(cls: type) -> dict[str, Any]:
    """Parameter defaults of an attack class, from its typed schema (`Attack.schema`)."""
    return {k: p.default for k, p in cls.schema.items()}


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def _expected_passes(params: dict[str, Any], n_models: int) -> int:
    """Rough count of forward passes an attack makes, for the progress bar."""
    steps = int(params.get("steps", 1) or 1)
    restarts = int(params.get("restarts", 1) or 1)
    eot = int(params.get("eot", 1) or 1)
    passes = steps * restarts * eot + int(params.get("max_queries", 0) or 0)
    if "max_queries" in params and "steps" in params:  # an ensemble such as autoattack-binary
        passes += 2 * steps * eot
    return passes + 2 + n_models


def _spec_params(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(params.items()))


def _amplified(delta: np.ndarray) -> tuple[float, np.ndarray]:
    """The perturbation made visible: grey 128 is 0, scaled so the largest change is ±127."""
    peak = int(np.abs(delta).max())
    amp = 127.0 / peak if peak else 1.0
    img = np.clip(128 + delta * amp, 0, 255).round().astype(np.uint8)
    return round(amp, 3), img


def _overlay(tile: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A heat map (jet) of a [0,1] map blended over the tile."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = tile.shape[:2]
    c = np.asarray(cam, dtype=np.float32)
    if c.shape != (h, w):
        c = np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BILINEAR))
    heat = colormaps["jet"](np.clip(c, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * tile + alpha * heat, 0, 255).astype(np.uint8)


def _tile_info(tile: np.ndarray, png: bytes) -> dict[str, Any]:
    return {
        "width": int(tile.shape[1]),
        "height": int(tile.shape[0]),
        "sha256": hashlib.sha256(tile.tobytes()).hexdigest(),
        "png": b64png(png),
    }
