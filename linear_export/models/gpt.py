"""LlamaGen's class-conditional GPT with an explicit, fixed-capacity KV cache.

State-dict keys match the official checkpoints exactly. Two forwards:
- `step()`: the decode-step contract of DESIGN.md (one graph for prefill and decode);
- `forward()`: plain causal full attention over a whole sequence, the teacher-forced reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import cached_attention, decode_attention, line_mass, live_slots, per_slot
from .configs import GPTConfig, SequenceLayout
from .kernels import emits_ort_kernels
from .rope import apply_rope, rope_table_2d, rotate_pairs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def add(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream h + delta and its norm; one SkipSimplifiedLayerNormalization
        where the export emits ONNX Runtime's kernels."""
        if not emits_ort_kernels():
            total = h + delta
            return total, self(total)
        normed, _, _, total = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::SkipSimplifiedLayerNormalization", [h, delta, self.weight],
            {"epsilon": float(self.eps)},
            dtypes=(h.dtype, torch.float32, torch.float32, h.dtype),  # out, mean, 1/rms, sum
            shapes=(h.shape, (*h.shape[:-1], 1), (*h.shape[:-1], 1), h.shape), version=1)
        return total, normed


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.dim, bias=False)

    def project(self, x: torch.Tensor, cos_sin: torch.Tensor,
                score_cos_sin: torch.Tensor | None = None):
        """q [B, H, T, D], k and v [B, Hkv, T, D]; q and k after RoPE.

        With `score_cos_sin` [B, R, T, ...], also the queries rotated to those (score)
        positions, [B, H, R, T, D].
        """
        batch, steps, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q_raw, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q_raw = q_raw.view(batch, steps, self.n_head, self.head_dim)
        q = apply_rope(q_raw, cos_sin)
        k = apply_rope(k.view(batch, steps, self.n_kv_head, self.head_dim), cos_sin)
        v = v.view(batch, steps, self.n_kv_head, self.head_dim)
        projected = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if score_cos_sin is None:
            return projected
        rotations = score_cos_sin.shape[1]
        tiled = q_raw.unsqueeze(1).expand(-1, rotations, -1, -1, -1)  # [B, R, T, H, D]
        return *projected, apply_rope(tiled, score_cos_sin).permute(0, 3, 1, 2, 4)

    def step(
        self,
        x: torch.Tensor,
        cos_sin: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        live: torch.Tensor,
        score_cos_sin: torch.Tensor | None = None,
    ):
        """Attend over live cache slots plus this step's own tokens (causal among them).

        Returns the block output, this step's k and v, and the attention mass per past slot
        (measured with queries at the `score_cos_sin` positions when given). `live` [B or 1,
        C], or [B, Hkv, C] when each kv head holds its own number of slots.
        """
        if score_cos_sin is None:
            (q, k, v), score_q = self.project(x, cos_sin), None
        else:
            q, k, v, score_q = self.project(x, cos_sin, score_cos_sin)
        out, mass = cached_attention(q, k, v, past_key, past_value, live, score_q=score_q)
        return self.wo(out), k, v, mass

    def decode(self, x: torch.Tensor, cos_sin: torch.Tensor, past_key: torch.Tensor,
               past_value: torch.Tensor, cache_len: torch.Tensor,
               slot_positions: torch.Tensor | None = None):
        """The step without scores: block output, k, v, the post-RoPE q, and the cache as a
        fused kernel leaves it (export only; see decode_attention)."""
        q, k, v = self.project(x, cos_sin)
        out, in_place = decode_attention(q, k, v, past_key, past_value, cache_len,
                                         self.head_dim ** -0.5, slot_positions)
        return self.wo(out), k, v, q, in_place

    def full(self, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """Plain causal self-attention over the whole sequence (no cache)."""
        batch, steps, _ = x.shape
        q, k, v = self.project(x, cos_sin)
        group = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, steps, -1))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)


