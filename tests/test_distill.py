"""Distillation from the dense teacher: the chunked KL, the loss function, and the passes' options."""

from __future__ import annotations

import copy
import doctest
import importlib

import pytest
import torch
from torch.nn import functional as F

import shear
from shear.data import TextData
from shear.errors import PipelineError
from shear.training import (
    DistillLoss,
    TokenBatches,
    TrainConfig,
    chunked_distill_sums,
    ensure_lora,
    is_lora_param,
    train,
)
from shear.zoo import load_tiny_llama


@pytest.fixture(scope="module")
def tiny():
    model, tok, _, _ = load_tiny_llama()
    data = TextData.from_corpus(tok, max_train_chars=30_000, max_val_chars=6_000)
    return model, data


def test_doctests():
    module = importlib.import_module("shear.training.distill")
    assert doctest.testmod(module, raise_on_error=True).failed == 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_sums_equal_the_full_computation(temperature):
    g = torch.Generator().manual_seed(0)
    head, t_head = torch.nn.Linear(8, 11, bias=False), torch.nn.Linear(12, 11, bias=False)
    hidden, t_hidden = torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 12, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, 3] = -100
    ce, kl = chunked_distill_sums(hidden, head, t_hidden, t_head, labels, chunk=3, temperature=temperature)
    s, t = head(hidden)[:, :-1].reshape(-1, 11), t_head(t_hidden)[:, :-1].reshape(-1, 11)
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    full_ce = F.cross_entropy(s, y, ignore_index=-100, reduction="sum")
    full_kl = F.kl_div(F.log_softmax(s[keep] / temperature, -1), F.log_softmax(t[keep] / temperature, -1),
                       log_target=True, reduction="sum")
    assert torch.allclose(ce, full_ce, atol=1e-5) and torch.allclose(kl, full_kl, atol=1e-5)


def test_kl_is_zero_for_the_teacher_itself_and_gradients_reach_only_lora(tiny):
    teacher, _ = tiny
    student, _ = ensure_lora(copy.deepcopy(teacher), r=4)  # lora_B starts at zero: student == teacher
    ids = torch.randint(0, teacher.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    loss = DistillLoss(teacher, weight=1.0, temperature=2.0, chunk=16)
    ce, kl = loss.sums(student, batch)
    assert abs(kl.item()) < 1e-5 and ce.item() > 0
    flags = [p.requires_grad for p in teacher.parameters()]
    was_training = teacher.training
    with torch.no_grad():  # move the student off the teacher so the KL has a gradient
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    value = loss(student, batch)
    assert float(value) > 0
    value.backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(is_lora_param(n) for n in grads)
    assert all(p.grad is None for p in teacher.parameters())
    assert [p.requires_grad for p in teacher.parameters()] == flags and teacher.training == was_training


def test_weight_zero_is_the_plain_loss(tiny):
    teacher, _ = tiny
    student, _ = ensure_lora(copy.deepcopy(teacher), r=4)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids}
    plain = student(input_ids=ids, labels=ids, use_cache=False).loss
    assert torch.allclose(DistillLoss(teacher, weight=0.0)(student, batch), plain, atol=1e-5)


def test_training_with_distillation_brings_the_student_to_the_teacher(tiny):
    teacher, data = tiny
    student, _ = ensure_lora(copy.deepcopy(teacher), r=4)
    with torch.no_grad():  # a perturbed student
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    ids = data.calibration(2, 32, seed=0)
    batch = {"input_ids": ids, "labels": ids}
    loss = DistillLoss(teacher, weight=1.0)
    before = float(loss.sums(student, batch)[1])
    config = TrainConfig(steps=8, lr=5e-3, batch_size=2, seq_len=32)
    train(student, TokenBatches(data.train, 2, 32), config, loss_fn=loss)
    with torch.no_grad():
        after = float(loss.sums(student, batch)[1])
    assert after < before


def test_passes_distill_and_check_their_options(tiny):
    model, data = tiny
    ids = {"input_ids": torch.arange(16).view(1, 16)}
    before = copy.deepcopy(model.state_dict())
    small = shear.compile(
        model,
        "lora,discover-groups,lhspg{ratio=0.2,periods=1,steps_per_period=2,warmup=1,batch_size=2,seq_len=32,"
        "kinds=[channel],distill=0.5,distill_temperature=2},erase,"
        "recover-dynamic{max_rounds=1,steps_per_round=2,batch_size=2,seq_len=32,eval_windows=1,distill=1},merge-lora",
        example_inputs=ids,
        data=data,
    )
    assert type(small).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the teacher is untouched
    for bad in ("distill=1.5", "distill=-0.1", "distill_temperature=0"):
        with pytest.raises(PipelineError, match="distill"):
            shear.compile(model, f"discover-groups,lhspg{{{bad}}}", example_inputs=ids, data=data)
        with pytest.raises(PipelineError, match="distill"):
            shear.compile(model, f"discover-groups,recover-dynamic{{{bad}}}", example_inputs=ids, data=data)
    with pytest.raises(PipelineError, match="pass 'lhspg' requires result 'dense-model'.*'keep-dense'"):
        shear.compile(copy.deepcopy(model), "lora,discover-groups,lhspg{distill=0.5,seq_len=32,batch_size=2}",
                      example_inputs=ids, data=data, inplace=True)
