"""The quality table: LoRAShear vs LLM-Pruner-style and magnitude baselines, and unstructured baselines.

In one run, on the reference trained LLaMA (SmolLM2-135M; ``--quick``: shear's tiny trained LLaMA):

Structured, at each ``--ratios`` share of parameters removed (the same per-group budget for all):

* **dense**;
* **LoRAShear**: lora, discover-groups, knowledge-distribution, lhspg, erase, recover-dynamic
  (pretraining sources by degradation, then instructions), merge-lora;
* **LoRAShear (instruct only)**: the same with recovery on the instruction data only (the paper's † row);
* **Taylor + LoRA** (LLM-Pruner): first-order Taylor importance, one shot, erase, LoRA recovery on
  the instruction data;
* **magnitude + LoRA**: structure L2 norms, one shot, erase, LoRA recovery on the instruction data;
* **Taylor + dynamic recovery**, **magnitude + dynamic recovery**: the same one-shot pruning, then
  exactly LoRAShear's recovery (pretraining sources by degradation, then instructions);

every recovery stage with the same budget (``rounds x steps`` LoRA steps of ``batch`` sequences; the
steps and tokens each row consumed are reported). Equal-budget pairs: LoRAShear with the
"dynamic recovery" rows (two stages), LoRAShear (instruct only) with the "+ LoRA" rows (one stage).

Unstructured 50% (masks kept, nothing erased): **magnitude**, **Wanda**, **SparseGPT**, each without
and with **EBFT**, and **Wanda + LoRA** trained for the wall time Wanda + EBFT took.

Columns: parameters (non-zero ones for the unstructured rows; LoRA adapters not counted), held-out
perplexity per corpus source (non-overlapping validation windows), their mean, wall time of the
method, peak memory above the start of the method (Linux VmHWM). Written as Markdown to ``--out``
(and JSON next to it) and printed.

Usage:
    python -m tools.bench_quality --quick        # tiny LLaMA: a few minutes on 2 cores
    python -m tools.bench_quality                # SmolLM2-135M at 20% and 50% (its rows took 4.7 h here)
    python -m tools.bench_quality --resume       # go on after an interruption: rows already in
                                                 # the JSON next to --out are kept, not re-run

The ablation (``--ablation SHARE``): at SHARE of the non-embedding parameters and one token budget
(60 steps of 4 x 256 tokens), the LLM-Pruner-style baseline (shear's ``taylor{kinds=[channel]}`` pass:
first-order Taylor on the IR's MLP channel groups, the same count cut in every layer, erased; then LoRA
r=8 on every linear, see :func:`llm_pruner_mlp`) and LoRAShear variants (heads or not, knowledge
distribution on/off, distillation, one-shot vs progressive, global selection, saliency, recovery
stages), each evaluated in domain (the corpus' validation split) and out of domain (Debian texts the
corpus does not contain: licences, Perl manuals, Vim's help, changelogs):

    python -m tools.bench_quality --quick --ablation 0.2 --out abl.md          # tiny LLaMA, ~25 min
    python -m tools.bench_quality --ablation 0.2 --only "LLM-Pruner-style (MLP)" "LoRAShear channels" --out a.md

Each finished row is written to the JSON at once, so an interrupted run loses at most one row.
Parts may run side by side, one thread each (with two OpenMP threads per part on 2 shared cores,
one row ran for 70+ min instead of ~26), and be merged into one table:

    export OMP_NUM_THREADS=1
    python -m tools.bench_quality --unstructured 0 --out q.md &
    python -m tools.bench_quality --ratios --unstructured 0.5 --out u.md
    python -m tools.bench_quality --out q.md --table-only u.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shear.kernels.allocation import base_param_count
from shear.passes.budgets import lhspg_steps
from tools.bench_common import load_average, markdown_table, mean, measured

__all__ = ["ABLATION", "OOD_SOURCES", "PASS_TOKENS", "Profile", "llm_pruner_mlp", "main", "ood_windows", "scaled"]


@dataclass(frozen=True)
class Profile:
    """Step counts and evaluation sizes of a run."""

    seq_len: int
    batch: int
    lhspg: str
    """lhspg options other than ratio."""
    kd: str
    rounds: int
    steps_per_round: int
    recover_lr: float
    eval_windows: int
    calib: int
    ebft_epochs: int
    ebft_lr: float


QUICK = Profile(
    seq_len=128, batch=4, lhspg="periods=3,steps_per_period=10,warmup=5,lr=0.002", kd="max_windows=2",
    rounds=3, steps_per_round=10, recover_lr=1e-3, eval_windows=8, calib=16, ebft_epochs=3, ebft_lr=1e-4,
)
FULL = Profile(
    seq_len=256, batch=4, lhspg="periods=4,steps_per_period=15,warmup=10,lr=0.0005", kd="max_windows=1,include=basic",
    rounds=3, steps_per_round=15, recover_lr=3e-4, eval_windows=12, calib=32, ebft_epochs=2, ebft_lr=5e-5,
)



class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from shear.data import TextData
        from shear.zoo import load_smollm2, load_tiny_llama

        self.args = args
        self.p = QUICK if args.quick else FULL
        loaded = load_tiny_llama() if args.quick else load_smollm2()
        self.name = loaded.name
        self.model = loaded.model
        self.data = TextData.from_corpus(
            loaded.tokenizer, max_train_chars=200_000 if args.quick else 400_000, instructions=args.instructions
        )
        self.sources = list(self.data.validation)
        self.ids = {"input_ids": torch.arange(16).view(1, 16)}
        self.rows: list[dict[str, Any]] = []
        self.json = args.out.with_suffix(".json")
        if args.resume and self.json.exists():
            self.rows = json.loads(self.json.read_text())
            print(f"resuming: {len(self.rows)} rows from {self.json}", flush=True)

    def done(self, method: str, ratio: float) -> bool:
        return any(r["method"] == method and abs(r["ratio"] - ratio) < 1e-9 for r in self.rows)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return self.data.perplexity(model, seq_len=self.p.seq_len, max_windows=self.p.eval_windows)

    def run(self, method: str, ratio: float, fn: Any, *, nonzero: bool = False) -> torch.nn.Module | None:
        """Time ``fn``, evaluate the model it returns and record the row (``None``: the row was resumed)."""
        if self.done(method, ratio):
            print(f"{method} @ {ratio:.0%}: kept from {self.json}", flush=True)
            return None
        if method in self.args.skip:
            print(f"{method} @ {ratio:.0%}: skipped", flush=True)
            return None
        run = measured(fn)
        model, wall = run.value, run.seconds
        row = {
            "method": method,
            "ratio": ratio,
            "params": base_param_count(model, nonzero=nonzero),
            "ppl": self.evaluate(model),
            "wall_s": wall,
            "peak_mb": run.added_bytes / 2**20,
        }
        report = getattr(model, "shear_report", None)
        if report is not None:  # where the time went, pass by pass
            row["pass_s"] = {f"{i}:{r.name}": round(r.seconds, 1) for i, r in enumerate(report.passes)}
        resumed = list(getattr(model, "bench_resumed", [])) + (_resumed(report.warnings) if report is not None else [])
        if resumed:  # --checkpoint-dir: training picked up where a stopped run of this row left off
            row["resumed"] = resumed
        rec = _recovery(model)
        if rec is not None:
            row["recovery_steps"], row["recovery_tokens"] = rec
        self.rows.append(row)
        self.json.write_text(json.dumps(self.rows, indent=2) + "\n")
        print(f"{method} @ {ratio:.0%}: mean ppl {mean(row['ppl']):.2f} in {wall:.0f}s", flush=True)
        return model

    def compile(self, pipeline: str, model: torch.nn.Module | None = None) -> torch.nn.Module:
        import shear

        return shear.compile(
            self.model if model is None else model, pipeline, example_inputs=self.ids, data=self.data,
            verify=self.args.verify_tol,
        )

    # -- pipelines -------------------------------------------------------------------------------

    def recover(self, stages: str) -> str:
        p = self.p
        return (
            f"recover-dynamic{{stages={stages},max_rounds={p.rounds},steps_per_round={p.steps_per_round},"
            f"min_gain=0,lr={p.recover_lr},batch_size={p.batch},seq_len={p.seq_len},eval_windows={p.eval_windows}}}"
        )

    def lorashear(self, ratio: float, stages: str) -> str:
        p = self.p
        return (
            f"lora,discover-groups,knowledge-distribution{{{p.kd},seq_len={p.seq_len}}},"
            f"lhspg{{ratio={ratio},{p.lhspg},batch_size={p.batch},seq_len={p.seq_len}}},erase,"
            f"{self.recover(stages)},merge-lora"
        )

    def one_shot(self, ratio: float, prune: str, stages: str = "instruct") -> str:
        return f"discover-groups,{prune},erase,lora,{self.recover(stages)},merge-lora"

    def structured(self, ratio: float) -> None:
        p = self.p
        self.run("LoRAShear", ratio, lambda: self.compile(self.lorashear(ratio, "pretrain+instruct")))
        self.run("LoRAShear (instruct only)", ratio, lambda: self.compile(self.lorashear(ratio, "instruct")))
        taylor = f"taylor{{params={ratio},samples={p.calib},seq_len={p.seq_len}}}"
        magnitude = f"magnitude{{params={ratio},mode=structured}}"
        self.run("Taylor + LoRA (LLM-Pruner)", ratio, lambda: self.compile(self.one_shot(ratio, taylor)))
        self.run("magnitude + LoRA", ratio, lambda: self.compile(self.one_shot(ratio, magnitude)))
        # the same recovery as the LoRAShear row (both stages), so pruning is the only difference
        both = "pretrain+instruct"
        self.run("Taylor + dynamic recovery", ratio, lambda: self.compile(self.one_shot(ratio, taylor, both)))
        self.run("magnitude + dynamic recovery", ratio, lambda: self.compile(self.one_shot(ratio, magnitude, both)))

    def unstructured(self, ratio: float) -> None:
        p = self.p
        calib = f"nsamples={p.calib},seq_len={p.seq_len}"
        ebft = f"ebft{{nsamples={p.calib},seq_len={p.seq_len},epochs={p.ebft_epochs},lr={p.ebft_lr}}}"
        prunes = {
            "magnitude": f"magnitude{{ratio={ratio},mode=unstructured,per_row=true}}",
            "Wanda": f"wanda{{ratio={ratio},{calib}}}",
            "SparseGPT": f"sparsegpt{{ratio={ratio},{calib}}}",
        }
        ebft_seconds = 0.0
        for label, prune in prunes.items():
            self.run(f"{label} (unstructured)", ratio, lambda prune=prune: self.compile(prune), nonzero=True)
            tuned = self.run(f"{label} + EBFT", ratio, lambda prune=prune: self.compile(f"{prune},{ebft}"), nonzero=True)
            if label == "Wanda":
                ebft_seconds = self._ebft_seconds(tuned, ratio)
        self.run(
            "Wanda + LoRA (EBFT's wall time)", ratio, lambda: self.wanda_lora(ratio, ebft_seconds), nonzero=True
        )

    def _ebft_seconds(self, tuned: torch.nn.Module | None, ratio: float) -> float:
        """Seconds the ebft pass took in the Wanda + EBFT row (from the JSON when that row was resumed)."""
        if tuned is not None:
            seconds = sum(r.seconds for r in tuned.shear_report.passes if r.name == "ebft")
            self.rows[-1]["ebft_s"] = seconds
            self.json.write_text(json.dumps(self.rows, indent=2) + "\n")
            return seconds
        row = next((r for r in self.rows if r["method"] == "Wanda + EBFT" and abs(r["ratio"] - ratio) < 1e-9), None)
        if row is None:
            raise SystemExit("Wanda + LoRA runs for as long as Wanda + EBFT's ebft pass: run that row too (do not --skip it)")
        return float(row.get("ebft_s", row["wall_s"]))

    def wanda_lora(self, ratio: float, seconds: float) -> torch.nn.Module:
        """Wanda, then LoRA on the pretraining sources for as long as EBFT ran (``seconds``).

        The adapters stay unmerged: merging ``B @ A`` would fill the pruned weights."""
        from shear.training import TokenBatches, TrainConfig, TrainHook, ensure_lora, train

        p = self.p
        model = self.compile(f"wanda{{ratio={ratio},nsamples={p.calib},seq_len={p.seq_len}}}")
        model, _ = ensure_lora(model)
        deadline = time.perf_counter() + max(seconds, 1.0)

        class Deadline(TrainHook):
            def after_optimizer_step(self, state: Any) -> None:
                if time.perf_counter() > deadline:
                    raise _Stop

        config = TrainConfig(steps=10_000, lr=p.recover_lr, batch_size=p.batch, seq_len=p.seq_len)
        try:
            train(model, TokenBatches(self.data.train, p.batch, p.seq_len), config, hooks=[Deadline()])
        except _Stop:
            pass
        return model


# -- the ablation at equal budget (--ablation) ---------------------------------------------------

OOD_SOURCES: dict[str, tuple[str, str]] = {
    "licences": ("/usr/share/common-licenses", "*"),
    "perlpod": ("/usr/share/perl/5.36/pod", "*.pod"),
    "vimhelp": ("/usr/share/vim/vim90/doc", "*.txt"),
    "changelogs": ("/usr/share/doc", "*/changelog.Debian.gz"),
}
"""Out-of-domain held-out text: Debian packages' texts the committed corpus does not contain (legal
prose, Perl manuals, Vim's help, Debian changelogs), read offline from this machine; sources whose
folder is missing are left out and the table says which were used."""


def ood_windows(tokenizer: Any, seq_len: int, windows: int, chars: int = 200_000) -> dict[str, torch.Tensor]:
    """``[windows, seq_len]`` token windows per out-of-domain source: files in sorted order, the
    first ``chars`` characters, cut into non-overlapping windows."""
    import glob
    import gzip

    out: dict[str, torch.Tensor] = {}
    for name, (folder, pattern) in OOD_SOURCES.items():
        files = sorted(f for f in glob.glob(os.path.join(folder, pattern)) if os.path.isfile(f))
        text, n = [], 0
        for f in files:
            raw = gzip.open(f).read() if f.endswith(".gz") else Path(f).read_bytes()
            piece = raw.decode("utf-8", errors="replace")
            text.append(piece)
            n += len(piece)
            if n >= chars:
                break
        ids = tokenizer("\n\n".join(text)[:chars], return_tensors="pt").input_ids[0]
        w = min(windows, ids.numel() // seq_len)
        if w:
            out[name] = ids[: w * seq_len].view(w, seq_len)
    return out


ABLATION = Profile(
    seq_len=256, batch=4, lhspg="warmup=8,periods=4,steps_per_period=8", kd="",
    rounds=2, steps_per_round=5, recover_lr=2e-4, eval_windows=8, calib=8, ebft_epochs=0, ebft_lr=0.0,
)
"""The issue's budget: 60 optimizer steps of 4 x 256 tokens (61k tokens) per method."""


