"""Per-head budget files: how many image tokens each kv head keeps after each line.

LineAR's uniform budget gives every (layer, kv head) the same number of slots, but a model's
heads differ: some read far back, some only nearby. A head-shared cache pool lets a layer's
heads split its slots unevenly, by a table calibrated once per model (`linear-export
calibrate`, evaluation/oracle.py). One file holds a table per budget:

    budget_<tokens>: int64 [lines - 1, n_layer, n_kv_head]

and, where calibrated, LineAR's position prior for that budget (evaluation/position_prior.py):

    prior_<tokens>: float32 [lines - 1, n_layer, n_kv_head, image tokens]
    prior_weight_<tokens>: float32 [n_layer, n_kv_head]

In the safetensors metadata: the grid, layer and head counts, and each budget's recent lines,
anchor and lookahead, so a table is never applied to a model or policy it was not made for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..errors import UserError
from ..models.configs import GPTConfig
from ..outputs import write_atomic
from .policies import Policy

FORMAT = "linear-export head budgets 1"


@dataclass
class HeadBudgets:
    """Tables for one model: {budget tokens: [lines - 1, L, Hkv]} and what they were made for."""

    tables: dict[int, torch.Tensor]
    grid: tuple[int, int]  # lines, tokens per line
    n_layer: int
    n_kv_head: int
    knobs: dict[int, dict]  # per budget: recent_lines, anchor, lookahead (with a prior)
    source: str = ""  # how it was calibrated, for the record
    priors: dict[int, torch.Tensor] = field(default_factory=dict)  # [lines - 1, L, Hkv, N]
    prior_weights: dict[int, torch.Tensor] = field(default_factory=dict)  # [L, Hkv]

    def apply(self, policy: Policy, config: GPTConfig, path: str | Path = "") -> Policy:
        """`policy` with its budget's table (and position prior): the head-shared pool."""
        if not policy.evicts:
            return policy  # the whole image fits: no table is needed
        table = self.for_policy(policy, config, path)
        chosen = Policy(replace(policy.config, head_budgets=table), policy.layout)
        if policy.budget not in self.priors:
            return chosen
        lookahead = self.knobs[policy.budget]["lookahead"]
        if chosen.lookahead != lookahead:
            where = f" in '{path}'" if path else ""
            raise UserError(f"The position prior{where} for {policy.budget} tokens was weighed "
                            f"against LineAR's scores {lookahead} lines ahead, the policy "
                            f"looks {chosen.lookahead}; pass --lookahead {lookahead} or "
                            "calibrate again with yours.")
        return Policy(replace(chosen.config, position_prior=self.priors[policy.budget],
                              prior_weight=self.prior_weights[policy.budget]), policy.layout)

    def for_policy(self, policy: Policy, config: GPTConfig, path: str | Path = "") -> torch.Tensor:
        """The table for `policy`'s budget; an error if the model or the policy differ."""
        where = f" in '{path}'" if path else ""
        layout = policy.layout
        if self.grid != (layout.height, layout.width) or (self.n_layer, self.n_kv_head) != (
                config.n_layer, config.kv_heads):
            raise UserError(
                f"The head budgets{where} were calibrated for a {self.grid[0]}x{self.grid[1]} "
                f"grid, {self.n_layer} layers and {self.n_kv_head} kv heads, not this model's "
                f"{layout.height}x{layout.width}, {config.n_layer} and {config.kv_heads}; run "
                "linear-export calibrate for it.")
        if policy.budget not in self.tables:
            have = ", ".join(str(tokens) for tokens in sorted(self.tables))
            raise UserError(f"The head budgets{where} have no table for a budget of "
                            f"{policy.budget} tokens (they have {have}); run linear-export "
                            "calibrate with this --budget.")
        knobs = self.knobs[policy.budget]
        if (knobs["recent_lines"], knobs["anchor"]) != (policy.recent_lines,
                                                        policy.config.anchor):
            raise UserError(f"The head budgets{where} for {policy.budget} tokens keep "
                            f"{knobs['recent_lines']} recent lines and {knobs['anchor']} anchor "
                            f"tokens, the policy {policy.recent_lines} and "
                            f"{policy.config.anchor}; pass the same --recent-lines/--anchor or "
                            "calibrate again.")
        return self.tables[policy.budget]

    def to_bytes(self) -> bytes:
        metadata = {"format": FORMAT, "grid": list(self.grid), "n_layer": self.n_layer,
                    "n_kv_head": self.n_kv_head, "source": self.source,
                    "knobs": {str(tokens): knobs for tokens, knobs in self.knobs.items()}}
        tensors = {f"budget_{tokens}": table.to(torch.int64).contiguous()
                   for tokens, table in self.tables.items()}
        for tokens, prior in self.priors.items():
            tensors[f"prior_{tokens}"] = prior.float().contiguous()
            tensors[f"prior_weight_{tokens}"] = self.prior_weights[tokens].float().contiguous()
        return save(tensors, metadata={"head_budgets": json.dumps(metadata)})

    def save(self, path: str | Path) -> None:
        write_atomic(Path(path), self.to_bytes())


def load_head_budgets(path: str | Path) -> HeadBudgets:
    """Read a head budgets file; one clear error if it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Head budgets file {str(path)!r} does not exist; make one with "
                        "linear-export calibrate.")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = json.loads(file.metadata()["head_budgets"])
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        if metadata["format"] != FORMAT:
            raise ValueError(metadata["format"])
        knobs = {int(tokens): value for tokens, value in metadata["knobs"].items()}
        tables, priors, weights = ({int(name.removeprefix(prefix)): tensor
                                    for name, tensor in tensors.items()
                                    if name.startswith(prefix) and name[len(prefix)].isdigit()}
                                   for prefix in ("budget_", "prior_", "prior_weight_"))
        if set(tables) != set(knobs) or set(priors) != set(weights) or not set(priors) <= set(
                tables) or len(tensors) != len(tables) + len(priors) + len(weights):
            raise ValueError("tables, priors and knobs differ")
    except (SafetensorError, ValueError, KeyError, TypeError, IndexError):
        raise UserError(f"{str(path)!r} is not a head budgets file of this linear-export version; "
                        "make one with linear-export calibrate.") from None
    return HeadBudgets(tables, tuple(metadata["grid"]), metadata["n_layer"],
                       metadata["n_kv_head"], knobs, metadata.get("source", ""), priors, weights)
