"""Distillation losses. Importing this package registers every loss in ``LOSSES``.

Pure losses are functions ``loss(s, t, *, hyper=...) -> scalar``; stateful ones (``crd``,
``reviewkd``) are ``nn.Module`` classes registered with ``stateful=True`` that the distiller
instantiates with the tapped shapes and trains alongside the student.
"""

from .contrastive import CRDLoss
from .features import at, cosine, l1, mse, smooth_l1
from .logits import ce, dist, dkd, kd, rkl
from .relations import pkt, rkd, sp
from .review import ReviewKDLoss
from .sequence import fkl, jsd, skl, srkl, topk, tvd
from .tiled import tiled

__all__ = [
    "CRDLoss",
    "ReviewKDLoss",
    "at",
    "ce",
    "cosine",
    "dist",
    "dkd",
    "fkl",
    "jsd",
    "kd",
    "l1",
    "mse",
    "pkt",
    "rkd",
    "rkl",
    "skl",
    "smooth_l1",
    "sp",
    "srkl",
    "tiled",
    "topk",
    "tvd",
]
# registers the cross-tokenizer, cross-modal and disentangling losses
from . import acam as _acam  # noqa: E402,F401  (registers acam, static_mask)
from . import clock as _clock  # noqa: E402,F401  (registers CLoCKDistill terms)
from . import collab_seg as _collab_seg  # noqa: E402,F401  (registers bsd_pixel, hfd_map, ...)
from . import correlation, crossmodal, crosstok, disentangle, domain  # noqa: E402,F401
from . import detection as _detection  # noqa: E402,F401  (registers centernet, set_loss)
from . import distillfss as _distillfss  # noqa: E402,F401  (registers fss_focal, ...)
from . import ezad as _ezad  # noqa: E402,F401  (registers ezad_distill, ezad_detect, ...)
from . import gssf as _gssf  # noqa: E402,F401  (registers)
from . import l0 as _l0  # noqa: E402,F401
from . import libs as _libs  # noqa: E402,F401
from . import mllm as _mllm  # noqa: E402,F401  (registers)
from . import pairs as _pairs  # noqa: E402,F401  (registers)
from . import prototypes as _prototypes  # noqa: E402,F401  (registers)
from . import ranking as _ranking  # noqa: E402,F401  (registers)
from . import sad as _sad  # noqa: E402,F401  (registers sad, bn_l1)
from . import similarity as _similarity  # noqa: E402,F401
from . import transkd as _transkd  # noqa: E402,F401  (registers csf, hcl, ...)
from . import unidistill as _unidistill  # noqa: E402,F401  (registers unidistill_*)
from . import vl_classify as _vl_classify  # noqa: E402,F401  (registers)
from .hetero import CrossAttentionProjector, HFDLoss, TAIDLoss, bsd, dct_mse, dml, ofa, pld  # noqa: E402,F401
