"""Which transformers architectures shear prunes, and how: a coverage table from small configs.

For each architecture a 2-layer model is built from its config (random weights; nothing is
downloaded), traced, pruned at random (``ratio`` of every prunable group), erased and checked:

- which kinds of structure are prunable (residual width, attention heads / GQA families, MLP channels);
- parameters before and after, and what ``erase`` emitted (the model's own class or a GraphModule);
- max |diff| of the logits against the masked model, and whether ``shear.save`` / ``shear.load``
  give back the same logits exactly; the same again with peft LoRA on every linear (skip those rows
  with ``--no-lora``);
- for an architecture with nothing prunable, the first reason the analysis gave.

    python -m tools.arch_coverage                    # every architecture below, Markdown table
    python -m tools.arch_coverage --archs llama phi3 --out coverage.md
    python -m tools.arch_coverage --lorashear        # the whole LoRAShear pipeline per architecture
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "LORASHEAR", "VOCAB", "check", "check_lorashear", "main", "table", "with_lora"]

VOCAB = 128
_GQA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)  # fmt: skip
_MHA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=64)  # fmt: skip
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _hf(config: str, model: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        return getattr(tf, model)(getattr(tf, config)(**kwargs))

    return build


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "llama": _hf("LlamaConfig", "LlamaForCausalLM", **_GQA, **_IDS),
    "mistral": _hf("MistralConfig", "MistralForCausalLM", **_GQA, **_IDS),
    "qwen2": _hf("Qwen2Config", "Qwen2ForCausalLM", **_GQA, **_IDS),
    "qwen3": _hf("Qwen3Config", "Qwen3ForCausalLM", head_dim=16, **_GQA, **_IDS),
    "smollm3": _hf("SmolLM3Config", "SmolLM3ForCausalLM", **_GQA, **_IDS),
    "granite": _hf("GraniteConfig", "GraniteForCausalLM", residual_multiplier=0.5, **_GQA, **_IDS),
    "olmo2": _hf("Olmo2Config", "Olmo2ForCausalLM", **_GQA, **_IDS),
    "gemma": _hf("GemmaConfig", "GemmaForCausalLM", head_dim=16, **_GQA, **_IDS),
    "gemma2": _hf("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, **_GQA, **_IDS),
    "gemma3": _hf("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, **_GQA, **_IDS),
    "phi3": _hf("Phi3Config", "Phi3ForCausalLM", **_GQA, **_IDS),
    "phi": _hf("PhiConfig", "PhiForCausalLM", **_MHA, **_IDS),
    "stablelm": _hf("StableLmConfig", "StableLmForCausalLM", **_GQA, **_IDS),
    "gpt_neox": _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **_MHA, **_IDS),
    "gptj": _hf("GPTJConfig", "GPTJForCausalLM", n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                vocab_size=VOCAB, n_positions=64, **_IDS),
    "gpt2": _hf("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                n_positions=64, **_IDS),
    "opt": _hf("OPTConfig", "OPTForCausalLM", hidden_size=64, ffn_dim=96, num_hidden_layers=2,
               num_attention_heads=4, word_embed_proj_dim=64, vocab_size=VOCAB, max_position_embeddings=64, **_IDS),
    "falcon": _hf("FalconConfig", "FalconForCausalLM", hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, vocab_size=VOCAB, **_IDS),
    "bloom": _hf("BloomConfig", "BloomForCausalLM", hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB, **_IDS),
    "bert": _hf("BertConfig", "BertForMaskedLM", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64),
}  # fmt: skip
"""Architecture -> builder of a small, randomly initialised model from its config."""


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def with_lora(model: nn.Module) -> nn.Module:
    """``model`` with peft LoRA r=4 on every linear, initialised non-zero (``init_lora_weights=False``)
    so the adapters change the logits and a wrong erase of them shows; in eval mode."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, cfg).eval()


