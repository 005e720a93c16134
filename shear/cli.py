"""The ``shear`` command line: inspect, draw, plan and prune local models, and list the passes.

MODEL is always a local directory: a Hugging Face ``save_pretrained`` directory or a model saved
with ``shear.save``. shear never downloads; a hub id gives a "download it first" error.

Example (shell)::

    shear passes                                   # every registered pass, its options and docs
    shear inspect ./tiny-llama                     # the pruning groups as a table
    shear draw ./tiny-llama -o groups.svg          # node groups, composites, overlaps
    shear prune ./tiny-llama --passes "random{ratio=0.3,seed=0},erase" -o ./tiny-llama-pruned
    shear prune ./tiny-llama --pipeline lorashear.toml -o ./out   # and out/report.html
    shear prune ./smollm2 --ratio 0.2 --budget quick -o ./smollm2-pruned
    shear export ./tiny-llama-pruned -o pruned.gguf --tokenizer ./tiny-llama   # llama.cpp
    shear plan ./llama-405b --ratio 0.2 --world-size 64 --seq-len 4096   # config only: no weights read
    shear stream-prune ./llama-7b --ratio 0.2 -o ./llama-7b-pruned   # tensor by tensor from the shards
    shear bench ./tiny-llama ./tiny-llama-pruned --threads 2   # tokens/s dense vs pruned, efficiency

Outputs never replace a user's files (:mod:`shear.io.outputs`): ``-o`` must be a new path or an
empty directory unless ``--overwrite`` is given, and is never the input folder, inside it, a file, a
symbolic link or the current directory; ``--report``, ``--dump-dir``, ``draw -o`` and ``export -o``
are never inside an input either, and replace only files shear wrote (or with ``--overwrite``).
Every output is checked (with the free space) before any work starts, and again at the final
rename. The pruned model is saved with the input's tokenizer, so the output folder is usable on its own.

Exit status: 0 on success, 1 on a shear error (message on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shear.errors import DataError, InputError, ModelLoadError, OutputError, PipelineError, ShearError

__all__ = ["main", "load_model", "build_parser"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 160, highlight=False)


def load_model(spec: str) -> Any:
    """Load a model from a local directory (HF or ``shear.save``); never from the network.

    A directory with ``shear.json`` loads with ``shear.load``, one with ``config.json`` with
    ``AutoModelForCausalLM.from_pretrained(local_files_only=True)``. Raises :class:`ModelLoadError`
    for a hub id, a missing or non-directory path, or a directory neither understands.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        if _HUB_ID.match(spec) and not spec.startswith("."):
            local = spec.rsplit("/", 1)[-1]
            raise ModelLoadError(
                f"{spec!r} is not a local path; it looks like a Hugging Face hub id. shear never downloads "
                f"models: download it first (e.g. `huggingface-cli download {spec} --local-dir ./{local}`) "
                f"and pass the directory (`./{local}`)"
            )
        raise ModelLoadError(f"model path {spec!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(
            f"model path {spec!r} is a file; expected a directory written by save_pretrained or shear.save"
        )
    from shear.io.remote_code import refuse_remote_code

    refuse_remote_code(path)  # before transformers (or shear.load) reads the folder
    if (path / "shear.json").is_file():
        from shear.io.checkpoint import load

        return load(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"cannot load a model from {spec!r}: no config.json (a Hugging Face model directory) "
            "and no shear.json (a model saved with shear.save)"
        )
    try:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one actionable error
        raise ModelLoadError(f"cannot load a model from {spec!r}: transformers: {type(e).__name__}: {e}") from e


def _example_inputs(model: Any, seq_len: int) -> Any:
    from shear.compiler import default_example_inputs

    inputs = default_example_inputs(model, seq_len)
    if inputs is None:
        raise ModelLoadError(f"{type(model).__name__} has no config.vocab_size; the CLI only builds inputs for language models")
    return inputs


