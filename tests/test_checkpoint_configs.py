"""The families added for the generic path and the new adapters, under the configs of real checkpoints.

Zoo defaults hide quirks, so each family is also built from a published checkpoint's config.json, shrunk
in layers, heads and width but with its quirks kept: rope scaling (longrope factors, linear scaling of
global layers), head_dim independent of the width, partial rotary, local/global layer patterns, query
scalars, GQA / MHA as published. Sliding windows are shrunk with the width so the test prompts reach
past them. Every check of `interp_cache.verify` must pass: cache vs uncached (stepwise, chunked), left
padding, generate, the original model under eager and SDPA, no-op hooks, compression at full budget.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import interp_cache as ic
from interp_cache.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from interp_cache.verify import verify

BYTE_IDS = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def _factors(count: int, start: float, stop: float) -> list[float]:
    """A longrope factor list shaped as published ones are: rising from ~1 to a few, per frequency."""
    return [round(start + (stop - start) * (i / (count - 1)) ** 2, 4) for i in range(count)]


CHECKPOINTS = {
    # microsoft/Phi-3-mini-128k-instruct: MHA 32 x 96, longrope (48 factors each), original 4096 of 131072
    "phi3 (Phi-3-mini-128k)": (tf.Phi3Config, dict(
        hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=131072, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _factors(48, 1.0, 2.7),
                         "long_factor": _factors(48, 1.1, 40.0), "original_max_position_embeddings": 4096},
        sliding_window=262144, tie_word_embeddings=False)),
    # microsoft/Phi-4-mini-instruct: GQA 24/8 x 128, partial rotary 0.75, longrope, tied embeddings
    "phi3 (Phi-4-mini)": (tf.Phi3Config, dict(
        hidden_size=384, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        max_position_embeddings=131072, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": _factors(48, 1.0, 3.0), "long_factor": _factors(48, 1.0, 60.0),
                         "original_max_position_embeddings": 4096},
        tie_word_embeddings=True)),
    # google/gemma-3-4b (text): GQA 8/4 x 256 at width 2560, query_pre_attn_scalar 256, 5 local : 1 global,
    # local base 1e4, global base 1e6 with linear scaling 8; window 1024 (shrunk to 8)
    "gemma3_text (Gemma-3-4B)": (tf.Gemma3TextConfig, dict(
        hidden_size=160, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=8, max_position_embeddings=131072,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # google/gemma-3-1b-pt: MQA 4/1 x 256 at width 1152, no rope scaling, window 512 (shrunk to 8)
    "gemma3_text (Gemma-3-1B)": (tf.Gemma3TextConfig, dict(
        hidden_size=144, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=8, max_position_embeddings=32768,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # allenai/OLMo-2-1124-7B: MHA 32 x 128, rope base 5e5, q/k RMSNorm over all heads
    "olmo2 (OLMo-2-7B)": (tf.Olmo2Config, dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
    # EleutherAI/gpt-neo-125m: 12 x 64, global / local alternating, window 256 (shrunk to 8), 2048 positions
    "gpt_neo (GPT-Neo-125M)": (tf.GPTNeoConfig, dict(
        hidden_size=128, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]], window_size=8,
        max_position_embeddings=2048, tie_word_embeddings=True)),
    # Salesforce/codegen-350M-mono: 16 x 64 at width 1024, rotary on 32 of 64 channels, 4 model-parallel chunks
    "codegen (CodeGen-350M)": (tf.CodeGenConfig, dict(
        n_embd=256, n_layer=2, n_head=4, rotary_dim=32, n_positions=2048, n_ctx=2048, activation_function="gelu_new",
        tie_word_embeddings=False)),
}


@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS))
def test_a_real_checkpoints_config_passes_every_verify_check(checkpoint):
    config_class, fields = CHECKPOINTS[checkpoint]
    torch.manual_seed(0)
    hf_model = tf.AutoModelForCausalLM.from_config(config_class(**BYTE_IDS, **fields)).eval()
    model = ic.load(hf_model, tokenizer=ic.ByteTokenizer())
    assert model.family == checkpoint.split(" ")[0]
    report = verify(model, max_new_tokens=8)
    failed = [(row.check, row.max_abs_err, row.note) for row in report.rows if row.status == "fail"]
    assert not failed, failed
    assert sum(row.status == "pass" for row in report.rows) >= 8
