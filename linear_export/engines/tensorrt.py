"""TrtEngine: an artifact's TensorRT plans, run on torch CUDA tensors bound by address.

Per step the host copies only the tiny inputs (token ids, positions, cache_len) into
device buffers bound once; the cache is bound in place and the outputs are preallocated,
so nothing crosses to the host. Written against the TensorRT 10/11 Python API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..export.artifact import SCORE, STEP, STEP_DECODE, Artifact, load_artifact
from ..export.onnx_step import SCORE_OUTPUT, SLOT_POSITIONS
from ..export.split_cache import CACHE_INPUTS, layer_input
from ..export.tensorrt import Profile, check_plan_compatible, require_tensorrt
from .base import StepOutput, check_bound_cache, scoring_positions
from .cache import KVCache


@dataclass
class _Bound:
    """Buffers of one (variant, B, T); the context's shapes are set when it was last used."""

    out: StepOutput
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    score_position_ids: torch.Tensor | None  # the scored variant's only


class _Plan:
    """One deserialized plan with one execution context per optimization profile."""

    def __init__(self, trt, runtime, path: Path, profiles: list[Profile], stream: int):
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT cannot load {path.name}; rebuild the artifact with "
                            "linear-export build --tensorrt --force.")
        self.inputs = [name for name in self._names()
                       if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        self.outputs = [name for name in self._names() if name not in self.inputs]
        self.profiles = profiles
        self.contexts = []
        for index in range(len(profiles)):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, stream)
            self.contexts.append(context)
        self.last_key: list[tuple | None] = [None] * len(profiles)

    def _names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def profile_for(self, batch: int, steps: int, rotations: int = 0) -> int:
        for index, profile in enumerate(self.profiles):
            if profile.covers(batch, steps, rotations):
                return index
        raise ValueError(f"no TensorRT profile covers batch {batch} x {steps} steps x "
                         f"{rotations} scoring rotations "
                         f"({[(p.batch, p.steps, p.rotations) for p in self.profiles]})")


