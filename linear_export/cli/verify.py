"""`linear-export verify`: an artifact against the PyTorch reference, step by step."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

from ..engines.base import Engine
from ..engines.ort import OrtEngine
from ..engines.torch import TorchEngine
from ..errors import UserError
from ..export.artifact import Artifact, load_artifact
from ..export.reference import reference_model
from ..runtime.policies import POLICIES, fit_policy
from ..runtime.verify import compare_engines, format_report
from .options import build_policy


@click.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--batch", type=int, default=2, show_default=True,
              help="Images per generation (CFG doubles the rows).")
@click.option("--policy", "policies", multiple=True,
              help=f"Policy to verify ({', '.join(POLICIES)}); repeatable [default: full and "
                   "linear where the artifact's capacity allows, and the build's policy].")
@click.option("--budget", default=None,
              help="Budget for the evicting policies [default: the build's, else 1/4].")
@click.option("--cfg-scale", type=float, default=4.0, show_default=True,
              help="Classifier-free guidance scale (rows [cond; uncond]); 1.0 disables it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generations.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="The checkpoint (janus/lumina: model directory) the artifact was built "
                   "from, if it has moved.")
@click.option("--device", default="cpu", show_default=True, help="Device of both engines.")
def verify(artifact_dir, batch, policies, budget, cfg_scale, seed, checkpoint, device) -> None:
    """Compare every output of every step of an artifact with the PyTorch reference.

    Both engines get the same inputs and cache over whole generations (teacher-forced by the
    reference's greedy tokens); then each generates greedily on its own and the tokens must be
    identical. Exit code 0: pass, 1: mismatch, 2: bad input.
    """
    if batch < 1:
        raise UserError(f"--batch {batch} must be at least 1.")
    artifact = load_artifact(artifact_dir)
    rows = batch * (2 if cfg_scale > 1.0 else 1)
    if rows > artifact.max_batch:
        raise UserError(f"--batch {batch} needs {rows} rows, above the artifact's --max-batch "
                        f"{artifact.max_batch}; lower --batch.")
    build = artifact.manifest["build"]
    budget = budget or build.get("budget") or "1/4"
    explicit = bool(policies)
    names = list(dict.fromkeys(policies or ("full", "linear", build["policy"])))
    family = artifact.family
    layout = family.token_layout(artifact.layout)  # what policies see (end-of-line included)
    chosen, skipped = [], []
    for name in names:
        policy = build_policy(layout, name, budget)
        if policy.capacity > artifact.capacity and not explicit:
            skipped.append(f"{name} skipped: it needs {policy.capacity} cache slots, the "
                           f"artifact has {artifact.capacity}")
            continue
        chosen.append(fit_policy(policy, artifact.capacity))
    conditions = family.example_conditions(batch, seed)  # class ids, or token prompts
    # Quantized weights are checked against the fp32 model at their own recorded tolerances.
    precision = (artifact.dtype_name if artifact.weight_format == "fp32"
                 else artifact.weight_format)

    click.echo(f"Verifying {artifact.path} ({family.name} {artifact.manifest['model']['name']}, "
               f"{layout.height} lines of {layout.width} tokens, {precision}, capacity "
               f"{artifact.capacity}) against PyTorch: batch {batch}, cfg {cfg_scale}, greedy.")
    click.echo(f"An element passes when |candidate - reference| <= atol or <= rtol * "
               f"|reference| (Polygraphy elementwise check); {precision} tolerances "
               "below.")
    for note in skipped:
        click.echo(f"note: {note}")
    candidate = OrtEngine(artifact, device=device)
    reference = TorchEngine(reference_model(artifact, checkpoint).to(device))
    pairs = [("ort vs torch", reference, candidate)] + tensorrt_pairs(
        artifact, reference, candidate, lambda dev: TorchEngine(
            reference_model(artifact, checkpoint).to(dev)))
    passed = True
    for label, base, engine in pairs:
        click.echo(f"{label} ({engine.device}):")
        for policy in chosen:
            started = time.perf_counter()
            report = compare_engines(base, engine, policy, conditions, cfg_scale=cfg_scale,
                                     dtype_name=precision, seed=seed)
            click.echo(format_report(report))
            click.echo(f"  ({time.perf_counter() - started:.1f} s)")
            passed &= report.passed
    if "vq_decoder" in artifact.manifest:
        passed &= verify_vq_decoder(artifact, batch, seed)
    click.echo("PASS" if passed else "FAIL: the artifact does not match the PyTorch reference.")
    if not passed:
        sys.exit(1)


def tensorrt_pairs(
    artifact: Artifact, reference: TorchEngine, ort_engine: OrtEngine,
    make_reference: Callable[[torch.device], TorchEngine],
) -> list[tuple[str, Engine, Engine]]:
    """(label, reference, candidate) for the TensorRT plans, or none with a printed reason."""
    from ..export.tensorrt import skip_reason

    reason = skip_reason(artifact.manifest, str(artifact.path))
    if reason is not None:
        click.echo(f"note: TensorRT comparison skipped: {reason}")
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


def verify_vq_decoder(artifact, batch: int, seed: int) -> bool:
    """vq_decoder.onnx on ONNX Runtime against the PyTorch decoder on random codes."""
    from ..engines.ort_vq import OrtVQDecoder
    from .generate import load_decoder

    record = artifact.manifest["vq_decoder"]
    if not Path(record["path"]).is_file():
        click.echo(f"note: VQ decoder comparison skipped: its checkpoint {record['path']} is "
                   "gone; rebuild the artifact or restore the file.")
        return True
    reference = load_decoder(record["path"], record["model"], artifact.config)
    generator = torch.Generator().manual_seed(seed)
    layout = artifact.layout
    codes = torch.randint(0, artifact.config.vocab_size, (batch, layout.height, layout.width),
                          generator=generator)
    with torch.no_grad():
        expected = reference.decode_codes(codes).float()
    got = OrtVQDecoder(artifact.path / record["file"]).decode_codes(codes)
    error = float((got - expected).abs().max())
    passed = error <= VQ_ATOL
    click.echo(f"vq decoder ort vs torch: batch {batch}, max |diff| {error:.2e} (atol "
               f"{VQ_ATOL:g}): {'pass' if passed else 'FAIL'}")
    return passed