def scaled(p: Profile, k: int) -> Profile:
    """``p`` with every training step count times ``k`` (LHSPG warm-up and steps per period, recovery
    steps per round): ``k`` times the tokens, the same periods and rounds.

    Example:
        >>> scaled(ABLATION, 4).lhspg, scaled(ABLATION, 4).steps_per_round
        ('warmup=32,periods=4,steps_per_period=32', 20)
    """
    if k < 1:
        raise SystemExit(f"--tokens-scale must be at least 1, got {k}")
    lhspg = re.sub(r"\b(warmup|steps_per_period)=(\d+)", lambda m: f"{m.group(1)}={int(m.group(2)) * k}", p.lhspg)
    return dataclasses.replace(p, lhspg=lhspg, steps_per_round=p.steps_per_round * k)


ONE_SHOT = "warmup=0,periods=1,steps_per_period=1"
"""LHSPG options of the one-shot rows: every structure zeroed at the first step."""


def llm_pruner_mlp(model: torch.nn.Module, data: Any, remove: int, *, steps: int, calib: int, seq_len: int,
                   batch: int, lr: float, seed: int = 0, checkpoint_dir: Path | None = None,
                   verify: float | None = None) -> torch.nn.Module:
    """LLM-Pruner-style baseline: ``remove`` MLP channels cut from every layer by first-order Taylor
    importance, then LoRA r=8 on every linear, trained and merged.

    The cut is the pass pipeline ``discover-groups,taylor{kinds=[channel],...},erase``: ``taylor``
    scores every structure of the IR's channel groups by ``Σ |W ⊙ dL/dW|`` over its members (for a
    LLaMA MLP: gate and up rows, the down column) on ``calib`` windows of ``seq_len`` tokens and
    zeroes the lowest ``remove / width`` of each group, ``erase`` removes them. Then LoRA r=8 trains
    for ``steps`` steps of ``batch x seq_len`` tokens of the pretraining text (LLM-Pruner's recovery:
    plain LoRA, no stage schedule) and is merged. ``seed`` seeds the calibration windows, the training
    batches and the adapters, as ``--seed`` does the LoRAShear rows'; with ``checkpoint_dir`` the
    training writes a checkpoint every 8 steps there and resumes from the latest."""
    import shear
    from shear.training import TokenBatches, TrainConfig, ensure_lora, train

    ratio = remove / model.config.intermediate_size  # the same count in every layer: the groups are equal
    pipeline = f"discover-groups,taylor{{ratio={ratio!r},kinds=[channel],samples={calib},seq_len={seq_len},seed={seed}}},erase"
    pruned = shear.compile(model, pipeline, example_inputs={"input_ids": torch.arange(16).view(1, 16)}, data=data,
                           verify=verify)
    pruned, _ = ensure_lora(pruned, r=8, seed=seed)
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch, seq_len=seq_len,
                         checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                         checkpoint_every=8 if checkpoint_dir is not None else 0)
    result = train(pruned, TokenBatches(data.train, batch, seq_len, seed=seed), config)
    merged = pruned.merge_and_unload()
    merged.bench_resumed = _resumed(result.warnings)
    return merged


