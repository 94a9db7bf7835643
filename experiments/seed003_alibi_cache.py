"""Seed 003 reproduced: ALiBi under a KV cache, where the new query gets the bias row of position 0.

TransformerLens' Bloom disagreed with transformers' only with the cache on: the bias it added for a new
token was the row of query position 0, `-slope * |0 - key|`, which favours the *oldest* keys, instead of
the new token's own row (equal, up to a per-row constant softmax ignores, to `slope * key`). Here the bug
is injected twice into the trained ALiBi model `zoo:needle-alibi`:

1. into the plain transformers model, by a patched attention forward (every layer's `BloomAttention`
   takes the position-0 row whenever it decodes a single new token): greedy text with and without cache
   diverges; `verify_decode_loop(plain_model, loop)` names the first divergent layer and step;
2. into the HookedModel, by a hook on `blocks.{i}.attn.hook_pos_bias` at decode steps: the verifier names
   the hook and the step.

Writes `results/seed003_alibi_cache.md`.

    python experiments/seed003_alibi_cache.py     # ~10 s
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import interp_cache as ic
from interp_cache.models.trained import trained_models
from interp_cache.tasks.passkey import passkey_prompt
from interp_cache.verify import format_markdown, verify_decode_loop

RESULTS = Path(__file__).resolve().parent / "results"
NEW_TOKENS = 8


def position_zero_bias(alibi_bias: torch.Tensor) -> torch.Tensor:
    """The bias row of query position 0 in the textbook form `-slope * |query - key|`, from the bias
    `slope * key` (slopes are positive): `-slope * key`."""
    return -alibi_bias.abs()


@contextmanager
def patched_bloom_attention(model):
    """Every BloomAttention of a plain transformers Bloom model takes the position-0 bias row when it
    decodes one new token (the cached step); the prefill and the uncached forward are untouched."""
    attentions = [block.self_attention for block in model.transformer.h]
    originals = [attention.forward for attention in attentions]

    def buggy(original):
        def forward(hidden_states, residual, alibi, attention_mask, *args, **kwargs):
            if hidden_states.shape[1] == 1:
                alibi = position_zero_bias(alibi)
            return original(hidden_states, residual, alibi, attention_mask, *args, **kwargs)

        return forward

    for attention, original in zip(attentions, originals):
        attention.forward = buggy(original)
    try:
        yield model
    finally:
        for attention, original in zip(attentions, originals):
            attention.forward = original


def greedy_uncached(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    tokens = ids
    for _ in range(new_tokens):
        logits = model(tokens, use_cache=False).logits
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens[0, ids.shape[1] :].tolist()


def greedy_cached(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def generate_loop(model, input_ids, attention_mask, max_new_tokens):
    model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                   pad_token_id=0)


def text(tokens: list[int]) -> str:
    return bytes(tokens).decode("utf-8", errors="replace")


def run(model_name: str, out: Path) -> dict:
    prompt = passkey_prompt(256, 0.5, "71432")
    ids = torch.tensor([list(prompt.text.encode("utf-8"))])
    plain = AutoModelForCausalLM.from_pretrained(trained_models()[model_name], attn_implementation="eager").eval()
    with torch.no_grad():
        clean = text(greedy_cached(plain, ids, NEW_TOKENS))
        with patched_bloom_attention(plain):
            uncached = text(greedy_uncached(plain, ids, NEW_TOKENS))
            cached = text(greedy_cached(plain, ids, NEW_TOKENS))

    def patched_loop(model, input_ids, attention_mask, max_new_tokens):
        with patched_bloom_attention(model):
            generate_loop(model, input_ids, attention_mask, max_new_tokens)

    report_plain = verify_decode_loop(plain, patched_loop, ids, NEW_TOKENS)

    hooked = ic.load(f"zoo:{model_name}")

    def buggy_bias(bias, hook):
        return position_zero_bias(bias) if hook.step else bias

    bias_hooks = [(f"blocks.{layer}.attn.hook_pos_bias", buggy_bias) for layer in range(hooked.num_layers)]

    # The bug hooks act at decode steps only, so the verifier's uncached reference (one forward, step 0)
    # runs clean under them; attached before the verifier records, they are what it sees.
    with hooked.hooks(fwd_hooks=bias_hooks):
        report_hooked = verify_decode_loop(hooked, generate_loop, ids, NEW_TOKENS)
    found_plain = report_plain.rows[0].first_divergence
    found_hooked = report_hooked.rows[0].first_divergence
    lines = [
        "# Seed 003: ALiBi under a KV cache, the new query given the bias row of position 0",
        "",
        f"`experiments/seed003_alibi_cache.py` (`zoo:{model_name}`, passkey prompt of 256 tokens, key "
        f"{prompt.passkey}, greedy, {NEW_TOKENS} new tokens).",
        "",
        "| run | generated |",
        "|---|---|",
        f"| transformers, no bug, with cache | `{clean!r}` |",
        f"| bug injected (patched BloomAttention), without cache | `{uncached!r}` |",
        f"| bug injected (patched BloomAttention), with cache | `{cached!r}` |",
        "",
        "## The verifier on the plain model (module hooks only)",
        "",
        format_markdown([report_plain]),
        f"First departure: step {found_plain.step}, layer {found_plain.layer} (`{found_plain.hook}`), "
        f"position {found_plain.position}.",
        "",
        "## The verifier on the HookedModel (bug injected at `hook_pos_bias`)",
        "",
        format_markdown([report_hooked]),
        f"First divergent hook: `{found_hooked.hook}` at step {found_hooked.step}, head {found_hooked.head}.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "seed003_alibi_cache.md").write_text("\n".join(lines) + "\n")
    return {"clean": clean, "uncached": uncached, "cached": cached, "plain": found_plain, "hooked": found_hooked,
            "passkey": prompt.passkey}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="needle-alibi", choices=[n for n in trained_models() if "alibi" in n])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.model, args.out)
    print(f"without cache {result['uncached']!r}, with cache {result['cached']!r} (clean {result['clean']!r})")
    print(f"plain model: step {result['plain'].step}, layer {result['plain'].layer} ({result['plain'].hook}); "
          f"hooked model: {result['hooked'].hook} at step {result['hooked'].step}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
