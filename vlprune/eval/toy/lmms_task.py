"""lmms-eval tasks on the toy VLM's held-out questions, offline: ``vlprune_toy`` (generation)
and ``vlprune_toy_mc`` (multiple choice); YAML files in ``lmms_tasks/`` next to this module.

Documents are the first ``samples`` questions (YAML ``dataset_kwargs``, 200) of the held-out
``test`` split of :mod:`vlprune.eval.toy.data`, built in memory (no dataset files, no hub); a
document's image is rendered again from its index. The model is prompted through its chat
template, which reproduces the trained format (``<s> user : <image> question assistant :``),
and its reply is the subject word, then the one-word answer:

- ``vlprune_toy``: the generated reply is scored by exact match with "subject answer";
- ``vlprune_toy_mc``: the choices are "subject answer" for every answer of the question's kind
  (6 colours, counts 0-6, yes / no, left / right); lmms-eval picks the lowest loss.

``vlprune eval`` finds these tasks by itself; with ``lmms-eval`` directly, add
``--include_path <this folder>/lmms_tasks``.
"""

from __future__ import annotations

from typing import Any

import datasets
from lmms_eval.api.task import ConfigurableTask
from PIL import Image

from vlprune.eval.toy import data

__all__ = [
    "CHOICES",
    "ToyTask",
    "doc_to_choice",
    "doc_to_text",
    "doc_to_visual",
    "process_generation",
    "toy_docs",
]

CHOICES: dict[str, tuple[str, ...]] = {
    "color": tuple(data.COLORS),
    "count": tuple(str(n) for n in range(data.MAX_OBJECTS + 1)),
    "presence": ("yes", "no"),
    "position": ("left", "right"),
}
"""The answers a question of each kind can have."""


def toy_docs(split: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` questions of ``split`` as documents: ``index``, ``kind``, ``question``,
    ``subject``, ``answer``, ``target`` ("subject answer"), ``choices`` and ``label`` (the
    index of the right choice)."""
    docs = []
    for index in range(n):
        kind = data.KINDS[index % len(data.KINDS)]  # as data.sample, without rendering
        _, [(question, subject, answer, _)] = data.scene_with_questions(split, index, (kind,))
        docs.append({
            "index": index, "split": split, "kind": kind, "question": question,
            "subject": subject, "answer": answer, "target": f"{subject} {answer}",
            "choices": [f"{subject} {a}" for a in CHOICES[kind]],
            "label": CHOICES[kind].index(answer),
        })
    return docs


class ToyTask(ConfigurableTask):
    """A YAML task whose documents come from :func:`toy_docs` (``dataset_kwargs``: ``split``,
    ``samples``) instead of a dataset on disk or on the hub."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config, **kwargs)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        """Build the documents in memory."""
        kwargs = dict(dataset_kwargs or {})
        docs = toy_docs(kwargs.get("split", "test"), int(kwargs.get("samples", 200)))
        split = self.config.test_split or "test"
        self.dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})
        self.dataset_no_image = self.dataset


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The document's image (rendered from its split and index)."""
    return [data.sample(doc["split"], doc["index"]).image]


def doc_to_text(doc: dict[str, Any]) -> str:
    """The question, as the toy model was trained to read it."""
    return doc["question"]


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """"subject answer" for every answer of the question's kind."""
    return list(doc["choices"])


def process_generation(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``exact_match``: 1 when the reply's words are the subject and the answer."""
    return {"exact_match": float(results[0].split() == doc["target"].split())}
