"""Maintainer tools that train and ship the bundled VQA model (``vflowopt/assets/vqa_model``).

Users never import them: the package keeps what they run (:mod:`vflowopt.vqa.scenes`, :mod:`vflowopt.vqa.model`,
:mod:`vflowopt.vqa.evaluate`, ``vflowopt eval``). Run from the repository root of a clone:

* :mod:`training.vqa.pretrain` - ``python -m training.vqa.pretrain lm|vision|connect ...`` (decoupled pre-training);
* :mod:`training.vqa.train` - ``python -m training.vqa.train --out DIR --steps N [--resume] ...`` (joint training);
* :mod:`training.vqa.ship` - ``python -m training.vqa.ship ...`` (model folder, card, learning curve, samples);
* :mod:`training.vqa.attn_supervision` - the attention-supervision loss of ``train --attn-weight``;
* :mod:`training.vqa.common` - helpers both training scripts use, and the checkpoint reader / writer
  (every checkpoint is read with ``torch.load(weights_only=True)``).
"""
