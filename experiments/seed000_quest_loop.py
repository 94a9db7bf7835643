"""Seed 000 reproduced: a hand-written decode loop on a plain transformers model, with a hand-written
Quest-style paged cache whose `get_seq_length` counts pages instead of tokens, repeats itself; the
verifier names where and why; the same loop through interp_cache answers.

The researcher of seed 000 replaced the attention with Quest's and the cache with their own, wrote the
loop by hand (the new token and `past_key_values`, nothing else) and got " I I I". Here, on `zoo:needle`
(a passkey prompt of 512 tokens):

1. the plain transformers model, the loop and `PagedQuestCache` (pages of 16 with per-page key min / max,
   the metadata Quest scores pages by): transformers takes the cache's length as the position of the new
   token, so new tokens sit at positions 32, 33, ... instead of 512, 513, ...;
2. `verify_decode_loop(plain_model, loop)` names the first divergent step and layer and shows the position
   ids used next to the true ones and the length the cache reported;
3. the same loop on the HookedModel with interp_cache's own Quest (budget 128, pages of 16): its cache keeps
   true positions, so the loop is right (and `verify_decode_loop` passes it uncompressed);
4. `results/seed000_quest_loop.png`: the retrieval head's attention (layer 3, head 3) at each decode step,
   both runs side by side; `results/seed000_quest_loop.md`: texts and the verifier's report.

    python experiments/seed000_quest_loop.py     # ~10 s
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

import interp_cache as ic  # noqa: E402
from interp_cache.compress import Quest  # noqa: E402
from interp_cache.models.trained import trained_models  # noqa: E402
from interp_cache.tasks.passkey import passkey_prompt  # noqa: E402
from interp_cache.verify import format_markdown, verify_decode_loop  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAGE, LAYER, HEAD, NEW_TOKENS = 16, 3, 3, 12


class PagedQuestCache(DynamicCache):
    """The user's cache: keys and values as DynamicCache keeps them, plus Quest's page metadata (per-page
    elementwise min and max of the keys). Its bug: the length it reports is the number of pages."""

    def __init__(self, config):
        super().__init__(config=config)
        self.page_min: dict[int, torch.Tensor] = {}
        self.page_max: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        tokens = keys.shape[-2]
        pages = math.ceil(tokens / PAGE)
        padded = torch.nn.functional.pad(keys, (0, 0, 0, pages * PAGE - tokens), value=float("nan"))
        paged = padded.unflatten(-2, (pages, PAGE))  # [b, kv_heads, pages, PAGE, d]
        self.page_min[layer_idx] = paged.nan_to_num(float("inf")).amin(-2)
        self.page_max[layer_idx] = paged.nan_to_num(float("-inf")).amax(-2)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if layer_idx not in self.page_min else self.page_min[layer_idx].shape[-2]  # pages, not tokens


def seed_loop(make_cache, generated: list[int] | None = None):
    """The loop of seed 000: prefill, then only the new token and `past_key_values`."""

    def loop(model, input_ids, attention_mask, max_new_tokens):
        cache = make_cache(model)
        out = model(input_ids, past_key_values=cache, use_cache=True)
        for _ in range(max_new_tokens):
            token = out.logits[:, -1:].argmax(-1)
            if generated is not None:
                generated.append(int(token))
            out = model(token, past_key_values=cache, use_cache=True)

    return loop


def plain_decode_attention(model, layer: int, head: int, caches: list) -> tuple[list[torch.Tensor], object]:
    """Rows of the head's attention at each decode step of the plain model, recomputed from its own query
    (rotated as the model rotated it) and the cache's keys: `[keys]` per step, and the hook handle."""
    attention = model.model.layers[layer].self_attn
    rows: list[torch.Tensor] = []

    def after_attention(module, args, kwargs, output):
        hidden = kwargs["hidden_states"]
        if hidden.shape[1] != 1:
            return
        cos, sin = kwargs["position_embeddings"]
        query = module.q_proj(hidden).view(1, 1, -1, module.head_dim).transpose(1, 2)
        query, _ = apply_rotary_pos_emb(query, query, cos, sin)
        keys = caches[-1].layers[layer].keys[0, head // module.num_key_value_groups]  # [tokens, d]
        rows.append(((query[0, head, -1] @ keys.T) * module.scaling).softmax(-1))

    return rows, attention.register_forward_hook(after_attention, with_kwargs=True)


def draw(ax, rows: list[torch.Tensor], title: str, needle: tuple[int, int]) -> None:
    width = max(row.shape[-1] for row in rows)
    grid = torch.full((len(rows), width), float("nan"))
    for step, row in enumerate(rows):
        grid[step, : row.shape[-1]] = row.float()
    colours = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(grid.numpy(), aspect="auto", cmap=colours, interpolation="nearest", vmin=0, vmax=1)
    ax.axvspan(needle[0] - 0.5, needle[1] - 0.5, color="red", alpha=0.25, label="the pass key")
    ax.set_xlabel("key position")
    ax.set_ylabel("decode step")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    ax.figure.colorbar(image, ax=ax, label="attention weight", fraction=0.046, pad=0.04)


def run(out: Path) -> dict:
    prompt = passkey_prompt(512, 0.5, "71432")
    ids = torch.tensor([list(prompt.text.encode("utf-8"))])
    key_start = prompt.needle_start + prompt.text[prompt.needle_start:].index(prompt.passkey)
    plain = AutoModelForCausalLM.from_pretrained(trained_models()["needle"], attn_implementation="sdpa").eval()
    hooked = ic.load("zoo:needle")

    caches: list = []
    plain_tokens: list[int] = []
    rows_plain, handle = plain_decode_attention(plain, LAYER, HEAD, caches)
    try:
        with torch.no_grad():
            seed_loop(lambda m: caches.append(PagedQuestCache(m.config)) or caches[-1], plain_tokens)(
                plain, ids, None, NEW_TOKENS)
    finally:
        handle.remove()
    report_plain = verify_decode_loop(plain, seed_loop(lambda m: PagedQuestCache(m.config)), ids, NEW_TOKENS)

    quest = Quest(budget=128, page_size=PAGE, dense_layers=1)
    hooked_tokens: list[int] = []
    pattern = f"blocks.{LAYER}.attn.hook_pattern"
    with torch.no_grad(), hooked.record(pattern) as recording:
        seed_loop(lambda m: m.new_cache(compress=quest), hooked_tokens)(hooked, ids, None, NEW_TOKENS)
    stitched_qk = recording.stacked(pattern)[0, HEAD]  # true positions; NaN where an entry was not read
    rows_hooked = list(stitched_qk[ids.shape[1] : ids.shape[1] + NEW_TOKENS])
    report_hooked = verify_decode_loop(hooked, seed_loop(lambda m: m.new_cache()), ids, NEW_TOKENS)

    plain_text = bytes(plain_tokens).decode("utf-8", errors="replace")
    hooked_text = bytes(hooked_tokens).decode("utf-8", errors="replace")
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    draw(axes[0], rows_plain, f"plain transformers + PagedQuestCache: {plain_text!r}\n(positions from the "
         f"page count)", (key_start, key_start + 5))
    draw(axes[1], rows_hooked[: len(rows_plain)], f"interp_cache + Quest(budget=128, page 16): {hooked_text!r}\n"
         "(true positions kept; grey: pages not selected)", (key_start, key_start + 5))
    figure.suptitle(f"zoo:needle, passkey prompt of 512 tokens (key at {key_start}), layer {LAYER} head {HEAD}")
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    figure.savefig(out / "seed000_quest_loop.png", dpi=110)
    plt.close(figure)

    found = report_plain.rows[0].first_divergence
    given = found.loop_inputs
    lines = [
        "# Seed 000: a hand-written loop and cache on a plain transformers model",
        "",
        "`experiments/seed000_quest_loop.py` (`zoo:needle`, passkey prompt of 512 tokens, key 71432, greedy, "
        f"{NEW_TOKENS} new tokens).",
        "",
        "| run | generated | answers the key |",
        "|---|---|---|",
        f"| plain transformers, `PagedQuestCache` (length = pages) | `{plain_text!r}` | "
        f"{plain_text.strip().startswith(prompt.passkey)} |",
        f"| same loop, interp_cache `Quest(budget=128, page_size=16)` | `{hooked_text!r}` | "
        f"{hooked_text.strip().startswith(prompt.passkey)} |",
        "",
        "## The verifier on the plain loop",
        "",
        format_markdown([report_plain]),
        f"First departure: step {found.step}, layer {found.layer} (`{found.hook}`), position {found.position}; "
        f"position ids used {given['position_ids']} vs true {given['expected_position_ids']}; "
        f"the cache reported length {given['cache_length']} (true {given['expected_cache_length']}).",
        "",
        "## The same loop through interp_cache (uncompressed, verified)",
        "",
        format_markdown([report_hooked]),
        "![attention at each decode step](seed000_quest_loop.png)",
    ]
    (out / "seed000_quest_loop.md").write_text("\n".join(lines) + "\n")
    return {"plain_text": plain_text, "hooked_text": hooked_text, "passkey": prompt.passkey,
            "plain_report": report_plain, "hooked_report": report_hooked}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.out)
    print(f"plain loop: {result['plain_text']!r} (verifier: {result['plain_report'].rows[0].note})")
    print(f"through interp_cache: {result['hooked_text']!r} (verifier passed: {result['hooked_report'].passed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
