"""Run inside nnsight's own environment (`nnsight_env.py` builds it): greedy generate on the benchmark's saved
weights, plain and under nnsight, idle and recording the 24 attention activations interp_cache's benchmark
records (q, k, v, scores, pattern, z of every layer at every step). Prints one JSON line.

What a user of nnsight writes: `LanguageModel(...)` with eager attention (SDPA returns no pattern), a
`generate` trace iterating over the steps (`tracer.iter[:n]`), module outputs for q/k/v (projection outputs)
and the pattern (the attention module's second output), the o-projection's input for z, and `.source` for
the pre-softmax scores (the softmax's input inside the eager attention function). Saved values are
`.detach().cpu()`'d into a list, as the TransformerLens bridge peer does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import nnsight  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from nnsight import LanguageModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def byte_tokenizer(repo_tokenizer: str):
    """interp_cache's byte tokenizer, loaded from its file alone (the package is not installed here)."""
    spec = importlib.util.spec_from_file_location("byte_tokenizer", repo_tokenizer)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ByteTokenizer()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("weights")
    parser.add_argument("--tokenizer-file", required=True)
    parser.add_argument("--settings", required=True, help="prompt x batch, comma separated: 256x1,2048x8")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    plain = AutoModelForCausalLM.from_pretrained(args.weights, dtype=torch.float32).eval()  # SDPA, as the baseline
    lm = LanguageModel(args.weights, tokenizer=byte_tokenizer(args.tokenizer_file), dispatch=True,
                       attn_implementation="eager", dtype=torch.float32)
    lm._module.eval()
    layers = lm.model.layers
    num_layers = len(layers)
    # `.source` instruments a function the first time it is touched; touched first inside a generate trace,
    # later requests in that step fail as out of order. One throwaway trace does it.
    with torch.inference_mode(), lm.trace(torch.tensor([[3, 4, 5]])):
        for layer in range(num_layers):
            layers[layer].self_attn.source.attention_interface_1.source.nn_functional_softmax_0.input  # noqa: B018

    def plain_generate(ids, n):
        with torch.inference_mode():
            plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=256)

    def nnsight_idle(ids, n):
        with torch.inference_mode():
            lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=256)

    def nnsight_recording(ids, n) -> int:
        with torch.inference_mode():
            with lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=256) as tracer:
                saved = list().save()
                for _ in tracer.iter[:n]:
                    for layer in range(num_layers):
                        attention = layers[layer].self_attn  # requests in execution order, or nnsight refuses
                        saved.append(attention.q_proj.output.detach().cpu())
                        saved.append(attention.k_proj.output.detach().cpu())
                        saved.append(attention.v_proj.output.detach().cpu())
                        eager = attention.source.attention_interface_1.source
                        saved.append(eager.nn_functional_softmax_0.input.detach().cpu())
                        saved.append(attention.o_proj.input.detach().cpu())  # z, heads flattened
                        saved.append(attention.output[1].detach().cpu())  # pattern (eager attention's weights)
        return len(saved)

    results = {"nnsight": nnsight.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
               "settings": []}
    for setting in args.settings.split(","):
        tokens, batch = (int(x) for x in setting.split("x"))
        ids = torch.randint(3, 251, (batch, tokens), generator=torch.Generator().manual_seed(0))
        calls = [0]
        variants = {
            "transformers generate": lambda: plain_generate(ids, args.new),
            "nnsight idle": lambda: nnsight_idle(ids, args.new),
            "nnsight attention 24": lambda: calls.__setitem__(0, nnsight_recording(ids, args.new)),
        }
        for run in variants.values():  # warm-up
            run()
        seconds = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
        results["settings"].append({"prompt": tokens, "batch": batch, "seconds": seconds, "calls": calls[0]})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