def _resumed(warnings: list[str]) -> list[str]:
    """The warnings of training that resumed from a checkpoint (or found its run finished)."""
    return [w for w in warnings if "resumed from step" in w or "had already finished" in w]


PASS_TOKENS = 1024
"""Leading validation tokens per source that passes read (knowledge-distribution, recover-dynamic)."""


class Ablation(Bench):
    """Rows at one parameter budget and one token budget: the baseline and LoRAShear variants."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.p = scaled(ABLATION, args.tokens_scale)
        emb = self.model.get_input_embeddings().weight.numel()
        self.total = base_param_count(self.model)
        self.body = self.total - emb
        self.ood = ood_windows(self.data.tokenizer, self.p.seq_len, self.p.eval_windows)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """In-domain: validation windows after the first :data:`PASS_TOKENS` of each source, the text
        the passes' own decisions read (knowledge distribution's 8 x 128-token windows, recovery's
        4 x 256), so no row is scored on text it was selected on; out-of-domain: :func:`ood_windows`."""
        from shear.evaluation import window_perplexity

        ppl = {}
        for name, ids in self.data.validation.items():
            n = min(self.p.eval_windows, (ids.numel() - PASS_TOKENS) // self.p.seq_len)
            ppl[name] = window_perplexity(model, ids[PASS_TOKENS : PASS_TOKENS + n * self.p.seq_len].view(n, -1))
        ppl.update({f"ood:{k}": window_perplexity(model, w) for k, w in self.ood.items()})
        return ppl

    def steps(self) -> int:
        """Optimizer steps of every row: LHSPG's warm-up and periods, then two recovery stages."""
        p = self.p
        return lhspg_steps(p.lhspg) + 2 * p.rounds * p.steps_per_round

    def pipeline(self, ratio: float, *, kinds: str = "", kd: bool | str = True, distill: str = "",
                 lhspg: str = "", steps_per_round: int = 0, recover: str = "", rounds: int = 0) -> str:
        p = self.p
        kd_opts = kinds.lstrip(",") + (kd if isinstance(kd, str) else "")
        if self.args.kd_cache is not None:
            kd_opts = (kd_opts + f',cache_dir="{self.args.kd_cache}"').lstrip(",")
        kd_pass = f"knowledge-distribution{{{kd_opts}}}," if kd is not False else ""
        lhspg = lhspg or p.lhspg
        if "protect_cap" not in lhspg:  # the rows measured before the cap was the default keep whole protection
            lhspg += ",protect_cap=inf"
        seed = f",seed={self.args.seed}" if self.args.seed else ""  # knowledge distribution keeps seed 0: cached
        lhspg_opts = f"ratio={ratio},{lhspg},batch_size={p.batch},seq_len={p.seq_len}{kinds}{distill}{seed}"
        recover_opts = (f"max_rounds={rounds or p.rounds},steps_per_round={steps_per_round or p.steps_per_round},min_gain=0,"
                        f"lr={p.recover_lr},batch_size={p.batch},seq_len={p.seq_len},eval_windows=4{distill}{recover}{seed}")
        if self.args.checkpoint_dir is not None:  # one folder per pass options, so a rerun resumes the same row
            lhspg_opts += self._checkpoint("lhspg", lhspg_opts)
            recover_opts += self._checkpoint("recover", lhspg_opts + recover_opts)
        return (f"lora{{r=8{seed}}},discover-groups,{kd_pass}lhspg{{{lhspg_opts}}},erase,"
                f"recover-dynamic{{{recover_opts}}},merge-lora")

    def _checkpoint_folder(self, stage: str, what: str) -> Path:
        """A folder under ``--checkpoint-dir`` named by ``stage`` and a hash of the model and ``what``
        (the options that make the run), so the same command finds it again."""
        key = hashlib.sha1(f"{self.name},{what}".encode()).hexdigest()[:12]
        return self.args.checkpoint_dir / f"{stage}-{key}"

    def _checkpoint(self, stage: str, opts: str) -> str:
        """``checkpoint_dir`` and ``checkpoint_every`` options of a pass: its folder (keyed by ``opts``
        and what came before), a checkpoint every 8 steps."""
        return f',checkpoint_dir="{self._checkpoint_folder(stage, opts)}",checkpoint_every=8'

    def _baseline_checkpoint(self, ratio: float) -> Path | None:
        """The baseline's checkpoint folder under ``--checkpoint-dir``, ``None`` without one."""
        if self.args.checkpoint_dir is None:
            return None
        p = self.p
        return self._checkpoint_folder(
            "baseline", f"{ratio},{self.steps()},{p.batch},{p.seq_len},{p.recover_lr},{self.args.seed}")

    def rows_at(self, share: float) -> dict[str, Any]:
        """Row name -> what makes it, at ``share`` of the non-embedding parameters removed."""
        ratio = round(share * self.body / self.total, 4)
        layers = self.model.config.num_hidden_layers
        per_channel = 3 * self.model.config.hidden_size
        remove = round(share * self.body / (layers * per_channel))
        p = self.p
        ch = ",kinds=[channel]"
        heads = ",kinds=[channel,head]"  # the defaults before this ablation
        dist = ",distill=0.5,distill_temperature=1.0"
        act = ',saliency="activation=1"'
        kd_act = ",proxy=activation"
        cap = ",protect_cap=1.5"
        no_warmup = re.sub(r"\bwarmup=\d+", "warmup=0", p.lhspg)

        def per_period(div: int) -> str:  # no warm-up, 1/div of the steps per period
            return re.sub(r"\bsteps_per_period=(\d+)", lambda m: f"steps_per_period={max(1, int(m.group(1)) // div)}",
                          no_warmup)

        one_shot_round = -(-(self.steps() - 1) // (2 * p.rounds))  # one step that zeroes, then the rest in recovery
        rows = {
            "LLM-Pruner-style (MLP)": lambda: llm_pruner_mlp(
                self.model, self.data, remove, steps=self.steps(), calib=p.calib, seq_len=p.seq_len,
                batch=p.batch, lr=p.recover_lr, seed=self.args.seed, checkpoint_dir=self._baseline_checkpoint(ratio),
                verify=self.args.verify_tol),
            "LoRAShear (old default)": lambda: self.compile(self.pipeline(ratio, kinds=heads)),
            "LoRAShear channels": lambda: self.compile(self.pipeline(ratio, kinds=ch)),
            "LoRAShear channels, no KD": lambda: self.compile(self.pipeline(ratio, kinds=ch, kd=False)),
            "LoRAShear channels + distill": lambda: self.compile(self.pipeline(ratio, kinds=ch, distill=dist)),
            "LoRAShear channels + distill (KL only)": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, distill=",distill=1.0,distill_temperature=1.0")),
            "LoRAShear channels, no KD + distill": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, kd=False, distill=dist)),
            "LoRAShear (old default) + distill": lambda: self.compile(self.pipeline(ratio, kinds=heads, distill=dist)),
            "LoRAShear channels, global": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, lhspg=p.lhspg + ",selection=global")),
            "LoRAShear channels, KD gamma=0.2": lambda: self.compile(self.pipeline(ratio, kinds=ch, kd=",gamma=0.2")),
            "LoRAShear channels, taylor saliency": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, lhspg=p.lhspg + ',saliency="taylor1=1"')),
            # two pretraining rounds, then two instruction rounds, of 5 steps: pretraining only, 4 rounds
            "LoRAShear channels, pretrain-only recovery": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, recover=",stages=pretrain", rounds=2 * p.rounds)),
            "one-shot channels, no KD + recovery": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, kd=False, lhspg=ONE_SHOT, steps_per_round=one_shot_round)),
            # the same saliency, all structures zeroed at the first step, then 2 x 2 x 15 recovery steps
            "one-shot channels + recovery": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, lhspg=ONE_SHOT, steps_per_round=one_shot_round)),
            "LoRAShear channels, activation": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, lhspg=p.lhspg + act)),
            "one-shot channels, activation + recovery": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, lhspg=ONE_SHOT + act, steps_per_round=one_shot_round)),
            "LoRAShear channels, activation, KD activation": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, kd=kd_act, lhspg=p.lhspg + act)),
            "one-shot channels, activation, KD activation + recovery": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, kd=kd_act, lhspg=ONE_SHOT + act, steps_per_round=one_shot_round)),
            "LoRAShear channels, activation, KD activation + distill": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, kd=kd_act, lhspg=p.lhspg + act, distill=dist)),
            # the defaults with knowledge distribution's protected groups capped at 1.5x the others' kept share
            "LoRAShear, protect_cap=1.5": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, lhspg=p.lhspg + cap)),
            # gamma=0.033 of SmolLM2's 90 node groups marks 3 (MLP 0's channel space and its two LoRA linears)
            "LoRAShear, KD top group, protect_cap=1.5": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, kd=",gamma=0.033", lhspg=p.lhspg + cap)),
            "LoRAShear, KD top group": lambda: self.compile(self.pipeline(ratio, kinds=ch, kd=",gamma=0.033")),
            "LoRAShear, protect_cap=1.5, pretrain-only recovery": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, lhspg=p.lhspg + cap, recover=",stages=pretrain", rounds=2 * p.rounds)),
            "LoRAShear, KD gamma=0.2, protect_cap=1.5, pretrain-only recovery": lambda: self.compile(self.pipeline(
                ratio, kinds=ch, kd=",gamma=0.2", lhspg=p.lhspg + cap, recover=",stages=pretrain",
                rounds=2 * p.rounds)),
            # the warm-up's steps go to recovery on the final structure: 4 x 8 LHSPG steps, then 4 rounds of 7
            "LoRAShear, KD gamma=0.2, protect_cap=1.5, no warm-up, pretrain-only recovery": lambda: final_heavy(
                no_warmup, kd=",gamma=0.2"),
            "LoRAShear, protect_cap=1.5, no warm-up, pretrain-only recovery": lambda: final_heavy(no_warmup),
            # half the periods' steps too: 4 x 4 LHSPG steps, then 4 rounds of 11
            "LoRAShear, protect_cap=1.5, LHSPG 4x4, pretrain-only recovery": lambda: final_heavy(per_period(2)),
            "LoRAShear, KD gamma=0.2, protect_cap=1.5, LHSPG 4x4, pretrain-only recovery": lambda: final_heavy(
                per_period(2), kd=",gamma=0.2"),
            # a quarter: 4 x 2 LHSPG steps, then 4 rounds of 13
            "LoRAShear, protect_cap=1.5, LHSPG 4x2, pretrain-only recovery": lambda: final_heavy(per_period(4)),
            # LHSPG's one step zeroes every pruned structure with the same saliency, then 4 rounds of 14
            "one-shot, protect_cap=1.5, pretrain-only recovery": lambda: final_heavy(ONE_SHOT),
            "LoRAShear, protect_cap=1.5, no warm-up, pretrain-only recovery + distill": lambda: final_heavy(
                no_warmup, distill=dist),
            # the price of a target's layout, without knowledge distribution (whose protected groups would keep
            # some layers wider): today's schedule with free MLP widths, widths in multiples of 256 (nas and
            # gguf: ffn_mult, k-quant rows), and the same widths in every layer (hf)
            "layout: free widths, no KD": lambda: layout(",round_to=1"),
            "layout: multiples of 256 (nas, gguf), no KD": lambda: layout(",round_to=256"),
            "layout: same widths in every layer (hf), no KD": lambda: layout(",selection=shared,round_to=1"),
        }

        def layout(options: str) -> torch.nn.Module:
            """Today's schedule (LHSPG 4 x 4, then 4 recovery rounds on the pretraining text) without
            knowledge distribution, with LHSPG ``options``."""
            rounds = 2 * p.rounds
            return self.compile(self.pipeline(
                ratio, kinds=ch, kd=False, lhspg=per_period(2) + cap + options, recover=",stages=pretrain",
                rounds=rounds, steps_per_round=(self.steps() - lhspg_steps(per_period(2))) // rounds))

        def final_heavy(lhspg: str, *, kd: str = "", distill: str = "") -> torch.nn.Module:
            """Capped protection, LHSPG with ``lhspg``'s steps, then the rest of the budget in 4 recovery
            rounds on the pretraining text."""
            rounds = 2 * p.rounds
            return self.compile(self.pipeline(
                ratio, kinds=ch, kd=kd, lhspg=lhspg + cap, recover=",stages=pretrain", distill=distill,
                rounds=rounds, steps_per_round=(self.steps() - lhspg_steps(lhspg)) // rounds))

        return rows

    def table(self, note: str) -> str:
        return ablation_table(self.name, self.p, self.rows, self.body, self.steps(), list(self.ood), note)

    def ablate(self, share: float) -> None:
        rows = self.rows_at(share)
        for name in self.args.only or list(rows):
            if name not in rows:
                raise SystemExit(f"unknown row {name!r}; rows: {list(rows)}")
            self.run(name, share, rows[name])


def ablation_table(name: str, p: Profile, rows: list[dict[str, Any]], body: int, steps: int, ood: list[str],
                   note: str) -> str:
    """Markdown: in-domain and out-of-domain mean perplexity per row, and each row's gap to dense
    as a multiple of the LLM-Pruner-style baseline's gap."""
    def means(r: dict[str, Any]) -> tuple[float, float]:
        ind = [v for k, v in r["ppl"].items() if not k.startswith("ood:")]
        out = [v for k, v in r["ppl"].items() if k.startswith("ood:")]
        return mean(ind), mean(out) if out else float("nan")

    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is None:  # a part run with --skip dense: its rows are in the JSON already
        raise SystemExit("the ablation table needs the dense row: merge this part into a run that has it, "
                         "e.g. --out a.md --table-only this.json")
    base = next((r for r in rows if r["method"].startswith("LLM-Pruner")), None)
    d_in, d_out = means(dense)
    b_in, b_out = means(base) if base else (float("nan"), float("nan"))
    head = ["method", "params", "removed (non-embedding)", "in-domain ppl", "out-of-domain ppl",
            "gap vs baseline's (in / out)", "wall s"]
    lines = [
        f"### Ablation on {name}: equal parameters, equal tokens",
        "",
        f"Every pruned row removes its share of the {body:,} non-embedding parameters and trains for "
        f"{steps} optimizer steps of {p.batch} x {p.seq_len} tokens ({steps * p.batch * p.seq_len:,} tokens). "
        f"Perplexity: mean over sources of {p.eval_windows} windows x {p.seq_len} tokens each; in-domain = the "
        f"corpus' validation split after the first {PASS_TOKENS:,} tokens of each source (the passes read those), out-of-domain = {', '.join(ood)}. {note}",
        "",
    ]
    cells = []
    for r in rows:
        m_in, m_out = means(r)
        removed = (dense["params"] - r["params"]) / body
        gap = "" if r is dense else f"{(m_in - d_in) / (b_in - d_in):.2f}x / {(m_out - d_out) / (b_out - d_out):.2f}x"
        cells.append([r["method"], f"{r['params']:,}", f"{removed:.1%}", f"{m_in:.2f}", f"{m_out:.2f}", gap,
                      f"{r['wall_s']:.0f}"])
    return "\n".join(lines) + "\n" + markdown_table(head, cells)


class _Stop(Exception):
    pass


def _recovery(model: torch.nn.Module) -> tuple[int, int] | None:
    report = getattr(model, "shear_report", None)
    for record in getattr(report, "passes", []) or []:
        if getattr(record, "name", "") == "recover-dynamic":
            stats = getattr(record, "stats", {}) or {}
            if "steps" in stats:
                return int(stats["steps"]), int(stats.get("tokens", 0))
    return None


def _table(name: str, quick: bool, p: Profile, rows: list[dict[str, Any]], note: str) -> str:
    sources = list(rows[0]["ppl"])
    head = ["method", "removed", "params"] + sources + ["mean ppl", "recovery steps / tokens", "wall s", "peak MB"]
    lines = [
        f"### Quality on {name} ({'quick' if quick else 'full'} profile)",
        "",
        f"Perplexity on held-out validation text ({p.eval_windows} windows x {p.seq_len} tokens per source). "
        f"LHSPG {p.lhspg}; recovery {p.rounds} rounds x {p.steps_per_round} steps per stage, batch {p.batch}, "
        f"lr {p.recover_lr} (rows with the same steps had the same recovery budget); "
        f"EBFT {p.ebft_epochs} epochs on {p.calib} x {p.seq_len} calibration tokens. The methods' wall times sum to "
        f"{sum(r['wall_s'] for r in rows) / 60:.1f} min; {note}",
        "",
    ]
    base = rows[0]["params"]
    cells = []
    for r in rows:
        rec = f"{r['recovery_steps']} / {r['recovery_tokens']:,}" if "recovery_steps" in r else ""
        row = [r["method"], f"{1 - r['params'] / base:.1%}", f"{r['params']:,}"]
        row += [f"{r['ppl'][s]:.2f}" for s in sources]
        row += [f"{mean(r['ppl']):.2f}", rec, f"{r['wall_s']:.0f}", f"{r['peak_mb']:.0f}"]
        cells.append(row)
    return "\n".join(lines) + "\n" + markdown_table(head, cells)


def _merge(out: Path, others: list[Path]) -> list[dict[str, Any]]:
    """The rows of the JSON next to ``out``, then those of ``others`` (their dense rows dropped), by
    method and ratio as :class:`Bench` runs them."""
    rows: list[dict[str, Any]] = json.loads(out.with_suffix(".json").read_text())
    for path in others:
        rows += [r for r in json.loads(path.read_text()) if r["method"] != "dense"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny trained LLaMA, short schedules")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.5])
    parser.add_argument("--unstructured", type=float, default=0.5, help="unstructured sparsity; 0 skips")
    parser.add_argument("--instructions", type=int, default=512, help="instruction records to tokenize")
    parser.add_argument("--verify-tol", type=float, default=2e-2,
                        help="max |diff| of erase on the logits (SmolLM2 logits reach ~40; fp32 noise through 30 layers ~4e-3)")
    parser.add_argument("--out", type=Path, default=Path("bench_quality.md"))
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the JSON next to --out")
    parser.add_argument("--skip", nargs="*", default=[], metavar="METHOD",
                        help="methods not to run, by their row name (e.g. to run the rest side by side)")
    parser.add_argument("--ablation", type=float, default=0.0, metavar="SHARE",
                        help="run the ablation rows at this share of the non-embedding parameters (e.g. 0.2) instead")
    parser.add_argument("--only", nargs="*", default=[], metavar="ROW", help="with --ablation: these rows only")
    parser.add_argument("--tokens-scale", type=int, default=1, metavar="K",
                        help="with --ablation: K times every row's training steps (K x 61,440 tokens: 4 for the "
                        "budget curve's 250k, 16 for 1M); write each K to its own --out")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="with --ablation: seed of the data streams and adapters of every row (LHSPG, recovery, "
                        "the baseline's calibration and batches; knowledge distribution keeps 0); run a second "
                        "seed to its own --out to see the rows' spread")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR",
                        help="with --ablation: LHSPG, recovery and the baseline's training write a checkpoint every "
                        "8 steps under DIR, and "
                        "the same command run again resumes a row stopped half way (for the long budget curve)")
    parser.add_argument("--kd-cache", type=Path, default=None, metavar="DIR",
                        help="with --ablation: keep knowledge-distribution results in DIR and reuse them across rows "
                        "and runs with the same model, text and options (a row's pass_s then shows ~0 s for it)")
    parser.add_argument("--table-only", nargs="*", type=Path, metavar="JSON",
                        help="run nothing: write the table of the JSON next to --out, with the rows of these "
                             "JSON files (runs made side by side, e.g. --ratios ... and --ratios --unstructured 0.5) appended")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.table_only is not None and args.ablation:
        rows = _merge(args.out, args.table_only)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        bench = Ablation(args)
        bench.rows = rows
        table = bench.table(f"Rows merged from {1 + len(args.table_only)} runs made side by side on the same cores.")
        print(table)
        args.out.write_text(table + "\n")
        return
    if args.table_only is not None:
        rows = _merge(args.out, args.table_only)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        merged = f"rows merged from {1 + len(args.table_only)} runs made side by side on the same cores."
        table = _table("tiny-llama" if args.quick else "smollm2-135m-instruct", args.quick, profile, rows, merged)
        print(table)
        args.out.write_text(table + "\n")
        return
    start = time.perf_counter()
    load = load_average()
    bench = Ablation(args) if args.ablation else Bench(args)
    print(f"{bench.name}: {base_param_count(bench.model):,} parameters; load average {load:.2f}", flush=True)
    bench.run("dense", 0.0, lambda: copy.deepcopy(bench.model))
    if isinstance(bench, Ablation):
        bench.ablate(args.ablation)
        note = f"Load average at start {load:.2f}; this invocation took {(time.perf_counter() - start) / 60:.1f} min."
        table = bench.table(note)
        print(table)
        args.out.write_text(table + "\n")
        return
    for ratio in args.ratios:
        bench.structured(ratio)
    if args.unstructured > 0:
        bench.unstructured(args.unstructured)
    note = f"load average at start {load:.2f}; this invocation took {(time.perf_counter() - start) / 60:.1f} min."
    table = _table(bench.name, args.quick, bench.p, bench.rows, note)
    print(table)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
