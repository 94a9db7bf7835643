"""TransformerLens' `TransformerBridge` on the benchmark's weights, in the project's own environment.

The bridge wraps a transformers model in place (it swaps submodules and switches attention to eager), so it
gets its own copy of the weights. There is no Hugging Face tokenizer for the byte vocabulary: the bridge is
handed interp_cache's byte tokenizer, with the two init fields its setup reads, and fed ids directly.
Recording does what a user of the bridge would: `detach().cpu()` of every call into a list.
"""

from __future__ import annotations

import torch

from interp_cache.models.tokenizer import ByteTokenizer

BRIDGE_ATTENTION_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")


def bridge_or_reason(hf_model):
    """`(bridge, None)`, or `(None, why it cannot run here)`."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as error:
        return None, f"transformer_lens has no TransformerBridge: {error}"
    tokenizer = ByteTokenizer()
    tokenizer.init_kwargs["name_or_path"] = "byte-tokenizer"  # read by the bridge's tokenizer setup
    tokenizer.init_kwargs["add_bos_token"] = True  # otherwise it reloads the tokenizer from the hub
    try:
        bridge = TransformerBridge.boot_transformers("interp-cache-benchmark-llama", hf_model=hf_model, tokenizer=tokenizer)
    except Exception as error:  # a peer that cannot run is reported, not fatal
        return None, f"{type(error).__name__}: {error}"
    return bridge, None


def bridge_recording_generate(bridge, ids: torch.Tensor, new_tokens: int, hook_kinds) -> int:
    """Greedy generate with the bridge's KV cache; records the attention hooks `hook_kinds` of every layer
    (None: no hooks). Returns the number of hook calls recorded."""
    records: list[torch.Tensor] = []

    def record(activation, hook):
        records.append(activation.detach().cpu())

    names = [] if hook_kinds is None else [
        f"blocks.{layer}.attn.{kind}" for layer in range(bridge.cfg.n_layers) for kind in hook_kinds
    ]
    with torch.no_grad(), bridge.hooks(fwd_hooks=[(name, record) for name in names]):
        bridge.generate(ids, max_new_tokens=new_tokens, do_sample=False, stop_at_eos=False,
                        use_past_kv_cache=True, return_type="tokens", verbose=False)
    return len(records)
