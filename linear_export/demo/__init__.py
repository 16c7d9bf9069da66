"""The bundled demo model: a tiny class-conditional GPT, its VQ tokenizer and a judge CNN.

All three were trained on this package's procedural dataset (`linear_export.demo.dataset`)
by `linear-export demo train`; the weights ship in `assets/demo/` (fp16 safetensors with
their configs in the metadata) so that every command has a real, non-random model to run.
Generation needs only `decode_codes`; to turn images into the GPT's tokens use
`encode_blocks` (block-wise, as in training), not `VQModel.encode_images`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save

from ..errors import UserError
from ..models import GPT, load_gpt
from ..models.vq import VQModel, load_vq
from .blocks import encode_blocks
from .classifier import ClassifierConfig, DemoClassifier
from .dataset import CLASS_NAMES, IMAGE_SIZE

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
DEMO_MODEL_NAME = "GPT-demo"
DEMO_VQ_NAME = "VQ-demo"
DEMO_IMAGE_SIZE = IMAGE_SIZE
GPT_FILE, VQ_FILE, CLASSIFIER_FILE = "gpt.safetensors", "vq.safetensors", "classifier.safetensors"
LOG_FILE, MANIFEST_FILE = "train_log.json", "demo.json"

__all__ = [
    "CLASS_NAMES", "DEMO_DIR", "DEMO_IMAGE_SIZE", "DEMO_MODEL_NAME", "DEMO_VQ_NAME",
    "demo_files", "encode_blocks", "load_demo_classifier", "load_demo_gpt", "load_demo_vq",
]


def _path(name: str, directory: Path | None) -> Path:
    path = (directory or DEMO_DIR) / name
    if not path.is_file():
        raise UserError(f"Demo weights '{path}' are missing; reinstall linear-export or run "
                        "`linear-export demo train --out DIR` and pass that directory.")
    return path


def _fp16_bytes(module: torch.nn.Module, metadata: dict[str, str]) -> bytes:
    """A module's state dict as safetensors bytes, floats stored as fp16 to keep the wheel small."""
    tensors = {
        key: (value.half() if value.is_floating_point() else value).contiguous()
        for key, value in module.state_dict().items()
    }
    return save(tensors, metadata=metadata)


def demo_files(gpt: GPT, vq: VQModel, classifier: DemoClassifier, log: dict) -> dict[str, bytes]:
    """Every file of a demo model directory, by name."""
    gpt_meta = {"model": DEMO_MODEL_NAME, "image_size": str(DEMO_IMAGE_SIZE),
                "config": json.dumps(asdict(gpt.config))}
    vq_meta = {"model": DEMO_VQ_NAME, "config": json.dumps(asdict(vq.config))}
    classifier_meta = {"config": json.dumps(classifier.config.to_dict())}
    manifest = {
        "gpt": {"file": GPT_FILE, "model": DEMO_MODEL_NAME, "config": asdict(gpt.config)},
        "vq": {"file": VQ_FILE, "model": DEMO_VQ_NAME, "config": asdict(vq.config)},
        "classifier": {"file": CLASSIFIER_FILE, "config": classifier.config.to_dict()},
        "image_size": DEMO_IMAGE_SIZE,
        "class_names": list(CLASS_NAMES),
        "storage_dtype": "fp16",
    }
    return {
        GPT_FILE: _fp16_bytes(gpt, gpt_meta),
        VQ_FILE: _fp16_bytes(vq, vq_meta),
        CLASSIFIER_FILE: _fp16_bytes(classifier, classifier_meta),
        LOG_FILE: (json.dumps(log, indent=2) + "\n").encode(),
        MANIFEST_FILE: (json.dumps(manifest, indent=2, default=list) + "\n").encode(),
    }


def load_demo_gpt(
    dtype: str = "fp32", device: str = "cpu", directory: Path | None = None
) -> GPT:
    """The demo GPT (GPT-demo, 64 px -> 16x16 tokens) in eval mode."""
    return load_gpt(DEMO_MODEL_NAME, DEMO_IMAGE_SIZE, _path(GPT_FILE, directory),
                    dtype=dtype, device=device)


def load_demo_vq(encoder: bool = True, directory: Path | None = None) -> VQModel:
    """The demo VQ tokenizer (VQ-demo) in eval mode, fp32."""
    return load_vq(_path(VQ_FILE, directory), DEMO_VQ_NAME, encoder=encoder)


def load_demo_classifier(directory: Path | None = None) -> DemoClassifier:
    """The demo judge CNN in eval mode, fp32."""
    path = _path(CLASSIFIER_FILE, directory)
    with safe_open(str(path), framework="pt") as handle:
        config = ClassifierConfig.from_dict(json.loads(handle.metadata()["config"]))
    model = DemoClassifier(config)
    state = {key: value.float() if value.is_floating_point() else value
             for key, value in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)

