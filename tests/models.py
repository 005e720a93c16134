"""Small models of every architecture the IR must handle, built from configs (no downloads).

``build(arch, lora=False)`` returns ``(model, example_inputs)`` in eval mode, fp32, seeded.
Architectures: llama (GQA 8 q / 2 kv heads), qwen2 (qkv bias), mistral, gpt2 (Conv1D, fused
c_attn), opt, bert, cnn (ResNet-style: conv, batchnorm, residual add, 1x1 shortcut, concat),
qwen3 (per-head q/k RMS norms), phi3 (fused qkv and gate_up projections; reads head counts from its
config), gemma3 (``(1 + w)`` norms, per-head q/k norms, sandwich norms, scaled embeddings), granite
(residual / attention / logit multipliers; its RMS norm is recognised by probing).

Example:
    >>> model, inputs = build("llama")
    >>> type(model).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ARCHS", "build", "fresh_inputs", "TinyResNet"]

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt", "bert", "cnn", "qwen3", "phi3", "gemma3", "granite"]
VOCAB = 96
SEQ = 8


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus a 1x1 conv shortcut, added."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet-style CNN with a concat of two branches before the head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block1 = Block(8, 12)
        self.branch_a = nn.Conv2d(12, 6, 1)
        self.branch_b = nn.Conv2d(12, 10, 3, padding=1)
        self.block2 = Block(16, 16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.block1(x)
        x = torch.cat([torch.relu(self.branch_a(x)), torch.relu(self.branch_b(x))], dim=1)
        x = self.block2(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def _randomize_norms(model: nn.Module) -> None:
    """Give norms non-trivial affine parameters and statistics (fresh inits are all ones/zeros)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        for name in ("weight", "bias"):
            p = getattr(m, name, None)
            if isinstance(p, nn.Parameter) and p.dim() == 1 and "norm" in type(m).__name__.lower():
                with torch.no_grad():
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if name == "weight" else 0.1 * torch.randn(p.shape, generator=g))
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape, generator=g))


def _hf(arch: str) -> nn.Module:
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, **common)
        return tf.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, **common)
        return tf.Qwen2ForCausalLM(cfg)
    if arch == "mistral":
        cfg = tf.MistralConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common)
        return tf.MistralForCausalLM(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4)
        return tf.GPT2LMHeadModel(cfg)
    if arch == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=48, ffn_dim=80, num_hidden_layers=2,
                           num_attention_heads=4, word_embed_proj_dim=48, max_position_embeddings=64)
        return tf.OPTForCausalLM(cfg)
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64)
        return tf.BertModel(cfg, add_pooling_layer=False)
    gqa: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, **gqa))
    if arch == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **gqa))
    if arch == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=16, sliding_window=4, **gqa))
    if arch == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(residual_multiplier=0.5, embedding_multiplier=2.0,
                                                      attention_multiplier=0.2, logits_scaling=4.0, **gqa))
    raise KeyError(arch)


LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bert": ["query", "key", "value", "dense"],
    "cnn": ["fc"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "granite": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def fresh_inputs(arch: str, seed: int = 0, batch: int = 1, seq: int = SEQ) -> Any:
    g = torch.Generator().manual_seed(seed)
    if arch == "cnn":
        return (torch.randn(batch, 3, 8, 8, generator=g),)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def build(arch: str, lora: bool = False, seed: int = 0) -> tuple[nn.Module, Any]:
    """A small seeded ``arch`` model (optionally peft LoRA r=8) and example inputs."""
    torch.manual_seed(seed)
    model = TinyResNet() if arch == "cnn" else _hf(arch)
    _randomize_norms(model)
    model = model.float().eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS[arch], lora_dropout=0.0,
                         init_lora_weights=False)
        model = get_peft_model(model, cfg).eval()
    return model, fresh_inputs(arch)
