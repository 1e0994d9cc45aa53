"""A tiny trained VLM and an offline benchmark, so pruning methods are compared on accuracy.

- :mod:`~vlprune.eval.toy.data`: synthetic shape / colour / count / position QA, rendered with
  PIL, deterministic from ``(split, index)``;
- :mod:`~vlprune.eval.toy.model`: the toy LLaVA (real transformers classes, 576 visual tokens
  per image) and its processor, whose chat template is the trained prompt format;
  ``load_toy_model()`` loads the shipped checkpoint offline;
- :mod:`~vlprune.eval.toy.train`: ``python -m vlprune.eval.toy.train`` retrains it from scratch
  (stages in :mod:`~vlprune.eval.toy.vision_stage` and :mod:`~vlprune.eval.toy.language_stage`);
- :mod:`~vlprune.eval.toy.benchmark`: accuracy of every method × budget (``vlprune demo``);
- :mod:`~vlprune.eval.toy.lmms_task`: the held-out questions as lmms-eval tasks
  (``vlprune eval ... --tasks vlprune_toy,vlprune_toy_mc``).

The names a first script needs are exported here: ``load_toy_model``, ``toy_processor``,
``sample`` / ``samples`` (held-out questions with their images), ``CHECKPOINT_DIR``.
"""

from vlprune.eval.toy.data import QASample, sample, samples
from vlprune.eval.toy.model import CHECKPOINT_DIR, load_toy_model, prompt, toy_processor

__all__ = [
    "CHECKPOINT_DIR",
    "QASample",
    "load_toy_model",
    "prompt",
    "sample",
    "samples",
    "toy_processor",
]