class LabelEmbedding(nn.Module):
    """Class embedding table; the last row is the null class used for CFG."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(config.class_rows, config.dim)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, layout: SequenceLayout):
        super().__init__()
        self.config, self.layout = config, layout
        self.cls_embedding = LabelEmbedding(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        rope = rope_table_2d(layout, config.head_dim, config.rope_base)
        self.register_buffer("rope", rope, persistent=False)

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) must move the RoPE table but keep it float32, as the original does.
        rope = self.rope
        super()._apply(fn, recurse)
        self.rope = rope.to(self.rope.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    @property
    def family(self):
        """The adapter that tells the runtime how to drive this model (class-conditional)."""
        from .families.llamagen import LlamaGenC2I

        return LlamaGenC2I.for_model(self.config, self.layout)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Image tokens from tok_embeddings; ids >= vocab are class tokens (vocab + class)."""
        vocab = self.config.vocab_size
        is_class = (input_ids >= vocab).unsqueeze(-1)
        tokens = self.tok_embeddings(input_ids.clamp(max=vocab - 1))
        classes = self.cls_embedding.embedding_table((input_ids - vocab).clamp(min=0))
        return torch.where(is_class, classes, tokens)

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        cache_len: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        score_position_ids: torch.Tensor | None = None,
        slot_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step (DESIGN.md contract).

        input_ids, position_ids [B, T]; past_key/past_value [L, B, Hkv, C, D]; cache_len [] or
        [B]. Returns logits [B, V] float32, present_key/present_value [L, B, Hkv, T, D] and
        attn_mass [L, B, H, C] float32. `inputs_embeds` [B, T, dim] replaces the embedding of
        input_ids (a caption prefix, which is no token). `score_position_ids` [B, R, T]
        (default position_ids): where the queries that measure attn_mass are rotated to, R
        rotations of each; attn_mass sums over them. `slot_positions` [L, B, Hkv, C] int64:
        the sequence position each slot holds, -1 for a dead one below cache_len (per-head
        budgets: a kv head that keeps fewer slots; None: all slots below cache_len live).
        """
        capacity = past_key.shape[3]
        live = [live_slots(capacity, cache_len,
                           None if slot_positions is None else slot_positions[layer])
                for layer in range(len(self.layers))]
        cos_sin = self.rope[position_ids]
        score_cos_sin = None
        if score_position_ids is not None:
            # [B, T] is one rotation: [B, 1, T].
            score_cos_sin = self.rope[score_position_ids.view(score_position_ids.shape[0], -1,
                                                              position_ids.shape[-1])]
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.to(cos_sin.device)
        keys, values, masses = [], [], []
        normed = self.layers[0].attention_norm(h)
        for index, (layer, next_norm) in enumerate(zip(self.layers, self.next_norms(),
                                                       strict=True)):
            attn_out, k, v, mass = layer.attention.step(
                normed, cos_sin, past_key[index], past_value[index], live[index], score_cos_sin)
            h, normed = layer.ffn_norm.add(h, attn_out)
            h, normed = next_norm.add(h, layer.feed_forward(normed))
            keys.append(k)
            values.append(v)
            masses.append(mass)
        return self.logits(normed), torch.stack(keys), torch.stack(values), torch.stack(masses)

    def next_norms(self) -> list[RMSNorm]:
        """The norm after each layer's residual add (RMSNorm.add fuses them): the next layer's
        attention_norm, after the last layer the output norm."""
        return [layer.attention_norm for layer in self.layers[1:]] + [self.norm]

    def decode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        cache_len: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        slot_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """The decode step: `step()` without attn_mass, and this step's post-RoPE queries.

        Returns logits [B, V] float32, present_key/present_value [L, B, Hkv, T, D],
        present_query [L, B, H, T, D] (what line_scores() reads at a line end) and, only
        when exported with the fused kernel, each layer's cache as that kernel leaves it
        (decode_attention); an empty list otherwise.
        """
        cos_sin = self.rope[position_ids]
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.to(cos_sin.device)
        keys, values, queries, in_place = [], [], [], []
        normed = self.layers[0].attention_norm(h)
        for index, (layer, next_norm) in enumerate(zip(self.layers, self.next_norms(),
                                                       strict=True)):
            attn_out, k, v, q, updated = layer.attention.decode(
                normed, cos_sin, past_key[index], past_value[index], cache_len,
                None if slot_positions is None else slot_positions[index])
            h, normed = layer.ffn_norm.add(h, attn_out)
            h, normed = next_norm.add(h, layer.feed_forward(normed))
            keys.append(k)
            values.append(v)
            queries.append(q)
            in_place += [] if updated is None else [updated]
        logits = self.logits(normed)
        return logits, torch.stack(keys), torch.stack(values), torch.stack(queries), in_place

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] float32 at the last position of the output-normed [B, T, dim]."""
        # [:, -1:]: a 3-D input keeps the head a MatMul in ONNX (a 2-D Linear exports as
        # Gemm, which weight-only quantization cannot take).
        return self.output(normed[:, -1:])[:, 0].float()

    def rotate_queries(self, queries: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """Post-RoPE queries [..., Q, D] moved `shifts` [R] positions on: [..., R, Q, D].

        RoPE composes, so a query moved by k lines is one more rotation, by the angles of
        image position k lines down in column 0 (rows and columns rotate separately).
        """
        cos_sin = self.rope[self.layout.prefix + shifts]  # [R, D/2, 2]
        return rotate_pairs(queries.unsqueeze(-3), cos_sin[:, None])

    def line_scores(self, line_query: torch.Tensor, score_shifts: torch.Tensor,
                    past_key: torch.Tensor, cache_len: torch.Tensor,
                    slot_positions: torch.Tensor | None = None) -> torch.Tensor:
        """LineAR's scores at a line end, [L, B, Hkv, C] float32 (attention.line_mass).

        `line_query` [L, B, H, Q, D]: the finished line's last Q queries (decode()'s
        present_query), rotated by `score_shifts` [R] positions (R = 1, shift 0: in place).
        `slot_positions` [L, B, Hkv, C]: -1 marks a dead slot (per-head budgets).
        """
        scale = self.config.head_dim ** -0.5
        # A layer at a time: the rotated queries of one layer stay in cache, all layers' at
        # once (GPT-B, 16 rows, 3 rotations: 28 MB per intermediate) made the rotation's
        # elementwise ops cost more than the scores' matmuls.
        return torch.stack([
            line_mass(self.rotate_queries(line_query[layer], score_shifts), past_key[layer],
                      cache_len, scale,
                      None if slot_positions is None else slot_positions[layer])
            for layer in range(len(self.layers))])

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """Teacher-forced logits [B, T, V] with plain causal full attention."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.expand_as(input_ids)
        cos_sin = self.rope[position_ids]
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer.attention.full(layer.attention_norm(h), cos_sin)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return self.output(self.norm(h)).float()


class StepModule(nn.Module):
    """The step as a module whose forward is the graph to export; optionally without scores.

    `slot_positions` [L, B, Hkv, C] int64 is per-head budgets' (an input after cache_len);
    None for a cache whose slots below cache_len are all live, whose graph then has no such
    input. The scored variant takes `score_position_ids` too (the graph's last input).
    """

    def __init__(self, model: GPT, with_scores: bool = True):
        super().__init__()
        self.model, self.with_scores = model, with_scores

    def forward(self, input_ids, position_ids, past_key, past_value, cache_len,
                slot_positions=None, score_position_ids=None):
        logits, present_key, present_value, attn_mass = self.model.step(
            input_ids, position_ids, past_key, past_value, cache_len,
            score_position_ids=score_position_ids if self.with_scores else None,
            **per_slot(slot_positions),
        )
        if self.with_scores:
            return logits, present_key, present_value, attn_mass
        return logits, present_key, present_value


class DecodeModule(nn.Module):
    """The decode step as the graph to export (any family's model with decode()).

    Outputs logits, present_key, present_value, present_query and, exported with the fused
    kernel, the cache as it leaves it: every layer's keys, then every layer's values (bound
    to the cache's own buffers by the engine). Per-head budgets' step takes slot_positions.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, past_key, past_value, cache_len,
                slot_positions=None):
        logits, present_key, present_value, present_query, in_place = self.model.decode(
            input_ids, position_ids, past_key, past_value, cache_len,
            **per_slot(slot_positions))
        return (logits, present_key, present_value, present_query,
                *(key for key, _ in in_place), *(value for _, value in in_place))


class ScoreModule(nn.Module):
    """LineAR's line-end score as the graph to export: model.line_scores()."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, line_query, score_shifts, past_key, cache_len, slot_positions=None):
        return self.model.line_scores(line_query, score_shifts, past_key, cache_len,
                                      **per_slot(slot_positions))


class EmbedsPrefillModule(nn.Module):
    """The prefill of a prefix that is no token (caption features): the graph to export.

    Takes `inputs_embeds` [B, T, E] in place of input_ids; no attn_mass (the cache is empty
    at prefill, so there is nothing to score).
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, position_ids, past_key, past_value, cache_len):
        logits, present_key, present_value, _ = self.model.step(
            None, position_ids, past_key, past_value, cache_len, inputs_embeds=inputs_embeds)
        return logits, present_key, present_value


def init_weights(model: GPT, seed: int = 0, std: float = 0.02) -> GPT:
    """Deterministic random weights (normal std 0.02, norms at 1), for tests and benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model
