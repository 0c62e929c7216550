"""Clustering heads trained on frozen embeddings: SCAN (neighbour consistency + self-labelling),
TEMI (weighted pointwise mutual information with an EMA teacher) and TURTLE (labellings a linear
classifier can learn in every representation space), behind :func:`fit_head`.

>>> from gpu_ops.heads import fit_head, load_head
>>> res = fit_head("scan", "/path/to/store", k=10, seed=0)   # doctest: +SKIP
>>> res.save("model-scan.pt"); load_head("model-scan.pt").predict_proba(X)   # doctest: +SKIP
"""

from gpu_ops.heads.api import HEADS, fit_head, head_config
from gpu_ops.heads.common import HeadResult, InputTransform, LoadedHead, MultiHead, load_head
from gpu_ops.heads.scan import ScanConfig
from gpu_ops.heads.temi import TemiConfig
from gpu_ops.heads.turtle import TurtleConfig

__all__ = ["HEADS", "HeadResult", "InputTransform", "LoadedHead", "MultiHead", "ScanConfig", "TemiConfig", "TurtleConfig",
           "fit_head", "head_config", "load_head"]
