"""Train shear's tiny reference LLaMA on the committed corpus and write it to shear/zoo/tiny_llama/.

The tiny model (4 layers, hidden 128, 4 query / 2 kv heads, intermediate 384, a 2048-token
byte-level BPE tokenizer trained here on the same corpus, tied embeddings, ~1.05M parameters)
gives unit tests and ``--quick`` benchmarks a model with *real trained weights* whose perplexity
reacts to pruning, at a cost of milliseconds per forward. Weights are stored as float16
safetensors (~2 MB) and upcast to float32 on load.

Usage:
    python -m tools.train_tiny_llama --steps 1500          # ~10 min on 2 cores

The run is deterministic (seeded); it prints validation perplexity per source at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "shear" / "zoo" / "tiny_llama"
VOCAB = 2048


def train_tokenizer(texts: list[str], out: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from shear.data import TextData, load_corpus

    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    train_text = load_corpus("train", max_chars=600_000)
    tokenizer = train_tokenizer(list(train_text.values()), args.out)
    data = TextData.from_texts(tokenizer, train_text, load_corpus("validation"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    start = time.time()
    model.train()
    for step in range(args.steps):
        ids = data.calibration(args.batch, args.seq + 1, seed=step)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    model.eval()
    ppl = data.perplexity(model, seq_len=args.seq)
    print(json.dumps({k: round(v, 2) for k, v in ppl.items()}))
    model.half().save_pretrained(args.out, safe_serialization=True)
    (args.out / "TRAINING.json").write_text(
        json.dumps(
            {"steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
             "validation_ppl_fp32": {k: round(v, 3) for k, v in ppl.items()},
             "wall_s": round(time.time() - start, 1)},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
