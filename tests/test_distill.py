"""Knowledge distillation in fine-tuning: the fp32 model's softened outputs as a second target."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hirelc import lower as L
from hirelc.errors import HirelcError
from hirelc.lower import qat as qat_mod
from hirelc.options import LowerConfig
from hirelc.policy import PRESETS
from hirelc.train import TrainConfig, fit

CFG = TrainConfig(epochs=1, max_steps=4, weight_decay=0.0, label_smoothing=0.0, augment=False, lr=1e-2)


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))  # no batch norm: train and eval modes agree


def test_pure_distillation_from_an_identical_teacher_has_next_to_no_loss():
    student = _net()
    record = fit(student, _data(), CFG, progress=False, teacher=copy.deepcopy(student), distill=1.0)
    labels_only = fit(_net(), _data(), CFG, progress=False)
    # zero at the first step (identical outputs); Adam's normalised steps on rounding-level gradients move it a hair
    assert record["loss"] < 1e-3 < 0.5 < labels_only["loss"]


def test_the_loss_mixes_labels_and_the_teachers_softened_outputs_as_documented():
    student, teacher, w, t = _net(seed=0), _net(seed=1), 0.3, 2.0
    x, y = next(iter(_data()))
    with torch.no_grad():
        s_out, t_out = student(x), teacher(x)
        p_t, log_p_s = torch.softmax(t_out / t, 1), torch.log_softmax(s_out / t, 1)
        kl = (p_t * (torch.log(p_t) - log_p_s)).sum(1).mean()  # KL(teacher || student), per sample
        want = (1 - w) * torch.nn.functional.cross_entropy(s_out, y) + w * t * t * kl
    record = fit(student, _data(), TrainConfig(**{**CFG.__dict__, "max_steps": 1}), progress=False,
                 teacher=teacher, distill=w, temperature=t)
    assert record["loss"] == pytest.approx(want.item(), rel=1e-5)  # the first step's loss, before any update


def test_distillation_pulls_the_student_towards_the_teacher():
    teacher = _net(seed=1)
    gap = {}
    for weight in (0.0, 1.0):
        student = _net(seed=0)
        fit(student, _data(), TrainConfig(**{**CFG.__dict__, "max_steps": 40, "epochs": 10}), progress=False,
            teacher=teacher, distill=weight)
        x = next(iter(_data(seed=5)))[0]
        with torch.no_grad():
            gap[weight] = (torch.softmax(student(x), 1) - torch.softmax(teacher(x), 1)).abs().mean().item()
    assert gap[1.0] < 0.5 * gap[0.0]


@pytest.mark.parametrize("kw", [dict(distill=0.5), dict(distill=1.5, teacher=_net()),
                                dict(distill=0.5, teacher=_net(), temperature=0.0)])
def test_distillation_without_a_teacher_or_with_bad_settings_is_refused(kw):
    with pytest.raises(HirelcError, match="distillation needs"):
        fit(_net(), _data(), CFG, progress=False, **kw)


def test_lowering_distills_from_the_model_it_was_given(built, bundle, monkeypatch):
    b = built("test_resnet")
    seen = []
    real = qat_mod.fit
    monkeypatch.setattr(qat_mod, "fit", lambda *a, **k: seen.append((k.get("teacher"), k.get("distill")))
                        or real(*a, **k))
    layers = PRESETS["int8"].resolve(list(b.topo.layers))
    before = copy.deepcopy(b.model.state_dict())
    L.lower_model(b.model, b.topo, layers, bundle, LowerConfig(epochs=0, max_steps=1, distill=0.5), progress=False)
    distilled, seen[:] = list(seen), []
    L.lower_model(b.model, b.topo, layers, bundle, LowerConfig(epochs=0, max_steps=1), progress=False)
    # one fine-tune per learning rate tried (LowerConfig.lr_also), each from the same teacher
    assert len(distilled) == len(seen) == 1 + len(LowerConfig().lr_also)
    assert all(t is b.model and w == 0.5 for t, w in distilled)
    assert all(torch.equal(v, before[k]) for k, v in b.model.state_dict().items())  # the teacher is left alone
    assert seen == [(None, 0.0)] * len(seen)


def test_an_out_of_range_distillation_weight_is_a_config_error():
    with pytest.raises(HirelcError, match="--distill"):
        LowerConfig(distill=2.0)
