"""shear's benchmark, check and data scripts: one package, run from the repository root as modules.

Every tool is a module with a ``main(argv)``; run it with ``python -m tools.<name> ...`` from the
repository root (the root must be on ``sys.path``, which ``-m`` gives from there; no tool edits
``sys.path``). Tools import one another as ``from tools.x import y``; helpers the benchmarks share
(Markdown tables, the load-average note, timing medians, peak memory) live in
:mod:`tools.bench_common`. Tests import them the same way (``tests/test_tools.py``).

Benchmarks (tables for the README):

- ``python -m tools.bench_quality --quick``      LoRAShear vs LLM-Pruner-style, magnitude and unstructured baselines
- ``python -m tools.bench_lorashear --quick``    LHSPG vs one-shot magnitude vs dense, no recovery
- ``python -m tools.bench_allocation``           per-layer allocation of a one-shot MLP cut (SmolLM2-135M)
- ``python -m tools.bench_speed``                dense vs pruned latency (prefill, decode)
- ``python -m tools.bench_step``                 training-step throughput: plain peft vs shear's LHSPG / recovery
- ``python -m tools.bench_training_memory``      peak memory of LoRAShear phase by phase on a LLaMA shape
- ``python -m tools.bench_discovery``            trace + grouping time and peak RSS on the meta device
- ``python -m tools.bench_streaming --work /tmp`` planning and the streamed prune of a 7B-shaped checkpoint

Checks (their assertions are tests; the tools print the tables):

- ``python -m tools.gpu_check``                  runs ``tests/gpu`` (``@pytest.mark.gpu``) and prints the GPU table
- ``python -m tools.arch_coverage``              which transformers architectures prune, and how (``tests/test_tools.py``)
- ``python -m tools.compat snapshot|compare``    what a newer torch / transformers / peft changes (``./dev compat``)
- ``python -m tools.gguf_check --client-python PY`` shear's GGUF export in llama.cpp; ``tools/llama_cpp_client.py``
  is the one script run by path, in another interpreter that has ``llama-cpp-python`` and no shear

Data and models:

- ``python -m tools.build_corpus [--check]``     rebuild the committed corpus (``tools.corpus_parsers``,
  ``tools.corpus_instructions``) and its card (``python -m tools.make_data_card``)
- ``python -m tools.train_tiny_llama``           train the tiny reference LLaMA of ``shear/zoo/tiny_llama``
"""

from __future__ import annotations

__all__: list[str] = []
