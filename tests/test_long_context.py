"""A 32K-token cached decode on zoo:llama under Quest and under AdaKV: the process's peak memory is measured
(the kernel's high-water mark of resident bytes, reset before the run) and bounded, and the entries the
cache holds at the end sit at their true positions -- their keys equal, position for position, the keys an
uncached forward over the same tokens computes.

A score matrix over 32K keys would be 4 heads x 32K x 32K x 4 bytes = 16 GiB per layer; the bound below is
what the run needs without one: the cache, a few copies of the 32K-token hidden states, and the kernels'
working sets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import interp_cache as ic
from interp_cache.compress import AdaKV, Quest, SnapKV

LENGTH = 32 * 1024
NEW_TOKENS = 4
PEAK_BOUND = 384 * 2**20  # bytes above the resident set before the run
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in {_STATUS}")


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


@pytest.mark.parametrize("policy", [Quest(budget=256, page_size=16), AdaKV(SnapKV(budget=256, window=16))],
                         ids=["quest", "adakv"])
def test_a_32k_decode_stays_within_its_memory_bound_and_keeps_true_positions_llama(policy):
    if not _reset_peak():
        pytest.skip("this kernel does not let a process reset its peak resident set (/proc/self/clear_refs)")
    model = ic.load("zoo:llama", max_position_embeddings=LENGTH + 64)
    prompt = torch.randint(4, 250, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(policy)
    tokens = prompt
    resident_before = _status_bytes("VmRSS")
    _reset_peak()
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        for _ in range(NEW_TOKENS):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            logits = model(next_token, past_key_values=cache, use_cache=True).logits
    peak = _status_bytes("VmHWM") - resident_before
    print(f"{type(policy).__name__}: peak {peak / 2**20:.1f} MiB above the resident set, cache {cache.nbytes:,} bytes")
    assert peak <= PEAK_BOUND, f"peak {peak / 2**20:.0f} MiB above the resident set; bound {PEAK_BOUND / 2**20:.0f} MiB"

    full_entries = 2 * (LENGTH + NEW_TOKENS) * model.runners[0].spec.num_kv_heads  # per layer, keys + values
    if isinstance(policy, AdaKV):
        assert cache.nbytes < 0.05 * full_entries * model.runners[0].spec.head_dim * 4 * model.num_layers
    assert cache.logical_length == LENGTH + NEW_TOKENS

    with torch.no_grad(), model.record([f"blocks.{i}.attn.hook_rot_k" for i in range(model.num_layers)]) as uncached:
        model(tokens, use_cache=False, logits_to_keep=1)
    for layer in range(model.num_layers):
        keys_bgkd, _, positions_bgk = cache.layers[layer].read()
        keys_bgkd = keys_bgkd if isinstance(keys_bgkd, torch.Tensor) else keys_bgkd.materialize()
        stored = positions_bgk >= 0  # -1: a head's unused slot (AdaKV keeps a different count per head)
        assert int(positions_bgk.max()) == LENGTH + NEW_TOKENS - 1
        for head_positions, head_stored in zip(positions_bgk[0], stored[0]):
            assert head_positions[head_stored].unique().numel() == int(head_stored.sum())  # no position twice
        # Layer 0's keys depend on token and position only; deeper layers' keys of prompt tokens come from the
        # dense prefill: both must equal the uncached forward's at the stored position.
        check = (positions_bgk >= 0) & (positions_bgk < LENGTH if layer else True)
        expected_bpgd = uncached[f"blocks.{layer}.attn.hook_rot_k"][0].activation
        expected_bgkd = expected_bpgd.permute(0, 2, 1, 3).gather(
            2, positions_bgk.clamp(min=0)[..., None].expand(-1, -1, -1, keys_bgkd.shape[-1]))
        difference = (keys_bgkd - expected_bgkd).abs().amax(-1)[check]
        assert difference.numel() > 0 and difference.max().item() <= 1e-5, layer
