"""Train the retrieval models shipped in the package: `zoo:needle` (llama-style: rotary, GQA 8/2) and
`zoo:needle-alibi` (Bloom-style: ALiBi), byte tokenizer, on 2 CPU cores (each under 30 minutes; the
times are in each model's `training.json`).

    python experiments/train_needle.py --model needle     # one of them
    python experiments/train_needle.py                    # both
    python experiments/train_needle.py --quick --out /tmp/x   # a few steps, to check the script (tests)
    python experiments/train_needle.py --resume --model needle  # continue the shipped checkpoint's phases

Three tasks, one batch mixes them:
* passkey retrieval in the standard wording (`interp_cache.tasks.passkey`), needle at a uniform depth;
* multi-key associative recall: `Code abc is 1234.` lines among filler, then `What is code abc? Code abc is`
  questions -- the answer needs the three-letter name matched, a different head than the passkey's;
* copying a random repeated string, which is what makes induction heads form early (measured: without it
  the mixture sat at chance for 1,300 steps; with it the copy loss falls from step ~700);
* a fixed trigram language, in the ALiBi model's copy phase only: under ALiBi, copying alone sat at chance
  for 3,000 steps (no position tells a head which token came just before); with half the rows needing the
  previous token (weighted fully, length 128) induction formed at step ~1,500 (313 s). Weighted half at
  lengths 96-160 it had not formed by step 2,700.
Training runs in phases: short copies first (where the induction circuit forms cheaply), then all
three tasks at moderate lengths, then at full length, then hard needles (far from the question, keys with
a doubled digit) with a fresh optimizer -- so `--resume` can add them to a checkpoint of the first three.
The loss weighs answer tokens 1 and the rest 0.02 (the filler is learned at once and would otherwise drown
the retrieval signal).

Deterministic from `--seed` with the same torch build and thread count: the data come from one
`random.Random(seed)`, the weights from `torch.manual_seed(seed)`. The ALiBi model is trained on prompts
of at most 2000 tokens and tested at 2048, 3072 and 4096 in the study to measure how far ALiBi
extrapolates (the rotary model, trained to 1300, at 1536 and beyond).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf

from interp_cache.models.hooked_model import HookedModel
from interp_cache.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer
from interp_cache.models.trained import TRAINED_DIR
from interp_cache.tasks.passkey import FILLER, PASSKEY_DIGITS, passkey_prompt, random_passkey

ANSWER_WEIGHT, CONTEXT_WEIGHT = 1.0, 0.02
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Phase:
    steps: int
    lengths: tuple[int, int]  # sequence lengths drawn uniformly from this range (tokens)
    tokens_per_step: int
    task_mix: tuple[float, float, float, float]  # passkey, recall, copy, trigram
    peak_lr: float
    # The copy phase holds its learning rate and ends once induction has formed (the answer loss over the
    # last 20 steps below this), at most after `steps`: the step at which induction forms varies with the
    # seed (measured 700-1300), a fixed count either wastes time or stops short. Still deterministic.
    until_answer_nll: float | None = None
    # Passkey rows only: the share whose needle sits in the first tenth of the filler (else its depth is
    # uniform), and the share whose key repeats a digit (`53377`). The two misses of the three-phase models
    # were exactly these: the needle furthest from the question, and a doubled digit dropped.
    near_start_share: float = 0.0
    repeated_digit_share: float = 0.0
    fresh_optimizer: bool = False  # a new AdamW here, so `--resume` from the shipped phases is the same run


@dataclass(frozen=True)
class Recipe:
    description: str
    config: tf.PretrainedConfig
    phases: tuple[Phase, ...]
    attn_implementation: str
    # Bloom has no SDPA in transformers: its eager attention materialises the ALiBi-biased score matrix and
    # took 2.9 s a step where the hooked model's attention core -- the same function, max |logit diff|
    # 1.2e-6 -- takes 1.5 s. Training runs through it and the plain transformers model is saved.
    through_hooked_model: bool = False


def recipes() -> dict[str, Recipe]:
    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                  tie_word_embeddings=True)
    llama = tf.LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, **common)
    bloom = tf.BloomConfig(hidden_size=128, n_layer=4, n_head=8, **common)
    copy = Phase(3000, (64, 192), 2048, (0.0, 0.0, 1.0, 0.0), 3e-3, until_answer_nll=0.5)
    mid = Phase(800, (250, 512), 4096, (0.5, 0.3, 0.2, 0.0), 2e-3)
    # ALiBi gives no head a clean view of the previous token, and copying alone did not form induction in
    # 3,000 steps: its copy phase mixes in the trigram language, which needs that view at every position.
    copy_with_trigrams = replace(copy, lengths=(128, 128), task_mix=(0.0, 0.0, 0.5, 0.5))
    # The three phases left the needle furthest from the question 90% found (depth 0 at 1024 tokens on the
    # rotary model, 2048 on ALiBi) and dropped a doubled final digit at 256 tokens: hard-needle phases draw
    # half their needles from the first tenth and half their keys with a repeated digit. On the rotary model
    # short prompts must come before long ones (measured: short after long lost depth 0 at 1024 again).
    def hard_needles(steps: int, lengths: tuple[int, int], fresh_optimizer: bool = True) -> Phase:
        return Phase(steps, lengths, 8192, (0.8, 0.1, 0.1, 0.0), 5e-4, near_start_share=0.5,
                     repeated_digit_share=0.5, fresh_optimizer=fresh_optimizer)

    return {
        "needle": Recipe(
            "llama-style (rotary, GQA 8 query / 2 KV heads, 4 layers, d=128) trained on passkey retrieval "
            "and associative recall, prompts up to 1300 tokens",
            llama, (copy, mid, Phase(700, (600, 1300), 8192, (0.6, 0.25, 0.15, 0.0), 1e-3),
                    hard_needles(100, (250, 600)), hard_needles(300, (600, 1300), fresh_optimizer=False)),
            "sdpa"),
        "needle-alibi": Recipe(
            "Bloom-style (ALiBi, 8 heads, 4 layers, d=128) trained on passkey retrieval and associative "
            "recall, prompts up to 2000 tokens (tested to 2048 and beyond)",
            bloom, (copy_with_trigrams, replace(mid, steps=400),
                    Phase(550, (600, 2000), 8192, (0.6, 0.25, 0.15, 0.0), 1e-3), hard_needles(60, (600, 2000))),
            "eager",
            through_hooked_model=True),
    }


# -- the three tasks: token ids and a loss weight per token ---------------------------------------------
def _encode(text: str, weight: float) -> tuple[list[int], list[float]]:
    ids = list(text.encode("utf-8"))
    return ids, [weight] * len(ids)


def passkey_sample(rng: random.Random, length: int, phase: Phase):
    depth = rng.random()
    if phase.near_start_share and rng.random() < phase.near_start_share:  # no draw where unused: same data
        depth *= 0.1
    passkey = random_passkey(rng)
    if phase.repeated_digit_share and rng.random() < phase.repeated_digit_share:
        doubled = rng.randrange(1, PASSKEY_DIGITS)
        passkey = passkey[:doubled] + passkey[doubled - 1] + passkey[doubled + 1:]
    prompt = passkey_prompt(length, depth, passkey)
    ids, weights = _encode(prompt.text, CONTEXT_WEIGHT)
    answer_ids, answer_weights = _encode(prompt.answer + ".", ANSWER_WEIGHT)
    # the key's second mention is copyable from its first: a short-range lesson in the same skill
    second = prompt.needle_start + prompt.text[prompt.needle_start:].index(prompt.passkey + " is the")
    for i in range(second, second + len(prompt.passkey)):
        weights[i] = ANSWER_WEIGHT / 2
    return ids + answer_ids, weights + answer_weights


def recall_sample(rng: random.Random, length: int, phase: Phase):
    ids, weights = _encode("Remember the codes. ", CONTEXT_WEIGHT)
    codes: dict[str, str] = {}
    while len(ids) < 0.6 * length or not codes:
        name = "".join(rng.choice(LETTERS) for _ in range(3))
        if name in codes:
            continue
        codes[name] = str(rng.randrange(1000, 10000))
        text = f"Code {name} is {codes[name]}. "
        if rng.random() < 0.5:
            text += FILLER[: rng.randrange(len(FILLER))].rsplit(" ", 1)[0] + " "
        more = _encode(text, CONTEXT_WEIGHT)
        ids, weights = ids + more[0], weights + more[1]
    names = list(codes)
    while len(ids) < length:
        name = rng.choice(names)
        for text, weight in ((f"What is code {name}? Code {name} is", CONTEXT_WEIGHT),
                             (f" {codes[name]}", ANSWER_WEIGHT), (". ", CONTEXT_WEIGHT)):
            more = _encode(text, weight)
            ids, weights = ids + more[0], weights + more[1]
    return ids[:length], weights[:length]


def trigram_sample(rng: random.Random, length: int, phase: Phase):
    """A fixed trigram language (next byte = a fixed function of the two before, 80% of the time) over a
    six-letter alphabet per sequence: predicting it needs the previous token at every position, which is
    what lets induction form under ALiBi. (The copy phase's stopping rule reads the copy rows only.)"""
    alphabet = [rng.randrange(32, 127) for _ in range(6)]
    ids = [rng.choice(alphabet), rng.choice(alphabet)]
    while len(ids) < length:
        ids.append(TRIGRAM[ids[-2]][ids[-1]] if rng.random() < 0.8 else rng.choice(alphabet))
    return ids, [CONTEXT_WEIGHT] * 2 + [ANSWER_WEIGHT] * (length - 2)


def copy_sample(rng: random.Random, length: int, phase: Phase):
    prefix = [rng.randrange(32, 127) for _ in range(rng.randrange(0, 32))]
    segment = [rng.randrange(32, 127) for _ in range(rng.randrange(8, 48))]
    repeats = math.ceil((length - len(prefix)) / len(segment))
    ids = (prefix + segment * repeats)[:length]
    first_copy = len(prefix) + len(segment)
    weights = [CONTEXT_WEIGHT] * first_copy + [ANSWER_WEIGHT] * (len(ids) - first_copy)
    return ids, weights[:length]


TASKS = (passkey_sample, recall_sample, copy_sample, trigram_sample)
_trigram_rng = random.Random(1)  # the language itself is fixed, not drawn from the training seed
TRIGRAM = [[_trigram_rng.randrange(32, 127) for _ in range(256)] for _ in range(256)]


def make_batch(rng: random.Random, phase: Phase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids and loss weights `[rows, width]`, and which rows are copies (the copy phase's stopping rule)."""
    length = rng.randint(*phase.lengths)
    rows = max(2, phase.tokens_per_step // length)
    samples, copy_rows = [], []
    for _ in range(rows):
        task = rng.choices(TASKS, weights=phase.task_mix)[0]
        if task is passkey_sample and length < 250:
            task = recall_sample
        samples.append(task(rng, length, phase))
        copy_rows.append(task is copy_sample)
    width = max(len(ids) for ids, _ in samples)
    ids = torch.full((rows, width), PAD_ID)
    weights = torch.zeros(rows, width)
    for row, (sample_ids, sample_weights) in enumerate(samples):  # right-padded, padding weighs 0
        ids[row, : len(sample_ids)] = torch.tensor(sample_ids)
        weights[row, : len(sample_weights)] = torch.tensor(sample_weights)
    return ids, weights, torch.tensor(copy_rows)


def _phases_done(recipe: Recipe, resume: Path) -> tuple[list[dict], float]:
    """The phases a checkpoint's `training.json` records, checked against the recipe's, and their seconds."""
    record = json.loads((resume / "training.json").read_text())
    done = record["phases"]
    if len(done) >= len(recipe.phases) or not recipe.phases[len(done)].fresh_optimizer:
        raise ValueError(f"{resume} ran {len(done)} of {len(recipe.phases)} phases; --resume continues only "
                         f"into a phase that starts a fresh optimizer")
    for ran, phase in zip(done, recipe.phases):
        recorded = Phase(**{key: tuple(value) if isinstance(value, list) else value for key, value in ran.items()})
        if replace(recorded, steps=phase.steps) != phase:  # a record from before a field existed has its default
            raise ValueError(f"{resume} ran phase {ran}, which is not the recipe's {phase}")
    return done, record["train_seconds"]


def train(name: str, recipe: Recipe, seed: int, out_dir: Path, scale_steps: float = 1.0, log=print,
          resume: Path | None = None) -> dict:
    """Train `recipe` from `seed`; `resume`: a checkpoint of this recipe's first phases (its own
    `training.json` says which), continued into the next -- the data drawn for the phases it ran are drawn
    again and dropped, so the run equals one from scratch."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    phases_run, seconds_before = [], 0.0
    if resume is None:
        model = tf.AutoModelForCausalLM.from_config(recipe.config, attn_implementation=recipe.attn_implementation)
    else:
        phases_run, seconds_before = _phases_done(recipe, resume)
        model = tf.AutoModelForCausalLM.from_pretrained(resume, attn_implementation=recipe.attn_implementation)
        for ran, phase in zip(phases_run, recipe.phases):
            for _ in range(ran["steps"]):
                make_batch(rng, phase)
    model.train()
    forward = HookedModel(model, tokenizer=ByteTokenizer()) if recipe.through_hooked_model else model
    started = time.perf_counter()
    history, copy_history = [], []
    for phase_index, phase in enumerate(recipe.phases):
        if phase_index < len(phases_run):
            continue
        if phase_index == 0 or phase.fresh_optimizer:
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.98), weight_decay=0.01)
        steps = max(1, round(phase.steps * scale_steps))
        warmup = max(1, min(100, steps // 12))
        for step in range(steps):
            decay = 1.0 if phase.until_answer_nll else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = phase.peak_lr * min(1.0, (step + 1) / warmup) * decay
            ids, weights, copy_rows = make_batch(rng, phase)
            logits = forward(input_ids=ids).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            target_weights = weights[:, 1:].reshape(-1)
            loss = (nll * target_weights).sum() / target_weights.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            answers = target_weights == ANSWER_WEIGHT
            answer_nll = nll.detach()[answers].mean().item()
            history.append(answer_nll)
            copy_answers = answers & copy_rows[:, None].expand_as(weights[:, 1:]).reshape(-1)
            copy_history.append(nll.detach()[copy_answers].mean().item() if bool(copy_answers.any()) else math.inf)
            done = phase.until_answer_nll is not None and step >= 20 and (
                sum(copy_history[-20:]) / 20 < phase.until_answer_nll)
            if step % 100 == 0 or step == steps - 1 or done:
                log(f"{name} phase {phase_index + 1} step {step}/{steps} length {ids.shape[1]} loss {loss.item():.3f} "
                    f"answer nll {answer_nll:.3f} copy nll {copy_history[-1]:.3f} ({time.perf_counter() - started:.0f}s)")
            if done:
                break
        phases_run.append(vars(phase) | {"steps": step + 1})
    if forward is not model:
        forward.unwrap()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    record = {
        "description": recipe.description,
        "seed": seed,
        "phases": phases_run,
        "train_seconds": round(seconds_before + time.perf_counter() - started, 1),
        "final_answer_nll": round(sum(history[-50:]) / len(history[-50:]), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(recipes()), action="append", help="default: both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=TRAINED_DIR, help="parent folder of the checkpoints")
    parser.add_argument("--quick", action="store_true", help="1%% of the steps: checks the script, trains nothing useful")
    parser.add_argument("--resume", action="store_true",
                        help="continue the checkpoint in --out from the phases its training.json records")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.model or list(recipes()):
        record = train(name, recipes()[name], args.seed, args.out / name, scale_steps=0.01 if args.quick else 1.0,
                       resume=args.out / name if args.resume else None)
        print(f"{name}: {record['train_seconds']}s, final answer nll {record['final_answer_nll']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
