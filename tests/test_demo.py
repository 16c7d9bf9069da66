"""The demo model: procedural dataset, `demo train --quick`, and the shipped weights' quality."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from click.testing import CliRunner

from linear_export.cli import main
from linear_export.demo import (
    DEMO_DIR,
    DEMO_IMAGE_SIZE,
    DEMO_MODEL_NAME,
    encode_blocks,
    load_demo_classifier,
    load_demo_gpt,
    load_demo_vq,
)
from linear_export.demo.dataset import (
    CLASS_NAMES,
    NUM_CLASSES,
    dataset_split,
    in_heldout,
    make_images,
)
from linear_export.demo.evaluate import encode, teacher_forced_nll, vq_roundtrip_mse
from linear_export.models.configs import GPT_CONFIGS
from linear_export.models.vq import VQ_CONFIGS

# Measured on the shipped weights (see assets/demo/train_log.json), asserted with margin.
MAX_VQ_MSE = 0.03  # measured 0.012 on 500 held-out images ([-1, 1] scale)
MIN_CLASSIFIER_ACCURACY = 0.9  # measured 0.958 on 500 held-out images
MAX_NLL_FRACTION = 0.1  # held-out NLL / log(vocab): measured 0.195 / 6.24 = 0.031


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- dataset


def test_images_are_a_function_of_the_seed() -> None:
    ids = list(range(NUM_CLASSES))
    first, again = make_images(ids, seed=3), make_images(ids, seed=3)
    assert first.shape == (NUM_CLASSES, 3, 64, 64) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, make_images(ids, seed=4))
    assert first.min() >= -1 and first.max() <= 1


def test_split_images_do_not_depend_on_the_batch_they_come_in() -> None:
    whole, labels = dataset_split("train", 30, seed=0)
    tail, tail_labels = dataset_split("train", 10, seed=0, start=20)
    assert torch.equal(whole[20:], tail) and torch.equal(labels[20:], tail_labels)


def test_train_and_heldout_never_overlap() -> None:
    train, _ = dataset_split("train", 400, seed=0)
    heldout, _ = dataset_split("heldout", 400, seed=0)
    assert not {_digest(x) for x in train} & {_digest(x) for x in heldout}
    # Membership is a property of the pixels, so it holds whatever the seed or index.
    assert all(in_heldout(x) for x in heldout[:50])
    assert not any(in_heldout(x) for x in train[:50])


def test_every_class_renders_distinct_non_blank_images() -> None:
    images, labels = dataset_split("heldout", 5 * NUM_CLASSES, seed=1)
    assert len(CLASS_NAMES) == NUM_CLASSES == 10
    assert torch.equal(labels.bincount(), torch.full((NUM_CLASSES,), 5))
    # Two colours each: every image has real contrast.
    assert (images.flatten(1).std(dim=1) > 0.1).all()
    means = torch.stack([images[labels == c].mean(0) for c in range(NUM_CLASSES)])
    # Class mean images differ pairwise (the classes really are different structures).
    gaps = torch.cdist(means.flatten(1), means.flatten(1))
    assert (gaps + torch.eye(NUM_CLASSES) * 1e3).min() > 1.0
    for c in range(NUM_CLASSES):
        same_class = images[labels == c]
        assert len({_digest(x) for x in same_class}) >= 4  # varied within a class too


def test_unknown_split_and_class_are_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        dataset_split("test", 1)
    with pytest.raises(ValueError, match="class id"):
        make_images([NUM_CLASSES], seed=0)


# ---------------------------------------------------------------- configs and CLI


def test_demo_configs_fit_each_other() -> None:
    gpt, vq = GPT_CONFIGS[DEMO_MODEL_NAME], VQ_CONFIGS["VQ-demo"]
    assert gpt.vocab_size == vq.codebook_size
    assert gpt.downsample == vq.downsample == 4
    assert gpt.num_classes == NUM_CLASSES
    assert DEMO_IMAGE_SIZE // gpt.downsample == 16


def test_quick_training_writes_loadable_weights(tmp_path) -> None:
    out = tmp_path / "demo"
    runner = CliRunner()
    args = ["demo", "train", "--quick", "--out", str(out), "--no-progress"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    log = json.loads((out / "train_log.json").read_text())
    assert set(log["stages"]) == {"vq", "classifier", "encode", "gpt"}
    gpt = load_demo_gpt(directory=out)
    vq = load_demo_vq(directory=out)
    classifier = load_demo_classifier(directory=out)
    assert gpt.config == GPT_CONFIGS[DEMO_MODEL_NAME]
    assert vq.config == VQ_CONFIGS["VQ-demo"]
    assert classifier.logits(torch.zeros(2, 3, 64, 64)).shape == (2, NUM_CLASSES)
    # An existing directory is never replaced without --force.
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "--force" in again.output


# ---------------------------------------------------------------- shipped weights


@pytest.fixture(scope="module")
def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    return dataset_split("heldout", 200, seed=0)


def test_shipped_files_are_small_and_described() -> None:
    names = {"gpt.safetensors", "vq.safetensors", "classifier.safetensors", "train_log.json",
             "demo.json"}
    assert names <= {p.name for p in DEMO_DIR.iterdir()}
    assert sum((DEMO_DIR / n).stat().st_size for n in names) < 20 * 2**20
    manifest = json.loads((DEMO_DIR / "demo.json").read_text())
    assert manifest["gpt"]["model"] == DEMO_MODEL_NAME
    assert manifest["class_names"] == list(CLASS_NAMES)


def test_shipped_vq_round_trips_heldout_images(heldout) -> None:
    images, _ = heldout
    vq = load_demo_vq()
    assert vq_roundtrip_mse(vq, images[:60]) < MAX_VQ_MSE


def test_shipped_vq_codes_are_colours() -> None:
    """Block-wise codes: two-colour square and stripe images use exactly two codes each."""
    images = make_images([1, 3, 4, 1], seed=5)
    codes = encode_blocks(load_demo_vq(), images)
    assert codes.shape == (4, 16, 16)
    assert [int(c.unique().numel()) for c in codes] == [2, 2, 2, 2]


def test_shipped_classifier_is_accurate_on_heldout_images(heldout) -> None:
    images, labels = heldout
    classifier = load_demo_classifier()
    accuracy = (classifier.predict(images) == labels).float().mean()
    assert accuracy > MIN_CLASSIFIER_ACCURACY
    assert classifier.features(images[:4]).shape == (4, classifier.feature_dim)


def test_shipped_gpt_predicts_heldout_codes(heldout) -> None:
    images, labels = heldout
    gpt, vq = load_demo_gpt(), load_demo_vq()
    codes = encode(vq, images[:20])
    nll = teacher_forced_nll(gpt, codes, labels[:20])
    assert nll < MAX_NLL_FRACTION * math.log(gpt.config.vocab_size)
