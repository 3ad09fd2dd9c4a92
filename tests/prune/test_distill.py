"""Distillation from the dense starting model (prune.distill): the loss is the formula, the teacher
is frozen (eval mode, no gradient, the start checkpoint's weights to the end), and an interrupted
then resumed distilled run equals the uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import Recorder, tiny_recipe
from test_trainer_resume import Interrupt, _load, _updates

from smcp_core import stages
from smcp_core.errors import SmcpError
from smcp_core.models import build_model
from smcp_core.prune import trainer as trainer_module
from smcp_core.prune.distill import Teacher, distillation_loss


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


def test_distillation_loss_is_the_formula_on_fixed_logits():
    s = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    t = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 2.5, 0.0]])
    y = torch.tensor([2, 1])
    alpha, temp = 0.7, 3.0
    # by hand: softmax, cross-entropy, KL(p_teacher || p_student) at temperature T, batch mean
    def softmax(z):
        e = torch.exp(z - z.max(1, keepdim=True).values)
        return e / e.sum(1, keepdim=True)
    p_s, q_s, q_t = softmax(s), softmax(s / temp), softmax(t / temp)
    ce = -torch.log(p_s[torch.arange(2), y]).mean()
    kl = (q_t * (torch.log(q_t) - torch.log(q_s))).sum(1).mean()
    want = (1 - alpha) * ce + alpha * temp ** 2 * kl
    got = distillation_loss(s, t, y, alpha=alpha, temperature=temp)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(distillation_loss(s, t, y, alpha=0.0, temperature=temp)) == pytest.approx(float(ce), rel=1e-6)
    # identical logits: only the (1 - alpha) CE term is left
    assert float(distillation_loss(s, s, y, alpha=alpha, temperature=temp)) == pytest.approx(
        float((1 - alpha) * ce), rel=1e-6)


def test_the_teacher_is_a_frozen_copy():
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    teacher = Teacher(student)
    student.train()
    out = teacher(torch.randn(5, 4))
    assert not teacher.model.training and out.grad_fn is None
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched
    assert all(a is not b for a, b in zip(teacher.model.parameters(), student.parameters()))


def _start_checkpoint(path):
    torch.manual_seed(0)
    model = build_model("cifar/resnet20", num_classes=10, kwargs={"in_channels": 1})
    torch.save(model.state_dict(), path)
    return model.state_dict()


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    start = _start_checkpoint(tmp / "start.pt")
    recipe = tiny_recipe(f"model.checkpoint={tmp / 'start.pt'}", "prune.distill.enabled=true",
                         "prune.distill.alpha=0.7", "prune.distill.temperature=3")
    teachers = []

    class Recording(Teacher):
        def __init__(self, model):
            super().__init__(model)
            teachers.append(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer_module, "Teacher", Recording)
    try:
        torch.manual_seed(1)
        rec = Recorder()
        summary = stages.prune(recipe, tmp / "A", reporter=rec).to_dict()
    finally:
        mp.undo()
    return recipe, tmp, start, teachers, summary, rec.rows


def test_a_distilled_run_keeps_its_teacher_frozen_at_the_start_checkpoint(distilled):
    recipe, tmp, start, teachers, summary, rows = distilled
    assert len(teachers) == 1 and summary["meets_budget"]
    t = teachers[0].model
    assert not t.training
    for name, p in t.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    for k, v in t.state_dict().items():  # its BN statistics were never updated either
        assert torch.equal(v, start[k]), k
    # the distilled loss is what was trained on: another loss than the plain run's
    plain = stages.prune(tiny_recipe(f"model.checkpoint={tmp / 'start.pt'}"), tmp / "plain").to_dict()
    loss = [r["loss"] for r in rows if r.get("event") == "epoch"]
    loss_plain = [r["loss"] for r in plain["history"] if r.get("event") == "epoch"]
    assert loss[0] != pytest.approx(loss_plain[0], rel=1e-3)


def test_interrupted_then_resumed_distilled_run_equals_uninterrupted(distilled):
    recipe, tmp, _, _, summary_a, rows_a = distilled
    out_b = tmp / "B"
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        stages.prune(recipe, out_b, reporter=Interrupt(after_epoch=2))
    torch.manual_seed(12345)
    summary_b = stages.prune(recipe, out_b, reporter=Recorder(), resume=True).to_dict()
    ck_a, _ = _load(tmp / "A")
    ck_b, _ = _load(out_b)
    assert torch.equal(ck_a["keep"], ck_b["keep"])
    for k, v in ck_a["state_dict"].items():
        assert torch.allclose(v.float(), ck_b["state_dict"][k].float(), atol=1e-6, rtol=0), k
    assert summary_b["top1"] == pytest.approx(summary_a["top1"])
    hist_b = json.loads((out_b / "prune" / "summary.json").read_text())["history"]
    assert _updates(hist_b) == _updates(rows_a)


def test_distillation_without_a_start_checkpoint_is_one_clear_line(tmp_path):
    with pytest.raises(SmcpError, match=r"prune.distill.enabled needs model.checkpoint"):
        stages.prune(tiny_recipe("prune.distill.enabled=true"), tmp_path)
