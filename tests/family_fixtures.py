"""Tiny random models of each family, built from the libraries' own config classes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from linear_export.engines.base import StepOutput, scoring_positions
from linear_export.engines.cache import KVCache


def image_vocab(codes: int, first_id: int) -> dict[str, int]:
    """A Chameleon vocabulary_map: code c is the BPE token named IMGIMG<c in letters>Z."""
    letters = {str(i): chr(ord("A") + i) for i in range(10)}
    return {"IMGIMG" + "".join(letters[d] for d in str(code)) + "Z": first_id + code
            for code in range(codes)}


def tiny_chameleon(codes: int = 16, seed: int = 0, vocab_size: int = 96):
    """A 2-layer Chameleon (GQA) with `codes` image tokens at BPE ids 60..

    `vocab_size` above 8804 + the grid side holds Lumina-mGPT's own special-token ids.
    """
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

    vq = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=codes, latent_channels=8,
                              base_channels=32, channel_multiplier=[1], num_res_blocks=1,
                              resolution=16, attn_resolutions=[])
    config = ChameleonConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, vq_config=vq.to_dict(),
                             vocabulary_map=image_vocab(codes, 60))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return ChameleonForConditionalGeneration(config).eval()


class OnnxStepEngine:
    """Runs a directory's exported graphs (export_family_graphs) with plain onnxruntime, for
    step-by-step comparisons: the scored step, the decode step and the line-end score."""

    name = "onnx"

    def __init__(self, directory, like):
        self.sessions = {name: ort.InferenceSession(str(directory / name),
                                                    providers=["CPUExecutionProvider"])
                         for name in ("step.onnx", "step_decode.onnx", "score.onnx")}
        self.config, self.layout, self.family = like.config, like.layout, like.family
        self.dtype, self.device = like.dtype, torch.device("cpu")

    def step(self, input_ids, position_ids, cache: KVCache, need_scores=False,
             score_position_ids=None, **_):
        batch, steps = input_ids.shape
        feeds = {"input_ids": input_ids.numpy().astype(np.int64),
                 "position_ids": position_ids.expand(batch, steps).numpy().astype(np.int64),
                 "past_key": cache.key.numpy(), "past_value": cache.value.numpy(),
                 "cache_len": np.array(cache.cache_len, dtype=np.int64)}
        if not need_scores:
            outputs = self.sessions["step_decode.onnx"].run(None, feeds)
            logits, key, value, query = (torch.from_numpy(a) for a in outputs)
            return StepOutput(logits, key, value, None, query)
        scored = scoring_positions(position_ids, score_position_ids).expand(batch, -1, -1)
        feeds["score_position_ids"] = scored.numpy().astype(np.int64)
        outputs = self.sessions["step.onnx"].run(None, feeds)
        logits, key, value, mass = (torch.from_numpy(a) for a in outputs)
        return StepOutput(logits, key, value, mass)

    def score_line(self, line_query, score_shifts, cache: KVCache):
        feeds = {"line_query": line_query.numpy(), "score_shifts": score_shifts.numpy(),
                 "past_key": cache.key.numpy(),
                 "cache_len": np.array(cache.cache_len, dtype=np.int64)}
        return torch.from_numpy(self.sessions["score.onnx"].run(None, feeds)[0])


def export_family_graphs(step, directory, capacity: int) -> None:
    """The scored step, the decode step and the score graph of `step` into `directory`."""
    from linear_export.export.onnx_step import export_step
    from linear_export.export.step_variants import export_decode_sharing, export_score_sharing

    main = directory / "step.onnx"
    export_step(step, main, capacity=capacity, max_batch=8)
    shared = {"capacity": capacity, "max_batch": 8, "opset": 18}
    export_decode_sharing(step, directory, main, name="step_decode.onnx", **shared)
    export_score_sharing(step, directory, main, name="score.onnx", **shared)


def tiny_janus(codes: int = 16, seed: int = 0):
    """A 2-layer Janus (Llama, GQA) with a `codes`-entry generation vocabulary."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    text = {"model_type": "llama", "vocab_size": 80, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 3}
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16, "projection_dim": 32, "depth": 1,
              "num_image_tokens": 4}
    vq = {"embed_dim": 8, "num_embeddings": codes, "latent_channels": 8, "base_channels": 32,
          "channel_multiplier": [1], "num_res_blocks": 1, "num_patches": 4,
          "projection_dim": 32, "image_token_embed_dim": 32, "num_hidden_layers": 2}
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=79)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return JanusForConditionalGeneration(config).eval()


def save_word_tokenizer(directory, words: int = 40) -> None:
    """A whitespace word-level tokenizer (ids 0..words-1) saved beside a tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{index}": index for index in range(1, words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(
        directory)
