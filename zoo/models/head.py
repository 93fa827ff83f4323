"""timm's classifier-head API, shared by both families: each names its head once (torchvision's
attribute name, which checkpoints depend on) and builds it with ``_head(num_classes)``."""
from __future__ import annotations

from torch import nn


class ClassifierHead:
    """Mixin for an ``nn.Module`` with ``head_attr`` and ``_head(num_classes) -> nn.Module``."""

    head_attr: str

    def _head(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        """The classifier head (``fc`` in ResNeXt, ``classifier`` in DenseNet: torchvision's names)."""
        return getattr(self, self.head_attr)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for ``num_classes`` classes (``0``: none, the model returns pooled features),
        on the model's device and dtype."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"Invalid num_classes: {num_classes!r}")
        like = next(self.parameters())  # type: ignore[attr-defined]
        self.num_classes = num_classes
        setattr(self, self.head_attr, self._head(num_classes).to(device=like.device, dtype=like.dtype))
