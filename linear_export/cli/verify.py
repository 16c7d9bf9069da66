"""`linear-export verify`: an artifact against the PyTorch reference, step by step."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import api
from ..runtime.policies import POLICIES


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
    passed = api.verify(artifact_dir, batch=batch, policies=policies, budget=budget,
                        cfg_scale=cfg_scale, seed=seed, checkpoint=checkpoint, device=device,
                        log=click.echo)
    click.echo("PASS" if passed else "FAIL: the artifact does not match the PyTorch reference.")
    if not passed:
        sys.exit(1)
