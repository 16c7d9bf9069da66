"""The T = 1 decode step of the PyTorch model captured as a CUDA graph and replayed.

The step's shapes are fixed (the cache's capacity is static), so one graph per batch size
replays every decode step: one launch instead of hundreds of kernel launches from Python.
The graph reads the cache at the addresses it was captured with, so it is re-captured when
the host loop allocates a new cache (once per generation); compaction works in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models.attention import per_slot
from ..models.gpt import GPT
from .base import StepOutput, scoring_positions
from .cache import KVCache

WARMUP_RUNS = 2  # eager runs on a side stream before capture, as torch.cuda.graphs asks


def check_cuda_graph_device(device: torch.device) -> None:
    """CUDA graphs exist only on CUDA devices: a clear error anywhere else."""
    if device.type != "cuda":
        raise UserError(f"--cuda-graph needs a CUDA device but the model is on '{device}'; "
                        "pass --device cuda or drop --cuda-graph.")
    if not torch.cuda.is_available():
        raise UserError("--cuda-graph needs CUDA but torch sees no CUDA device; drop "
                        "--cuda-graph or run on an NVIDIA GPU machine.")


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    cache_pointers: tuple[int, int, int]
    input_ids: torch.Tensor  # [B, 1] static inputs, copied into before each replay
    position_ids: torch.Tensor
    score_position_ids: torch.Tensor | None  # [B, R, 1]: the scored step's R rotations
    outputs: StepOutput


class DecodeGraphs:
    """CUDA graphs of the T = 1 step, one per batch size and variant: the decode step
    (`model.decode`) or the scored one (`model.step`, per number of scoring rotations)."""

    def __init__(self, model: GPT, device: torch.device):
        check_cuda_graph_device(device)
        self.model, self.device = model, device
        self.cache_len = torch.zeros((), dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], _Captured] = {}

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
             need_scores: bool = False, score_position_ids: torch.Tensor | None = None
             ) -> StepOutput:
        """The outputs of one decode step; overwritten by the next replay of the same batch."""
        batch = input_ids.shape[0]
        scored = scoring_positions(position_ids, score_position_ids) if need_scores else None
        key = (batch, 0 if scored is None else scored.shape[1])
        pointers = _cache_pointers(cache)
        captured = self._graphs.get(key)
        if captured is None or captured.cache_pointers != pointers:
            self._graphs.pop(key, None)  # frees the old graph's memory pool first
            captured = self._capture(batch, key[1], cache)
            self._graphs[key] = captured
        captured.input_ids.copy_(input_ids, non_blocking=True)
        captured.position_ids.copy_(position_ids.expand(batch, 1), non_blocking=True)
        if scored is not None:
            captured.score_position_ids.copy_(scored.expand(batch, -1, -1), non_blocking=True)
        self.cache_len.fill_(cache.cache_len)
        captured.graph.replay()
        return captured.outputs

    def _capture(self, batch: int, rotations: int, cache: KVCache) -> _Captured:
        """`rotations` 0: the decode step; else the scored step with that many."""
        input_ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        position_ids = torch.full((batch, 1), self.model.layout.prefix, dtype=torch.long,
                                  device=self.device)
        score_position_ids = (position_ids[:, None].repeat(1, rotations, 1) if rotations
                              else None)
        self.cache_len.fill_(cache.cache_len)

        def run() -> StepOutput:
            slots = per_slot(cache.shared_positions)
            if score_position_ids is None:
                logits, key, value, query, _ = self.model.decode(
                    input_ids, position_ids, cache.key, cache.value, self.cache_len, **slots)
                return StepOutput(logits, key, value, None, query)
            return StepOutput(*self.model.step(
                input_ids, position_ids, cache.key, cache.value, self.cache_len,
                score_position_ids=score_position_ids, **slots))

        # Warm up on a side stream so lazy initialisation (cuBLAS handles, autotuning) is
        # not captured; the step never writes the cache, so running it here is harmless.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
        return _Captured(graph, _cache_pointers(cache), input_ids, position_ids,
                         score_position_ids, outputs)


def _cache_pointers(cache: KVCache) -> tuple[int, int, int]:
    """Where the graph reads the cache (keys, values, slot positions; compaction is in
    place)."""
    return cache.key.data_ptr(), cache.value.data_ptr(), cache.positions.data_ptr()
