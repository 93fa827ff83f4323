"""Train-time augmentation with timm's flag names, and mixup/cutmix.

:class:`Augment` is the resolved per-image augmentation of a run (what ``--hflip``, ``--vflip``,
``--scale``, ``--ratio``, ``--color-jitter``, ``--aa``, ``--reprob`` and ``--no-aug`` came to for
its data); :func:`resolve_augment` makes it from a :class:`zoo.config.TrainConfig`, and the
checkpoint keeps both. The steps, in timm's order (``timm.data.transforms_factory``):

1. geometry: random resized crop to the model's H x W (``scale``, ``ratio``; folders crop the
   decoded image with Pillow, the tensor sets crop their stored image), or for ``digits`` and
   ``synthetic`` by default a random shift of up to ``shift`` of the side (zero fill);
2. horizontal / vertical flip with probability ``hflip`` / ``vflip``;
3. color jitter: brightness, contrast and saturation factors drawn from ``[1 - f, 1 + f]``;
4. an auto-augment policy (``aa``), timm's spelling, run by kornia's implementations;
5. normalisation, then random erasing with probability ``reprob`` (timm's ``pixel`` mode: the
   erased box is filled with normal noise, on the normalised image).

The val transform is never augmented: it is ``contract.preprocess.val_transform``, which the
server applies too. Randomness comes from torch's global generator (seeded per DataLoader worker).

:class:`Mixup` mixes a batch after loading (timm's ``Mixup`` in ``batch`` mode) and returns soft
targets that sum to one, with label smoothing folded in.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

# timm's ImageNet training defaults (and torchvision's RandomResizedCrop's).
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DEFAULT_HFLIP = 0.5
# The tensor sets' own default: a random shift of up to this fraction of the side (1/16 of 32 px
# = 2 px, a quarter of one original digit pixel at 8 -> 32).
TENSOR_SHIFT = 1.0 / 16.0
# timm's RandAugment magnitudes run 0..10 (its _LEVEL_DENOM); kornia's run over (0, 30).
TIMM_MAGNITUDE_MAX = 10.0
KORNIA_MAGNITUDE_MAX = 30.0
# --aa spellings understood: timm's, mapped onto kornia's policies.
AA_HELP = "rand-m9-mstd0.5 (RandAugment: -mM magnitude 0-10, -nN ops, -mstdS magnitude noise, -mmaxX), " \
          "trivial (TrivialAugment), original (AutoAugment's ImageNet policy)"
# timm's names for AutoAugment policies -> kornia's policy names.
AUTOAUGMENT_POLICIES = {"original": "imagenet"}


class AugmentError(ValueError):
    """A setting the augmentation cannot take; the message is one line meant for the user."""


@dataclass(frozen=True)
class Augment:
    """One run's per-image train augmentation, resolved (see the module docstring for the order).

    ``enabled=False`` (``--no-aug``) trains on the val transform: no crop, shift, flip or jitter.
    """

    enabled: bool = True
    scale: tuple[float, float] | None = None  # random resized crop area range; None: no crop
    ratio: tuple[float, float] = DEFAULT_RATIO
    shift: float = 0.0  # random shift, a fraction of the side (tensor sets without a crop)
    hflip: float = 0.0
    vflip: float = 0.0
    color_jitter: float = 0.0
    aa: str | None = None
    reprob: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("scale", "ratio"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Augment:
        d = dict(d)
        for key in ("scale", "ratio"):
            if d.get(key) is not None:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)

    def describe(self) -> str:
        """One line, e.g. ``random resized crop scale 0.08-1 ratio 0.75-1.33, hflip 0.5``."""
        if not self.enabled:
            return "none (--no-aug: the val transform)"
        parts = []
        if self.scale is not None:
            parts.append(f"random resized crop scale {self.scale[0]:g}-{self.scale[1]:g} "
                         f"ratio {self.ratio[0]:.3g}-{self.ratio[1]:.3g}")
        elif self.shift:
            parts.append(f"random shift up to {self.shift:.3g} of the side")
        for name in ("hflip", "vflip", "color_jitter", "reprob"):
            if getattr(self, name):
                parts.append(f"{name.replace('_', '-')} {getattr(self, name):g}")
        if self.aa:
            parts.append(f"aa {self.aa}")
        return ", ".join(parts) or "none"


def resolve_augment(*, data: str, no_aug: bool = False, hflip: float | None = None, vflip: float = 0.0,
                    scale: tuple[float, float] | None = None, ratio: tuple[float, float] | None = None,
                    color_jitter: float = 0.0, aa: str | None = None, reprob: float = 0.0) -> Augment:
    """The augmentation a run on ``data`` trains with, from its flags (None: the data's default).

    Folders take timm's ImageNet defaults (random resized crop 0.08-1, hflip 0.5). ``digits`` and
    ``synthetic`` default to a small random shift and no flip: their images are centred and
    their orientation is the class. A given ``scale`` replaces their shift with a crop.
    :class:`AugmentError` for a value out of range or an unknown ``aa``.
    """
    for name, p in (("--hflip", hflip), ("--vflip", vflip), ("--reprob", reprob)):
        if p is not None and not 0.0 <= p <= 1.0:
            raise AugmentError(f"{name} must be a probability in [0, 1], got {p:g}")
    if not color_jitter >= 0.0:
        raise AugmentError(f"--color-jitter must be >= 0, got {color_jitter:g}")
    if scale is not None and not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise AugmentError(f"--scale MIN MAX must satisfy 0 < MIN <= MAX <= 1, got {scale[0]:g} {scale[1]:g}")
    if ratio is not None and not 0.0 < ratio[0] <= ratio[1]:
        raise AugmentError(f"--ratio MIN MAX must satisfy 0 < MIN <= MAX, got {ratio[0]:g} {ratio[1]:g}")
    if aa:
        parse_aa(aa)
    if no_aug:
        return Augment(enabled=False)
    folder = data.startswith("folder:")
    if scale is None and folder:
        scale = DEFAULT_SCALE
    return Augment(
        scale=tuple(scale) if scale is not None else None, ratio=tuple(ratio) if ratio else DEFAULT_RATIO,
        shift=TENSOR_SHIFT if scale is None else 0.0,
        hflip=hflip if hflip is not None else (DEFAULT_HFLIP if folder else 0.0), vflip=vflip,
        color_jitter=color_jitter, aa=aa or None, reprob=reprob)


# ------------------------------------------------------------------------------ --aa


@dataclass(frozen=True)
class AAPolicy:
    """A parsed ``--aa``: ``kind`` is rand, trivial or auto."""

    kind: str
    magnitude: float = 9.0  # rand: timm's 0..10 scale
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = TIMM_MAGNITUDE_MAX
    policy: str = ""  # auto: kornia's policy name


def parse_aa(spec: str) -> AAPolicy:
    """timm's ``--aa`` spelling: ``rand-m9-n2-mstd0.5-mmax10`` (``inc1`` is accepted: kornia's
    operations already grow with the magnitude), ``trivial``, or ``original``."""
    name, *parts = spec.split("-")
    if name == "rand":
        values: dict[str, float] = {}
        for part in parts:
            key = next((k for k in ("mstd", "mmax", "inc", "m", "n") if part.startswith(k)), None)
            try:
                if key is None:
                    raise ValueError
                values[key] = float(part[len(key):])
            except ValueError:
                raise AugmentError(f"--aa {spec}: cannot read {part!r}; RandAugment takes -mM, -nN, -mstdS, "
                                   "-mmaxX, -inc1 (e.g. rand-m9-mstd0.5)") from None
        policy = AAPolicy("rand", magnitude=values.get("m", 9.0), num_ops=int(values.get("n", 2)),
                          magnitude_std=values.get("mstd", 0.0), magnitude_max=values.get("mmax", TIMM_MAGNITUDE_MAX))
        if not 1 <= policy.num_ops <= 15:
            raise AugmentError(f"--aa {spec}: -n must be 1..15 (kornia's RandAugment has 15 operations)")
        if not 0 <= policy.magnitude <= policy.magnitude_max:
            raise AugmentError(f"--aa {spec}: -m must be in [0, {policy.magnitude_max:g}]")
        return policy
    if name in ("trivial", "trivialaugment") and not parts:
        return AAPolicy("trivial")
    if name in AUTOAUGMENT_POLICIES and not parts:
        return AAPolicy("auto", policy=AUTOAUGMENT_POLICIES[name])
    raise AugmentError(f"unknown --aa {spec!r}; use one of: {AA_HELP}")


def _kornia_magnitude(m: float) -> float:
    # kornia refuses its range's ends; 0 and timm's 10 map just inside them.
    return min(max(m / TIMM_MAGNITUDE_MAX * KORNIA_MAGNITUDE_MAX, 1e-3), KORNIA_MAGNITUDE_MAX - 1e-3)


@lru_cache(maxsize=8)
def _aa_module(spec: str) -> torch.nn.Module:
    from kornia.augmentation.auto import AutoAugment, RandAugment, TrivialAugment

    policy = parse_aa(spec)
    if policy.kind == "rand":
        return RandAugment(n=policy.num_ops, m=_kornia_magnitude(policy.magnitude))  # type: ignore[arg-type]
    if policy.kind == "trivial":
        return TrivialAugment()
    return AutoAugment(policy.policy)


def apply_aa(x: Tensor, spec: str) -> Tensor:
    """``--aa`` on one image ``(C, H, W)`` in 0..1. timm's ``mstd`` draws each image's magnitude
    from a normal around ``m``, clipped to ``[0, mmax]``."""
    module = _aa_module(spec)
    policy = parse_aa(spec)
    if policy.kind == "rand" and policy.magnitude_std > 0:
        m = policy.magnitude + policy.magnitude_std * torch.randn(()).item()
        module.m = _kornia_magnitude(min(max(m, 0.0), policy.magnitude_max))  # type: ignore[assignment]
    return _rgb_op(x, module)


@lru_cache(maxsize=8)
def _jitter_module(f: float) -> torch.nn.Module:
    from kornia.augmentation import ColorJitter

    return ColorJitter(brightness=f, contrast=f, saturation=f, hue=0.0, p=1.0)


def _rgb_op(x: Tensor, module: torch.nn.Module) -> Tensor:
    """Run a kornia op on one image; a grayscale image goes through as RGB and comes back as
    the channels' mean (the colour operations keep gray pixels gray)."""
    gray = x.shape[0] == 1
    batch = (x.expand(3, -1, -1) if gray else x)[None].contiguous()
    out = module(batch)[0].clamp(0.0, 1.0)
    return out.mean(0, keepdim=True) if gray else out


