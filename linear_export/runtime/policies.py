"""Eviction policies: which cache slots to keep at a line end.

Every policy is a priority over the live slots (higher is kept, +inf always kept) and a
number of slots to keep; the same top-k then serves all of them. Priorities are pure
functions of slot positions and attention scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..models.attention import DEFAULT_LOOKAHEAD, MAX_LOOKAHEAD
from ..models.configs import SequenceLayout

POLICIES = ("full", "linear", "streaming", "h2o", "window")
# LineAR's lookahead with per-head budgets: the demo sweep (docs/quality.md) measured 4 lines
# best at 1/2, 1/4 and 1/6 there (1/4: ΔNLL +1.4% against +2.2% with 3), 3 without them.
HEAD_SHARED_LOOKAHEAD = 4
ALWAYS = float("inf")


@dataclass(frozen=True)
class PolicyConfig:
    """A policy and its knobs; `budget` is in image tokens (see budget.parse_budget)."""

    name: str = "linear"
    budget: int | None = None  # None: the whole image (no eviction)
    recent_lines: int | None = None  # linear: newest whole lines always kept (None: auto)
    anchor: int = 0  # linear: first image tokens always kept
    granularity: str = "head"  # linear/h2o: select per (layer, head) or per layer
    cfg_share: bool = False  # cond and uncond rows share one selection
    score_queries: int = 0  # linear: score with the line's last k queries (0: all of them)
    # linear: score with them rotated 1..lookahead lines down (None: 3, or 4 with head_budgets)
    lookahead: int | None = None
    sinks: int = 4  # streaming: first image tokens always kept (attention sinks)
    recent_tokens: int | None = None  # h2o: recent window (None: half the budget)
    # linear: image tokens each kv head keeps after each line but the last, [lines - 1, L, Hkv]
    # (runtime/head_budgets.py); the heads of a layer then share its slots (head-shared pool).
    head_budgets: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # linear, with head_budgets: where later lines read on average, per kv head, after each
    # line but the last, [lines - 1, L, Hkv, image tokens] (each row sums to 1), and how much
    # each head's ranking leans on it, [L, Hkv] (0: LineAR's scores alone).
    position_prior: torch.Tensor | None = field(default=None, compare=False, repr=False)
    prior_weight: torch.Tensor | None = field(default=None, compare=False, repr=False)


KNOB_FLAGS = {"recent_lines": "--recent-lines", "anchor": "--anchor",
              "score_queries": "--score-queries", "sinks": "--sinks",
              "recent_tokens": "--recent-tokens"}


def auto_recent_lines(budget_lines: int) -> int:
    """LineAR's default: one recent line up to a 4-line budget, then half the budget's lines.

    From the demo sweep (docs/quality.md): with lookahead scoring, selected tokens beat whole lines
    at small budgets; at 6-8 lines, keeping the nearest half whole was better (8 lines:
    ΔNLL +0.31% against +0.72% with one recent line). A budget under one line cannot hold
    the recent line, which Policy refuses (unless --recent-lines 0 is asked for).
    """
    return budget_lines // 2 if budget_lines > 4 else 1


def _check_knob_ranges(config: PolicyConfig, lookahead: int, layout: SequenceLayout) -> None:
    """Counts are never negative; lookahead and score_queries have upper bounds too."""
    for name, flag in KNOB_FLAGS.items():
        value = getattr(config, name)
        if value is not None and value < 0:
            raise UserError(f"{flag} {value} is negative; give 0 or more.")
    if not 0 <= lookahead <= MAX_LOOKAHEAD:
        raise UserError(f"--lookahead {lookahead} is out of range; give 0 to {MAX_LOOKAHEAD} "
                        "lines.")
    if config.score_queries > layout.width:
        raise UserError(f"--score-queries {config.score_queries} is more than a line's "
                        f"{layout.width} queries; give 0 (all of them) to {layout.width}.")


class Policy:
    """A validated policy bound to a sequence layout."""

    def __init__(self, config: PolicyConfig, layout: SequenceLayout):
        if config.name not in POLICIES:
            known = ", ".join(POLICIES)
            raise UserError(f"Unknown policy {config.name!r}; choose one of: {known}.")
        self.lookahead = config.lookahead
        if self.lookahead is None:
            self.lookahead = (DEFAULT_LOOKAHEAD if config.head_budgets is None
                              else HEAD_SHARED_LOOKAHEAD)
        if config.granularity not in ("head", "layer"):
            raise UserError(f"Unknown granularity {config.granularity!r}; use head or layer.")
        self.config, self.layout = config, layout
        _check_knob_ranges(config, self.lookahead, layout)
        budget = layout.image_tokens if config.budget is None else config.budget
        self.budget = min(budget, layout.image_tokens)
        if config.name == "full":
            self.budget = layout.image_tokens
        if self.budget < 1:
            raise UserError(f"--budget {self.budget} keeps no image tokens; give 1 to "
                            f"{layout.image_tokens} tokens (at least one line for linear).")
        self.recent_lines = (config.recent_lines if config.recent_lines is not None
                             else auto_recent_lines(self.budget // layout.width))
        self.recent_tokens = (
            config.recent_tokens if config.recent_tokens is not None else self.budget // 2
        )
        self._check_budget_holds_what_is_always_kept()
        if config.name == "window":
            self.budget = self.budget // layout.width * layout.width
        if config.head_budgets is not None:
            self._check_head_budgets(config.head_budgets)
        if (config.position_prior is None) != (config.prior_weight is None):
            raise UserError("A position prior needs its per-head weights and the other way "
                            "round; take both from one head budgets file.")
        if config.position_prior is not None:
            self._check_position_prior(config.position_prior, config.prior_weight)

    def _check_budget_holds_what_is_always_kept(self) -> None:
        """The budget (image tokens) must hold what the policy never evicts."""
        config, width, whole = self.config, self.layout.width, self.layout.image_tokens
        budget, name = self.budget, self.config.name
        floor = config.anchor + self.recent_lines * width
        if name == "linear" and floor > whole:
            raise UserError(f"--recent-lines {self.recent_lines} ({self.recent_lines * width} "
                            f"tokens) plus --anchor {config.anchor} keep more than the whole "
                            f"image ({whole} tokens); give them at most {whole} tokens together.")
        if name == "linear" and floor > budget:
            lines = "line" if self.recent_lines == 1 else "lines"
            raise UserError(
                f"--budget {budget} tokens is smaller than the {self.recent_lines} recent "
                f"{lines} ({self.recent_lines * width} tokens) plus {config.anchor} anchor "
                f"tokens that --policy linear always keeps; give --budget {floor} to {whole} "
                "tokens, or lower --recent-lines or --anchor.")
        if name == "window" and budget < width:
            raise UserError(f"--budget {budget} tokens is less than one line ({width} tokens), "
                            f"and the window policy keeps whole lines; give --budget {width} to "
                            f"{whole} tokens.")
        if name == "streaming" and config.sinks >= budget:
            raise UserError(f"--sinks {config.sinks} leaves no room for recent tokens in a "
                            f"budget of {budget}; give --sinks 0 to {budget - 1} or raise "
                            "--budget.")
        if name == "h2o" and self.recent_tokens > budget:
            raise UserError(f"--recent-tokens {self.recent_tokens} (the H2O recent window) must "
                            f"lie within the budget; give 0 to {budget}.")

    def _check_head_budgets(self, table: torch.Tensor) -> None:
        config, layout = self.config, self.layout
        if config.name != "linear" or config.granularity != "head":
            raise UserError("Per-head budgets need --policy linear with --granularity head.")
        if table.dim() != 3 or table.shape[0] != layout.height - 1:
            raise UserError(f"The head budgets have shape {list(table.shape)}, not [lines - 1 = "
                            f"{layout.height - 1}, layers, kv heads]; calibrate them for this "
                            "model's grid.")
        floor = config.anchor + self.recent_lines * layout.width
        for line, counts in enumerate(table):
            cached = (line + 1) * layout.width
            wanted = counts.shape[-1] * min(cached, self.budget)
            if (counts.sum(-1) != wanted).any() or counts.min() < min(floor, cached):
                raise UserError(
                    f"The head budgets after line {line} do not keep {wanted} image tokens per "
                    f"layer with at least {floor} per head (anchor + recent lines); they were "
                    f"calibrated for another budget or --recent-lines, so calibrate them again.")

    def _check_position_prior(self, prior: torch.Tensor, weight: torch.Tensor) -> None:
        table, layout = self.config.head_budgets, self.layout
        if table is None:
            raise UserError("A position prior comes with per-head budgets; pass --head-budgets.")
        wanted = [layout.height - 1, *table.shape[1:], layout.image_tokens]
        if list(prior.shape) != wanted or list(weight.shape) != wanted[1:3]:
            raise UserError(f"The position prior has shape {list(prior.shape)} and weights "
                            f"{list(weight.shape)}, not {wanted} and {wanted[1:3]}; calibrate "
                            "them for this model again.")

    @property
    def head_shared(self) -> bool:
        """Whether the kv heads of a layer share its cache slots (per-head budgets)."""
        return self.config.head_budgets is not None and self.evicts

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def evicts(self) -> bool:
        return self.budget < self.layout.image_tokens

    @property
    def capacity(self) -> int:
        """Cache slots needed: prefix + budget + the line in flight, never above the full cache.

        With `head_budgets` a row holds one kv head's slots, so it must hold the largest
        count any head keeps: the price in memory of letting each head read only its own."""
        layout = self.layout
        if not self.evicts:
            return layout.length
        most = self.budget
        if self.config.head_budgets is not None:
            most = max(most, int(self.config.head_budgets.max()))
        return min(layout.prefix + most + layout.width, layout.length)

    def score_shifts(self, query_line: int) -> list[int] | None:
        """How far the scoring queries of image line `query_line` are moved: 1, 2, ..
        `lookahead` lines down, in positions.

        Kept slots can never come back, so LineAR ranks them by what later lines will read,
        not by what the finished line read: its queries are rotated (RoPE) as if they sat
        1..`lookahead` lines further down, in the same column, never past the last image line,
        and the mass is summed over the rotations. Constant within a line, so the host loop
        works it out once per line. None: measure in place.
        """
        ahead = self.lookahead if self.score_mode == "line" else 0
        if ahead == 0:
            return None
        lines_left = max(self.layout.height - 1 - query_line, 0)
        return [min(lines, lines_left) * self.layout.width for lines in range(1, ahead + 1)]

    @property
    def score_mode(self) -> str | None:
        """'line': mass from the just-finished line; 'cumulative': summed over all steps."""
        return {"linear": "line", "h2o": "cumulative"}.get(self.name) if self.evicts else None

    @property
    def scored_queries(self) -> int:
        """How many of a line's last queries LineAR scores with (score_queries, or all)."""
        return self.config.score_queries or self.layout.width

    def query_slot(self, image_index: int) -> int | None:
        """Where LineAR keeps the query of image token `image_index` until its line ends, in
        the line's [.., Q, D] query buffer; None if the line-end score does not read it."""
        if self.score_mode != "line" or not self.needs_scores(image_index):
            return None
        return image_index % self.layout.width - (self.layout.width - self.scored_queries)

    def needs_scores(self, image_index: int) -> bool:
        """Whether the query of image token `image_index` counts in the scores: every step's
        attn_mass for H2O; for LineAR, the line-end score reads its query."""
        if self.score_mode == "cumulative":
            return True
        if self.score_mode != "line":
            return False
        width = self.layout.width
        line = image_index // width
        evicts_at_line_end = (line + 1) * width > self.budget
        queries = self.config.score_queries or width
        return evicts_at_line_end and image_index % width >= width - queries

    def select(self, positions: torch.Tensor, scores: torch.Tensor | None, finished_line: int,
               cfg: bool) -> torch.Tensor | None:
        """Slots to keep among the live ones, in KVCache.compact's form; None: all.

        positions, scores: [L, B, Hkv, n] over the live extent: the sequence position each
        slot holds (-1: a dead slot of a head that holds fewer), the attention mass it
        received (score-based policies). Each kv head keeps the prefix and `budget` image
        tokens of its own slots, or with `head_budgets` its own count: [L, B, Hkv, K]
        ascending, a head that keeps fewer than K ending its row with -1s.
        """
        layout, table = self.layout, self.config.head_budgets
        if table is None:  # every head keeps the budget, and holds the live extent
            if positions.shape[-1] - layout.prefix <= self.budget:
                return None
            counts = torch.full((1, 1, 1), layout.prefix + self.budget, device=positions.device)
        else:
            counts = table[finished_line].to(positions.device)[:, None, :] + layout.prefix
            if bool(((positions >= 0).sum(-1) <= counts).all()):
                return None
        return self._select_per_head(self.priority(positions, scores, finished_line, cfg),
                                     counts)

    @staticmethod
    def _select_per_head(priority: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each head's best `counts` [L or 1, 1, Hkv or 1] of its live slots (dead ones are
        -inf), in KVCache.compact's form: [L, B, Hkv, max count], padded with -1."""
        most = min(int(counts.max()), priority.shape[-1])
        best = torch.topk(priority, most, dim=-1)  # sorted: rank k is the head's k-th best
        rank = torch.arange(most, device=priority.device)
        chosen = (rank < counts[..., None]) & (best.values > -ALWAYS)
        padding = priority.shape[-1]  # sorts after every slot, then becomes -1
        keep = best.indices.masked_fill(~chosen, padding).sort(dim=-1).values
        return keep.masked_fill(keep == padding, -1)

    def priority(self, positions: torch.Tensor, scores: torch.Tensor | None, finished_line: int,
                 cfg: bool) -> torch.Tensor:
        """Priority per live slot [L, B, Hkv, n]: higher is kept first, +inf always, -inf for
        a dead slot (position -1, past its head's own slots)."""
        layout = self.layout
        image_index = (positions - layout.prefix).float()
        newest = (finished_line + 1) * layout.width - 1
        if self.name == "linear":
            keep_always = (image_index < self.config.anchor) | (
                image_index > newest - self.recent_lines * layout.width
            )
            priority = self.shared(scores, cfg)
            if self.config.position_prior is not None:
                priority = self.with_prior(priority, positions, finished_line)
        elif self.name == "h2o":
            keep_always = image_index > newest - self.recent_tokens
            priority = self.shared(scores, cfg)
        elif self.name == "streaming":
            keep_always = image_index < self.config.sinks
            priority = image_index
        else:  # window: the newest whole lines
            keep_always = torch.zeros_like(image_index, dtype=torch.bool)
            priority = image_index
        priority = priority.masked_fill(keep_always | (image_index < 0), ALWAYS)
        return priority.masked_fill(positions < 0, -ALWAYS)

    def with_prior(self, scores: torch.Tensor, positions: torch.Tensor,
                   finished_line: int) -> torch.Tensor:
        """Each head's share of its scores plus its weight times the position prior.

        Shares, not raw mass, so the weight means the same in every head and on every line:
        both terms sum to 1 over a head's keys. Weight 0 keeps LineAR's own ranking.
        """
        layers, _, heads, _ = positions.shape
        device = positions.device
        share = scores / scores.float().sum(-1, keepdim=True).clamp(min=1e-12)
        layer = torch.arange(layers, device=device).view(-1, 1, 1, 1)
        head = torch.arange(heads, device=device).view(1, 1, -1, 1)
        image_index = (positions - self.layout.prefix).clamp(0, self.layout.image_tokens - 1)
        prior = self.config.position_prior[finished_line].to(device)[layer, head, image_index]
        return share + self.config.prior_weight.to(device)[layer, head] * prior

    def shared(self, scores: torch.Tensor, cfg: bool) -> torch.Tensor:
        """Scores pooled over the dimensions that share one selection (heads, CFG halves)."""
        if self.config.granularity == "layer":
            scores = scores.sum(dim=2, keepdim=True).expand_as(scores)
        if cfg and self.config.cfg_share:
            cond, uncond = scores.chunk(2, dim=1)
            pooled = cond + uncond
            scores = torch.cat([pooled, pooled], dim=1)
        return scores