def _trace(model: Any, seq_len: int) -> Any:
    from shear.passes import Context, PassManager, registered_passes

    inputs = _example_inputs(model, seq_len)
    if "discover-groups" not in registered_passes():
        from shear.graph import trace

        return trace(model, inputs)
    ctx = Context(model=model, example_inputs=inputs)
    PassManager(["discover-groups"]).run(ctx)
    return ctx.graph


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    model = load_model(args.model)
    graph = _trace(model, args.seq_len)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    table = Table(title=f"{type(model).__name__}: pruning groups", title_justify="left")
    for col in ("id", "group", "kind", "structures", "params", "status"):
        table.add_column(col, justify="right" if col in ("id", "structures", "params") else "left")
    groups = graph.pruning_groups if args.all else graph.prunable_groups
    for g in groups:
        try:
            params = f"{g.structure_numel(shapes) * g.size:,}"
        except KeyError:
            params = "?"
        status = "prunable" if g.prunable else "pinned: " + "; ".join(g.reasons)
        table.add_row(str(g.id), g.name, g.kind, str(g.size), params, status)
    out = _console()
    out.print(table)
    hidden = len(graph.pruning_groups) - len(groups)
    total = sum(p.numel() for p in model.parameters())
    out.print(
        f"{len(graph.prunable_groups)} prunable of {len(graph.pruning_groups)} groups; {total:,} parameters"
        + (f" ({hidden} unprunable groups hidden; --all shows them)" if hidden else "")
    )
    for d in getattr(graph, "diagnostics", ()):
        out.print(f"[yellow]{getattr(d, 'kind', 'note')}:[/yellow] {getattr(d, 'message', d)}")
    return 0


