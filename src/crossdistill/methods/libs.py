"""LIBS: lip reading by distilling a speech recogniser (Zhao et al., "Hearing Lips:
Improving Lip Reading by Distilling Speech Recognizers", AAAI 2020). No official code.

Teacher: a trained audio :class:`~crossdistill.models.seq.Seq2Seq` (frozen); student: a
visual one of the same shape. ``L = CE + seq_weight * L_seq + context_weight * L_ctx +
frame_weight * L_frame``:

* sequence level: MSE between the student's encoder summary (mean of its valid states,
  ours: the paper's summary is not specified) through a trainable linear map and the
  teacher's (``mse`` + ``linear`` projector);
* context level: decoder contexts at the steps matched by the LCS of the teacher's greedy
  prediction and the ground truth (``libs_context``; ``context_align="all"`` pairs every
  teacher step with the student step of the same index instead: the "no filtering"
  ablation);
* frame level: each video state attends over the audio states, MSE to the projected video
  state (``libs_frame``).

The paper tunes the three weights and does not give them; the defaults (1 each) are ours,
to be tuned on val CER. Weight 0 leaves a term out. Models are called through
:func:`~crossdistill.models.seq.seq_io`: the student reads ``video``, the teacher
``audio``; the task is ``cer``.
"""

from __future__ import annotations

from ..distiller import Term
from ..errors import ConfigError
from ..losses.libs import ALIGNS
from ..registry import METHODS
from ..schema import NonNeg
from . import Recipe


@METHODS.register(
    "libs",
    paper="Hearing Lips: Improving Lip Reading by Distilling Speech Recognizers",
    year=2020,
    family="crossmodal",
)
def libs(
    student,
    teacher,
    *,
    seq_weight: NonNeg = 1.0,
    context_weight: NonNeg = 1.0,
    frame_weight: NonNeg = 1.0,
    context_align: str = "lcs",
    eos: int = 10,
) -> Recipe:
    """CE + the three LIBS levels (module docstring)."""
    if teacher is None:
        raise ConfigError("method.teacher", None, "libs distils a trained speech recogniser: "
                          "give the audio Seq2Seq teacher")
    if context_align not in ALIGNS:
        raise ConfigError("method.context_align", context_align, f"allowed: {', '.join(ALIGNS)}")
    terms = [Term("ce", name="ce")]
    if seq_weight > 0:
        terms.append(Term("mse", student="output.summary", teacher="output.summary",
                          projector="linear", weight=seq_weight, name="libs_seq"))
    if context_weight > 0:
        terms.append(Term("libs_context", student=["output.context"],
                          teacher=["output.pred_context", "output.pred"],
                          weight=context_weight, align=context_align, eos=eos,
                          name="libs_context"))
    if frame_weight > 0:
        terms.append(Term("libs_frame", student=["output.encoder", "output.encoder_len"],
                          teacher=["output.encoder", "output.encoder_len"],
                          weight=frame_weight, name="libs_frame"))
    levels = [n for n, w in (("seq", seq_weight), ("context", context_weight),
                             ("frame", frame_weight)) if w > 0]
    note = f"libs: CE + {' + '.join(levels) or 'nothing'}"
    if context_weight > 0:
        note += f" (context pairs: {context_align})"
    return Recipe(terms, note=note)
