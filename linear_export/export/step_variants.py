"""The step graph's siblings, each exported beside step.onnx and sharing its weight file:
the decode step, LineAR's line-end score graph and a feature prefix's prefill."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from ..models.attention import MAX_LOOKAHEAD
from ..models.gpt import GPT, EmbedsPrefillModule, ScoreModule
from .onnx_step import (
    BATCH,
    OUTPUT_NAMES,
    QUERIES,
    ROTATIONS,
    SCORE_INPUTS,
    SCORE_OUTPUT,
    SLOT_POSITIONS,
    STEPS,
    TensorSpec,
    _check_no_cache_sized_values,
    _match,
    _spec,
    example_inputs,
    export_step,
    share_external_data,
)
from .split_cache import split_cache_inputs


def export_decode_sharing(
    model: GPT, directory: Path, main: Path, *, capacity: int, max_batch: int, opset: int,
    name: str, split_cache: bool = False, head_shared: bool = False, attention: str = "math",
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Export the decode step into `directory/name`, sharing `main`'s weight file."""
    scratch = Path(tempfile.mkdtemp(dir=directory, prefix=".decode."))
    try:
        specs = export_step(model, scratch / name, capacity=capacity, with_scores=False,
                            max_batch=max_batch, opset=opset, split_cache=split_cache,
                            head_shared=head_shared, attention=attention)
        share_external_data(scratch / name, main)
        # The graph now names main's data file, so it must sit beside it.
        os.replace(scratch / name, directory / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(directory / name))
    return specs


def export_score_sharing(
    model: GPT, directory: Path, main: Path, *, capacity: int, max_batch: int, opset: int,
    name: str, split_cache: bool = False, head_shared: bool = False,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Export LineAR's line-end score graph (ScoreModule) into `directory/name`.

    Inputs line_query [L, B, H, Q, D], score_shifts [R], past_key, cache_len (and
    slot_positions for per-head budgets); output line_mass [L, B, Hkv, C] float32.
    """
    config, batch_size = model.config, 2
    cache = (config.n_layer, batch_size, config.kv_heads, capacity, config.head_dim)
    # Example sizes B = 2, Q = 3, R = 5: distinct, and none is 1 (DESIGN.md's pitfall).
    example = [torch.zeros(config.n_layer, batch_size, config.n_head, 3, config.head_dim,
                           dtype=model.dtype),
               torch.arange(5, dtype=torch.long), torch.zeros(cache, dtype=model.dtype),
               torch.tensor(4, dtype=torch.long)]
    batch = torch.export.Dim(BATCH, min=1, max=max(2, max_batch))
    dynamic_shapes = {"line_query": {1: batch, 3: torch.export.Dim(QUERIES, min=1,
                                                                   max=capacity)},
                      "score_shifts": {0: torch.export.Dim(ROTATIONS, min=1,
                                                           max=MAX_LOOKAHEAD)},
                      "past_key": {1: batch}, "cache_len": None}
    names = list(SCORE_INPUTS)
    if head_shared:
        example.append(torch.zeros(cache[:4], dtype=torch.long))
        dynamic_shapes[SLOT_POSITIONS] = {1: batch}
        names.append(SLOT_POSITIONS)
    scratch = Path(tempfile.mkdtemp(dir=directory, prefix=".score."))
    path = scratch / name
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(ScoreModule(model).eval(), tuple(example), str(path), dynamo=True,
                              opset_version=opset, input_names=names,
                              output_names=[SCORE_OUTPUT], dynamic_shapes=dynamic_shapes,
                              external_data=True, verbose=False)
        if split_cache:
            split_cache_inputs(path, config.n_layer)
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
        inputs = [_spec(value) for value in proto.graph.input]
        outputs = [_spec(value) for value in proto.graph.output]
        want = [TensorSpec(SCORE_OUTPUT, "float32", (config.n_layer, BATCH, config.kv_heads,
                                                     capacity))]
        _match(outputs, want, name)
        if any(path.parent.glob("*.data")):
            share_external_data(path, main)
        os.replace(path, directory / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(directory / name))
    return inputs, outputs


EMBEDS_INPUTS = ("inputs_embeds", "position_ids", "past_key", "past_value", "cache_len")


def export_embeds_prefill_sharing(
    model: GPT, directory: Path, main: Path, *, embed_dim: int, capacity: int, max_batch: int,
    opset: int, name: str = "prefill_embeds.onnx", split_cache: bool = False,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Export the prefill that takes caption features [B, T, embed_dim] instead of token ids.

    Same cache inputs and K/V outputs as the step; no attn_mass (the cache is empty then).
    Written to `directory/name`, sharing `main`'s weight file.
    """
    model = model.eval()
    scratch = Path(tempfile.mkdtemp(dir=directory, prefix=".prefill."))
    path = scratch / name
    batch = torch.export.Dim(BATCH, min=1, max=max(2, max_batch))
    steps = torch.export.Dim(STEPS, min=1, max=capacity)
    dynamic_shapes = {"inputs_embeds": {0: batch, 1: steps}, "position_ids": {0: batch, 1: steps},
                      "past_key": {1: batch}, "past_value": {1: batch}, "cache_len": None}
    step_inputs = example_inputs(model, capacity, with_scores=False)
    embeds = torch.zeros(*step_inputs[0].shape, embed_dim)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                EmbedsPrefillModule(model).eval(), (embeds, *step_inputs[1:]), str(path),
                dynamo=True, opset_version=opset, input_names=list(EMBEDS_INPUTS),
                output_names=list(OUTPUT_NAMES[:3]), dynamic_shapes=dynamic_shapes,
                external_data=True, verbose=False,
            )
        if split_cache:
            split_cache_inputs(path, model.config.n_layer)
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
        inputs = [_spec(value) for value in proto.graph.input]
        outputs = [_spec(value) for value in proto.graph.output]
        if inputs[0].name != "inputs_embeds" or inputs[0].shape[2:] != (embed_dim,) \
                or [spec.name for spec in outputs] != list(OUTPUT_NAMES[:3]):
            raise RuntimeError(f"{name}: exported IO {[spec.to_json() for spec in inputs]} is "
                               "not the embeddings prefill's")
        _check_no_cache_sized_values(proto, model.config.n_layer, capacity, name)
        share_external_data(path, main)
        os.replace(path, directory / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(str(directory / name))
    return inputs, outputs
