"""A tiny trained VLM and an offline benchmark, so pruning methods are compared on accuracy.

- :mod:`~vlprune.eval.toy.data`: synthetic shape / colour / count / position QA, rendered with
  PIL, deterministic from ``(split, index)``;
- :mod:`~vlprune.eval.toy.model`: the toy LLaVA (real transformers classes, 576 visual tokens
  per image) and its processor; ``load_toy_model()`` loads the shipped checkpoint offline;
- :mod:`~vlprune.eval.toy.train`: ``python -m vlprune.eval.toy.train`` retrains it from scratch
  (stages in :mod:`~vlprune.eval.toy.vision_stage` and :mod:`~vlprune.eval.toy.language_stage`);
- :mod:`~vlprune.eval.toy.benchmark`: accuracy of every method × budget (``vlprune demo``).
"""
