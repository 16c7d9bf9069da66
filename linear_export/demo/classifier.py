"""A small CNN over the demo classes: the class-accuracy judge and a Frechet feature map."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dataset import NUM_CLASSES


@dataclass(frozen=True)
class ClassifierConfig:
    """Widths of the four stride-2 stages; the last one is the feature dimension."""

    widths: tuple[int, ...] = (16, 32, 64, 128)
    num_classes: int = NUM_CLASSES

    def to_dict(self) -> dict[str, object]:
        return {"widths": list(self.widths), "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ClassifierConfig:
        return cls(widths=tuple(data["widths"]), num_classes=int(data["num_classes"]))


def _stage(cin: int, cout: int) -> nn.Sequential:
    """conv3 stride 2 -> BN -> ReLU -> conv3 -> BN -> ReLU: halves the resolution."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DemoClassifier(nn.Module):
    """64x64 RGB in [-1, 1] -> 10 class logits; `features` is the pooled last stage."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        widths = (3, *self.config.widths)
        pairs = zip(widths[:-1], widths[1:], strict=True)
        self.stages = nn.Sequential(*(_stage(cin, cout) for cin, cout in pairs))
        self.head = nn.Linear(widths[-1], self.config.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.widths[-1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, F]: global average of the last stage (the Frechet features)."""
        return self.stages(images).mean(dim=(2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, num_classes]."""
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class ids [B], in batches, in eval mode."""
        was_training = self.training
        self.eval()
        preds = [self.logits(chunk).argmax(-1) for chunk in images.split(batch_size)]
        self.train(was_training)
        return torch.cat(preds)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur and noise, so the judge also accepts the VQ decoder's softer images."""
    batch = images.shape[0]
    # A 3x3 box blur mixed in at a random strength per image.
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    strength = torch.rand(batch, 1, 1, 1, generator=generator)
    images = torch.lerp(images, blurred, strength)
    noise = torch.randn(images.shape, generator=generator)
    sigma = torch.rand(batch, 1, 1, 1, generator=generator) * 0.08
    return (images + noise * sigma).clamp(-1, 1)

