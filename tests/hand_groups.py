"""Pruning groups written by hand for a tiny transformers LLaMA (plain or peft LoRA).

They pin the contract between the IR and codegen independently of the tracer: MLP intermediate
channels, GQA kv-head families, and the residual width (with RMSNorm rescaling).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from shear.graph.groups import Member, NormRescale, PruningGroup, Role

__all__ = ["tiny_llama", "llama_groups"]


def tiny_llama(*, tie: bool = False, seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    """A 2-layer GQA LLaMA (8 query / 2 kv heads, head_dim 8), fp32, eval mode."""
    torch.manual_seed(seed)
    kw: dict = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=tie,
        rms_norm_eps=1e-5, attn_implementation="sdpa",
    )
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # random norm weights so that the rescaling is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _linear(model: nn.Module, path: str) -> tuple[str, str | None, str | None, str | None]:
    """(weight, bias, lora_A weight, lora_B weight) names of a (possibly LoRA-wrapped) linear."""
    mod = model.get_submodule(path)
    if hasattr(mod, "base_layer"):
        base = f"{path}.base_layer"
        bias = f"{base}.bias" if mod.base_layer.bias is not None else None
        return f"{base}.weight", bias, f"{path}.lora_A.default.weight", f"{path}.lora_B.default.weight"
    bias = f"{path}.bias" if mod.bias is not None else None
    return f"{path}.weight", bias, None, None


def _arange(n: int, k: int = 1) -> torch.Tensor:
    return torch.arange(n * k).view(n, k)


def _producer(model: nn.Module, path: str, pos: torch.Tensor) -> list[Member]:
    w, b, _a, lb = _linear(model, path)
    out = [Member(w, 0, Role.PRIMARY, pos)]
    out += [Member(b, 0, Role.PRIMARY, pos)] if b else []
    out += [Member(lb, 0, Role.PRIMARY, pos)] if lb else []
    return out


def _consumer(model: nn.Module, path: str, pos: torch.Tensor) -> list[Member]:
    w, _b, la, _lb = _linear(model, path)
    out = [Member(w, 1, Role.SECONDARY, pos)]
    out += [Member(la, 1, Role.SECONDARY, pos)] if la else []
    return out


def llama_groups(model: nn.Module, *, residual: bool = True) -> list[PruningGroup]:
    """MLP, kv-family and residual groups of a LlamaForCausalLM (or a PeftModel around one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    pre = "base_model.model." if base is not model else ""
    groups: list[PruningGroup] = []
    hd, n_kv = cfg.head_dim, cfg.num_key_value_heads
    q_per_kv = cfg.num_attention_heads // n_kv
    res_members: list[Member] = []
    H = cfg.hidden_size
    hpos = _arange(H)
    norms: list[NormRescale] = []
    for i in range(cfg.num_hidden_layers):
        lp = f"{pre}model.layers.{i}"
        inter = _arange(cfg.intermediate_size)
        members = _producer(model, f"{lp}.mlp.gate_proj", inter) + _producer(model, f"{lp}.mlp.up_proj", inter)
        members += _consumer(model, f"{lp}.mlp.down_proj", inter)
        groups.append(PruningGroup(len(groups), f"{lp}.mlp/intermediate", tuple(members), cfg.intermediate_size))
        qpos = _arange(n_kv, hd * q_per_kv)
        kvpos = _arange(n_kv, hd)
        members = _producer(model, f"{lp}.self_attn.q_proj", qpos)
        members += _producer(model, f"{lp}.self_attn.k_proj", kvpos) + _producer(model, f"{lp}.self_attn.v_proj", kvpos)
        members += _consumer(model, f"{lp}.self_attn.o_proj", qpos)
        groups.append(PruningGroup(len(groups), f"{lp}.self_attn/kv-heads", tuple(members), n_kv, kind="head"))
        res_members += _producer(model, f"{lp}.self_attn.o_proj", hpos) + _producer(model, f"{lp}.mlp.down_proj", hpos)
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            res_members += _consumer(model, f"{lp}.{proj}", hpos)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            res_members.append(Member(f"{lp}.{norm}.weight", 0, Role.SECONDARY, hpos))
            norms.append(NormRescale(f"{lp}.{norm}", H))
    if residual:
        res_members.insert(0, Member(f"{pre}model.embed_tokens.weight", 1, Role.PRIMARY, hpos))
        res_members.append(Member(f"{pre}model.norm.weight", 0, Role.SECONDARY, hpos))
        norms.append(NormRescale(f"{pre}model.norm", H))
        res_members += _consumer(model, f"{pre}lm_head", hpos)
        groups.append(PruningGroup(len(groups), "residual", tuple(res_members), H, kind="residual", norms=tuple(norms)))
    return groups
