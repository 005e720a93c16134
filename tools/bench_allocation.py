"""How the per-layer allocation of an MLP cut moves quality, before any training (SmolLM2-135M).

One shot, no training: the lowest Wanda-style activation scores (``‖W ⊙ ‖X‖‖`` per channel, gate and
up rows and the down column, on 8 x 256 calibration tokens, LHSPG's default criterion) are zeroed in
every MLP, with per-layer counts from an allocation that removes the same total. The layers'
sensitivities are measured as knowledge distribution measures them (half of one MLP's channels
zeroed, pooled in-domain perplexity on the passes' 8 x 128-token windows), so the rows can protect
the most sensitive ones:

* ``uniform``: the same count in every layer (the LLM-Pruner-style baseline's allocation);
* ``top k whole``: the k most sensitive MLPs keep every channel, the others share the cut
  (``knowledge-distribution`` + ``lhspg{protect_cap=inf}``: the paper);
* ``top k, cap 1.5``: they keep 1.5x the others' kept share (``lhspg{protect_cap=1.5}``, the default).

Perplexity is scored as ``python -m tools.bench_quality --ablation`` scores it (in-domain after the passes'
text; out-of-domain on the Debian texts). Prints a Markdown table.

Usage:
    OMP_NUM_THREADS=1 python -m tools.bench_allocation --shares 0.2 0.5 --top 1 3 6 --out alloc.md   # ~25 min
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from shear.kernels.allocation import base_param_count
from tools.bench_quality import PASS_TOKENS, ood_windows

__all__ = ["main", "allocation"]

SEQ = 256


def allocation(total: int, width: int, layers: int, protected: list[int], cap: float) -> list[int]:
    """Channels to remove per layer, ``total`` in all: the ``protected`` layers keep
    ``min(width, cap x the others' kept count)`` (``cap=inf``: all), the others share the rest evenly.

    Example:
        >>> allocation(30, 10, 3, [], math.inf), allocation(15, 10, 3, [0], math.inf)
        ([10, 10, 10], [0, 8, 7])
        >>> allocation(24, 10, 3, [0], 1.5)   # the protected layer keeps 3, the others 1 and 2
        [7, 9, 8]
    """
    others = [i for i in range(layers) if i not in protected]
    # the others keep k each: (layers - p) * k + p * min(width, cap * k) = layers * width - total
    left = layers * width - total
    k = left / (len(others) + len(protected) * cap) if math.isfinite(cap) else 0.0
    if not math.isfinite(cap) or cap * k >= width:
        k = (left - len(protected) * width) / len(others)
    keep_p = width if not math.isfinite(cap) else min(width, round(cap * k))
    counts = {i: width - keep_p for i in protected}
    rest = total - sum(counts.values())
    for j, i in enumerate(others):
        counts[i] = rest // len(others) + (1 if j < rest % len(others) else 0)
    return [counts[i] for i in range(layers)]


class Probe:
    """SmolLM2 with its MLP weights saved, activation scores, and the two evaluations."""

    def __init__(self) -> None:
        from shear.data import TextData
        from shear.zoo import load_smollm2

        loaded = load_smollm2()
        self.model, self.tok = loaded.model.eval(), loaded.tokenizer
        self.data = TextData.from_corpus(self.tok, max_train_chars=400_000)
        self.ood = ood_windows(self.tok, SEQ, 8)
        self.mlps = [layer.mlp for layer in self.model.model.layers]
        self.saved = [(m.gate_proj.weight.clone(), m.up_proj.weight.clone(), m.down_proj.weight.clone()) for m in self.mlps]
        self.scores = self._activation(self.data.calibration(8, SEQ, seed=0))

    @torch.no_grad()
    def _activation(self, calib: torch.Tensor) -> list[torch.Tensor]:
        sq_in = [torch.zeros(m.gate_proj.in_features, dtype=torch.float64) for m in self.mlps]
        sq_mid = [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in self.mlps]

        def hook(acc: torch.Tensor):  # noqa: ANN202
            def add(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                acc.add_(args[0].double().pow(2).sum((0, 1)))
            return add

        handles = [h for i, m in enumerate(self.mlps) for h in (
            m.gate_proj.register_forward_pre_hook(hook(sq_in[i])), m.down_proj.register_forward_pre_hook(hook(sq_mid[i])))]
        for i in range(0, calib.shape[0], 4):
            self.model(input_ids=calib[i : i + 4], use_cache=False)
        for h in handles:
            h.remove()
        out = []
        for (g, u, d), x, xm in zip(self.saved, sq_in, sq_mid):
            x, xm = x.sqrt(), xm.sqrt()
            s = (g.double() * x).pow(2).sum(1) + (u.double() * x).pow(2).sum(1) + (d.double() * xm).pow(2).sum(0)
            out.append(s.sqrt())
        return out

    @torch.no_grad()
    def cut(self, counts: list[int]) -> None:
        """Restore every MLP, then zero the ``counts[i]`` lowest-scored channels of layer ``i``."""
        for m, (g, u, d), s, n in zip(self.mlps, self.saved, self.scores, counts):
            m.gate_proj.weight.copy_(g)
            m.up_proj.weight.copy_(u)
            m.down_proj.weight.copy_(d)
            idx = s.argsort()[:n]
            m.gate_proj.weight[idx] = 0
            m.up_proj.weight[idx] = 0
            m.down_proj.weight[:, idx] = 0

    def sensitivity(self) -> list[float]:
        """Pooled in-domain perplexity increase when half of one MLP's channels go (knowledge distribution's measure)."""
        from shear.evaluation import window_perplexity

        windows = {k: v[:PASS_TOKENS].view(-1, 128) for k, v in self.data.validation.items()}

        def pooled() -> float:
            return math.exp(statistics.mean(math.log(window_perplexity(self.model, w)) for w in windows.values()))

        width = self.mlps[0].gate_proj.out_features
        self.cut([0] * len(self.mlps))
        base = pooled()
        out = []
        for i in range(len(self.mlps)):
            self.cut([width // 2 if j == i else 0 for j in range(len(self.mlps))])
            out.append(pooled() - base)
        return out

    def evaluate(self) -> tuple[float, float, float]:
        """In-domain and out-of-domain mean perplexity, and the licences source's."""
        from shear.evaluation import window_perplexity

        ind = []
        for ids in self.data.validation.values():
            n = min(8, (ids.numel() - PASS_TOKENS) // SEQ)
            ind.append(window_perplexity(self.model, ids[PASS_TOKENS : PASS_TOKENS + n * SEQ].view(n, -1)))
        ood = {k: window_perplexity(self.model, w) for k, w in self.ood.items()}
        return statistics.mean(ind), statistics.mean(ood.values()), ood.get("licences", float("nan"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.2, 0.5], help="shares of the non-embedding parameters cut")
    parser.add_argument("--top", type=int, nargs="+", default=[1, 3, 6], help="how many of the most sensitive MLPs to protect")
    parser.add_argument("--out", type=Path, default=Path("bench_allocation.md"))
    args = parser.parse_args(argv)
    probe = Probe()
    cfg = probe.model.config
    layers, width, hidden = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size
    body = base_param_count(probe.model) - probe.model.get_input_embeddings().weight.numel()  # as the ablation counts
    sens = probe.sensitivity()
    order = sorted(range(layers), key=lambda i: -sens[i])
    lines = [
        "### One-shot MLP cuts by allocation (no training)",
        "",
        "MLP sensitivity, most sensitive first (Δ pooled in-domain ppl with half of its channels zeroed): "
        + ", ".join(f"{i}: {sens[i]:+.2f}" for i in order[:8]) + ", ...",
        "",
        "| share | allocation | channels removed per layer (min..max) | in-domain ppl | out-of-domain ppl | licences |",
        "|---|---|---|---|---|---|",
    ]
    for share in args.shares:
        total = layers * round(share * body / (layers * 3 * hidden))
        rows = [("uniform", allocation(total, width, layers, [], math.inf))]
        for k in args.top:
            rows.append((f"top {k} whole", allocation(total, width, layers, order[:k], math.inf)))
            rows.append((f"top {k}, cap 1.5", allocation(total, width, layers, order[:k], 1.5)))
        for name, counts in rows:
            probe.cut(counts)
            ind, ood, lic = probe.evaluate()
            lines.append(f"| {share:.0%} | {name} | {min(counts)}..{max(counts)} | {ind:.2f} | {ood:.2f} | {lic:.1f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