class TrtEngine:
    """Runs the artifact's plans; outputs live in buffers reused by the next step() call."""

    name = "tensorrt"

    def __init__(self, artifact: Artifact | str | Path, device: str | torch.device = "cuda"):
        trt = require_tensorrt()
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise UserError(f"The tensorrt engine runs on CUDA devices, not '{device}'; pass "
                            "--device cuda.")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.artifact.prefill_embeds_path is not None:
            raise UserError(f"Artifact '{self.artifact.path}' ({self.artifact.family_name}) "
                            "prefills caption features, which the TensorRT engine does not run "
                            "yet; use --engine ort.")
        record = self.artifact.manifest.get("tensorrt")
        check_plan_compatible(record, trt.__version__,
                              torch.cuda.get_device_name(self.device), str(self.artifact.path))
        self.config, self.layout = self.artifact.config, self.artifact.layout
        self.family = self.artifact.family  # how the runtime drives the exported model
        self.capacity, self.dtype = self.artifact.capacity, self.artifact.dtype
        self.max_batch = int(record["max_batch"])
        profiles, scoring = ([Profile(p["name"], tuple(p["batch"]), tuple(p["steps"]),
                                      tuple(p["rotations"])) for p in record[key]]
                             for key in ("profiles", "score_profiles"))
        # Every plan runs on torch's current stream, so torch ops before and after it are
        # ordered with it and no synchronisation is needed.
        self.stream = torch.cuda.current_stream(self.device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(self.device):
            def plan(graph: str, ranges: list[Profile]) -> _Plan:
                return _Plan(trt, self._runtime, self.artifact.path / record["plans"][graph],
                             ranges, self.stream.cuda_stream)

            self.plans = {True: plan(STEP, profiles), False: plan(STEP_DECODE, profiles)}
            self.score_plan = plan(SCORE, scoring)
        self._bindings: dict[tuple[bool, int, int], _Bound] = {}
        self._cache_len = torch.zeros((), dtype=torch.long, device=self.device)

    def _binding(self, with_scores: bool, batch: int, steps: int, rotations: int) -> _Bound:
        """Buffers per (variant, B, T, R); R: score_position_ids' rotations (0: no scores)."""
        key = (with_scores, batch, steps, rotations)
        if key not in self._bindings:
            config, dev = self.config, self.device
            present = (config.n_layer, batch, config.kv_heads, steps, config.head_dim)
            self._bindings[key] = _Bound(
                StepOutput(
                    logits=torch.empty(batch, config.vocab_size, dtype=torch.float32, device=dev),
                    present_key=torch.empty(present, dtype=self.dtype, device=dev),
                    present_value=torch.empty(present, dtype=self.dtype, device=dev),
                    attn_mass=torch.empty(config.n_layer, batch, config.n_head, self.capacity,
                                          dtype=torch.float32, device=dev)
                    if with_scores else None,
                    present_query=None if with_scores else torch.empty(
                        config.n_layer, batch, config.n_head, steps, config.head_dim,
                        dtype=self.dtype, device=dev)),
                torch.zeros(batch, steps, dtype=torch.long, device=dev),
                torch.zeros(batch, steps, dtype=torch.long, device=dev),
                torch.zeros(batch, rotations, steps, dtype=torch.long, device=dev)
                if with_scores else None)
        return self._bindings[key]

    def _tensors(self, bound: _Bound, cache: KVCache) -> dict[str, torch.Tensor]:
        """Every IO tensor of the graph by name; the cache as the graph takes it."""
        tensors = {"input_ids": bound.input_ids, "position_ids": bound.position_ids,
                   "cache_len": self._cache_len}
        if bound.score_position_ids is not None:
            tensors["score_position_ids"] = bound.score_position_ids
        tensors.update(self._cache_tensors(cache))
        for name in ("logits", "present_key", "present_value", "attn_mass", "present_query"):
            if getattr(bound.out, name) is not None:
                tensors[name] = getattr(bound.out, name)
        return tensors

    def _cache_tensors(self, cache: KVCache) -> dict[str, torch.Tensor]:
        """The cache (and per-head budgets' slot positions) as the graphs take them."""
        tensors = {SLOT_POSITIONS: cache.positions} if self.artifact.head_shared else {}
        for name, whole in zip(CACHE_INPUTS, (cache.key, cache.value), strict=True):
            if self.artifact.split_cache:  # each layer's slice of the same storage
                tensors.update({layer_input(name, layer): whole[layer]
                                for layer in range(self.config.n_layer)})
            else:
                tensors[name] = whole
        return tensors

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        need_scores: bool = False,
        score_position_ids: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step (Engine.step); the returned tensors are overwritten by the next call with
        the same shape."""
        batch, steps = input_ids.shape
        check_bound_cache(self, cache, batch, "the TensorRT plans' max batch")
        with_scores = need_scores
        plan = self.plans[with_scores]
        scored = scoring_positions(position_ids, score_position_ids) if with_scores else None
        rotations = 0 if scored is None else scored.shape[1]
        index = plan.profile_for(batch, steps, rotations)
        context = plan.contexts[index]
        bound = self._binding(with_scores, batch, steps, rotations)
        bound.input_ids.copy_(input_ids, non_blocking=True)
        bound.position_ids.copy_(position_ids.expand(batch, steps), non_blocking=True)
        if scored is not None:
            bound.score_position_ids.copy_(scored.expand(batch, -1, -1), non_blocking=True)
        self._cache_len.fill_(cache.cache_len)  # a fill kernel: no host round trip
        key = (batch, steps, rotations, cache.key.data_ptr(), cache.value.data_ptr(),
               cache.positions.data_ptr())
        if plan.last_key[index] != key:  # shapes and addresses change per (B, T) and cache
            tensors = self._tensors(bound, cache)
            for name in plan.inputs:
                if not context.set_input_shape(name, tuple(tensors[name].shape)):
                    raise ValueError(f"TensorRT rejected shape {tuple(tensors[name].shape)} "
                                     f"for {name}")
            for name in plan.inputs + plan.outputs:
                context.set_tensor_address(name, tensors[name].data_ptr())
            plan.last_key[index] = key
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
        return bound.out

    def score_line(self, line_query: torch.Tensor, score_shifts: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        """The score plan, once per line: shapes and addresses set on every call."""
        config, batch = self.config, cache.shape.batch
        plan = self.score_plan
        context = plan.contexts[plan.profile_for(batch, line_query.shape[3],
                                                 score_shifts.shape[0])]
        mass = torch.empty(config.n_layer, batch, config.kv_heads, self.capacity,
                           dtype=torch.float32, device=self.device)
        self._cache_len.fill_(cache.cache_len)
        tensors = {"line_query": line_query.to(self.device, self.dtype).contiguous(),
                   "score_shifts": score_shifts.to(self.device, torch.long).contiguous(),
                   "cache_len": self._cache_len, SCORE_OUTPUT: mass,
                   **self._cache_tensors(cache)}
        for name in plan.inputs:
            context.set_input_shape(name, tuple(tensors[name].shape))
        for name in plan.inputs + plan.outputs:
            context.set_tensor_address(name, tensors[name].data_ptr())
        plan.last_key = [None] * len(plan.contexts)
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
        return mass