def check(arch: str, ratio: float = 0.4, lora: bool = False) -> dict[str, Any]:
    """Trace, prune ``ratio`` at random, erase, verify and round-trip one architecture."""
    import shear

    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().float().eval()
    if lora:
        model = with_lora(model)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    graph = shear.trace(model, inputs)
    prunable = graph.prunable_groups
    kinds = sorted({g.kind for g in prunable})
    row: dict[str, Any] = {"arch": arch, "lora": lora, "kinds": kinds, "groups": len(prunable),
                           "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    if not prunable:
        # the reasons of inner structures (MLP, heads) first: a LayerNorm'd residual is pinned by design
        ordered = sorted(graph.pruning_groups, key=lambda g: g.kind == "residual")
        reasons = [r for g in ordered for r in g.reasons if not r.startswith(("vocabulary", "LoRA rank", "model output"))]
        row.update(after=row["params"], emitted="-", diff=0.0, reload="-", why=reasons[0] if reasons else "")
        return row
    spec = f"discover-groups,random{{ratio={ratio},seed=0}}"
    masked = shear.compile(model, spec, example_inputs=inputs)
    small = shear.compile(model, spec + ",erase", example_inputs=inputs)
    other = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    want = _logits(masked, other)
    got = _logits(small, other)
    with tempfile.TemporaryDirectory() as tmp:
        again = shear.load(shear.save(small, Path(tmp) / "m"))
        reload_ok = torch.equal(_logits(again, other), got)
    row.update(after=sum(p.numel() for p in small.parameters()),
               emitted="GraphModule" if isinstance(small, torch.fx.GraphModule) else "module tree",
               diff=float((want - got).abs().max()), reload="exact" if reload_ok else "DIFFERS", why="")  # fmt: skip
    return row


LORASHEAR = (
    "lora{{r=4}},discover-groups,knowledge-distribution{{max_windows=1,seq_len=64,gamma=0.3}},"
    "lhspg{{ratio={ratio},periods=2,steps_per_period=3,warmup=1,batch_size=2,seq_len=64,lr=0.002}},erase,"
    "recover-dynamic{{stages={stages},max_rounds=1,steps_per_round=2,batch_size=2,seq_len=64,eval_windows=1}},"
    "merge-lora"
)
"""A short LoRAShear pipeline: every pass runs, on budgets that only prove the plumbing."""


def check_lorashear(arch: str, data: Any, ratio: float = 0.03) -> dict[str, Any]:
    """The whole LoRAShear pipeline on one architecture, with the corpus and shear's tiny tokenizer.

    The 2-layer models are mostly embedding, so ``ratio`` is small. Models with learned position
    embeddings (64 here) recover on the corpus only: the instruction prompts are longer.
    """
    import shear
    from shear.codegen.hf_config import max_positions
    from shear.kernels.allocation import base_param_count

    torch.manual_seed(0)
    model = ARCHITECTURES[arch]()
    model.resize_token_embeddings(len(data.tokenizer), mean_resizing=False)
    model = model.float().eval()
    ids = {"input_ids": torch.arange(16).view(1, 16)}
    stages = "pretrain" if max_positions(model) else "pretrain+instruct"
    t0 = time.perf_counter()
    small = shear.compile(model, LORASHEAR.format(ratio=ratio, stages=stages), example_inputs=ids, data=data)
    with tempfile.TemporaryDirectory() as tmp:
        again = shear.load(shear.save(small, Path(tmp) / "m"))
        reload_ok = torch.equal(_logits(again, ids["input_ids"]), _logits(small, ids["input_ids"]))
    return {"arch": arch, "class": type(small).__name__, "stages": stages,
            "removed": 1 - base_param_count(small) / base_param_count(model),
            "verify": small.shear_report.verify_max_diff, "reload": "exact" if reload_ok else "DIFFERS",
            "seconds": time.perf_counter() - t0}  # fmt: skip


def lorashear_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| architecture | result | recovery stages | removed | verified max diff | save/load | s |",
             "|---|---|---|---:|---:|---|---:|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['arch']} | {r['class']} | {r['stages']} | {r['removed']:.1%} | {r['verify']:.1e} | "
                     f"{r['reload']} | {r['seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| architecture | LoRA | prunable kinds | groups | params | after erase | emitted | max diff | save/load | "
             "nothing prunable because |", "|---|---|---|---:|---:|---:|---|---:|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {'yes' if r['lora'] else 'no'} | error | | | | | | | {r['error']} |")
            continue
        lines.append(
            f"| {r['arch']} | {'yes' if r['lora'] else 'no'} | {', '.join(r['kinds']) or '-'} | {r['groups']} | "
            f"{r['params']:,} | {r['after']:,} | {r['emitted']} | {r['diff']:.1e} | {r['reload']} | {r['why']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--no-lora", action="store_true", help="skip the LoRA-wrapped rows")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    ap.add_argument("--lorashear", action="store_true",
                    help="instead, run a short LoRAShear pipeline (KD, LHSPG, erase, recovery, merge) per architecture")
    args = ap.parse_args(argv)
    if args.lorashear:
        from shear.data import TextData
        from shear.zoo import load_tiny_llama

        tokenizer = load_tiny_llama()[1]
        data = TextData.from_corpus(tokenizer, max_train_chars=30_000, max_val_chars=4_000, instructions=32)
        results = []
        for arch in (a for a in args.archs if a != "bert"):  # a causal-LM pipeline
            try:
                results.append(check_lorashear(arch, data))
            except Exception as e:  # noqa: BLE001 - a failing architecture is a row of the table
                results.append({"arch": arch, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        text = lorashear_table(results)
        print(text)
        if args.out:
            args.out.write_text(text)
        return results
    rows = []
    for arch in args.archs:
        for lora in (False,) if args.no_lora else (False, True):
            try:
                rows.append(check(arch, args.ratio, lora))
            except Exception as e:  # one architecture failing is a row of the table, not the end of it
                rows.append({"arch": arch, "lora": lora, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text)
    return rows


if __name__ == "__main__":
    main()