# ------------------------------------------------------------------------------ per image


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float] = DEFAULT_SCALE,
                            ratio: tuple[float, float] = DEFAULT_RATIO) -> tuple[int, int, int, int]:
    """A random ``(left, top, right, bottom)`` box covering a ``scale`` fraction of the area
    with aspect ratio in ``ratio`` (torchvision's RandomResizedCrop.get_params, on torch's RNG).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)).item())
            left = int(torch.randint(0, width - w + 1, (1,)).item())
            return left, top, left + w, top + h
    # Fallback: the whole image, cropped to the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def random_shift(x: Tensor, pad: int) -> Tensor:
    """Shift ``x`` (C, H, W) by up to ``pad`` pixels each way, filling with zeros."""
    dy, dx = torch.randint(-pad, pad + 1, (2,)).tolist()
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def photometric(x: Tensor, augment: Augment) -> Tensor:
    """Steps 2-4 on one image ``(C, H, W)`` in 0..1 (already cropped or shifted)."""
    if augment.hflip and torch.rand(()).item() < augment.hflip:
        x = x.flip(-1)
    if augment.vflip and torch.rand(()).item() < augment.vflip:
        x = x.flip(-2)
    if augment.color_jitter:
        x = _rgb_op(x, _jitter_module(float(augment.color_jitter)))
    if augment.aa:
        x = apply_aa(x, augment.aa)
    return x


def random_erase(x: Tensor, prob: float, area: tuple[float, float] = (0.02, 1 / 3),
                 log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))) -> Tensor:
    """timm's ``RandomErasing`` (mode ``pixel``, one box) on a normalised image ``(C, H, W)``:
    with probability ``prob`` a box of ``area`` of the image is replaced by normal noise."""
    if not prob or torch.rand(()).item() >= prob:
        return x
    channels, height, width = x.shape
    for _ in range(10):
        target = height * width * torch.empty(1).uniform_(*area).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w < width and 0 < h < height:
            top = int(torch.randint(0, height - h + 1, (1,)).item())
            left = int(torch.randint(0, width - w + 1, (1,)).item())
            x = x.clone()
            x[:, top:top + h, left:left + w] = torch.randn(channels, h, w, dtype=x.dtype)
            return x
    return x


# ------------------------------------------------------------------------------ mixup / cutmix


def one_hot(target: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """``(1 - eps) * onehot + eps / C`` as float32, ``(N, C)``."""
    off = smoothing / num_classes
    out = torch.full((target.shape[0], num_classes), off, device=target.device)
    return out.scatter_(1, target.long().view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of a box of about ``1 - lam`` of the image, centred at a
    uniform point and clipped to the image (timm's ``rand_bbox``)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = random.randint(0, height - 1), random.randint(0, width - 1)
    return (max(cy - ch // 2, 0), min(cy + ch // 2, height), max(cx - cw // 2, 0), min(cx + cw // 2, width))


class Mixup:
    """timm's ``Mixup`` in ``batch`` mode: one ``lam`` per batch, each image mixed with the one
    at the mirrored position of the batch (``x.flip(0)``).

    With probability ``prob`` the batch is mixed: by cutmix with probability ``switch_prob`` when
    both are on (else mixup); mixup blends the images with ``lam ~ Beta(mixup, mixup)``, cutmix
    pastes a box of the partner with ``lam ~ Beta(cutmix, cutmix)`` then sets ``lam`` to the
    share of the image left unpasted. Targets are ``lam * smooth(y) + (1 - lam) * smooth(y')``
    (``smooth`` is label smoothing), so each row sums to one. Python's and numpy's global
    generators draw ``lam`` and the box, as timm's do.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0) -> None:
        self.num_classes = num_classes
        self.mixup, self.cutmix = float(mixup), float(cutmix)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.label_smoothing = float(label_smoothing)

    def _lam(self) -> tuple[float, bool]:
        if np.random.rand() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or np.random.rand() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        return float(np.random.beta(alpha, alpha)), use_cutmix

    def __call__(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(mixed images, soft targets (N, C))``; ``x`` is not modified in place."""
        lam, use_cutmix = self._lam()
        if lam < 1.0:
            if use_cutmix:
                top, bottom, left, right = cutmix_box(x.shape[-2], x.shape[-1], lam)
                x = x.clone()
                x[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
                lam = 1.0 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
            else:
                x = x * lam + x.flip(0) * (1.0 - lam)
        y1 = one_hot(target, self.num_classes, self.label_smoothing)
        y2 = one_hot(target.flip(0), self.num_classes, self.label_smoothing)
        return x, y1 * lam + y2 * (1.0 - lam)
