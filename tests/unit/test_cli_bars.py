"""The progress bars of `m2y send` (cli/main.py ``_Bars``): what they count."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_resumed_bar_starts_at_the_kept_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    """The first report of a resumed send is the bytes the server kept: the bar starts there, and
    its rate counts only what this run sends (it used to jump from 0 and show a rate of the kept bytes)."""
    from cli.main import _Bars

    bars = _Bars()
    update = bars(Path("x.meta"), 10_000_000)
    update(6_000_000, 10_000_000)
    bar = bars._bar
    assert bar is not None and (bar.n, bar.initial) == (6_000_000, 6_000_000)
    update(7_000_000, 10_000_000)
    assert (bar.n, bar.initial) == (7_000_000, 6_000_000)
    update(10_000_000, 10_000_000)
    assert bars._bar is None and bar.n == 10_000_000  # closed at the end
    assert "x.meta" in capsys.readouterr().err
