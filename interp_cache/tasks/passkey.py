"""The passkey retrieval task of the long-context literature, in its standard wording.

The intro, filler and needle sentences are used verbatim (Mohtashami & Jaggi 2023, "Landmark Attention",
and the LongLoRA / InfLLM evaluations), so prompts written for other tools work here. Lengths are counted
in tokens of the byte tokenizer (one per UTF-8 byte): a prompt of length 1024 is exactly 1024 bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there. "
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"
PASSKEY_DIGITS = 5


def needle(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    passkey: str
    depth: float  # where the needle sits in the filler: 0.0 right after the intro, 1.0 right before the question
    needle_start: int  # token (byte) index of the needle's first token

    @property
    def answer(self) -> str:
        """What a model that retrieved the key generates next (greedy): a space, then the digits."""
        return " " + self.passkey

    def is_retrieved(self, generated: str) -> bool:
        return generated.startswith(self.answer)


def random_passkey(rng: random.Random) -> str:
    return str(rng.randrange(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS))


def passkey_prompt(num_tokens: int, depth: float, passkey: str) -> PasskeyPrompt:
    """A prompt of exactly `num_tokens` byte tokens: intro, filler cut to fit, the needle at `depth`.

    The needle goes on the filler sentence boundary nearest to `depth` of the filler's length, so no
    sentence is split around it; the filler stream is cut at its end to make the length exact.
    """
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool):
        raise TypeError(f"num_tokens must be an int; got {type(num_tokens).__name__}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] (a fraction of the filler); got {depth!r}")
    if len(passkey) != PASSKEY_DIGITS or not passkey.isdigit():
        raise ValueError(f"passkey must be {PASSKEY_DIGITS} decimal digits; got {passkey!r}")
    needle_text = needle(passkey)
    filler_len = num_tokens - len(INTRO) - len(needle_text) - len(QUESTION)
    if filler_len < 0:
        minimum = num_tokens - filler_len
        raise ValueError(f"num_tokens={num_tokens} is too short for the passkey prompt; it needs at least {minimum}")
    filler = (FILLER * (filler_len // len(FILLER) + 1))[:filler_len]
    boundaries = [0] + [i + 2 for i in range(len(filler) - 1) if filler[i : i + 2] == ". "]
    cut = min(boundaries, key=lambda b: (abs(b - depth * filler_len), b))
    text = INTRO + filler[:cut] + needle_text + filler[cut:] + QUESTION
    assert len(text.encode("utf-8")) == num_tokens
    return PasskeyPrompt(text, passkey, depth, len(INTRO) + cut)


def passkey_prompts(num_tokens: int, depths: list[float], samples_per_depth: int, seed: int) -> list[PasskeyPrompt]:
    """`samples_per_depth` prompts at each depth, passkeys drawn from `seed` (same seed, same prompts)."""
    rng = random.Random(seed)
    return [passkey_prompt(num_tokens, depth, random_passkey(rng)) for depth in depths for _ in range(samples_per_depth)]


@dataclass(frozen=True)
class PasskeyAnswers:
    generated: list[str]  # per prompt, the greedy continuation
    hits: list[bool]  # per prompt, whether it starts with the pass key
    cache_bytes: list[int]  # per prompt, the bytes its cache held after the last step (its batch's share)
    kept_entries: list[int]  # per prompt, the KV entries its cache stored after the last step (all layers, heads)


def answer_passkeys(model, prompts: list[PasskeyPrompt], compress=None, batch_size: int = 16) -> PasskeyAnswers:
    """Greedy answers of a HookedModel to `prompts` over a cache compressed by `compress` (None: full cache).

    Prompts of one length share a batch with no padding, so nothing depends on batch neighbours."""
    generated, hits, cache_bytes, kept_entries = [], [], [], []
    new_tokens = len(prompts[0].answer) if prompts else 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        lengths = {len(p.text.encode("utf-8")) for p in batch}
        if len(lengths) != 1:
            raise ValueError(f"a batch of passkey prompts must share one length; got {sorted(lengths)}")
        ids = model.tokenizer([p.text for p in batch], return_tensors="pt")["input_ids"].to(model.device)
        cache = model.new_cache(compress=compress)
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache)
        texts = model.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        generated += texts
        hits += [p.is_retrieved(text) for p, text in zip(batch, texts)]
        cache_bytes += [cache.nbytes // len(batch)] * len(batch)
        kept_entries += cache.kept_counts().sum(dim=(0, 2)).tolist()
    return PasskeyAnswers(generated, hits, cache_bytes, kept_entries)
