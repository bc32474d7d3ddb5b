"""FYI: flip your images -- a plug-in for DC, DSA, DM and MTT.

Paper: Son, Lee, Kim & Ham, "FYI: Flip Your Images for Dataset Distillation", ECCV 2024.
Observation ("bilateral equivalence"): real datasets contain object parts on both sides, so
matching pushes every synthetic image to duplicate its discriminative parts left and right.
Remedy (their Eq. 5, "FlipBatch" in the official code cvlab-yonsei/FYI, main_DM.py
``BatchAug``): inside the matching loss replace each class's synthetic batch S_c by
S_c ∪ hflip(S_c); the saved set is S only (no extra storage). Gradients of both copies flow
back to S (plain concatenation; the official repo also has max/min-gradient variants, not
used). For MTT the inner training steps sample from S ∪ hflip(S).

Here FYI is the ``fyi=True`` flag of :class:`~crossdistill.condense.base.MatchingCondenser`;
this module registers the combined names ``dc+fyi``, ``dsa+fyi``, ``dm+fyi``, ``mtt+fyi`` and
``ncfm+fyi``. Note: on digit datasets a horizontal flip changes the meaning of some digits
(2, 3, 4, 5, 6, 7, 9 are not mirror-symmetric), so the paper's premise holds less well there;
the benchmark reports what happens.
"""

from __future__ import annotations

from ..registry import CONDENSERS
from .dc import DC, DSACondenser
from .dm import DM
from .mtt import MTT
from .ncfm import NCFM

PAPER = "FYI: Flip Your Images for Dataset Distillation"


def _with_fyi(base: type, name: str) -> type:
    def __init__(self, *, fyi: bool = True, **kw):
        base.__init__(self, fyi=fyi, **kw)

    cls = type(
        f"{base.__name__}FYI",
        (base,),
        {"__init__": __init__, "name": name, "__doc__": f"{base.__name__} with FYI. {PAPER}."},
    )
    return CONDENSERS.register(name, paper=PAPER, year=2024, base=base.name)(cls)


DCFYI = _with_fyi(DC, "dc+fyi")
DSAFYI = _with_fyi(DSACondenser, "dsa+fyi")
DMFYI = _with_fyi(DM, "dm+fyi")
MTTFYI = _with_fyi(MTT, "mtt+fyi")
NCFMFYI = _with_fyi(NCFM, "ncfm+fyi")
