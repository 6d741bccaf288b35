"""Integrations with training frameworks (imported on demand; each needs its framework installed):

* :mod:`layerwise.integrations.hf` — Hugging Face ``Trainer``: optimizer factory for
  ``optimizer_cls_and_kwargs``, ``AlphaDecayCallback``, multiplier-aware clipping, merged ``save_pretrained``;
* :mod:`layerwise.integrations.lightning` — PyTorch Lightning: ``AlphaDecayCallback``, ``WeightDecayMonitor``,
  ``LayerwiseLM``.
"""
