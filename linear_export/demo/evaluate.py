"""Quality measures of the demo models: VQ round trip, judge accuracy, NLL, samples, attention."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..engines.torch import TorchEngine
from ..models.gpt import GPT
from ..models.vq import VQModel
from ..runtime.generate import generate
from ..runtime.policies import Policy, PolicyConfig
from ..runtime.sampling import SamplingConfig
from .blocks import encode_blocks
from .classifier import DemoClassifier
from .dataset import CLASS_NAMES, NUM_CLASSES, dataset_split


def encode(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, 64, 64] -> flat code sequences [B, h*w] int64 (block-wise codes)."""
    return encode_blocks(vq, images).flatten(1)


@torch.no_grad()
def vq_roundtrip_mse(vq: VQModel, images: torch.Tensor, batch_size: int = 64) -> float:
    """Mean squared error of decode(encode(images)) on the [-1, 1] scale."""
    errors = [
        F.mse_loss(vq.decode_codes(encode_blocks(vq, chunk)), chunk, reduction="sum")
        for chunk in images.split(batch_size)
    ]
    return float(torch.stack(errors).sum() / images.numel())


def accuracy(classifier: DemoClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images the classifier labels correctly."""
    return float((classifier.predict(images) == labels).float().mean())


def gpt_inputs(codes: torch.Tensor, classes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[class token, t0 .. t_{N-2}]: the sequence whose logits predict t0 .. t_{N-1}."""
    return torch.cat([(vocab_size + classes)[:, None], codes[:, :-1]], dim=1)


@torch.no_grad()
def teacher_forced_nll(
    gpt: GPT, codes: torch.Tensor, classes: torch.Tensor, batch_size: int = 32
) -> float:
    """Mean cross entropy (nats per image token) of the codes given their classes."""
    total = 0.0
    batches = zip(codes.split(batch_size), classes.split(batch_size), strict=True)
    for chunk, chunk_classes in batches:
        logits = gpt(gpt_inputs(chunk, chunk_classes, gpt.config.vocab_size))
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk.flatten(), reduction="sum"))
    return total / codes.numel()


def sample_tokens(
    gpt: GPT,
    class_ids: Sequence[int],
    *,
    cfg_scale: float,
    seed: int,
    temperature: float = 1.0,
    top_k: int = 0,
    batch_size: int = 50,
) -> torch.Tensor:
    """Token grids [B, h, w] from the runtime's own loop (TorchEngine, `full` policy)."""
    engine = TorchEngine(gpt)
    policy = Policy(PolicyConfig(name="full"), gpt.layout)
    sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k)
    grids = []
    for offset in range(0, len(class_ids), batch_size):
        chunk = list(class_ids[offset: offset + batch_size])
        result = generate(engine, chunk, policy, sampling, seed=seed + offset)
        grids.append(result.tokens)
    return torch.cat(grids)


@torch.no_grad()
def decode(vq: VQModel, grids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Token grids [B, h, w] -> images [B, 3, H, W] in [-1, 1]."""
    return torch.cat([vq.decode_codes(chunk) for chunk in grids.split(batch_size)])


def frechet_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, F] (float64)."""
    a, b = first.double(), second.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(A B) = sum of sqrt eigenvalues of sqrt(A) B sqrt(A), which is symmetric PSD.
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle
    return float(distance)


@torch.no_grad()
def attention_locality(
    gpt: GPT, codes: torch.Tensor, classes: torch.Tensor, query_index: int | None = None
) -> dict[str, list[float]]:
    """Where one query's attention goes, per layer, against a uniform spread.

    The query is the step that feeds image token `query_index - 1` and predicts token
    `query_index` (default: the middle of the grid). Reported per layer: the attention mass
    on the previous line's worth of tokens (`window`), on the token straight above the one
    being predicted (`above`), and on the prefix (`prefix`), plus the uniform shares.
    """
    layout, config = gpt.layout, gpt.config
    width, prefix = layout.width, layout.prefix
    if query_index is None:
        query_index = layout.image_tokens // 2 + width // 2
    inputs = gpt_inputs(codes, classes, config.vocab_size)[:, : prefix + query_index]
    past = inputs.shape[1] - 1  # slots before the query
    batch = inputs.shape[0]
    positions = torch.arange(inputs.shape[1]).expand(batch, -1)
    empty = torch.zeros(config.n_layer, batch, config.kv_heads, 0, config.head_dim)
    _, keys, values, _ = gpt.step(inputs[:, :past], positions[:, :past], empty, empty,
                                  torch.tensor(0))
    _, _, _, mass = gpt.step(inputs[:, past:], positions[:, past:], keys, values,
                             torch.tensor(past))
    mass = mass.mean(dim=(1, 2))  # [L, past]: averaged over rows and heads
    above_slot = prefix + query_index - width  # holds the token above the predicted one
    window = mass[:, past - width:].sum(-1)
    return {
        "query_index": [float(query_index)],
        "window": window.tolist(),
        "above": mass[:, above_slot].tolist(),
        "prefix": mass[:, :prefix].sum(-1).tolist(),
        "uniform_window": [width / (past + 1)],
        "uniform_slot": [1 / (past + 1)],
    }


def evaluate_demo(
    gpt: GPT, vq: VQModel, classifier: DemoClassifier, *, seed: int, heldout_images: int,
    samples_per_class: int, cfg_scale: float, temperature: float = 1.0, top_k: int = 0,
) -> dict[str, object]:
    """Held-out metrics of the three models, and the judge's verdict on generated samples."""
    started = time.perf_counter()
    images, labels = dataset_split("heldout", heldout_images, seed)
    codes = encode(vq, images)
    recon = decode(vq, codes.view(-1, gpt.layout.height, gpt.layout.width))
    class_ids = [c for c in range(NUM_CLASSES) for _ in range(samples_per_class)]
    grids = sample_tokens(gpt, class_ids, cfg_scale=cfg_scale, seed=seed,
                          temperature=temperature, top_k=top_k)
    samples = decode(vq, grids)
    predicted, wanted = classifier.predict(samples), torch.tensor(class_ids)
    per_class = {name: float((predicted[wanted == c] == c).float().mean())
                 for c, name in enumerate(CLASS_NAMES)}
    with torch.no_grad():
        fd = frechet_distance(classifier.features(images), classifier.features(samples))
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "heldout_images": heldout_images,
        "vq_roundtrip_mse": round(vq_roundtrip_mse(vq, images), 5),
        "classifier_accuracy_real": accuracy(classifier, images, labels),
        "classifier_accuracy_vq_roundtrip": accuracy(classifier, recon, labels),
        "gpt_heldout_nll": round(teacher_forced_nll(gpt, codes, labels), 4),
        "log_vocab": round(math.log(gpt.config.vocab_size), 4),
        "samples": {
            "per_class": samples_per_class, "cfg_scale": cfg_scale, "temperature": temperature,
            "top_k": top_k, "policy": "full", "engine": "torch",
            "class_accuracy": float((predicted == wanted).float().mean()),
            "per_class_accuracy": per_class,
            "frechet_distance_to_heldout": round(fd, 3),
        },
        "attention": attention_locality(gpt, codes[:64], labels[:64]),
    }
