"""Reproducible CPU training of the demo models: VQ tokenizer, judge classifier, class GPT.

Each stage draws its own part of the procedural train split (by image index) and none
touches the held-out one. The VQ learns block-wise codes (blocks.py); the GPT learns the
exact sequence the generation loop produces. GPT matmuls run under bf16 autocast (about 3x
faster than fp32 on these CPUs); weights stay fp32. Use one torch thread on a shared
machine: with two, every parallel op waits for a core someone else holds (measured 10-60x
slower under load).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models import GPT, SequenceLayout, get_config, init_weights
from ..models.vq import VQ_CONFIGS, VQModel
from ..outputs import check_writable, write_directory
from . import DEMO_MODEL_NAME, DEMO_VQ_NAME, demo_files
from .blocks import block_latents
from .classifier import DemoClassifier, augment
from .dataset import IMAGE_SIZE, dataset_split
from .evaluate import encode, evaluate_demo, gpt_inputs

# Where each stage starts reading the train split, far enough apart never to meet.
_VQ_START, _CLASSIFIER_START, _GPT_START = 0, 1 << 24, 1 << 25


@dataclass(frozen=True)
class TrainPlan:
    """Step counts, batch sizes and learning rates of the three stages."""

    vq_steps: int = 800
    vq_ae_steps: int = 250  # plain-autoencoder warm-up, then the codebook starts from latents
    vq_full_steps: int = 150  # last steps on whole images (the rest on crops: cheaper)
    vq_batch: int = 16
    vq_crop: int = 32
    vq_lr: float = 2e-3
    vq_restart_every: int = 50  # re-seed unused codes from current latents this often
    classifier_steps: int = 500
    classifier_batch: int = 32
    classifier_lr: float = 2e-3
    # 2000 steps left the GPT far from the data's entropy (stripes not yet copied line to
    # line; samples 16-27% class-correct), so the GPT stage is twice as long on twice the data.
    gpt_images: int = 20000  # train images encoded once for the GPT (about three epochs)
    gpt_steps: int = 4000
    gpt_batch: int = 16
    gpt_lr: float = 2e-3
    class_dropout: float = 0.1  # label -> null class, so classifier-free guidance works
    eval_images: int = 500  # held-out images for the final metrics
    eval_samples_per_class: int = 10
    eval_cfg_scale: float = 4.0
    eval_temperature: float = 1.0
    eval_top_k: int = 0  # 0: sample from the whole (guided) distribution


FULL_PLAN = TrainPlan()
QUICK_PLAN = TrainPlan(
    vq_steps=6, vq_ae_steps=2, vq_full_steps=2, vq_restart_every=3, classifier_steps=4,
    gpt_images=32, gpt_steps=4, gpt_batch=8, eval_images=20, eval_samples_per_class=1,
)


def warmup_cosine(total: int, warmup: int, floor: float = 0.05) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to `floor` at `total` steps."""

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / max(warmup, 1))
        progress = min(step / max(total, 1), 1.0)
        return ramp * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


class StageLog:
    """Loss curve and timing of one stage, as a JSON-ready dict."""

    def __init__(self, name: str, every: int) -> None:
        self.name, self.every = name, every
        self.curve: list[dict[str, float]] = []
        self.started = time.perf_counter()
        self.info: dict[str, object] = {}

    def record(self, step: int, total: int, **values: float) -> None:
        if step % self.every == 0 or step == total - 1:
            self.curve.append({"step": step, **{k: round(v, 5) for k, v in values.items()}})

    def finish(self, **info: object) -> dict[str, object]:
        self.info.update(info)
        seconds = round(time.perf_counter() - self.started, 1)
        return {"seconds": seconds, **self.info, "curve": self.curve}