def cmd_draw(args: argparse.Namespace) -> int:
    from shear.graph import draw
    from shear.io.outputs import atomic_file, check_output_file

    output = check_output_file(args.output, overwrite=args.overwrite, inputs=[args.model])
    model = load_model(args.model)
    graph = _trace(model, args.seq_len)
    with atomic_file(output) as tmp:  # replaces only what was checked above
        draw(graph, tmp)
    _console().print(f"wrote {output}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    import shear
    from shear.io.outputs import check_output_dir, check_writable_dir, tree_size
    from shear.io.targets import target_for
    from shear.model.target import parse_target
    from shear.passes import resolve_pipeline

    if args.passes is not None and args.pipeline is not None:
        raise ShearError("give either --passes or --pipeline, not both")
    if args.passes is not None and not args.passes.strip():
        raise PipelineError(
            'the pipeline is empty (--passes ""); omit --passes for the default pipeline, or name the passes, '
            'e.g. --passes "random{ratio=0.3,seed=0},erase"'
        )
    spec = args.pipeline if args.pipeline is not None else args.passes
    if spec is not None and (args.ratio is not None or args.budget != "auto"):
        raise ShearError("--ratio and --budget set the LoRAShear pipeline; give them without --passes/--pipeline")
    passes = resolve_pipeline(spec) if spec is not None else None  # fail on a typo before loading the model
    wanted = parse_target(args.target)  # an unknown --target word fails before loading the model
    if args.device is not None:
        from shear.model.devices import check_device

        check_device(args.device, "--device")  # a device this machine lacks fails now, not after loading
    # before any work: a run's output must not replace the user's files, nor fail to save at the end
    inputs = [args.model] + [p for p in (args.data, args.pipeline) if p and Path(p).exists()]
    if args.dump_dir is not None:  # the dumps go next to the output, never in or around it
        dump, out_real = Path(args.dump_dir).expanduser().resolve(), Path(args.output).expanduser().resolve()
        if dump == out_real or out_real in dump.parents:
            where = "is the output" if dump == out_real else "is inside the output"
            raise OutputError(
                f"--dump-dir {args.dump_dir} {where} {args.output}, which the save replaces; "
                "write the dumps to another folder"
            )
        if dump in out_real.parents:
            raise OutputError(
                f"-o {args.output} is inside the --dump-dir {args.dump_dir}, where shear adds its IR dumps; "
                "save the model outside it"
            )
    output = check_output_dir(
        args.output, overwrite=args.overwrite, needed_bytes=tree_size(Path(args.model).expanduser()), inputs=inputs
    )
    report = _report_path(args, inputs)
    if args.dump_dir is not None:  # the IR dumps: new, empty, or shear's own earlier dumps (or --overwrite)
        check_writable_dir(args.dump_dir, overwrite=args.overwrite, inputs=inputs)
    model = load_model(args.model)
    tokenizer = _tokenizer(args.model)
    data = _text_data(args.model, args.data, tokenizer)
    if passes is None:
        passes = _budget_pipeline(model, data, args)
    target = target_for(wanted, model, device=args.device)
    print(target.describe(), file=sys.stderr)
    small = shear.compile(
        model,
        passes,
        example_inputs=_example_inputs(model, args.seq_len),
        data=data,
        verify=not args.no_verify,
        inplace=False,  # the untouched model is the dense reference of recovery and EBFT
        device=args.device,
        debug=args.debug,
        dump_dir=args.dump_dir,
        progress=True,
        overwrite=args.overwrite,  # the --dump-dir files of the same names (the report is written below)
        target=target,
        evaluate=False if args.no_eval else args.eval_size,  # the verdict prints with the report below
    )
    out = _console()
    out.print(small.shear_report)
    inside = report is not None and report.parent.resolve() == output.resolve()
    if report is not None and inside:  # part of the saved folder: listed and hashed in its manifest
        from shear.report import render

        extra = {report.name: render(small.shear_report.details)}
    else:
        extra = {}
    refused = _save_for_target(small, output, wanted, overwrite=args.overwrite, tokenizer=tokenizer, files=extra)
    from shear.io.folder_formats import describe_folder

    saved = describe_folder(output)
    out.print(saved.line(args.output) + (" (with the tokenizer)" if tokenizer is not None else ""), markup=False)
    if saved.note:
        out.print(f"  ({saved.note})", markup=False)
    if refused is not None:
        out.print(f"--target {wanted.format}: {refused}; saved as shear instead", markup=False)
    if report is not None and not inside:
        from shear.report import write_html

        write_html(small.shear_report.details, report)
    if report is not None:
        out.print(f"report: {report}")
    return 0 if refused is None else 1


def _save_for_target(small: Any, output: Path, target: Any, **kwargs: Any) -> Any:
    """Save ``small`` in the folder format ``target`` names; when that format cannot hold the pruned model
    (an ``ExportError``, raised before anything is written), save it as ``shear`` so that the run is not
    lost, and return the error (None when the target was met)."""
    import shear
    from shear.errors import ExportError

    try:
        shear.save(small, output, target=target, **kwargs)
    except ExportError as e:
        shear.save(small, output, target="shear", **kwargs)
        return e
    return None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""Any of these in a model folder means it has a tokenizer."""


def _tokenizer(model_dir: str) -> Any:
    """The tokenizer saved in the model folder, or None when it has none."""
    if not any((Path(model_dir) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from shear.io.remote_code import refuse_remote_code

    refuse_remote_code(model_dir)  # tokenizer_config.json's auto_map: transformers would offer to run it
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{model_dir} has tokenizer files that transformers cannot read ({e}); fix or remove them"
        ) from e


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"--data: {file} is not UTF-8 text (byte {e.start}: {e.reason}); convert it (e.g. iconv -t utf-8) "
            "or remove it from the folder"
        ) from e


def _budget_pipeline(model: Any, data: object | None, args: argparse.Namespace) -> Any:
    """The LoRAShear pipeline with ``--ratio`` and ``--budget`` for a causal LM with data, else ``None``
    (``shear.compile``'s default for the model); says on stderr which budget, its tokens per stage and
    estimated time (:mod:`shear.scale.budget`), and where knowledge distribution is cached."""
    from shear.model.devices import model_device
    from shear.passes import resolve_pipeline
    from shear.passes.budgets import lorashear_pipeline
    from shear.passes.lorashear.knowledge_cache import with_cache
    from shear.passes.pipeline import LORASHEAR_PIPELINE, default_pipeline
    from shear.scale.budget import plan_budget

    if data is None or tuple(default_pipeline(model)) != LORASHEAR_PIPELINE:
        if args.ratio is not None or args.budget != "auto":
            raise ShearError("--ratio/--budget need a causal LM and text (--data); give --passes for this model")
        return None
    sources = len(getattr(data, "validation", {})) or 1
    plan = plan_budget(model, args.budget, args.device or model_device(model), sources=sources)
    spec = lorashear_pipeline(0.2 if args.ratio is None else args.ratio, plan.budget)
    print(f"LoRAShear with budget {plan.budget.name} ({plan.why}): {spec}", file=sys.stderr)
    print(plan.format(), file=sys.stderr)
    passes, note = with_cache(resolve_pipeline(spec), args.output, args.kd_cache, (args.model, args.data))
    print(note, file=sys.stderr)
    return passes


def _report_path(args: argparse.Namespace, inputs: Sequence[str | Path]) -> Path | None:
    """Where report.html goes (``--report PATH``, default ``<output>/report.html``; ``--no-report``:
    nowhere), checked before any work by the output guard: never a folder, a symbolic link, a file of
    an input (the model folder, the data, the pipeline file) or of a sub-folder of the output (the
    save replaces it); an existing file is kept unless ``--overwrite`` is given."""
    from shear.io.outputs import check_output_file

    if args.no_report:
        return None
    output = Path(args.output).expanduser().resolve()
    if not args.report:
        return output / "report.html"  # inside the output folder, which check_output_dir has cleared
    path = Path(args.report).expanduser()
    if path.resolve().parent == output and not path.is_symlink():
        return path.resolve()  # saved with the model, listed in its manifest
    try:
        if output in path.resolve().parents:
            raise OutputError(
                f"{path} is inside a sub-folder of the output {output}, which the save replaces; "
                f"write it next to the model ({output / path.name}) or outside the output"
            )
        return check_output_file(path, overwrite=args.overwrite, inputs=inputs)
    except OutputError as e:
        raise OutputError(f"--report: {e}") from e


def _text_data(model_dir: str, spec: str, tokenizer: Any) -> object | None:
    """``--data``: ``corpus`` (shear's committed corpus and instructions), ``none``, ``auto`` (the
    corpus when the model folder has a tokenizer, else none), or a folder of ``<source>.txt`` files
    (``<source>.validation.txt`` held out), tokenized with the model's tokenizer."""
    from shear.data import TextData

    if spec == "none":
        return None
    if spec == "auto":
        if tokenizer is None:
            return None
        spec = "corpus"
    if tokenizer is None:
        raise DataError(
            f"--data {spec}: no tokenizer in {model_dir} to tokenize the text; save the tokenizer next to "
            "the model (tokenizer.save_pretrained) or pass --data none for passes that need no data"
        )
    if spec == "corpus":
        return TextData.from_corpus(tokenizer, instructions=512)
    folder = Path(spec)
    if not folder.is_dir():
        raise DataError(f"--data {spec}: not a folder; give a folder of <source>.txt files, 'corpus' or 'none'")
    train = {f.stem: _read_text(f) for f in sorted(folder.glob("*.txt")) if ".validation" not in f.name}
    held = {f.name.split(".")[0]: _read_text(f) for f in sorted(folder.glob("*.validation.txt"))}
    if not train:
        raise DataError(f"--data {spec}: no <source>.txt files there; give a folder of text files, 'corpus' or 'none'")
    return TextData.from_texts(tokenizer, train, held)


def cmd_eval(args: argparse.Namespace) -> int:
    from shear.data import held_out, held_out_texts, read_validation_folder
    from shear.data.harness_tasks import harness_run
    from shear.evaluation import Verdict, check_comparable, evaluate_model
    from shear.evaluation.verdict import compare_speed_lazily
    from shear.progress import RichSink

    # bad input fails before any model loads: the tasks, the held-out files, the device
    tasks = harness_run(args.tasks.split(","), size=args.size, limit=args.limit, batch_size=args.batch_size) if args.tasks is not None else None
    texts = read_validation_folder(args.data) if args.data != "corpus" else None
    if args.device is not None:
        from shear.model.devices import check_device

        check_device(args.device, "--device")
    model = load_model(args.model)
    dense = load_model(args.against) if args.against is not None else None
    tokenizer, dense_tok = _tokenizer(args.model), _tokenizer(args.against) if args.against is not None else None
    if dense is not None:
        check_comparable(dense, model, dense_tokenizer=dense_tok, tokenizer=tokenizer)
    tokenizer = tokenizer or dense_tok
    if tokenizer is None:
        raise DataError(f"no tokenizer in {args.model}" + (f" or {args.against}" if args.against else "") + "; save the "
                        "tokenizer next to the model (tokenizer.save_pretrained) to evaluate it")  # fmt: skip
    held = (held_out(tokenizer, size=args.size, harness=tasks) if texts is None else
            held_out_texts(tokenizer, texts, size=args.size, origin=f"the validation files of {args.data}", harness=tasks))  # fmt: skip
    models = [m.to(args.device) if args.device else m for m in (model, dense) if m is not None]
    sink = RichSink()
    after = evaluate_model(models[0], held, size=args.size, progress=sink, label=f"({Path(args.model).name})")
    out = _console()
    if dense is None:
        out.print(after.format(), markup=False)
        return 0
    before = evaluate_model(models[1], held, size=args.size, progress=sink, label=f"({Path(args.against).name})")
    speed, note = compare_speed_lazily(models[1], models[0], args.size)
    out.print(Verdict.from_pair(before, after, speed=speed, speed_note=note or "not measured").format(), markup=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shear
    from shear.io.gguf import check_output, check_pre
    from shear.model.target import parse_target

    target = parse_target(args.target)
    if target.format not in ("auto", args.format):
        raise InputError(
            f"--target {args.target}: export writes {args.format} (--format {args.format}); the {target.format} format is "
            f"chosen when pruning or saving (shear prune --target {target.format})"
        )
    # before the model loads; never into the model or tokenizer folder
    check_output(args.output, force=args.force, inputs=[args.model, args.tokenizer])
    check_pre(args.pre)
    model = load_model(args.model)
    tokenizer = args.tokenizer or args.model
    path = shear.export(model, args.output, format=args.format, tokenizer=tokenizer, dtype=args.dtype,
                        merge_lora=args.merge_lora, force=args.force, pre=args.pre,
                        allow_nonfinite=args.allow_nonfinite)  # fmt: skip
    _console().print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import resource

    import shear

    result = shear.plan(
        args.model, args.ratio, world_size=args.world_size, batch=args.batch, seq_len=args.seq_len,
        lora_r=args.lora_r, round_to=args.round_to, layers=args.layers, group_ratio=args.group_ratio,
        kinds=_kinds(args.kinds), target=args.target,
    )
    print(result.format())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"measured: planning took {result.seconds:.1f} s, peak RSS of this process {peak:.0f} MB")
    return 0


def cmd_stream_prune(args: argparse.Namespace) -> int:
    import shear

    report = shear.prune_streamed(
        args.model, args.output, args.ratio, criterion=args.criterion, round_to=args.round_to,
        overwrite=args.overwrite, integrity=args.integrity, group_ratio=args.group_ratio,
        kinds=_kinds(args.kinds), target=args.target,
    )
    print(report.format())
    return 0


def _kinds(text: str | None) -> tuple[str, ...] | None:
    """``--kinds channel,head`` as a tuple (``None``: the command's default)."""
    return tuple(k.strip() for k in text.split(",") if k.strip()) if text else None


_TARGET_HELP = (
    "where the model will run: a format (auto, hf, nas, gguf, shear) and/or a device (auto, cpu, cuda), "
    "comma-separated, e.g. nas,cuda; widths follow its measured steps and layout (default auto: the "
    "model's device, nas when the model fits it, else shear); --round-to or a pass's round_to overrides it"
)
_RATIO_HELP = (
    "share of the PARAMETERS removed (default 0.2), as shear prune --ratio: counts per group from the "
    "parameter budget over --kinds"
)
_GROUP_RATIO_HELP = "share of EVERY prunable group's structures instead (the per-group meaning; not with --ratio)"
_KINDS_HELP = "group kinds to prune, comma-separated (default channel with --ratio, all with --group-ratio)"


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from shear.evaluation.llama_cpp_speed import check_gguf_file, gguf_speed, require_llama_cpp
    from shear.evaluation.speed import compare_speed

    if args.gguf_dense and not args.gguf:
        raise InputError("--gguf-dense needs --gguf (the pruned model's GGUF file) to compare with")
    if args.gguf:  # before any model loads: a missing binding or file fails now
        require_llama_cpp()
        check_gguf_file(args.gguf, "--gguf")
        if args.gguf_dense:
            check_gguf_file(args.gguf_dense, "--gguf-dense")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads {args.threads}: give a positive number of CPU threads")
        torch.set_num_threads(args.threads)
    if args.device is not None:
        from shear.model.devices import check_device

        check_device(args.device, "--device")
    dense, pruned = load_model(args.dense).eval(), load_model(args.pruned).eval()
    sizes = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats)
    result = compare_speed(dense, pruned, device=args.device, batches=tuple(args.batches), granularity=args.granularity,
                           mode="both" if args.static else "eager", **sizes)  # fmt: skip
    if args.gguf:
        pruned_rates = gguf_speed(args.gguf, threads=args.threads, **sizes)
        dense_rates = gguf_speed(args.gguf_dense, threads=args.threads, **sizes) if args.gguf_dense else {}
        for name, rate in pruned_rates.items():
            result.add(name, dense_rates.get(name, "not measured: give the dense GGUF with --gguf-dense"), rate)
    print(result.format())
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from shear.passes import import_errors, lookup_pass, pass_doc, pass_options, registered_passes
    from shear.passes.base import key_name
    from shear.passes.options import format_value

    out = _console()
    classes = [lookup_pass(args.name)] if args.name else list(registered_passes().values())
    for cls in classes:
        doc = pass_doc(cls)
        out.print(f"[bold]{cls.name}[/bold]  [dim]{cls.__module__}.{cls.__qualname__}[/dim]")
        if doc:
            out.print("  " + (doc if args.name else doc.split("\n\n")[0]).replace("\n", "\n  "))
        deps = [
            f"requires {', '.join(key_name(k) for k in cls.requires)}" if cls.requires else "",
            f"ensures {', '.join(key_name(k) for k in cls.ensures)}" if cls.ensures else "",
        ]
        if any(deps):
            out.print("  [dim]" + "; ".join(d for d in deps if d) + "[/dim]")
        options = pass_options(cls)
        if options:
            table = Table(show_header=True, box=None, padding=(0, 2))
            for col in ("option", "type", "default", "doc"):
                table.add_column(col)
            for o in options:
                default = "(required)" if o.required else format_value(o.default)
                table.add_row(o.name, o.type_name, default, o.doc.split("\n")[0])
            out.print(table)
        out.print()
    for module, err in import_errors().items():
        _console(stderr=True).print(f"[yellow]warning:[/yellow] pass module {module} failed to import: {err}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per action)."""
    parser = argparse.ArgumentParser(prog="shear", description="Structured pruning of PyTorch LLMs as a compiler.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,draw,prune,eval,export,plan,stream-prune,bench,passes}")

    def model_command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("model", help="local model directory (save_pretrained or shear.save); never a hub id")
        p.add_argument("--seq-len", type=int, default=16, help="length of the example token sequence (default 16)")
        return p

    p = model_command("inspect", "print the pruning groups of a model")
    p.add_argument("--all", action="store_true", help="also list unprunable groups and why")
    p.set_defaults(func=cmd_inspect)

    p = model_command("draw", "draw node groups, LoRA composites and overlaps with graphviz")
    p.add_argument("-o", "--output", required=True, help="output file (.svg, .png, .pdf or .dot)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.set_defaults(func=cmd_draw)

    p = model_command("prune", "run a pipeline and save the pruned model")
    p.add_argument("--passes", help='pipeline string, e.g. "random{ratio=0.3,seed=0},erase" (default, when omitted: the LoRAShear pipeline for causal LMs; an empty string is refused)')
    p.add_argument("--pipeline", help="pipeline file (.toml, or .yaml with PyYAML)")
    p.add_argument(
        "--data",
        default="auto",
        help="text for passes that calibrate or train: 'corpus' (shear's committed corpus), 'none', 'auto' "
        "(corpus when the model folder has a tokenizer; default), or a folder of <source>.txt files with "
        "optional <source>.validation.txt",
    )
    p.add_argument("-o", "--output", required=True, help="new directory to save the pruned model (and tokenizer) to")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing non-empty output directory (atomically; never the input or the current folder)",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: where the model loads)")
    p.add_argument("--no-verify", action="store_true", help="skip every equivalence check of erased models (each erase's own too)")
    p.add_argument("--debug", action="store_true", help="check IR invariants after every pass")
    p.add_argument("--dump-dir", default=None, help="write the IR after every pass to this directory")
    p.add_argument(
        "--ratio", type=float, default=None,
        help="share of the parameters the LoRAShear pipeline removes (default 0.2); not with --passes",
    )
    p.add_argument("--target", default="auto", help=_TARGET_HELP)
    p.add_argument(
        "--budget", default="auto", choices=("auto", "quick", "default", "paper"),
        help="LoRAShear training budget in tokens per stage: quick (768 training tokens), default (31k), paper "
        "(17M, for a GPU); auto: on a GPU a real run (at least 1M tokens), on a CPU default up to 2B parameters "
        "and a refusal with the estimated time above (shear.passes.budgets); tokens and time print first",
    )
    p.add_argument(
        "--kd-cache", default=None, metavar="DIR",
        help="keep the knowledge-distribution result here (default: shear-kd-cache next to the output), so a "
        "rerun with the same model, data and budget at another --ratio reuses it; 'none': no cache",
    )
    p.add_argument(
        "--report", default=None, metavar="PATH",
        help="where report.html goes (default <output>/report.html): one self-contained page with the "
        "passes, widths per layer, training and the folded IR",
    )
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    p.add_argument("--no-eval", action="store_true", help="skip the quality verdict (measured before and after by default)")
    p.add_argument("--eval-size", default="quick", choices=("quick", "full"),
                   help="how much the quality verdict reads: quick (default, seconds) or full (docs/evaluation.md)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", help="write a model for a serving engine (GGUF for llama.cpp)",
                       description="write a model for a serving engine (GGUF for llama.cpp)")  # fmt: skip
    p.add_argument("model", help="local model directory (save_pretrained or shear.save); never a hub id")
    p.add_argument("-o", "--output", required=True, help="file to write, e.g. model.gguf")
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default gguf)")
    p.add_argument("--target", default="auto", help="checked against --format: auto, gguf, and/or a device (auto, cpu, cuda)")
    p.add_argument("--dtype", default="f16", choices=["f16", "bf16", "f32"], help="weight type (default f16)")
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the model folder)")
    p.add_argument("--merge-lora", action="store_true", help="fold unmerged LoRA adapters into the written weights")
    p.add_argument("--pre", default=None, help="llama.cpp pre-tokenizer name, when shear cannot tell it (one llama.cpp knows)")
    p.add_argument("--allow-nonfinite", action="store_true", help="write tensors holding NaN or Inf (refused by default)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="plan a prune from the config alone: groups, sizes, predicted memory",
                       description="plan a prune from the config alone (meta device, no weights read): groups, "
                       "structure counts, the parameter count after pruning, and the predicted memory of each stage")
    p.add_argument("model", help="model directory with config.json, or a config JSON file")
    p.add_argument("--ratio", type=float, default=None, help=_RATIO_HELP)
    p.add_argument("--group-ratio", type=float, default=None, help=_GROUP_RATIO_HELP)
    p.add_argument("--kinds", default=None, help=_KINDS_HELP)
    p.add_argument("--target", default="auto", help=_TARGET_HELP)
    p.add_argument("--world-size", type=int, default=8, help="GPUs sharing LHSPG under FSDP (default 8)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch per GPU (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--round-to", type=int, default=0, help="keep multiples of this per group (default 0: the target's steps)")
    p.add_argument("--layers", default="stamp", choices=("stamp", "all"),
                   help="stamp: trace 2 blocks and stamp the rest (default); all: trace every block")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("stream-prune", help="prune safetensors shards tensor by tensor (magnitude), never whole in memory",
                       description="prune a safetensors checkpoint by structured magnitude at --ratio, reading and "
                       "writing one tensor at a time; the output loads with shear.load")
    p.add_argument("model", help="model directory: config.json and model.safetensors or sharded safetensors + index")
    p.add_argument("-o", "--output", required=True, help="new directory for the pruned checkpoint (not inside the source)")
    p.add_argument("--ratio", type=float, default=None, help=_RATIO_HELP)
    p.add_argument("--group-ratio", type=float, default=None, help=_GROUP_RATIO_HELP)
    p.add_argument("--kinds", default=None, help=_KINDS_HELP)
    p.add_argument("--target", default="auto", help=_TARGET_HELP)
    p.add_argument("--criterion", default="magnitude", choices=("magnitude",), help="saliency criterion (default magnitude)")
    p.add_argument("--round-to", type=int, default=0, help="keep multiples of this per group (default 0: the target's steps)")
    p.add_argument("--integrity", action="store_true", help="also check the source shards' sha256 where shear.json lists them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory (atomically)")
    p.set_defaults(func=cmd_stream_prune)

    p = sub.add_parser("eval", help="measure a model's quality; with --against, judge it against its dense model",
                       description="measure perplexity per source on held-out text, multiple-choice accuracy and greedy "
                       "generations; with --against DENSE_DIR, print the quality verdict (docs/evaluation.md)")
    p.add_argument("model", help="local model directory (shear.save, save_pretrained, or a GGUF export's source folder)")
    p.add_argument("--against", default=None, metavar="DENSE_DIR", help="the dense model it was pruned from: print the verdict")
    p.add_argument("--data", default="corpus", help="held-out text: 'corpus' (the bundled corpus's validation split; "
                   "default) or a folder of <source>.validation.txt files")
    p.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated, instead of shear's bundled "
                   "tasks (needs pip install lm_eval); shear_define_word, shear_next_line_kjv, shear_next_line_shakespeare run offline")
    p.add_argument("--size", default="quick", choices=("quick", "full"), help="how much to read (default quick)")
    p.add_argument("--limit", type=int, default=None, help="--tasks: at most this many items per task")
    p.add_argument("--batch-size", type=int, default=4, help="--tasks: lm-eval batch size (default 4)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: where the model loads)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="time a dense and a pruned model: prefill and decode tokens/s, speed-up, efficiency",
                       description="time DENSE and PRUNED on one device (prefill and decode at each batch size, medians "
                       "after a warm-up) and print tokens/s, speed-up and efficiency (speed-up / parameter ratio); "
                       "with --gguf, llama.cpp's prompt-eval and generation tokens/s too (needs llama-cpp-python)")
    p.add_argument("dense", help="the dense model's local directory (save_pretrained or shear.save)")
    p.add_argument("pruned", help="the pruned model's local directory (save_pretrained or shear.save)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: where the models load)")
    p.add_argument("--gguf", default=None, metavar="FILE", help="the pruned model as a GGUF file: time it in llama.cpp")
    p.add_argument("--gguf-dense", default=None, metavar="FILE", help="the dense model as a GGUF file, to compare with --gguf")
    p.add_argument("--static", action="store_true", help="also decode with a StaticCache and torch.compile "
                   "(what transformers deployments use; compiling takes tens of seconds per model)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and llama.cpp (default: torch's)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length of the prefill rows (default 64)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated by the decode rows (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after the warm-up; medians are shown (default 3)")
    p.add_argument("--granularity", type=int, default=None, help="list Linear widths that are not multiples of this "
                   "(default: the device's width step as --target measured it; 8 on a CPU, 64 on a GPU before any measurement)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("passes", help="list the registered passes, their options and docs")
    p.add_argument("name", nargs="?", help="show one pass in full")
    p.set_defaults(func=cmd_passes)
    return parser


_MAX_EXAMPLE_TOKENS = 1 << 16
"""Longest example sequence inspect, draw and prune trace with (a trace needs a few tokens)."""


def _check_args(args: argparse.Namespace) -> None:
    """The example input's --seq-len of inspect, draw and prune, refused before any model loads
    (``shear plan`` passes its own to :func:`shear.plan`, which bounds it)."""
    if args.command in ("inspect", "draw", "prune") and not 1 <= args.seq_len <= _MAX_EXAMPLE_TOKENS:
        raise InputError(
            f"--seq-len {args.seq_len}: a sequence needs 1 to {_MAX_EXAMPLE_TOKENS:,} tokens; give a length in that "
            "range (a few tokens are enough to trace the model)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shear`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        return int(args.func(args))
    except ShearError as e:
        print(f"shear {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
