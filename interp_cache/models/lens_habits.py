"""What TransformerLens users type, on a HookedModel: `model.cfg`, `to_tokens` / `to_string`, text in,
`return_type=`, and `logits, cache = model.run_with_cache(...)` giving TransformerLens' own
`ActivationCache` (so `cache["pattern", 0]` works). The transformers calling convention stays the default
of `model(...)` (it returns the transformers output object); these are the TransformerLens ways in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformer_lens import ActivationCache, TransformerBridgeConfig

RETURN_TYPES = ("output", "logits", "loss", "both", None)


class TransformerLensHabits:
    """Mixed into HookedModel; relies on its `tokenizer`, `hf_model`, `blocks`, `device` and `forward`."""

    @property
    def cfg(self) -> TransformerBridgeConfig:
        """TransformerLens' config class, filled from the wrapped model: n_layers, n_heads, d_model, d_head,
        d_vocab, n_ctx, n_key_value_heads."""
        config = self.hf_model.config
        attention = self.blocks[0].attn
        n_heads = attention.hook_z.layout.size("head")
        n_ctx = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                 or getattr(config, "seq_length", None) or -1)
        return TransformerBridgeConfig(
            d_model=config.hidden_size, d_head=attention.hook_z.layout.size("channel"), n_layers=len(self.blocks),
            n_ctx=n_ctx, n_heads=n_heads, d_vocab=config.vocab_size,
            n_key_value_heads=self.blocks[0].cache.hook_k_write.layout.size("kv_head"),
            architecture=type(self.hf_model).__name__, model_name=getattr(config, "name_or_path", "") or "custom",
            dtype=self.dtype,
        )

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool | None = None) -> torch.Tensor:
        """`[batch, tokens]` ids on the model's device, left-padded; `prepend_bos` None: as the tokenizer does."""
        texts = _texts(text, "to_tokens")
        ids = self._require_tokenizer()(texts, padding=True, return_tensors="pt")["input_ids"]
        if prepend_bos:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise ValueError("prepend_bos=True but the tokenizer has no bos token")
            if not bool((ids[:, :1] == bos).all()):
                ids = torch.cat([torch.full_like(ids[:, :1], bos), ids], dim=1)
        return ids.to(self.device)

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Text of `[tokens]` (one string) or `[batch, tokens]` (a list), special tokens dropped."""
        tokenizer = self._require_tokenizer()
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
            return tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def run_with_cache(self, *model_args, return_type="logits", names_filter=None, **kwargs):
        """`(output, ActivationCache)`: TransformerLens' cache of every hook `names_filter` admits, output as
        `return_type` says (default the logits)."""
        out, cache_dict = super().run_with_cache(*model_args, return_type=return_type, names_filter=names_filter,
                                                 **kwargs)
        return out, ActivationCache(cache_dict, self)

    # -- used by HookedModel.forward / generate -------------------------------------------------------
    def _encode_text(self, text, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(text, str) and not (isinstance(text, (list, tuple)) and text and isinstance(text[0], str)):
            return text, attention_mask
        if attention_mask is not None:
            raise TypeError("attention_mask= goes with input_ids; text is tokenized with its own mask")
        enc = self._require_tokenizer()(_texts(text, "the model"), padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _shaped_output(self, output, input_ids, attention_mask, return_type):
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {', '.join(map(repr, RETURN_TYPES))}; got {return_type!r}")
        if return_type == "output":
            return output
        if return_type is None:
            return None
        logits = output.logits
        if return_type == "logits":
            return logits
        loss = next_token_loss(logits, input_ids, attention_mask)
        return loss if return_type == "loss" else (logits, loss)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids, or load it with tokenizer=")
        return self.tokenizer


def _texts(text, who: str) -> list[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
        return list(text)
    raise TypeError(f"{who} takes a string or a non-empty list of strings; got {type(text).__name__}")


def next_token_loss(logits_btv: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Mean cross-entropy of each real next token (padding neither predicts nor is predicted)."""
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits_btv[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    if attention_mask is None:
        return nll.mean()
    real = (attention_mask[:, 1:] * attention_mask[:, :-1]).flatten().float()
    return (nll * real).sum() / real.sum()