class FixedCapacityPolicy(Policy):
    """A policy run in a cache of an artifact's static capacity (at least what it needs).

    Dead slots are masked, so a larger cache changes nothing but memory.
    """

    def __init__(self, policy: Policy, capacity: int):
        self.__dict__.update(policy.__dict__)
        self.needed = policy.capacity
        self._capacity = capacity

    @property
    def capacity(self) -> int:
        return self._capacity


def fit_policy(policy: Policy, capacity: int) -> Policy:
    """`policy` with its cache sized to an artifact's capacity; an error if that is too small."""
    if policy.capacity > capacity:
        if policy.name == "full":
            fix = ("rebuild it with linear-export build --policy full, or run an evicting policy "
                   "such as --policy linear --budget 1/4")
        elif policy.head_shared:
            fix = (f"rebuild it with linear-export build --head-budgets FILE --budget "
                   f"{policy.budget} (the same file: its largest per-head count sizes the cache)")
        else:
            fix = (f"rebuild it with linear-export build --policy {policy.name} --budget "
                   f"{policy.budget}, or choose a smaller --budget")
        raise UserError(f"The artifact holds {capacity} cache slots but --policy {policy.name} "
                        f"needs {policy.capacity}; {fix}.")
    if policy.capacity == capacity:
        return policy
    return FixedCapacityPolicy(policy, capacity)
