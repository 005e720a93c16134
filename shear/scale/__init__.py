"""Beyond one device: plan a prune from the config alone, and prune checkpoints larger than memory.

* :func:`plan` (``shear plan``): groups, structure counts, the parameter count after pruning and the
  predicted memory of each stage, on the meta device (:mod:`shear.scale.plan`);
* :func:`prune_streamed` (``shear stream-prune``): magnitude saliency and erasure streamed tensor by
  tensor from safetensors shards into new shards (:mod:`shear.scale.stream`).

Example:
    >>> import shear
    >>> shear.plan("llama-405b/config.json", ratio=0.2).params_after       # doctest: +SKIP
    >>> shear.prune_streamed("llama-7b", "llama-7b-pruned", ratio=0.2)       # doctest: +SKIP
"""

from shear.scale.plan import GroupFamily, PrunePlan, plan
from shear.scale.stream import Stage, StreamReport, prune_streamed

__all__ = ["GroupFamily", "PrunePlan", "plan", "Stage", "StreamReport", "prune_streamed"]
