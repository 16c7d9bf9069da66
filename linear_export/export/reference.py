"""The PyTorch model an artifact was exported from, rebuilt from what its manifest recorded:
what verify compares every engine against."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..hashing import sha256_file
from ..models.checkpoint import load_into, read_state_dict
from ..models.families import load_hf_step
from ..models.gpt import GPT, init_weights
from .artifact import MANIFEST, REBUILD, Artifact


def reference_model(artifact: Artifact, checkpoint: str | Path | None = None) -> GPT:
    """The PyTorch model the artifact was exported from, rebuilt from its recorded weights."""
    weights = artifact.manifest.get("weights", {})
    if weights.get("source") == "hf":
        return _hf_reference(artifact, weights, checkpoint)
    family = artifact.family
    if family.name == "llamagen-t2i":
        from ..models.families.t2i import T2IGPT

        model = T2IGPT(artifact.config, artifact.layout, caption_dim=family.caption_dim)
    else:
        model = GPT(artifact.config, artifact.layout)
    if weights.get("source") == "random":
        init_weights(model, seed=int(weights["seed"]), std=float(weights["std"]))
    elif weights.get("source") == "checkpoint" or checkpoint is not None:
        path = Path(checkpoint or weights["path"])
        if not path.is_file():
            raise UserError(f"The checkpoint this artifact was built from, '{path}', is missing; "
                            "pass it with --checkpoint PATH.")
        if weights.get("sha256") and sha256_file(path) != weights["sha256"]:
            raise UserError(f"Checkpoint '{path}' differs from the one this artifact was built "
                            "from (sha256 mismatch); pass the original or rebuild the artifact.")
        load_into(model, read_state_dict(path), artifact.manifest["model"]["name"])
    else:
        raise UserError(f"{MANIFEST} in '{artifact.path}' does not say which weights it was "
                        f"built from; {REBUILD}.")
    return model.to(dtype=artifact.dtype).eval().requires_grad_(False)


def _hf_reference(artifact: Artifact, weights: dict, directory: str | Path | None):
    """A Janus/Lumina step model rebuilt from the recorded Hugging Face directory."""
    from ..models.families import hf_weights_record

    path = Path(directory or weights["path"])
    if not path.is_dir():
        raise UserError(f"The model directory this artifact was built from, '{path}', is "
                        "missing; pass it with --checkpoint DIR.")
    if hf_weights_record(weights["family"], path)["sha256"] != weights["sha256"]:
        raise UserError(f"Model directory '{path}' differs from the one this artifact was built "
                        "from (sha256 mismatch); pass the original or rebuild the artifact.")
    return load_hf_step(weights["family"], path, int(artifact.manifest["image_size"]),
                        artifact.layout.prefix, artifact.dtype_name)
