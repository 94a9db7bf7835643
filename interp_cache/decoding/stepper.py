"""A step-by-step decoder for experiments that intervene between steps.

It is the correct version of the hand-written loop of seed 000: the same `HookedCache` object is carried
from call to call, the attention mask always covers every token slot seen, and positions come from the
cache's count of real tokens per row -- so a caller cannot forget them.

    stepper = Stepper(model)
    logits = stepper.prefill(input_ids, attention_mask)      # [b, p, vocab]
    logits = stepper.step(logits[:, -1].argmax(-1))          # [b, vocab]
    branch = stepper.fork()                                  # independent continuation
    stepper.rewind(1)                                        # forget the last step
"""

from __future__ import annotations

import torch

from interp_cache.cache.hooked_cache import HookedCache


class Stepper:
    def __init__(self, model, cache: HookedCache | None = None, compress=None):
        if cache is not None and compress is not None:
            raise ValueError("pass either cache= or compress=, not both (a cache carries its policy)")
        self.model = model
        self.cache = cache if cache is not None else model.new_cache(compress=compress)
        self.token_ids: torch.Tensor | None = None  # [b, T] every token slot fed so far
        self.attention_mask: torch.Tensor | None = None  # [b, T]

    @property
    def num_steps(self) -> int:
        """Forwards run on this cache (the prefill counts as step 0)."""
        return self.cache.forward_count

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (or any chunk of new tokens); logits `[b, p, vocab]`."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"prefill needs input_ids of shape [batch, >=1 tokens]; got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask for the new tokens must have the shape of input_ids {tuple(input_ids.shape)}; "
                f"got {tuple(attention_mask.shape)}"
            )
        if self.token_ids is None:
            self.token_ids, self.attention_mask = input_ids, attention_mask
        else:
            if input_ids.shape[0] != self.token_ids.shape[0]:
                raise ValueError(f"batch size {input_ids.shape[0]} differs from the stepper's {self.token_ids.shape[0]}")
            self.token_ids = torch.cat([self.token_ids, input_ids], dim=1)
            self.attention_mask = torch.cat([self.attention_mask, attention_mask], dim=1)
        with torch.no_grad():
            out = self.model(
                input_ids, attention_mask=self.attention_mask, past_key_values=self.cache, use_cache=True
            )
        return out.logits

    def step(self, next_token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (`[b]` or `[b, 1]`); logits `[b, vocab]` for the position after it."""
        if self.token_ids is None:
            raise RuntimeError("step() before prefill(): feed a prompt first")
        next_token_ids = next_token_ids.reshape(-1, 1).to(self.token_ids.device)
        return self.prefill(next_token_ids)[:, -1]

    def greedy(self, logits: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Decode `num_tokens` greedily starting from `logits` `[b, vocab]`; returns the tokens `[b, n]`."""
        chosen = []
        for _ in range(num_tokens):
            token = logits.argmax(-1)
            chosen.append(token)
            logits = self.step(token)
        return torch.stack(chosen, dim=1) if chosen else logits.new_zeros((logits.shape[0], 0), dtype=torch.long)

    def fork(self) -> Stepper:
        return self.continued_on(self.cache.fork())

    def continued_on(self, cache: HookedCache) -> Stepper:
        """A stepper that has fed what this one fed, decoding on `cache` (a fork, or a compressed copy)."""
        branch = Stepper(self.model, cache)
        branch.token_ids = None if self.token_ids is None else self.token_ids.clone()
        branch.attention_mask = None if self.attention_mask is None else self.attention_mask.clone()
        return branch

    def rewind(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` token slots, as if they had never been fed."""
        self.cache.rewind(num_tokens)
        if num_tokens:
            self.token_ids = self.token_ids[:, :-num_tokens]
            self.attention_mask = self.attention_mask[:, :-num_tokens]
