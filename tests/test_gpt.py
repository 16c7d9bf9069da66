"""GPT.step (explicit cache) against the plain full-attention forward."""

from __future__ import annotations

import pytest
import torch

from linear_export.models import GPT
from linear_export.models.rope import apply_rope

from conftest import tiny_model


def random_sequence(model: GPT, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    config, layout = model.config, model.layout
    ids = torch.randint(0, config.vocab_size, (batch, layout.length))
    ids[:, 0] = config.vocab_size + torch.arange(batch) % config.class_rows
    positions = torch.arange(layout.length).expand(batch, -1)
    return ids, positions


def run_steps(model: GPT, ids, positions, chunks, capacity, garbage=0.0):
    """Feed `chunks` step lengths through step(), writing presents like the host does."""
    config = model.config
    batch = ids.shape[0]
    shape = (config.n_layer, batch, config.kv_heads, capacity, config.head_dim)
    past_key = torch.full(shape, garbage)
    past_value = torch.full(shape, garbage)
    start, outputs = 0, []
    for steps in chunks:
        out = model.step(ids[:, start:start + steps], positions[:, start:start + steps],
                         past_key, past_value, torch.tensor(start))
        past_key[:, :, :, start:start + steps] = out[1]
        past_value[:, :, :, start:start + steps] = out[2]
        outputs.append(out)
        start += steps
    return outputs


@pytest.mark.parametrize("name", ["GPT-tiny", "GPT-tiny-gqa"])
@pytest.mark.parametrize("prefill", [1, 3])
def test_step_reproduces_full_attention(name: str, prefill: int) -> None:
    model = tiny_model(name)
    ids, positions = random_sequence(model, batch=3)
    length = model.layout.length
    with torch.no_grad():
        reference = model(ids, positions)
        chunks = [prefill] + [1] * (length - prefill)
        # Garbage in dead slots must not leak into the result.
        outputs = run_steps(model, ids, positions, chunks, capacity=length + 2, garbage=1e4)
    ends = [prefill - 1 + i for i in range(len(chunks))]
    for end, out in zip(ends, outputs, strict=True):
        torch.testing.assert_close(out[0], reference[:, end], atol=1e-4, rtol=0)


def test_present_shapes_and_attention_mass() -> None:
    model = tiny_model("GPT-tiny-gqa")
    config = model.config
    ids, positions = random_sequence(model, batch=2)
    with torch.no_grad():
        outputs = run_steps(model, ids, positions, [3, 2, 1], capacity=9, garbage=5.0)
    logits, present_key, present_value, mass = outputs[1]
    assert logits.shape == (2, config.vocab_size) and logits.dtype == torch.float32
    assert present_key.shape == (config.n_layer, 2, config.kv_heads, 2, config.head_dim)
    assert present_value.shape == present_key.shape
    assert mass.shape == (config.n_layer, 2, config.n_head, 9)
    # Slots 0..2 are live: they get mass; dead slots get none.
    assert torch.all(mass[..., 3:] == 0)
    assert torch.all(mass[..., :3] > 0)
    # Each of the 2 queries spends < 1 on the past (the rest goes to its own tokens).
    total = mass.sum(-1)
    assert torch.all(total < 2) and torch.all(total > 0)


def reference_mass(model: GPT, ids, positions, score_positions, past: int) -> torch.Tensor:
    """attn_mass of the step feeding ids[:, past:], written out head by head from the weights."""
    config = model.config
    group, dim = config.n_head // config.kv_heads, config.head_dim
    cos_sin, score_cos_sin = model.rope[positions], model.rope[score_positions[:, past:]]
    h, masses = model.embed(ids), []
    for layer in model.layers:
        attention = layer.attention
        x = layer.attention_norm(h)
        q_raw, k_raw, _ = attention.wqkv(x).split(
            [config.n_head * dim, config.kv_heads * dim, config.kv_heads * dim], dim=-1)
        keys = apply_rope(k_raw.view(*x.shape[:2], config.kv_heads, dim), cos_sin)
        queries = apply_rope(q_raw[:, past:].view(x.shape[0], -1, config.n_head, dim),
                             score_cos_sin)
        mass = torch.zeros(x.shape[0], config.n_head, past)
        for head in range(config.n_head):
            for t in range(queries.shape[1]):  # query t sees keys up to past + t
                logits = keys[:, :past + t + 1, head // group] @ queries[:, t, head, :, None]
                probs = torch.softmax(logits[..., 0] / dim ** 0.5, dim=-1)
                mass[:, head] += probs[:, :past]
        masses.append(mass)
        h = h + layer.attention.full(x, cos_sin)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return torch.stack(masses)


@pytest.mark.parametrize("name", ["GPT-tiny", "GPT-tiny-gqa"])
def test_score_positions_rotate_the_queries_that_measure_attention_mass(name: str) -> None:
    model = tiny_model(name)
    ids, positions = random_sequence(model, batch=2)
    past, steps, width = 5, 2, model.layout.width
    ids, positions = ids[:, :past + steps], positions[:, :past + steps]
    ahead = positions + 2 * width  # two lines further down, same columns
    config = model.config
    shape = (config.n_layer, 2, config.kv_heads, past + 3, config.head_dim)
    past_key, past_value = torch.zeros(shape), torch.zeros(shape)
    with torch.no_grad():
        _, key, value, _ = model.step(ids[:, :past], positions[:, :past], past_key, past_value,
                                      torch.tensor(0))
        past_key[:, :, :, :past], past_value[:, :, :, :past] = key, value
        args = (ids[:, past:], positions[:, past:], past_key, past_value, torch.tensor(past))
        plain = model.step(*args)
        in_place = model.step(*args, score_position_ids=positions[:, past:])
        shifted = model.step(*args, score_position_ids=ahead[:, past:])
        # Two rotations (one and two lines down): the mass of each, summed.
        both = torch.stack([positions[:, past:] + width, ahead[:, past:]], dim=1)
        summed = model.step(*args, score_position_ids=both)
        want = reference_mass(model, ids, positions, ahead, past)
        want_in_place = reference_mass(model, ids, positions, positions, past)
        want_summed = want + reference_mass(model, ids, positions, positions + width, past)
    for index in range(3):  # logits and K/V never depend on where the mass is measured
        torch.testing.assert_close(shifted[index], plain[index], atol=0, rtol=0)
        torch.testing.assert_close(summed[index], plain[index], atol=0, rtol=0)
    torch.testing.assert_close(in_place[3], plain[3], atol=0, rtol=0)
    torch.testing.assert_close(plain[3][..., :past], want_in_place, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shifted[3][..., :past], want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(summed[3][..., :past], want_summed, atol=1e-5, rtol=1e-4)
    assert (want - want_in_place).abs().max() > 1e-3


def test_prefill_past_keys_are_zero_for_the_class_token() -> None:
    model = tiny_model()
    ids, positions = random_sequence(model, batch=2)
    with torch.no_grad():
        (out,) = run_steps(model, ids, positions, [1], capacity=4)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # keys after zero RoPE rows
    assert out[2].abs().sum() > 0  # values are not


def test_cache_len_per_row_masks_each_row() -> None:
    model = tiny_model()
    ids, positions = random_sequence(model, batch=2)
    with torch.no_grad():
        outputs = run_steps(model, ids, positions, [4], capacity=6)
        keys, values = outputs[0][1], outputs[0][2]
        config = model.config
        past_key = torch.zeros(config.n_layer, 2, config.kv_heads, 6, config.head_dim)
        past_value = torch.zeros_like(past_key)
        past_key[:, :, :, :4], past_value[:, :, :, :4] = keys, values
        per_row = model.step(ids[:, 4:5], positions[:, 4:5], past_key, past_value,
                             torch.tensor([4, 2]))
        short = model.step(ids[1:, 4:5], positions[1:, 4:5], past_key[:, 1:], past_value[:, 1:],
                           torch.tensor(2))
    torch.testing.assert_close(per_row[0][1], short[0][0])
    assert torch.all(per_row[3][:, 1, :, 2:] == 0)


def test_class_tokens_use_the_class_table() -> None:
    model = tiny_model()
    vocab = model.config.vocab_size
    ids = torch.tensor([[vocab + 3, 5]])
    embedded = model.embed(ids)
    torch.testing.assert_close(embedded[0, 0], model.cls_embedding.embedding_table.weight[3])
    torch.testing.assert_close(embedded[0, 1], model.tok_embeddings.weight[5])


@pytest.mark.parametrize("name", ["GPT-tiny", "GPT-tiny-gqa"])
def test_dead_slots_of_a_head_are_never_read(name: str) -> None:
    """slot_positions all live is the plain step; a kv head never reads its slots at
    position -1 (what they hold changes nothing), and decode() gives step()'s logits."""
    model = tiny_model(name)
    config = model.config
    heads, group, live, capacity = config.kv_heads, config.n_head // config.kv_heads, 5, 8
    ids, positions = random_sequence(model, batch=2)
    step = (ids[:, live:live + 1], positions[:, live:live + 1])
    with torch.no_grad():
        prefill = run_steps(model, ids, positions, [live], capacity=capacity)[0]
        shape = (config.n_layer, 2, heads, capacity, config.head_dim)
        past_key, past_value = torch.full(shape, 3.0), torch.full(shape, 3.0)
        past_key[:, :, :, :live], past_value[:, :, :, :live] = prefill[1], prefill[2]
        plain = model.step(*step, past_key, past_value, torch.tensor(live))
        slots = torch.full(shape[:4], -1)
        slots[..., :live] = torch.arange(live)
        same = model.step(*step, past_key, past_value, torch.tensor(live), slot_positions=slots)
        slots[0, 1, heads - 1, 1:3] = -1  # layer 0, row 1, the last kv head lost two slots
        fewer = []
        for garbage in (3.0, -50.0):
            past_key[0, 1, heads - 1, 1:3] = past_value[0, 1, heads - 1, 1:3] = garbage
            out = model.step(*step, past_key, past_value, torch.tensor(live),
                             slot_positions=slots)
            decoded = model.decode(*step, past_key, past_value, torch.tensor(live),
                                   slot_positions=slots)
            torch.testing.assert_close(decoded[0], out[0], atol=1e-5, rtol=0)
            fewer.append(out)
    torch.testing.assert_close(same[0], plain[0], atol=0, rtol=0)
    torch.testing.assert_close(same[3], plain[3], atol=0, rtol=0)
    torch.testing.assert_close(fewer[0][0], fewer[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(fewer[0][0][0], plain[0][0], atol=1e-6, rtol=0)  # row 0
    assert (fewer[0][0][1] - plain[0][0][1]).abs().max() > 1e-4
    mass = fewer[0][3][0, 1, -group:]
    assert torch.all(mass[:, 1:3] == 0) and torch.all(mass[:, [0, 3, 4]] > 0)
