"""Pictures of cached decoding: the stitched attention map of one head, and head-wise budget maps.

The attention map is `rec.stacked("blocks.L.attn.hook_pattern")` of one generation -- prefill and every
decode step in one `[T, T]` matrix over absolute positions -- so a cache bug shows as a shape (seed 000's
map of a broken Quest decode was not lower-triangular). Cells are coloured by attention weight; cells a
query could have attended (key position <= query position) but did not read -- evicted from the cache or
not selected by Quest -- are marked red; the causal future stays blank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class HeatmapResult:
    path: str
    tokens: int  # T: prompt + generated positions shown
    unread_cells: int  # causally allowed (query, key) cells that were not read (evicted / unselected)
    kept_counts: torch.Tensor | None  # [layers, kv_heads] entries kept per head (row 0), with an eviction policy


def unread_mask(pattern_tt: torch.Tensor) -> torch.Tensor:
    """Cells `[T, T]` with key <= query that hold no attention value (NaN): evicted or not selected."""
    t = pattern_tt.shape[-1]
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    return allowed & torch.isnan(pattern_tt)


MAX_TOKEN_LABELS = 48  # beyond this many positions, ticks are plain integers


def draw_attention(ax, pattern_tt: torch.Tensor, title: str, prompt_length: int | None = None,
                   token_labels: list[str] | None = None) -> None:
    """The map with a colour bar, integer (or token) ticks and the prefill / decode boundary."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    values = pattern_tt.float().numpy()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=float(np.nanmax(values)),
                      interpolation="nearest")
    unread = unread_mask(pattern_tt).numpy()
    ax.imshow(np.ma.masked_where(~unread, unread), cmap=ListedColormap(["red"]), interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="attention weight", fraction=0.046, pad=0.04)
    t = values.shape[-1]
    if token_labels is not None and t <= MAX_TOKEN_LABELS:
        ax.set_xticks(range(t), token_labels, rotation=90, fontsize=6)
        ax.set_yticks(range(t), token_labels, fontsize=6)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if prompt_length is not None and 0 < prompt_length < t:
        boundary = prompt_length - 0.5
        ax.axhline(boundary, color="white", linestyle="--", linewidth=0.8)
        ax.axvline(boundary, color="white", linestyle="--", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position (dashed: prefill | decode)" if prompt_length else "query position")


def draw_budgets(ax, kept_lg: torch.Tensor, title: str) -> None:
    layers, heads = kept_lg.shape
    image = ax.imshow(kept_lg.numpy(), cmap="magma", aspect="auto", interpolation="nearest")
    low, high = float(kept_lg.min()), float(kept_lg.max())
    for layer in range(layers):
        for head in range(heads):
            value = float(kept_lg[layer, head])
            bright = high > low and (value - low) / (high - low) > 0.6  # magma is light at the top
            ax.text(head, layer, str(int(value)), ha="center", va="center", fontsize=7,
                    color="black" if bright else "white")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, label="entries kept")


def heatmap(
    model,
    prompt: str,
    max_new_tokens: int,
    layer: int,
    head: int,
    out: str,
    compress=None,
) -> HeatmapResult:
    """Generate greedily from `prompt` (optionally compressed) and save the stitched map of `layer`.`head`
    (plus, with an eviction policy, the per-layer/per-head budget map) as a PNG at `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1 (the map shows decode steps); got {max_new_tokens!r}")
    if not 0 <= layer < model.num_layers:
        raise ValueError(f"layer must be in [0, {model.num_layers}); got {layer}")
    num_heads = model.runners[layer].spec.num_heads
    if not 0 <= head < num_heads:
        raise ValueError(f"head must be in [0, {num_heads}); got {head}")
    if model.tokenizer is None:
        raise ValueError("heatmap needs a model with a tokenizer")
    input_ids = model.tokenizer([prompt], return_tensors="pt")["input_ids"]
    cache = model.new_cache(compress=compress)
    name = f"blocks.{layer}.attn.hook_pattern"
    with model.record(name) as rec:
        generated = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, past_key_values=cache)
    pattern_tt = rec.stacked(name)[0, head]
    policy = "no compression" if compress is None else repr(compress)
    kept = cache.kept_counts()[:, 0] if compress is not None and compress.evicts else None
    labels = [repr(model.tokenizer.decode([token]))[1:-1] for token in generated[0, : pattern_tt.shape[-1]].tolist()]
    figure, axes = plt.subplots(1, 1 if kept is None else 2, figsize=(7 if kept is None else 12, 6), squeeze=False)
    draw_attention(axes[0, 0], pattern_tt, f"{model.family} layer {layer} head {head}\n{policy}\nred: not read",
                   prompt_length=input_ids.shape[1], token_labels=labels)
    if kept is not None:
        draw_budgets(axes[0, 1], kept, "entries kept per layer and KV head")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return HeatmapResult(out, pattern_tt.shape[-1], int(unread_mask(pattern_tt).sum()), kept)
