"""Tiny random models with planted outliers, built at run time for tests and benchmarks.

Nothing here downloads weights: every model is created from a small transformers
config with a fixed seed. One module per family.
"""

from __future__ import annotations

from onnxq.zoo.bert import *  # noqa: F403
from onnxq.zoo.bert import __all__ as _bert_all

from onnxq.zoo.decoders import *  # noqa: F403
from onnxq.zoo.decoders import __all__ as _decoders_all
from onnxq.zoo.mamba import *  # noqa: F403
from onnxq.zoo.mamba import __all__ as _mamba_all

__all__ = list(_bert_all) + list(_decoders_all) + list(_mamba_all)
