"""Open an engine on a model or an artifact, and the image decoder that goes with it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..engines import ENGINES, make_engine
from ..engines.base import Engine
from ..errors import UserError
from ..export.artifact import Artifact, load_artifact
from ..runtime.policies import Policy
from .models import CHAMELEON_VQ, ModelSource, demo_source, load_source, load_vq_decoder

Decode = Callable[[torch.Tensor], torch.Tensor]  # codes [B, h, w] -> images [B, 3, H, W]


def open_engine(source: torch.nn.Module | Artifact | str | Path, engine: str | None = None, *,
                device: str = "cpu", cuda_graph: bool = False,
                threads: int | None = None, compile: bool = False) -> Engine:
    """An engine for a loaded model (torch) or an artifact or its directory (ort, tensorrt).

    `engine` defaults to torch for a model and ort for an artifact; `threads`: ort's intra-op
    threads [default: all cores]; `compile`: the torch engine's decode steps under
    torch.compile (for long runs: it compiles once per batch size)."""
    if engine is not None and engine not in ENGINES:
        raise UserError(f"Unknown engine '{engine}'; choose one of: {', '.join(ENGINES)}.")
    if isinstance(source, torch.nn.Module):
        if engine not in (None, "torch"):
            raise UserError(f"--engine {engine} runs a built artifact; build one with "
                            "linear-export build and pass --artifact DIR.")
        opened = make_engine("torch", source, cuda_graph=cuda_graph, compile=compile)
        opened.source = getattr(source, "source", None)
        return opened
    if engine == "torch":
        raise UserError("--artifact runs on the ort or tensorrt engine; add --engine ort.")
    artifact = source if isinstance(source, Artifact) else load_artifact(source)
    opened = make_engine(engine or "ort", artifact=artifact, device=device,
                         cuda_graph=cuda_graph, threads=threads, compile=compile)
    opened.source = None
    return opened


def load_artifact_for(path: str | Path, engine: str, *, weights_given: bool = False,
                      family: str | None = None, model: str | None = None,
                      image_size: int | None = None, dtype: str | None = None,
                      check_hashes: bool = True) -> Artifact:
    """The artifact at `path`, for `engine`: it runs on ort or tensorrt, already holds its
    weights, and fixes the family, model, image size and dtype, so what the user gave
    (None: not given) must agree."""
    if engine not in ("ort", "tensorrt"):
        raise UserError("--artifact runs on the ort or tensorrt engine; add --engine ort.")
    if weights_given:
        raise UserError("--artifact already holds the weights; drop --checkpoint and "
                        "--random-weights.")
    artifact = load_artifact(path, check_hashes=check_hashes)
    if family is not None and artifact.family_name != family:
        raise UserError(f"Artifact '{artifact.path}' holds a {artifact.family_name} model; "
                        f"pass --family {artifact.family_name}.")
    manifest = artifact.manifest
    built = {"--model": (model, manifest["model"]["name"]),
             "--image-size": (image_size, manifest["image_size"]),
             "--dtype": (dtype, manifest["dtype"])}
    for flag, (value, recorded) in built.items():
        if value is not None and value != recorded:
            raise UserError(f"{flag} {value} contradicts the artifact, which was built with "
                            f"{flag} {recorded}; drop {flag} or rebuild the artifact.")
    return artifact


def load_decoder(engine: Engine, checkpoint: str | Path | None = None,
                 vq_model: str = "VQ-16") -> Decode | None:
    """decode(codes) -> images in [-1, 1] for an engine's tokens, or None where there is none.

    In order: `checkpoint` (a LlamaGen VQ, or for lumina Chameleon's vqgan.ckpt); Janus's own
    decoder from its model directory; the artifact's exported decoder (build --vq-checkpoint);
    the bundled demo's VQ for the demo model."""
    family = engine.family.name
    model_dir = model_directory(engine)
    if family == "janus":
        if checkpoint is not None:
            raise UserError("--vq-checkpoint decodes LlamaGen or Chameleon tokens; --family "
                            "janus decodes with Janus's own VQ decoder from the model "
                            "directory; drop --vq-checkpoint.")
        from ..models.families.janus import load_janus_decoder

        return load_janus_decoder(model_dir)
    if checkpoint is not None:
        vq_model = CHAMELEON_VQ if family == "lumina" else vq_model
        return load_vq_decoder(checkpoint, vq_model, engine.config).decode_codes
    artifact = getattr(engine, "artifact", None)
    if artifact is not None and "vq_decoder" in artifact.manifest:
        from ..engines.ort_vq import OrtVQDecoder

        return OrtVQDecoder(artifact.path / artifact.manifest["vq_decoder"]["file"]).decode_codes
    source = getattr(engine, "source", None)
    if source is not None and source.demo:
        from ..demo import load_demo_vq

        return load_demo_vq(encoder=False).decode_codes
    return None


def model_directory(engine: Engine) -> str | None:
    """Where the engine's weights came from (a Janus/Lumina directory holds its tokenizer)."""
    source = getattr(engine, "source", None)
    if source is not None:
        return source.checkpoint
    artifact = getattr(engine, "artifact", None)
    return None if artifact is None else artifact.manifest["weights"].get("path")


def open_source(source: ModelSource, engine: str = "torch", *, policy: Policy | None = None,
                rows: int = 16, device: str = "cpu", cuda_graph: bool = False,
                threads: int | None = None, log: Callable[[str], None] | None = None) -> Engine:
    """An engine on `source`'s weights: torch loads the model; ort and tensorrt run the
    artifact for these weights from the per-user cache, built there for `policy` and `rows`
    on first use (LlamaGen class-to-image models)."""
    if engine == "torch":
        return open_engine(load_source(source), cuda_graph=cuda_graph)
    if engine == "tensorrt":
        raise UserError("--engine tensorrt runs a built artifact's plans; pass --artifact DIR "
                        "from linear-export build --tensorrt.")
    if source.family != "llamagen":
        raise UserError(f"--family {source.family} --engine {engine} runs a built artifact; "
                        f"pass --artifact DIR from linear-export build --family "
                        f"{source.family}.")
    from .build import cached_artifact

    if source.demo and not source.bundled_demo:
        source = demo_source(source)
    artifact = cached_artifact(source, policy, rows, log)
    opened = open_engine(artifact, engine, device=device, cuda_graph=cuda_graph, threads=threads)
    opened.source = source  # the weights it was built from (the demo's decoder goes with it)
    return opened
