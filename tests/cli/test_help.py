"""The command line's help: `ndino --help`, `ndino tiny --help` and `ndino assemble --help` exit 0 and
name their commands and options (`ndino plan --help`: tests/plan/test_planner.py)."""

from __future__ import annotations

import pytest

from llava_ndino import cli


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], ["tiny", "assemble"]),
        (["tiny", "--help"], ["--out", "--image-size", "--seed"]),
        (["assemble", "--help"], ["--vision", "--llm", "--projector", "--out", "openclip:"]),
    ],
)
def test_help(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ndino")
    for word in expected:
        assert word in text
