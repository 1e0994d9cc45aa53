"""The README's timm example (blocks whose first line is ``# timm: ...``) runs as written."""

from __future__ import annotations

import pytest

pytest.importorskip("timm")

from tests.test_readme import TIMM


def test_readme_has_a_timm_example() -> None:
    """The timm section keeps a runnable example."""
    assert TIMM


@pytest.mark.parametrize("block", TIMM)
def test_timm_blocks_run(block: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each timm block runs offline (random weights) and prints the shapes it promises."""
    exec(compile(block, "README timm block", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "torch.Size([2, 1000])" in out and "torch.Size([2, 64])" in out
