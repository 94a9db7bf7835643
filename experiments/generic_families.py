"""Which transformers families does the generic path serve exactly? Every model type of the installed
transformers whose causal-LM class routes attention through the attention interface and has no adapter
file here: a tiny random model of each (2 layers, hidden 64, its own config's quirks otherwise), wrapped,
and `interp_cache.verify` run on it -- stepwise and chunked cache vs the uncached forward, left padding,
generate, the original transformers model (eager and SDPA), no-op hooks, compression at full budget.
Writes `results/generic_families.md` and `.json`; the README lists the families that pass.

    python experiments/generic_families.py            # every such family, ~5 min on 2 cores
    python experiments/generic_families.py --quick --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import transformers as tf
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import interp_cache as ic
from interp_cache.adapters.attention_interface import InterfaceRefused, supports_interface
from interp_cache.adapters.registry import families
from interp_cache.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_FAMILIES = ("granite", "starcoder2", "gpt_oss")
SEED = 0

# Size fields under the names transformers configs use; a config gets those it has.
TINY = dict(hidden_size=64, d_model=64, n_embd=64, num_hidden_layers=2, num_layers=2, n_layer=2,
            num_attention_heads=4, n_head=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            ffn_dim=128, n_inner=128, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
            num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=1024,
            vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
            tie_word_embeddings=False)
MAX_PARAMETERS = 20_000_000  # a config this script does not know how to shrink is skipped, not built


def candidate_model_types() -> list[str]:
    """Model types with a causal-LM class on the attention interface and no declared family of their own."""
    declared = {family.model_type for family in families().values()}
    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if model_type in declared or model_type not in CONFIG_MAPPING:
            continue
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:  # a config that cannot be built from defaults is reported by `tiny_config`
            found.append(model_type)
            continue
        if supports_interface(config):
            found.append(model_type)
    return found


def tiny_config(model_type: str):
    config = CONFIG_MAPPING[model_type]()
    fields = {name: value for name, value in TINY.items() if hasattr(config, name)}
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        fields["layer_types"] = (layer_types * 2)[:2] if len(set(layer_types)) == 1 else sorted(set(layer_types))[:2]
    return CONFIG_MAPPING[model_type](**{**config.to_dict(), **fields})


def check(model_type: str) -> dict:
    row = {"model_type": model_type}
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):
            parameters = sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())
        if parameters > MAX_PARAMETERS:
            return row | {"status": "not built", "note": f"the shrunk config still has {parameters:,} parameters"}
        torch.manual_seed(SEED)
        hf_model = tf.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # the tiny config must run in transformers itself before anything is wrapped
            hf_model(input_ids=torch.tensor([[BOS_ID, 65, 66]]))
    except Exception as error:
        return row | {"status": "not built", "note": f"{type(error).__name__}: {str(error)[:160]}"}
    try:
        model = ic.load(hf_model, tokenizer=ByteTokenizer())
    except (InterfaceRefused, ic.UnsupportedArchitectureError) as error:
        return row | {"status": "refused", "note": str(error)[:240]}
    except Exception as error:
        return row | {"status": "error", "note": f"wrapping: {type(error).__name__}: {str(error)[:200]}"}
    try:
        report = ic.verify.verify(model, max_new_tokens=4, name=model_type)
    except Exception as error:
        return row | {"status": "error", "note": f"{type(error).__name__}: {str(error)[:200]}",
                      "trace": traceback.format_exc(limit=3)[-600:]}
    failed = [r for r in report.rows if r.status == "fail"]
    worst = max((r.max_abs_err or 0.0) for r in report.rows if r.max_abs_err is not None)
    return row | {"status": "pass" if not failed else "fail", "max_abs_err": worst,
                  "note": "; ".join(f"{r.check}: {r.max_abs_err:.1e}" for r in failed)}


def markdown(rows: list[dict], seconds: float) -> str:
    counts = {status: sum(r["status"] == status for r in rows) for status in ("pass", "fail", "refused", "error", "not built")}
    lines = [
        "# The generic path over transformers' families",
        "",
        f"`experiments/generic_families.py`, transformers {tf.__version__}, torch {torch.__version__}, float32, "
        f"seed {SEED}, {seconds:.0f} s. Every model type whose causal-LM class uses the attention interface and has "
        "no adapter file, as a tiny random model (2 layers, hidden 64, 4 heads / 2 KV heads, head dim 16, the "
        "config's other defaults kept), wrapped and run through `interp_cache.verify` (cache vs uncached stepwise "
        "and chunked, left padding, generate, the original model under eager and SDPA, no-op hooks, every policy "
        "at full budget). `pass`: every check within 1e-4 (1e-5 against the original); `refused`: the wrap "
        "refused it, saying why; `not built`: the tiny config could not be built or run by transformers itself "
        "(a shrinking this script does not know for that family); `error` / `fail`: a gap of the generic path.",
        "",
        " · ".join(f"{status}: {count}" for status, count in counts.items()),
        "",
        "| model type | status | max abs err | note |",
        "|---|---|---|---|",
    ]
    for r in rows:
        err = "" if r.get("max_abs_err") is None else f"{r['max_abs_err']:.1e}"
        lines.append(f"| {r['model_type']} | {r['status']} | {err} | {r.get('note', '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_FAMILIES)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = [check(model_type) for model_type in (QUICK_FAMILIES if args.quick else candidate_model_types())]
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generic_families.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "generic_families.md").write_text(markdown(rows, seconds))
    print(markdown(rows, seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
