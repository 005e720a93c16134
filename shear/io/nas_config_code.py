"""The one Python file a Nemotron-NAS folder holds: its config class, which shear writes and never runs.

vLLM and TensorRT-LLM build a checkpoint's config through transformers' ``AutoConfig``, which does
not know ``model_type: nemotron-nas``; NVIDIA's own Nemotron-NAS checkpoints (Llama-3.1-Nemotron-51B,
Llama-3.3-Nemotron-Super-49B) ship a ``configuration_decilm.py`` for it and are served with
``--trust-remote-code``. A folder shear writes with ``target="nas"`` ships :data:`CONFIG_CODE` the
same way: a config class only (it parses ``config.json``; no model code), named in ``config.json``'s
``auto_map``. llama.cpp's converter and MLX read ``config.json`` directly and never need it.

shear itself never imports the file: :func:`is_shear_config_code` accepts a folder's copy only when
it is byte-identical to :data:`CONFIG_CODE`, and :mod:`shear.io.remote_code` lets the ``auto_map``
that names it pass for that reason alone (any other code in a folder is still refused).

Example:
    >>> CONFIG_CODE_FILE, AUTO_MAP["AutoConfig"]
    ('configuration_decilm.py', 'configuration_decilm.DeciLMConfig')
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["AUTO_MAP", "CONFIG_CODE", "CONFIG_CODE_FILE", "CONFIG_CODE_SHA256", "is_shear_config_code"]

CONFIG_CODE_FILE = "configuration_decilm.py"
"""Where the config class lives in the folder (the name NVIDIA's checkpoints use)."""

AUTO_MAP: dict[str, str] = {"AutoConfig": "configuration_decilm.DeciLMConfig"}
"""``config.json``'s ``auto_map``: transformers' AutoConfig (with trust_remote_code) builds this class."""

CONFIG_CODE = '''\
"""Nemotron-NAS (DeciLM) config of a folder written by shear: per-layer widths in block_configs.

vLLM and TensorRT-LLM load this class through transformers' AutoConfig (trust_remote_code); it only
parses config.json. llama.cpp's convert_hf_to_gguf.py and MLX read config.json themselves.
"""

import dataclasses
from typing import Any, Optional

from transformers import LlamaConfig


@dataclasses.dataclass
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    sparsify: Optional[Any] = None
    n_heads_in_group: Optional[int] = None


@dataclasses.dataclass
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    sparsify: Optional[Any] = None
    ffn_mult: Optional[float] = None


def _known(cls, fields):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(fields).items() if k in names})


@dataclasses.dataclass
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_any(cls, block):
        if isinstance(block, cls):
            return block
        return cls(_known(AttentionConfig, block["attention"]), _known(FFNConfig, block["ffn"]))


def ffn_width(ffn_mult, hidden_size):
    """A layer's MLP width: int(2 * ffn_mult * hidden_size / 3) rounded up to a multiple of 256."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


class DeciLMConfig(LlamaConfig):
    """LlamaConfig plus block_configs; intermediate_size and num_key_value_heads hold the widest MLP and
    the first attention layer's kv heads (readers take the per-layer values from block_configs)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        blocks = [BlockConfig.from_any(b) for b in block_configs or []]
        hidden = kwargs.get("hidden_size", 4096)
        widths = [ffn_width(b.ffn.ffn_mult, hidden) for b in blocks if not b.ffn.no_op and b.ffn.ffn_mult]
        kwargs["intermediate_size"] = max(widths, default=1)
        groups = [b.attention.n_heads_in_group for b in blocks
                  if not b.attention.no_op and b.attention.n_heads_in_group]
        if groups:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 32) // groups[0]
        super().__init__(**kwargs)
        self.block_configs = blocks

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [dataclasses.asdict(b) for b in self.block_configs]
        return out
'''
"""The file's text: a LlamaConfig subclass whose ``block_configs`` entries are dataclasses, as vLLM's
``nemotron_nas`` reads them (``block_configs[i].attention.no_op``, ``hasattr(ffn, "ffn_mult")``) and
TensorRT-LLM's converter does (``dataclasses.asdict(block_config)``)."""

CONFIG_CODE_SHA256 = hashlib.sha256(CONFIG_CODE.encode()).hexdigest()
"""What a folder's copy must hash to."""


def is_shear_config_code(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` holds :data:`CONFIG_CODE_FILE` byte-identical to :data:`CONFIG_CODE` (a plain
    file, at most a few kilobytes): the config class shear writes, never a model's own code."""
    f = Path(folder) / CONFIG_CODE_FILE
    if f.is_symlink() or not f.is_file() or f.stat().st_size > 4 * len(CONFIG_CODE):
        return False
    return hashlib.sha256(f.read_bytes()).hexdigest() == CONFIG_CODE_SHA256
