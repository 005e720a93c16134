"""Run shear's GGUF export in llama.cpp and compare it with the PyTorch model it came from.

For each model (SmolLM2-135M-Instruct pruned by a short LoRAShear run with per-layer widths,
optionally rounded to multiples of 32, or with the same widths in every layer, and dense) this exports a GGUF file, runs it in llama.cpp
(``tools/llama_cpp_client.py`` in the interpreter given by ``--client-python``, whose environment
has ``llama-cpp-python``; not a shear dependency) and compares on held-out text of shear's corpus:

* next-token logits at every position: max |diff| relative to the largest |logit| (f16 weights
  and llama.cpp's f16 KV cache put it near 1e-3), and how often the argmax agrees;
* the greedy continuation of a prompt (``--new`` tokens), token by token, and where they part,
  shear's logit margin between its token and llama.cpp's (a near tie that f16 rounding flips);
* the tokenizer: llama.cpp's ids for a held-out passage against transformers';
* file size and llama.cpp's greedy decoding speed (tokens/s on ``--threads`` threads);
* with ``--quantize Q4_K_M``: llama.cpp's own quantizer on the exported file, its size,
  perplexity on the held-out tokens against the f16 file's, and its greedy continuation.

Pruned models are saved under ``--out`` and reused by the next run. The pruned models keep their
LoRA adapters unmerged, so the export folds them in (``merge_lora=True``) and the comparison
checks that too. The uniform model, merged, is also saved with ``save_pretrained`` and reloaded
with a plain ``AutoModelForCausalLM.from_pretrained``.

Runtime: 13 to 22 minutes per pruned model on a loaded, shared 2-core CPU (the LoRAShear prune;
the export and each llama.cpp check take under a minute). Example::

    python -m tools.gguf_check --client-python /path/to/llamacpp-venv/bin/python --out /tmp/gguf-check
    python -m tools.gguf_check --models uniform --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_LHSPG = "lhspg{ratio=0.2,periods=2,steps_per_period=3,warmup=1,seq_len=64,batch_size=2,calibration=2"
PIPELINES = {
    "dense": "",
    "nonuniform": f"lora,discover-groups,{_LHSPG},selection=global}},erase",
    "nonuniform32": f"lora,discover-groups,{_LHSPG},selection=global,round_to=32}},erase",
    "uniform": f"lora,discover-groups,{_LHSPG},selection=shared}},erase",
    "default": f"lora,discover-groups,{_LHSPG}}},erase",
}
"""Short LoRAShear runs (20% of the parameters): ``global`` selection gives every layer its own
widths (``round_to=32``: multiples of 32, which llama.cpp's quantizer blocks), ``shared`` the same
widths in every layer (stock transformers loads it); ``default`` leaves widths and layout to the
run's target (``shear.compile``'s default ``target="auto"``)."""
CLIENT = Path(__file__).resolve().with_name("llama_cpp_client.py")


def widths(model: Any) -> dict[str, list[int]]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.model.layers
    hd = layers[0].self_attn.head_dim

    def rows(m: Any) -> int:
        while hasattr(m, "base_layer"):
            m = m.base_layer
        return int(m.weight.shape[0])

    return {
        "heads": [rows(layer.self_attn.q_proj) // hd for layer in layers],
        "kv_heads": [rows(layer.self_attn.k_proj) // hd for layer in layers],
        "ffn": [rows(layer.mlp.gate_proj) for layer in layers],
        "hidden": [int(base.model.embed_tokens.weight.shape[1])],
    }


def run_client(python: str, request: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run the llama.cpp side in ``python`` (its own environment) and read its answer."""
    req, ans = workdir / "request.json", workdir / "answer.json"
    req.write_text(json.dumps(request))
    done = subprocess.run(
        [python, str(CLIENT), str(req), str(ans)], capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp client failed:\n{done.stderr[-3000:]}")
    answer = json.loads(ans.read_text())
    answer["logits"] = np.load(answer["logits"])
    return answer


def greedy_ids(model: Any, ids: list[int], n: int) -> list[int]:
    """``n`` argmax tokens after ``ids``, as the llama.cpp side decodes (no eos or length rules of
    ``generate``: its min_new_tokens masks eos, which llama.cpp's loop does not)."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean next-token cross-entropy of ``ids`` under ``logits`` (float64)."""
    x = logits[:-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def reload_plain(model: Any, folder: Path, ids: list[int]) -> float:
    """Max |diff| of logits after save_pretrained and a plain from_pretrained (uniform widths only)."""
    import torch
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    again = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        return float((again(x).logits - model(x).logits).abs().max())


def check(kind: str, model: Any, tokenizer: Any, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import shear

    out = Path(args.out)
    saved = out / f"smollm2-{kind}"
    t0 = time.perf_counter()
    if kind == "dense":
        small = model
    elif (saved / "shear.json").is_file():  # pruned by an earlier run
        small = shear.load(saved).eval()
    else:
        small = shear.compile(model, PIPELINES[kind], data=data).eval()
        shear.save(small, saved)
    prune_s = time.perf_counter() - t0
    path = out / f"smollm2-{kind}-{args.dtype}.gguf"
    has_lora = hasattr(small, "peft_config")
    t0 = time.perf_counter()
    shear.export(small, path, tokenizer=tokenizer, dtype=args.dtype, merge_lora=has_lora, force=True)
    export_s = time.perf_counter() - t0
    reference = small.merge_and_unload().eval() if has_lora else small

    ids = [int(i) for i in data.validation[args.source][: args.tokens]]
    prompt = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(data.validation[args.source][:300])
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].float().numpy()
    cont = greedy_ids(reference, prompt, args.new)
    with tempfile.TemporaryDirectory() as tmp:
        request = {"gguf": str(path), "logits_ids": ids, "prompt_ids": prompt, "new": args.new, "text": text,
                   "threads": args.threads}  # fmt: skip
        got = run_client(args.client_python, request, Path(tmp))
        plain = reload_plain(reference, Path(tmp) / "hf", ids) if kind == "uniform" else None
        quant = None
        if args.quantize:
            qpath = out / f"smollm2-{kind}-{args.quantize}.gguf"
            q = run_client(args.client_python, {**request, "quantize": {"out": str(qpath), "ftype": args.quantize}},
                           Path(tmp))  # fmt: skip
            quant = {
                "ftype": args.quantize,
                "file": qpath.name,
                "file_mib": round(qpath.stat().st_size / 2**20, 2),
                "perplexity": perplexity(q["logits"], ids),
                "greedy": tokenizer.decode(q["greedy"]),
                "tokens_per_s": round(args.new / q["greedy_s"], 1),
            }
    diff = np.abs(got["logits"] - want)
    prefix = next(
        (i for i, (a, b) in enumerate(zip(got["greedy"], cont)) if a != b), min(len(cont), len(got["greedy"]))
    )
    margin = None
    if prefix < min(
        len(cont), len(got["greedy"])
    ):  # how close shear's own choice was at the first difference
        with torch.no_grad():
            last = reference(torch.tensor([prompt + cont[:prefix]])).logits[0, -1]
        margin = float(last[cont[prefix]] - last[got["greedy"][prefix]])
    import gguf

    return {
        "model": kind,
        "pipeline": PIPELINES[kind],
        "widths": widths(small),
        "params": sum(p.numel() for p in reference.parameters()),
        "prune_s": round(prune_s, 1),
        "export_s": round(export_s, 1),
        "gguf": path.name,
        "arch": str(gguf.GGUFReader(str(path)).fields["general.architecture"].contents()),
        "file_mib": round(path.stat().st_size / 2**20, 2),
        "dtype": args.dtype,
        "client": got["client"],
        "tokens": len(ids),
        "max_abs_diff": float(diff.max()),
        "max_abs_logit": float(np.abs(want).max()),
        "max_rel_diff": float(diff.max() / np.abs(want).max()),
        "argmax_agreement": float((got["logits"].argmax(-1) == want.argmax(-1)).mean()),
        "greedy_same": got["greedy"] == cont,
        "greedy_common_prefix": prefix,
        "greedy_divergence_margin": margin,
        "greedy_llama_cpp": tokenizer.decode(got["greedy"]),
        "greedy_shear": tokenizer.decode(cont),
        "tokenizer_same": got["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"],
        "llama_cpp_tokens_per_s": round(args.new / got["greedy_s"], 1),
        "threads": args.threads,
        "load_average": round(os.getloadavg()[0], 1),
        "from_pretrained_max_abs_diff": plain,
        "perplexity_shear": perplexity(want, ids),
        "perplexity_llama_cpp": perplexity(got["logits"], ids),
        "quantized": quant,
    }


def speed_table(results: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Prompt-evaluation and generation tokens/s of every quantized file in llama.cpp, the files taken
    in turn for ``--speed-rounds`` rounds (so load changes hit them alike); per pruned model the
    speed-up over dense, the ideal one (dense params / pruned params), their ratio (efficiency) and
    the file size against ``dense file x pruned params / dense params``."""
    import statistics

    files = {r["model"]: r for r in results if r.get("quantized")}
    if "dense" not in files:
        raise SystemExit("--speed needs the dense model among --models and --quantize")
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in files}
    ids = list(range(1000, 1000 + args.speed_prompt))
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.speed_rounds):
            for kind, r in files.items():
                request = {"gguf": str(Path(args.out) / r["quantized"]["file"]), "logits_ids": ids, "prompt_ids": [],
                           "new": args.new, "threads": args.threads,
                           "speed": {"prompt": args.speed_prompt, "new": args.new, "repeats": 3}}  # fmt: skip
                req, ans = Path(tmp) / "request.json", Path(tmp) / "answer.json"
                req.write_text(json.dumps(request))
                subprocess.run([args.client_python, str(CLIENT), str(req), str(ans)], check=True, timeout=1800)
                runs[kind].append(json.loads(ans.read_text())["speed"])
    dense = files["dense"]
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("prompt_tok_s", "gen_tok_s")} for k, v in runs.items()}
    rows = []
    print(f"\n{args.quantize} in llama.cpp, {args.threads} threads, load average {os.getloadavg()[0]:.1f}, "
          f"medians of {args.speed_rounds} rounds x 3")
    print(f"{'model':<12}{'params':>13}{'ideal x':>9}{'MiB':>8}{'size/ideal':>11}"
          f"{'prompt tok/s':>14}{'eff':>6}{'gen tok/s':>11}{'eff':>6}")
    for kind, r in files.items():
        ideal = dense["params"] / r["params"]
        size = r["quantized"]["file_mib"] / (dense["quantized"]["file_mib"] / ideal)
        eff = {m: med[kind][m] / med["dense"][m] / ideal for m in ("prompt_tok_s", "gen_tok_s")}
        print(f"{kind:<12}{r['params']:>13,}{ideal:>9.3f}{r['quantized']['file_mib']:>8.1f}{size:>11.3f}"
              f"{med[kind]['prompt_tok_s']:>14.1f}{eff['prompt_tok_s']:>6.2f}{med[kind]['gen_tok_s']:>11.1f}"
              f"{eff['gen_tok_s']:>6.2f}")
        rows.append({"model": kind, "ideal": ideal, "file_mib": r["quantized"]["file_mib"], "size_vs_ideal": size,
                     **med[kind], "prompt_eff": eff["prompt_tok_s"], "gen_eff": eff["gen_tok_s"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["nonuniform", "uniform", "dense"], choices=sorted(PIPELINES)
    )
    parser.add_argument("--dtype", default="f16", choices=["f16", "bf16", "f32"])
    parser.add_argument("--client-python", default=sys.executable,
                        help="interpreter whose environment has llama-cpp-python (default: this one)")  # fmt: skip
    parser.add_argument("--out", default="/tmp/gguf-check", help="folder for the .gguf files and report.json")
    parser.add_argument("--source", default="shakespeare", help="held-out corpus source for the logits")
    parser.add_argument("--tokens", type=int, default=256, help="held-out tokens compared")
    parser.add_argument("--new", type=int, default=32, help="greedy tokens generated")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--quantize", default="", help="also quantize with llama.cpp, e.g. Q4_K_M, and compare"
    )
    parser.add_argument("--speed", action="store_true",
                        help="with --quantize: time every quantized file in llama.cpp, in turn, and print the table")
    parser.add_argument("--speed-rounds", type=int, default=3, help="rounds over the files for --speed")
    parser.add_argument("--speed-prompt", type=int, default=128, help="prompt tokens timed by --speed")
    args = parser.parse_args(argv)

    import torch

    from shear.data import TextData
    from shear.zoo import load_smollm2

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model, tokenizer, _, _ = load_smollm2()
    data = TextData.from_corpus(tokenizer, max_train_chars=100_000, instructions=64)
    results = []
    for kind in args.models:
        r = check(kind, model, tokenizer, data, args)
        results.append(r)
        print(json.dumps(r), flush=True)
        (Path(args.out) / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.speed:
        speed = speed_table(results, args)
        (Path(args.out) / "speed.json").write_text(json.dumps(speed, indent=1) + "\n")
    ok = all(r["max_rel_diff"] < 1e-2 and r["argmax_agreement"] > 0.95 for r in results)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
