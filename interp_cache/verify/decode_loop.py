"""`verify_decode_loop`: run a user's own decode loop and compare every forward it made with one uncached
forward over the same tokens; on disagreement, localize where the runs part -- the first divergent hook on
a HookedModel, the first divergent (step, layer) on a plain transformers model (`plain_loop.py`)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from interp_cache.models.hooked_model import HookedModel
from interp_cache.verify.localize import first_divergence
from interp_cache.verify.plain_loop import verify_plain_decode_loop
from interp_cache.verify.report import VerifyReport, compare
from interp_cache.verify.runs import TOLERANCES, aligned_logits, extend_mask, prompt_batch


def verify_decode_loop(model, loop_fn, prompts=None, max_new_tokens: int = 16, *, attention_mask=None) -> VerifyReport:
    """Run a user's decode loop and compare every forward it made with one uncached forward.

    `model`: a HookedModel, or a plain transformers model with the user's own cache class and attention
    (nothing of this library runs inside it: module hooks watch it). `loop_fn(model, input_ids,
    attention_mask, max_new_tokens)` calls the model the way transformers models are called, feeding each
    token slot once (a loop around `generate` works too). Each logit row the loop produced is compared with
    the uncached logits at the same token slot; on disagreement the first divergent hook (HookedModel) or
    decoder layer and step (plain model) is localized. Positions must equal the uncached run's exactly, in
    every dtype: a mismatch fails the check even where the logits stay within tolerance (an off-by-one
    position can hide inside a bfloat16 tolerance). `prompts` as for `verify`; a plain model takes ids.
    """
    if not callable(loop_fn):
        raise TypeError(f"loop_fn must be a function (model, input_ids, attention_mask, max_new_tokens); "
                        f"got {type(loop_fn).__name__}")
    if not isinstance(model, (HookedModel, PreTrainedModel)):
        raise TypeError(f"model must be a HookedModel or a transformers PreTrainedModel; got {type(model).__name__}")
    if model.dtype not in TOLERANCES:
        raise TypeError(f"verification has tolerances for {', '.join(map(str, TOLERANCES))}; "
                        f"the model is {model.dtype}")
    tolerance = TOLERANCES[model.dtype]["cache"]
    input_ids, attention_mask = prompt_batch(model, prompts, attention_mask)
    if isinstance(model, PreTrainedModel):
        if model.training:
            raise ValueError("the model is in training mode: dropout makes every forward differ; call model.eval()")
        return verify_plain_decode_loop(model, loop_fn, input_ids, attention_mask, max_new_tokens, tolerance)
    fed_pieces, logit_pieces = [], []

    def capture_inputs(module, args, kwargs):
        fed_pieces.append(kwargs["input_ids"] if "input_ids" in kwargs else args[0])

    def capture_logits(module, args, output):
        logit_pieces.append(None if output is None else output.logits.detach())

    handles = [model.hf_model.register_forward_pre_hook(capture_inputs, with_kwargs=True),
               model.hf_model.register_forward_hook(capture_logits)]
    try:
        with torch.no_grad(), model.record() as test:
            loop_fn(model, input_ids, attention_mask, max_new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    if not fed_pieces:
        raise ValueError("the decode loop never called the model")
    fed = torch.cat(fed_pieces, dim=1)
    got, scored = aligned_logits([(ids.shape[1], logits) for ids, logits in zip(fed_pieces, logit_pieces)],
                                 fed.shape[1])
    fed_mask = extend_mask(attention_mask, fed.shape[1])
    with torch.no_grad(), model.record() as reference:
        expected = model(fed, attention_mask=fed_mask).logits
    row = compare("decode_loop", got, expected, fed_mask.bool() & scored, tolerance)
    wrong_position = first_divergence(test, reference, tolerance, integers_only=True)
    if wrong_position is not None:
        row.passed, row.first_divergence = False, wrong_position
        row.note = (f"{wrong_position.hook} differs from the uncached run at step {wrong_position.step}, row "
                    f"{wrong_position.row}, position {wrong_position.position} (integer values compare exactly)")
    elif not row.passed:
        row.first_divergence = first_divergence(test, reference, tolerance) or row.first_divergence
    report = VerifyReport(f"{model.family} decode loop", str(model.dtype).replace("torch.", ""))
    report.rows.append(row)
    return report
