"""OrtEngine: the exported step on ONNX Runtime, cache bound zero-copy through IOBinding."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..errors import UserError
from ..export.artifact import Artifact, directory_mode, load_artifact
from ..export.consistency import entry_intact, stamp_entry
from ..export.onnx_step import IN_PLACE, SCORE_OUTPUT, SLOT_POSITIONS
from ..export.split_cache import CACHE_INPUTS, layer_input
from .base import StepOutput, check_bound_cache, check_room, scoring_positions
from .cache import KVCache

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
CACHE_DIR = ".ort"  # optimized models, inside the artifact directory they were made from


def _machine_tag() -> str:
    """CPU model and flags: ORT_ENABLE_ALL output may hold hardware-specific rewrites."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            text += "".join(line for line in info if line.startswith(("model name", "flags")))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass
class _Bound:
    """An IOBinding and the tensors bound to it, for one (variant, B, T)."""

    binding: ort.IOBinding
    out: StepOutput
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    score_position_ids: torch.Tensor | None  # the scored variant's only
    in_place: bool = False  # the fused decode step: its caches out are the cache's buffers
    cache_pointers: tuple[int, ...] | None = None


class OrtEngine:
    """Runs an artifact's step graph; outputs live in buffers reused by the next step() call."""

    name = "ort"

    def __init__(
        self,
        artifact: Artifact | str | Path,
        device: str | torch.device = "cpu",
        *,
        threads: int | None = None,
        cache_optimized: bool = True,
    ):
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        self.config, self.layout = self.artifact.config, self.artifact.layout
        self.family = self.artifact.family  # how the runtime drives the exported model
        self.capacity, self.max_batch = self.artifact.capacity, self.artifact.max_batch
        self.dtype = self.artifact.dtype
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("--device cuda needs onnxruntime-gpu's CUDA provider, which this "
                                "installation lacks; use --device cpu.")
            index = self.device.index if self.device.index is not None else 0
            self.device = torch.device("cuda", index)
            # ORT runs on torch's stream, so bound torch buffers need no extra synchronisation.
            stream = torch.cuda.current_stream(self.device).cuda_stream
            self.providers = [("CUDAExecutionProvider",
                               {"device_id": index, "user_compute_stream": str(stream)}),
                              "CPUExecutionProvider"]
        elif self.device.type == "cpu":
            self.providers = ["CPUExecutionProvider"]
        else:
            raise UserError(f"The ort engine runs on cpu or cuda, not '{device}'.")
        self.threads = threads or os.cpu_count() or 1
        self.cache_optimized = cache_optimized
        # The scored step (H2O) only when first asked for: most policies never run it.
        self.sessions = {False: self._session(self.artifact.decode_path)}
        self.score_session = self._session(self.artifact.score_path)
        self.in_place = self.artifact.attention == "gqa"  # the decode step writes its K/V
        self.prefill_embeds = None  # a feature prefix's prefill (llamagen-t2i)
        if self.artifact.prefill_embeds_path is not None:
            self.prefill_embeds = self._session(self.artifact.prefill_embeds_path)
        if self.device.type == "cuda" and any("CUDAExecutionProvider" not in s.get_providers()
                                              for s in (*self.sessions.values(),
                                                        self.score_session)):
            # ONNX Runtime falls back to the CPU silently when the CUDA libraries fail to load.
            raise UserError("onnxruntime's CUDA provider failed to load (CUDA or cuDNN libraries "
                            "missing or mismatched); install the onnxruntime-gpu build for this "
                            "CUDA version, or use --device cpu.")
        self._bindings: dict[tuple[bool, int, int], _Bound] = {}
        self._cache_len = torch.zeros((), dtype=torch.long, device=self.device)

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3  # errors only: the serialisation warning is handled below
        # Idle workers that spin slow the host loop's torch ops between steps (GPT-B batch 8:
        # sampling 2.1 s against 1.0 s per generation) more than waking them costs the step.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _session(self, source: Path) -> ort.InferenceSession:
        """A session, from the cached optimized model when present and newer than the source."""
        provider = self.providers[0] if isinstance(self.providers[0], str) else "CUDA"
        # Keyed by every file's hash (the graph and its weights), provider, ORT and CPU.
        files = self.artifact.manifest["files"]
        content = hashlib.sha256("".join(files[name]["sha256"] for name in sorted(files))
                                 .encode()).hexdigest()[:12]
        tag = (f"{source.stem}.{provider.removesuffix('ExecutionProvider').lower()}."
               f"ort{ort.__version__}.{content}.{_machine_tag()}")
        cached = source.parent / CACHE_DIR / tag / "model.onnx"
        newest_source = max((source.parent / name).stat().st_mtime for name in files)
        if self.cache_optimized and cached.is_file() and cached.stat().st_mtime >= newest_source \
                and entry_intact(cached.parent):  # a truncated or altered entry is rebuilt
            try:
                return ort.InferenceSession(str(cached), self._options(),
                                            providers=self.providers)
            except Exception:  # noqa: BLE001 - a broken cache entry is rebuilt, never fatal
                shutil.rmtree(cached.parent, ignore_errors=True)
        options = self._options()
        scratch = None
        if self.cache_optimized:
            try:
                cached.parent.parent.mkdir(exist_ok=True)
                scratch = Path(tempfile.mkdtemp(dir=cached.parent.parent, prefix=".tmp."))
                os.chmod(scratch, directory_mode())
            except OSError:
                scratch = None  # a read-only artifact: run without caching
        if scratch is not None:
            options.optimized_model_filepath = str(scratch / "model.onnx")
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "model.onnx.data")
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = ort.InferenceSession(str(source), options, providers=self.providers)
        except Exception as error:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise UserError(f"ONNX Runtime cannot load {source.name} from '{source.parent}' "
                            f"({str(error).splitlines()[0][:200]}); rebuild with linear-export "
                            "build --force.") from None
        if scratch is not None:
            # A directory rename is atomic, so a concurrent reader never sees half a cache entry.
            try:
                stamp_entry(scratch)
                shutil.rmtree(cached.parent, ignore_errors=True)
                os.replace(scratch, cached.parent)
            except OSError:
                shutil.rmtree(scratch, ignore_errors=True)
        return session

    def _step_session(self, with_scores: bool) -> ort.InferenceSession:
        if with_scores not in self.sessions:
            self.sessions[with_scores] = self._session(self.artifact.step_path)
        return self.sessions[with_scores]

    def _binding(self, with_scores: bool, batch: int, steps: int, rotations: int) -> _Bound:
        """One IOBinding per (variant, B, T, R), bound once to preallocated input/output tensors.

        R: score_position_ids' rotations [B, R, T] (0 without scores).
        """
        key = (with_scores, batch, steps, rotations)
        if key not in self._bindings:
            config, dev = self.config, self.device
            present = (config.n_layer, batch, config.kv_heads, steps, config.head_dim)
            out = StepOutput(
                logits=torch.empty(batch, config.vocab_size, dtype=torch.float32, device=dev),
                present_key=torch.empty(present, dtype=self.dtype, device=dev),
                present_value=torch.empty(present, dtype=self.dtype, device=dev),
                attn_mass=torch.empty(config.n_layer, batch, config.n_head, self.capacity,
                                      dtype=torch.float32, device=dev) if with_scores else None,
                present_query=None if with_scores else torch.empty(
                    config.n_layer, batch, config.n_head, steps, config.head_dim,
                    dtype=self.dtype, device=dev),
            )
            ids = [torch.zeros(shape, dtype=torch.long, device=dev)
                   for shape in ((batch, steps), (batch, steps), (batch, rotations, steps))]
            bound = _Bound(self._step_session(with_scores).io_binding(), out, ids[0], ids[1],
                           ids[2] if with_scores else None, in_place=not with_scores and
                           self.in_place)
            for name in ("logits", "present_key", "present_value", "attn_mass",
                         "present_query"):
                tensor = getattr(out, name)
                if tensor is not None:
                    self._bind(bound.binding.bind_output, name, tensor)
            for name, tensor in (("input_ids", bound.input_ids),
                                 ("position_ids", bound.position_ids),
                                 ("cache_len", self._cache_len),
                                 ("score_position_ids", bound.score_position_ids)):
                if tensor is not None:
                    self._bind(bound.binding.bind_input, name, tensor)
            self._bindings[key] = bound
        return self._bindings[key]

    def _bind(self, bind, name: str, tensor: torch.Tensor) -> None:
        bind(name, self.device.type, self.device.index or 0, NUMPY_DTYPES[tensor.dtype],
             list(tensor.shape), tensor.data_ptr())

    def _bind_cache(self, bound: _Bound, cache: KVCache) -> None:
        """Bind the cache in place (zero-copy), again only when it is another tensor."""
        pointers = (cache.key.data_ptr(), cache.value.data_ptr(), cache.positions.data_ptr())
        if bound.cache_pointers == pointers:
            return
        self._bind_cache_inputs(bound.binding, cache)
        if self.artifact.head_shared:
            self._bind(bound.binding.bind_input, SLOT_POSITIONS, cache.positions)
        if bound.in_place:
            # GroupQueryAttention sees its cache output at its input's address and updates
            # the cache in place (slots [cache_len, cache_len + T) only): no copy at all.
            for name, tensor in zip(IN_PLACE, (cache.key, cache.value), strict=True):
                for layer in range(self.config.n_layer):
                    self._bind(bound.binding.bind_output, layer_input(name, layer),
                               tensor[layer])
        bound.cache_pointers = pointers

    def _bind_cache_inputs(self, binding: ort.IOBinding, cache: KVCache,
                           names: tuple[str, ...] = CACHE_INPUTS) -> None:
        for name in names:
            tensor = cache.key if name == "past_key" else cache.value
            if self.artifact.split_cache:  # each layer's slice of the same storage
                for layer in range(self.config.n_layer):
                    self._bind(binding.bind_input, layer_input(name, layer), tensor[layer])
            else:
                self._bind(binding.bind_input, name, tensor)

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        need_scores: bool = False,
        score_position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step (Engine.step); the returned tensors are overwritten by the next call with
        the same shape.

        `inputs_embeds` [B, T, E]: a prefix of features (llamagen-t2i captions), run through
        the artifact's embeddings prefill; it reports no attn_mass (the cache is empty then).
        The fused decode step takes T > 1 only on an empty cache; other multi-token steps
        run the scored step (and report attn_mass, not present_query).
        """
        batch, steps = input_ids.shape
        check_bound_cache(self, cache, batch, "the artifact's --max-batch")
        check_room(cache, steps)
        if inputs_embeds is not None:
            return self._prefill_embeds(inputs_embeds, position_ids, cache)
        with_scores = need_scores or (self.in_place and steps > 1 and cache.cache_len > 0)
        scored = scoring_positions(position_ids, score_position_ids) if with_scores else None
        bound = self._binding(with_scores, batch, steps, 0 if scored is None else scored.shape[1])
        # Only the tiny inputs are copied, into buffers bound once; nothing is allocated.
        bound.input_ids.copy_(input_ids)
        bound.position_ids.copy_(position_ids.expand(batch, steps))
        if scored is not None:
            bound.score_position_ids.copy_(scored.expand(batch, -1, -1))
        self._cache_len.fill_(cache.cache_len)
        self._bind_cache(bound, cache)
        self.sessions[with_scores].run_with_iobinding(bound.binding)
        return bound.out

    def score_line(self, line_query: torch.Tensor, score_shifts: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        """Once per line, so bound afresh each call; the result is a new tensor."""
        config, batch = self.config, cache.shape.batch
        mass = torch.empty(config.n_layer, batch, config.kv_heads, self.capacity,
                           dtype=torch.float32, device=self.device)
        query = line_query.to(self.device, self.dtype).contiguous()
        shifts = score_shifts.to(self.device, torch.long).contiguous()
        self._cache_len.fill_(cache.cache_len)
        binding = self.score_session.io_binding()
        for name, tensor in (("line_query", query), ("score_shifts", shifts),
                             ("cache_len", self._cache_len)):
            self._bind(binding.bind_input, name, tensor)
        self._bind_cache_inputs(binding, cache, names=("past_key",))
        if self.artifact.head_shared:
            self._bind(binding.bind_input, SLOT_POSITIONS, cache.positions)
        self._bind(binding.bind_output, SCORE_OUTPUT, mass)
        self.score_session.run_with_iobinding(binding)
        return mass

    def _prefill_embeds(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                        cache: KVCache) -> StepOutput:
        """Once per generation, so bound afresh each time; outputs are new tensors."""
        if self.prefill_embeds is None:
            raise UserError(f"Artifact '{self.artifact.path}' has no embeddings prefill, so it "
                            "cannot take caption features; build it with --family llamagen-t2i.")
        config, dev = self.config, self.device
        batch, steps = inputs_embeds.shape[:2]
        present = (config.n_layer, batch, config.kv_heads, steps, config.head_dim)
        out = StepOutput(torch.empty(batch, config.vocab_size, dtype=torch.float32, device=dev),
                         torch.empty(present, dtype=self.dtype, device=dev),
                         torch.empty(present, dtype=self.dtype, device=dev), None)
        embeds = inputs_embeds.to(dev, torch.float32).contiguous()
        positions = position_ids.to(dev).expand(batch, steps).contiguous()
        self._cache_len.fill_(cache.cache_len)
        binding = self.prefill_embeds.io_binding()
        for name, tensor in (("inputs_embeds", embeds), ("position_ids", positions),
                             ("cache_len", self._cache_len)):
            self._bind(binding.bind_input, name, tensor)
        for name in ("logits", "present_key", "present_value"):
            self._bind(binding.bind_output, name, getattr(out, name))
        self._bind_cache_inputs(binding, cache)
        self.prefill_embeds.run_with_iobinding(binding)
        return out
