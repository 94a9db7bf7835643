"""The stepper: seed 000's loop done right; fork and rewind (zoo llama, bloom, gpt2)."""

from __future__ import annotations

import pytest
import torch

from conftest import hooked, padded_batch
from interp_cache.decoding import Stepper


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_stepper_greedy_equals_generate(family):
    model = hooked(family)
    input_ids, attention_mask = padded_batch(model)
    stepper = Stepper(model)
    logits = stepper.prefill(input_ids, attention_mask)[:, -1]
    tokens = stepper.greedy(logits, 12)
    expected = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False,
                              eos_token_id=None)
    assert torch.equal(tokens, expected[:, input_ids.shape[1]:])
    assert stepper.num_steps == 13  # the prefill (step 0) and one forward per chosen token
    assert stepper.cache.logical_length == input_ids.shape[1] + 12


def test_fork_gives_independent_continuations():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    stepper = Stepper(model)
    last = stepper.prefill(input_ids, attention_mask)[:, -1]
    branch = stepper.fork()
    forced = torch.tensor([65, 66])
    a = stepper.step(last.argmax(-1))
    b = branch.step(forced)
    # Each continuation equals an independent run over prompt + its token.
    for token, logits in ((last.argmax(-1), a), (forced, b)):
        full_ids = torch.cat([input_ids, token[:, None]], dim=1)
        full_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        with torch.no_grad():
            expected = model(full_ids, attention_mask=full_mask).logits[:, -1]
        assert (logits - expected).abs().max().item() <= 1e-4
    assert stepper.cache.logical_length == branch.cache.logical_length == input_ids.shape[1] + 1


def test_rewind_then_replay_is_exact():
    model = hooked("llama")
    input_ids, attention_mask = padded_batch(model)
    stepper = Stepper(model)
    last = stepper.prefill(input_ids, attention_mask)[:, -1]
    first = stepper.step(last.argmax(-1))
    stepper.step(first.argmax(-1))
    stepper.rewind(1)
    assert stepper.num_steps == 2
    again = stepper.step(first.argmax(-1))
    stepper.rewind(2)
    assert stepper.cache.logical_length == input_ids.shape[1]
    replay = stepper.step(last.argmax(-1))
    assert torch.equal(replay, first)
    del again
