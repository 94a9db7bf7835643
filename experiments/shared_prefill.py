"""Greedy answers to passkey prompts under many compression policies, one prefill per batch shared by all.

The studies compare dozens of policies and budgets on the same prompts. Each batch is prefilled once,
watched by `PrefillObservations`; each policy's cache is that prefill compressed as a prefill under the
policy would have left it (`compress_prefilled`: the same caches, bit for bit), then decoded greedily the way
`generate` decodes. `tests/test_experiments.py` checks the answers, bytes and kept entries against
`answer_passkeys` (one `generate` per policy).
"""

from __future__ import annotations

import torch

from interp_cache.decoding import PrefillObservations, Stepper, compress_prefilled
from interp_cache.tasks.passkey import PasskeyAnswers, PasskeyPrompt


def greedy_answer(stepper: Stepper, logits_bv: torch.Tensor, new_tokens: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """`generate`'s greedy decode from a prefilled stepper: rows that emitted EOS continue with padding, and
    decoding stops when every row has finished. Tokens `[b, <= new_tokens]`."""
    tokens = [logits_bv.argmax(-1)]
    finished = tokens[0] == eos_id
    while len(tokens) < new_tokens and not bool(finished.all()):
        token = stepper.step(tokens[-1]).argmax(-1).masked_fill(finished, pad_id)
        finished |= token == eos_id
        tokens.append(token)
    return torch.stack(tokens, dim=1)


def answer_under_policies(model, prompts: list[PasskeyPrompt], policies: dict, batch_size: int) -> dict:
    """Greedy answers to `prompts` under each policy (None: the full cache), one prefill per batch shared by
    all of them (`compress_prefilled`: the same caches, bit for bit, as a prefill under each policy)."""
    new_tokens = len(prompts[0].answer)
    eos_id, pad_id = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    answers = {key: ([], [], [], []) for key in policies}
    compressed = [key for key, policy in policies.items() if policy is not None]
    full_cache = [key for key, policy in policies.items() if policy is None]

    def decode(stepper: Stepper, logits: torch.Tensor, batch: list[PasskeyPrompt], keys: list) -> None:
        tokens = greedy_answer(stepper, logits, new_tokens, eos_id, pad_id)
        texts = model.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for key in keys:
            generated, hits, cache_bytes, kept_entries = answers[key]
            generated += texts
            hits += [p.is_retrieved(text) for p, text in zip(batch, texts)]
            cache_bytes += [stepper.cache.nbytes // len(batch)] * len(batch)
            kept_entries += stepper.cache.kept_counts().sum(dim=(0, 2)).tolist()

    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids = model.tokenizer([p.text for p in batch], return_tensors="pt")["input_ids"].to(model.device)
        observations = PrefillObservations()
        prefilled = Stepper(model, compress=observations)
        with torch.no_grad():
            logits = prefilled.prefill(ids)[:, -1]
            for key in compressed:  # every branch before the full cache decodes on: they start from its prefill
                decode(compress_prefilled(model, prefilled, observations, policies[key]), logits, batch, [key])
            if full_cache:
                decode(prefilled, logits, batch, full_cache)
    return {key: PasskeyAnswers(*lists) for key, lists in answers.items()}
