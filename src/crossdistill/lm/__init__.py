"""Language-model distillation beyond token losses: generation (on-policy GKD, sequence-level
KD), cross-tokenizer alignment, and the seed methods' LM procedures (BiStil, CoMD).
Importing this package registers its prepare stages, losses and methods."""

from . import bistil  # noqa: F401,I001  (registers)
from . import onpolicy  # noqa: F401  (registers)
