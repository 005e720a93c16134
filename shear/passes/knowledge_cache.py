"""A directory of knowledge-distribution results, keyed by what determines them.

Knowledge distribution is the costliest analysis of the LoRAShear pipeline (one perplexity
evaluation per node group: 32-54 minutes of a SmolLM2 LoRAShear row on the shared 2-core CPU, 61-78% of its wall time) and its
result does not depend on the pruning ratio, the schedule or the recovery that follow. A run with
``knowledge-distribution{cache_dir=...}`` stores its result as JSON under a key made of the model's
weights (adapters left out: their random start does not change what a node group is worth to the
base model, and the key still sees the peft names), the validation and training text, the pass's
options and shear's version; a later run with the same key loads the result instead of measuring
again. The file holds numbers and names only (JSON, no pickle).

Example:
    >>> import tempfile, pathlib
    >>> from shear.passes.knowledge import KnowledgeDistribution, NodeGroupDeviation
    >>> e = NodeGroupDeviation(0, "mlp", "basic", (0,), 4, 12.0, 2.0, 0.2, unprunable=True)
    >>> kd = KnowledgeDistribution(10.0, {"a": 10.0}, (e,), (0,), frozenset({0}), frozenset({0}), 0.5, 0.1, "random")
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "kd.json"
    >>> save_result(path, kd); load_result(path) == kd
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from shear.errors import PassError
from shear.runtime.training.fingerprint import RunFingerprint, tensor_digest

if TYPE_CHECKING:
    from shear.passes.knowledge import KnowledgeDistribution

__all__ = ["cache_key", "save_result", "load_result", "FORMAT"]

FORMAT = "shear-knowledge-distribution"


def cache_key(model: nn.Module, data: Any, options: dict[str, Any]) -> str:
    """Hex key (24 digits) of a knowledge-distribution run: weights, text, options, shear version."""
    text = tensor_digest(
        [(f"validation/{k}", v) for k, v in sorted(data.validation.items())]
        + [(f"train/{k}", v) for k, v in sorted(data.train.items())]
    )
    fp = RunFingerprint.of(model, data=text, options=options)
    return hashlib.sha256(json.dumps(fp.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_result(path: Path, kd: KnowledgeDistribution) -> None:
    """Write ``kd`` to ``path`` as JSON, atomically (a temporary sibling, then a rename)."""
    doc = asdict(kd)
    for key in ("unprunable_node_groups", "unprunable_groups"):
        doc[key] = sorted(doc[key])
    doc["figures"] = [str(f) for f in doc["figures"]]
    doc["format"] = FORMAT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, path)


def load_result(path: Path) -> KnowledgeDistribution:
    """The :class:`KnowledgeDistribution` stored at ``path``; a :class:`PassError` naming the file if it
    is not one (delete it to measure again)."""
    from shear.passes.knowledge import KnowledgeDistribution, NodeGroupDeviation

    def unreadable(why: object) -> PassError:
        return PassError(f"knowledge-distribution: the cached result {path} cannot be read ({why}); delete it to measure again")

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise unreadable(e) from e
    if not isinstance(doc, dict) or doc.pop("format", None) != FORMAT:
        raise unreadable(f"not a {FORMAT} file")
    try:
        entries = tuple(
            NodeGroupDeviation(**{**e, "pruning_groups": tuple(e["pruning_groups"])}) for e in doc.pop("entries")
        )
        return KnowledgeDistribution(
            **{
                **doc,
                "entries": entries,
                "ranking": tuple(doc["ranking"]),
                "unprunable_node_groups": frozenset(doc["unprunable_node_groups"]),
                "unprunable_groups": frozenset(doc["unprunable_groups"]),
                "figures": tuple(Path(f) for f in doc["figures"]),
            }
        )
    except (ValueError, TypeError, KeyError) as e:
        raise unreadable(e) from e
