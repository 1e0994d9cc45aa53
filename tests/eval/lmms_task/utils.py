"""Document hooks of the tiny offline lmms-eval tasks used by ``tests/eval/test_lmms_eval.py``.

Each document of the JSON-lines dataset holds ``question``, ``answer``, ``choices`` and
``images`` (absolute paths of PNG files written by the test).
"""

from PIL import Image


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The document's images, in order."""
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc: dict) -> str:
    """The question, as is."""
    return doc["question"]


def doc_to_choice(doc: dict) -> list[str]:
    """Answer options of the multiple-choice task."""
    return doc["choices"]
