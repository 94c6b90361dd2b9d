"""``seed_hash``: DomainBed's seed derivation, in a module light enough for any caller.

The data split (``gaqat.data.loaders``) and the hyperparameter draws (``gaqat.hparams``)
both derive their seeds with it, so it lives apart from either (and from torch).
"""

from __future__ import annotations

import hashlib
from typing import Any


def seed_hash(*args: Any) -> int:
    """A seed in [0, 2^31) from printable arguments, equal on every machine and run.

    DomainBed's definition: the md5 of ``str(args)``, modulo 2^31. Python's ``hash()`` of
    a string changes between interpreter runs, so it cannot be used. Pass plain Python
    ints: under numpy 2 ``str`` of a tuple holding ``np.int64(1)`` spells out the type and
    gives another seed.
    """
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)
