"""The step contract for Hugging Face decoder stacks (Llama in Janus, Chameleon in Lumina).

The library's modules hold the weights; attention over the explicit cache is computed here
(models/attention.py), so the library's own forward stays the independent reference.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import cached_attention, decode_attention, line_mass, live_slots
from ..configs import GPTConfig, SequenceLayout


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """1D RoPE tables [B, T, D] for explicit absolute positions (float32 angles, cast back)."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def geometry(text_config, layout: SequenceLayout, codes: int) -> GPTConfig:
    """What engines and the exporter read: layers, heads, head size, code count, prefix."""
    heads = text_config.num_attention_heads
    return GPTConfig(dim=text_config.hidden_size, n_layer=text_config.num_hidden_layers,
                     n_head=heads, n_kv_head=text_config.num_key_value_heads or heads,
                     vocab_size=codes, num_classes=0, cls_token_num=layout.prefix)


class HFDecoderStep(nn.Module):
    """Pre-norm decoder layers (self_attn.{q,k,v,o}_proj, optional q/k norms, mlp) as a step.

    Subclasses provide `embed(input_ids)` and `code_logits(hidden)`.
    """

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, inv_freq: torch.Tensor,
                 config: GPTConfig, layout: SequenceLayout):
        super().__init__()
        self.layers, self.norm = layers, norm
        self.config, self.layout = config, layout
        self.register_buffer("inv_freq", inv_freq.float().clone(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def _apply(self, fn, recurse=True):
        # .half() must keep the RoPE frequencies in float32, as the library does.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _project(self, attn: nn.Module, x: torch.Tensor):
        """q [B, H, T, D], k and v [B, Hkv, T, D], before RoPE."""
        batch, steps, _ = x.shape
        heads, kv_heads, dim = self.config.n_head, self.config.kv_heads, self.config.head_dim
        q = attn.q_proj(x).view(batch, steps, heads, dim)
        k = attn.k_proj(x).view(batch, steps, kv_heads, dim)
        v = attn.v_proj(x).view(batch, steps, kv_heads, dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Chameleon normalises each head's q and k
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos, sin, past_key, past_value, live,
                   score_cos_sin=None):
        q, k, v = self._project(attn, x)
        dim = self.config.head_dim
        score_q = None
        if score_cos_sin is not None:
            score_cos, score_sin = (table.unsqueeze(1) for table in score_cos_sin)
            tiled = q.unsqueeze(2)  # [B, H, 1, T, D] against tables [B, 1, R, T, D]
            score_q = tiled * score_cos + rotate_half(tiled) * score_sin
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out, mass = cached_attention(q, k, v, past_key, past_value, live, scale=dim ** -0.5,
                                     score_q=score_q)
        return attn.o_proj(out), k, v, mass

    def decode(self, input_ids, position_ids, past_key, past_value, cache_len,
               inputs_embeds=None):
        """The decode step without attn_mass (GPT.decode's contract): logits, present K/V,
        present_query [L, B, H, T, D] post-RoPE, and the fused kernel's in-place caches."""
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        position_ids = position_ids.expand(h.shape[0], h.shape[1])
        cos, sin = (table.unsqueeze(1) for table in rope_cos_sin(self.inv_freq, position_ids,
                                                                 h.dtype))
        keys, values, queries, in_place = [], [], [], []
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._project(attn, layer.input_layernorm(h))
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            out, updated = decode_attention(q, k, v, past_key[index], past_value[index],
                                            cache_len, self.config.head_dim ** -0.5)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            keys.append(k)
            values.append(v)
            queries.append(q)
            in_place += [] if updated is None else [updated]
        logits = self.code_logits(self.norm(h[:, -1])).float()
        return logits, torch.stack(keys), torch.stack(values), torch.stack(queries), in_place

    def rotate_queries(self, queries: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """Post-RoPE queries [..., Q, D] moved `shifts` [R] positions on: [..., R, Q, D]
        (1D RoPE composes: one more rotation by the shift's angles)."""
        cos, sin = rope_cos_sin(self.inv_freq, shifts, queries.dtype)  # [R, D]
        tiled = queries.unsqueeze(-3)
        return tiled * cos[:, None] + rotate_half(tiled) * sin[:, None]

    def line_scores(self, line_query, score_shifts, past_key, cache_len):
        """LineAR's scores at a line end, [L, B, Hkv, C] (GPT.line_scores' contract)."""
        scale = self.config.head_dim ** -0.5  # a layer at a time, as GPT.line_scores says why
        return torch.stack([line_mass(self.rotate_queries(line_query[layer], score_shifts),
                                      past_key[layer], cache_len, scale)
                            for layer in range(len(self.layers))])

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        cache_len: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        score_position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The DESIGN.md step: logits over image codes [B, K], present K/V, attn_mass.

        `score_position_ids` [B, R, T] (default position_ids): where attn_mass's queries are
        rotated to, R rotations of each; the mass sums over them.
        """
        live = live_slots(past_key.shape[3], cache_len)
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        position_ids = position_ids.expand(h.shape[0], h.shape[1])
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, h.dtype)
        score_cos_sin = None
        if score_position_ids is not None:
            score_position_ids = score_position_ids.view(score_position_ids.shape[0], -1,
                                                         h.shape[1])
            score_cos_sin = rope_cos_sin(self.inv_freq,
                                         score_position_ids.expand(h.shape[0], -1, -1), h.dtype)
        keys, values, masses = [], [], []
        for index, layer in enumerate(self.layers):
            out, k, v, mass = self._attention(layer.self_attn, layer.input_layernorm(h), cos, sin,
                                              past_key[index], past_value[index], live,
                                              score_cos_sin)
            h = h + out
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            keys.append(k)
            values.append(v)
            masses.append(mass)
        logits = self.code_logits(self.norm(h[:, -1])).float()
        return logits, torch.stack(keys), torch.stack(values), torch.stack(masses)
