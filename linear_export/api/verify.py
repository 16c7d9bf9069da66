"""Verify an artifact against the PyTorch reference, step by step over whole generations."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..engines.base import Engine
from ..engines.ort import OrtEngine
from ..engines.torch import TorchEngine
from ..errors import UserError
from ..export.artifact import Artifact, load_artifact
from ..export.reference import reference_model
from ..runtime.policies import Policy, fit_policy
from ..runtime.policy_spec import make_policy as layout_policy
from ..runtime.verify import compare_engines, format_report
from .models import load_vq_decoder

Log = Callable[[str], None]


def verify(artifact: Artifact | str | Path, *, batch: int = 2, policies: tuple[str, ...] = (),
           budget: str | None = None, cfg_scale: float = 4.0, seed: int = 0,
           checkpoint: str | None = None, device: str = "cpu", log: Log = print) -> bool:
    """Compare every output of every step of an artifact with the PyTorch reference.

    Both engines get the same inputs and cache over whole generations (teacher-forced by the
    reference's greedy tokens); then each generates greedily on its own and the tokens must be
    identical. `policies` default to full and linear where the capacity allows, and the
    build's. Returns whether everything passed; `log` gets the report line by line."""
    if batch < 1:
        raise UserError(f"--batch {batch} must be at least 1.")
    artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
    rows = batch * (2 if cfg_scale > 1.0 else 1)
    if rows > artifact.max_batch:
        raise UserError(f"--batch {batch} needs {rows} rows, above the artifact's --max-batch "
                        f"{artifact.max_batch}; lower --batch.")
    chosen, skipped = _policies(artifact, policies, budget)
    conditions = artifact.family.example_conditions(batch, seed)  # class ids, or token prompts
    # Quantized weights are checked against the fp32 model at their own recorded tolerances.
    precision = (artifact.dtype_name if artifact.weight_format == "fp32"
                 else artifact.weight_format)
    layout = artifact.family.token_layout(artifact.layout)
    log(f"Verifying {artifact.path} ({artifact.family.name} "
        f"{artifact.manifest['model']['name']}, {layout.height} lines of {layout.width} tokens, "
        f"{precision}, capacity {artifact.capacity}) against PyTorch: batch {batch}, cfg "
        f"{cfg_scale}, greedy.")
    log(f"An element passes when |candidate - reference| <= atol or <= rtol * |reference| "
        f"(Polygraphy elementwise check); {precision} tolerances below.")
    for note in skipped:
        log(f"note: {note}")
    candidate = OrtEngine(artifact, device=device)
    reference = TorchEngine(reference_model(artifact, checkpoint).to(device))
    pairs = [("ort vs torch", reference, candidate)] + tensorrt_pairs(
        artifact, reference, candidate, lambda dev: TorchEngine(
            reference_model(artifact, checkpoint).to(dev)), log)
    passed = True
    for label, base, engine in pairs:
        log(f"{label} ({engine.device}):")
        for policy in chosen:
            started = time.perf_counter()
            report = compare_engines(base, engine, policy, conditions, cfg_scale=cfg_scale,
                                     dtype_name=precision, seed=seed)
            log(format_report(report))
            log(f"  ({time.perf_counter() - started:.1f} s)")
            passed &= report.passed
    if "vq_decoder" in artifact.manifest:
        passed &= verify_vq_decoder(artifact, batch, seed, log)
    return passed


def _policies(artifact: Artifact, names: tuple[str, ...], budget: str | None,
              ) -> tuple[list[Policy], list[str]]:
    """The policies to verify, fitted to the artifact, and notes on the defaults skipped."""
    build = artifact.manifest["build"]
    budget = budget or build.get("budget") or "1/4"
    explicit = bool(names)
    names = list(dict.fromkeys(names or ("full", "linear", build["policy"])))
    layout = artifact.family.token_layout(artifact.layout)  # what policies see (end-of-line)
    chosen, skipped = [], []
    for name in names:
        policy = layout_policy(layout, name, budget)
        if policy.capacity > artifact.capacity and not explicit:
            skipped.append(f"{name} skipped: it needs {policy.capacity} cache slots, the "
                           f"artifact has {artifact.capacity}")
            continue
        chosen.append(fit_policy(policy, artifact.capacity))
    return chosen, skipped


def tensorrt_pairs(
    artifact: Artifact, reference: TorchEngine, ort_engine: OrtEngine,
    make_reference: Callable[[torch.device], TorchEngine], log: Log,
) -> list[tuple[str, Engine, Engine]]:
    """(label, reference, candidate) for the TensorRT plans, or none with a printed reason."""
    from ..export.tensorrt import skip_reason

    reason = skip_reason(artifact.manifest, str(artifact.path))
    if reason is not None:
        log(f"note: TensorRT comparison skipped: {reason}")
        return []
    from ..engines.tensorrt import TrtEngine

    device = reference.device if reference.device.type == "cuda" else "cuda"
    engine = TrtEngine(artifact, device=device)
    if reference.device != engine.device:  # the compared engines share one cache
        reference = make_reference(engine.device)
    pairs = [("tensorrt vs torch", reference, engine)]
    if ort_engine.device == engine.device:
        pairs.append(("tensorrt vs ort", ort_engine, engine))
    return pairs


VQ_ATOL = 1e-3  # fp32 decoder; images are in [-1, 1], so this is well under one 8-bit level


def verify_vq_decoder(artifact: Artifact, batch: int, seed: int, log: Log) -> bool:
    """vq_decoder.onnx on ONNX Runtime against the PyTorch decoder on random codes."""
    from ..engines.ort_vq import OrtVQDecoder

    record = artifact.manifest["vq_decoder"]
    if not Path(record["path"]).is_file():
        log(f"note: VQ decoder comparison skipped: its checkpoint {record['path']} is "
                   "gone; rebuild the artifact or restore the file.")
        return True
    reference = load_vq_decoder(record["path"], record["model"], artifact.config)
    generator = torch.Generator().manual_seed(seed)
    layout = artifact.layout
    codes = torch.randint(0, artifact.config.vocab_size, (batch, layout.height, layout.width),
                          generator=generator)
    with torch.no_grad():
        expected = reference.decode_codes(codes).float()
    got = OrtVQDecoder(artifact.path / record["file"]).decode_codes(codes)
    error = float((got - expected).abs().max())
    passed = error <= VQ_ATOL
    log(f"vq decoder ort vs torch: batch {batch}, max |diff| {error:.2e} (atol "
               f"{VQ_ATOL:g}): {'pass' if passed else 'FAIL'}")
    return passed
