"""Quality metrics: Fréchet distance of classifier features and its noise, accuracy, agreement."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, F] (the FID formula)."""
    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    cov_a = np.cov(features_a, rowvar=False)
    cov_b = np.cov(features_b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # near-singular product: regularise, as FID tools do
        offset = np.eye(cov_a.shape[0]) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real)
    return float(max(distance, 0.0))


def frechet_noise(features: np.ndarray, reference: np.ndarray, resamples: int = 10,
                  seed: int = 0) -> float:
    """Standard deviation of the distance over bootstrap resamples of `features`."""
    generator = np.random.default_rng(seed)
    distances = [
        frechet_distance(features[generator.integers(0, len(features), len(features))], reference)
        for _ in range(resamples)
    ]
    return float(np.std(distances))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def token_agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of image tokens equal to the reference's at the same place."""
    return float((tokens == reference).float().mean())
