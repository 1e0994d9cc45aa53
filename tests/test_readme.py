"""Every Python code block of the README runs, in order, in one namespace (as a reader would
paste them), offline on the shipped toy model. Blocks whose first line is ``# hub: ...`` need
weights from the Hugging Face Hub: they run only with ``VLPRUNE_HUB_TESTS=1`` (marker ``hub``);
blocks whose first line is ``# timm: ...`` need timm and run in ``.venv-timm``
(``tests/timm_vit/test_timm_readme.py``).
The README's ``vlprune methods`` table lists exactly the registered methods, each linking its
``docs/methods/<name>.md`` page."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from vlprune.registry import list_methods

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)
OFFLINE = [b for b in BLOCKS if not b.startswith(("# hub", "# timm"))]
HUB = [b for b in BLOCKS if b.startswith("# hub")]
TIMM = [b for b in BLOCKS if b.startswith("# timm")]


def test_readme_has_python_examples() -> None:
    """Offline and hub examples exist, and every block (hub ones too) is valid Python."""
    assert len(OFFLINE) >= 2 and HUB
    for i, block in enumerate(BLOCKS):
        compile(block, f"README python block {i}", "exec")


def test_offline_blocks_run_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    """The offline blocks run top to bottom in one namespace; the first one prunes to 64
    visual tokens and answers its question in the trained reply format."""
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, block in enumerate(OFFLINE):
        try:
            exec(compile(block, f"README python block {i}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {i} failed: {type(err).__name__}: {err}\n{block}")
    out = capsys.readouterr().out
    assert "[64]" in out
    qa = namespace["qa"]
    assert namespace["reply"].split()[0] == qa.subject  # type: ignore[attr-defined, union-attr]


@pytest.mark.hub
@pytest.mark.skipif(os.environ.get("VLPRUNE_HUB_TESTS") != "1",
                    reason="needs the Hugging Face Hub (VLPRUNE_HUB_TESTS=1)")
@pytest.mark.parametrize("block", HUB)
def test_hub_blocks_run(block: str) -> None:
    exec(compile(block, "README hub block", "exec"), {"__name__": "__readme__"})


def test_method_table_matches_the_registry() -> None:
    """The Methods table has one row per registered method, each linking its docs page."""
    text = README.read_text()
    section = text[text.index("## Methods"):text.index("## Layout")]
    rows = re.findall(r"^\| \[`(\w+)`\]\(docs/methods/(\w+)\.md\) \|", section, flags=re.M)
    assert sorted(name for name, _ in rows) == list_methods()
    assert all(name == page for name, page in rows)
