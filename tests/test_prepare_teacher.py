"""A student-only prepare stage: the student trains on dropped inputs, the teachers read the
complete ones (MMANet's complete-modality teacher)."""

import torch
from torch import nn

from crossdistill import Distiller, Term
from crossdistill.errors import ConfigError
from crossdistill.prepare import TEACHER_PREFIX, ModalityDropout


class Seen(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.fc(x)


def _run(teacher_mode):
    torch.manual_seed(0)
    student, teacher = Seen(), Seen()
    d = Distiller(student, teacher, [Term("kd")],
                  prepare=[ModalityDropout(["x"], rate=1.0, teacher=teacher_mode)])
    batch = {"x": torch.randn(5, 4) + 3, "y": torch.tensor([0, 1, 2, 0, 1])}
    d.train()
    d.build(batch)
    student.inputs.clear()
    teacher.inputs.clear()
    out = d(batch)
    return student.inputs[-1], teacher.inputs[-1], out


def test_teacher_sees_complete_inputs():
    s, t, out = _run("complete")
    assert torch.all(s == 0)  # rate 1: the student's input is dropped
    assert torch.all(t != 0)  # the teacher's is not
    assert TEACHER_PREFIX + "x" in out.batch and "present_x" in out.batch


def test_default_teacher_sees_what_the_student_sees():
    s, t, out = _run("dropped")
    assert torch.all(s == 0) and torch.all(t == 0)
    assert TEACHER_PREFIX + "x" not in out.batch


def test_bad_teacher_mode():
    try:
        ModalityDropout(["x"], teacher="both")
    except ConfigError as err:
        assert "prepare.teacher" in str(err)
    else:
        raise AssertionError("no error")