def _random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random size x size crop per image, at token-aligned (multiple of 4) offsets."""
    if size >= images.shape[-1]:
        return images
    stride = 4  # aligned crops keep the tokenizer's grid where it is at inference
    slots = (images.shape[-1] - size) // stride + 1
    offsets = torch.randint(0, slots, (images.shape[0], 2), generator=generator) * stride
    crops = [img[:, y: y + size, x: x + size] for img, (y, x) in zip(images, offsets, strict=True)]
    return torch.stack(crops)


def _flat(latents: torch.Tensor) -> torch.Tensor:
    return latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])


def train_vq(plan: TrainPlan, seed: int, progress: bool = True) -> tuple[VQModel, dict]:
    """The VQ tokenizer: MSE reconstruction + codebook/commitment losses, block-wise codes."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = VQ_CONFIGS[DEMO_VQ_NAME]
    model = VQModel(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.vq_lr, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.vq_steps, 50))
    log = StageLog("vq", every=50)
    usage = torch.zeros(config.codebook_size)
    restarted, start = 0, _VQ_START
    # Whole images cost (64 / crop)^2 times more, so their batch shrinks to match.
    full_batch = max(1, plan.vq_batch * plan.vq_crop**2 // IMAGE_SIZE**2)
    for step in tqdm(range(plan.vq_steps), desc="vq", disable=not progress):
        whole = step >= plan.vq_steps - plan.vq_full_steps
        batch = full_batch if whole else plan.vq_batch
        images, _ = dataset_split("train", batch, seed, start=start)
        start += batch
        if not whole:
            images = _random_crops(images, plan.vq_crop, generator)
        latents = block_latents(model, images)  # see blocks.py: codes without context
        if step < plan.vq_ae_steps:
            # Warm-up without quantisation: the encoder spreads out its latents first.
            recon = model.decoder(model.post_quant_conv(F.normalize(latents, dim=1)))
            quant_loss = torch.zeros(())
        else:
            quantised, codes, losses = model.quantize(latents)
            recon, quant_loss = model.decoder(model.post_quant_conv(quantised)), losses.total
            usage += torch.bincount(codes.flatten(), minlength=config.codebook_size)
        rec_loss = F.mse_loss(recon, images)
        optimizer.zero_grad(set_to_none=True)
        (rec_loss + quant_loss).backward()
        optimizer.step()
        schedule.step()
        log.record(step, plan.vq_steps, mse=rec_loss.item(), quant=quant_loss.item(),
                   lr=schedule.get_last_lr()[0])
        with torch.no_grad():
            if step == plan.vq_ae_steps - 1:
                _seed_codebook(model, seed, generator)
            elif step >= plan.vq_ae_steps and (step + 1) % plan.vq_restart_every == 0:
                # Codes nobody picked move to where this batch is worst coded: none stays dead.
                dead = usage == 0
                if dead.any() and not whole:
                    vectors = _flat(F.normalize(latents, dim=1))
                    live = model.quantize.codebook()[~dead]
                    distance = 1 - (vectors @ live.T).max(dim=1).values
                    pick = _spread_pick(vectors, int(dead.sum()), generator, distance)
                    model.quantize.embedding.weight[dead] = vectors[pick]
                    restarted += int(dead.sum())
                usage.zero_()
    stage = log.finish(steps=plan.vq_steps, images=start - _VQ_START, codes_restarted=restarted)
    return model.eval().requires_grad_(False), stage


def _spread_pick(
    vectors: torch.Tensor, count: int, generator: torch.Generator,
    distance: torch.Tensor | None = None,
) -> torch.Tensor:
    """k-means++ choice of `count` unit vectors: each pick favours those far from the rest.

    `distance` (1 - cosine to the nearest existing centre) lets the picks extend a codebook;
    without it the first pick is uniform. Duplicates only once nothing distinct is left.
    """
    picks = []
    if distance is None:
        first = int(torch.randint(0, len(vectors), (1,), generator=generator))
        picks.append(first)
        distance = 1 - vectors @ vectors[first]
    for _ in range(count - len(picks)):
        weights = distance.clamp(min=0)
        if float(weights.sum()) <= 1e-12:
            index = int(torch.randint(0, len(vectors), (1,), generator=generator))
        else:
            index = int(torch.multinomial(weights, 1, generator=generator))
        picks.append(index)
        distance = torch.minimum(distance, 1 - vectors @ vectors[index])
    return torch.tensor(picks, dtype=torch.long)


def _seed_codebook(model: VQModel, seed: int, generator: torch.Generator) -> None:
    """Codebook entries := well-spread latents of fresh train images (no dead start)."""
    images, _ = dataset_split("train", 64, seed, start=_VQ_START + (1 << 23))
    vectors = _flat(F.normalize(block_latents(model, images), dim=1))
    pick = _spread_pick(vectors, model.config.codebook_size, generator)
    model.quantize.embedding.weight.copy_(vectors[pick])


def train_classifier(
    plan: TrainPlan, seed: int, progress: bool = True
) -> tuple[DemoClassifier, dict]:
    """The judge CNN, on fresh (augmented) train images every step."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    model = DemoClassifier().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.classifier_lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(plan.classifier_steps, 20)
    )
    log = StageLog("classifier", every=25)
    start = _CLASSIFIER_START
    for step in tqdm(range(plan.classifier_steps), desc="classifier", disable=not progress):
        images, labels = dataset_split("train", plan.classifier_batch, seed, start=start)
        # Balanced labels arrive in class order; shuffling only reorders the batch.
        start += plan.classifier_batch
        logits = model.logits(augment(images, generator))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        accuracy = float((logits.argmax(-1) == labels).float().mean())
        log.record(step, plan.classifier_steps, loss=loss.item(), accuracy=accuracy)
    stage = log.finish(steps=plan.classifier_steps, images=start - _CLASSIFIER_START)
    return model.eval().requires_grad_(False), stage


def encode_train_codes(
    vq: VQModel, plan: TrainPlan, seed: int, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Codes [n, 256] and labels [n] of the GPT's train images, encoded once."""
    started = time.perf_counter()
    chunk, codes, labels = 250, [], []
    for offset in tqdm(range(0, plan.gpt_images, chunk), desc="encode", disable=not progress):
        count = min(chunk, plan.gpt_images - offset)
        images, chunk_labels = dataset_split("train", count, seed, start=_GPT_START + offset)
        codes.append(encode(vq, images))
        labels.append(chunk_labels)
    codes_t = torch.cat(codes)
    stage = {
        "seconds": round(time.perf_counter() - started, 1),
        "images": plan.gpt_images,
        "distinct_codes": int(codes_t.unique().numel()),
    }
    return codes_t, torch.cat(labels), stage


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms (and nothing else here is 1-D)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_gpt(
    plan: TrainPlan, codes: torch.Tensor, labels: torch.Tensor, seed: int, progress: bool = True
) -> tuple[GPT, dict]:
    """The class-conditional GPT, teacher-forced on exactly the generation loop's sequence."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 2)
    config = get_config(DEMO_MODEL_NAME)
    model = init_weights(GPT(config, SequenceLayout.for_image(config, IMAGE_SIZE)), seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, 0.05), lr=plan.gpt_lr, betas=(0.9, 0.95))
    warmup = max(1, plan.gpt_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.gpt_steps, warmup))
    log = StageLog("gpt", every=25)
    order = torch.randperm(len(codes), generator=generator)
    cursor, epochs = 0, 0.0
    for step in tqdm(range(plan.gpt_steps), desc="gpt", disable=not progress):
        if cursor + plan.gpt_batch > len(order):
            order, cursor = torch.randperm(len(codes), generator=generator), 0
        index = order[cursor: cursor + plan.gpt_batch]
        cursor += plan.gpt_batch
        epochs += plan.gpt_batch / len(codes)
        classes = labels[index].clone()
        dropped = torch.rand(len(index), generator=generator) < plan.class_dropout
        classes[dropped] = config.null_class
        targets = codes[index]
        # fp32: bf16 autocast is emulated (about 9x slower) on CPUs without AVX512-BF16/AMX.
        logits = model(gpt_inputs(targets, classes, config.vocab_size))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        schedule.step()
        log.record(step, plan.gpt_steps, loss=loss.item(), grad_norm=grad_norm,
                   lr=schedule.get_last_lr()[0])
    stage = log.finish(steps=plan.gpt_steps, sequences=plan.gpt_steps * plan.gpt_batch,
                       epochs=round(epochs, 2))
    return model.eval().requires_grad_(False), stage


def run_training(
    out: Path, plan: TrainPlan, *, seed: int = 0, threads: int = 1, force: bool = False,
    progress: bool = True,
) -> dict[str, object]:
    """Train all three models, evaluate them, and write the demo directory `out` atomically."""
    check_writable(out, force)  # refuse before the work, not after it
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        vq, vq_stage = train_vq(plan, seed, progress)
        classifier, classifier_stage = train_classifier(plan, seed, progress)
        codes, labels, encode_stage = encode_train_codes(vq, plan, seed, progress)
        gpt, gpt_stage = train_gpt(plan, codes, labels, seed, progress)
        train_seconds = time.perf_counter() - started
        evaluation = evaluate_demo(
            gpt, vq, classifier, seed=seed, heldout_images=plan.eval_images,
            samples_per_class=plan.eval_samples_per_class, cfg_scale=plan.eval_cfg_scale,
            temperature=plan.eval_temperature, top_k=plan.eval_top_k,
        )
    finally:
        torch.set_num_threads(previous_threads)
    log = {
        "seed": seed,
        "threads": threads,
        "torch": torch.__version__,
        "plan": asdict(plan),
        "stages": {"vq": vq_stage, "classifier": classifier_stage, "encode": encode_stage,
                   "gpt": gpt_stage},
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "evaluation": evaluation,
    }
    write_directory(out, demo_files(gpt, vq, classifier, log), force)
    return log
