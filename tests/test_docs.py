"""Docs that are generated must match the code that generates them."""

from pathlib import Path

from embedpipe.cli.reference import reference

DOCS = Path(__file__).parent.parent / "docs"


def test_cli_reference_is_in_sync():
    expected = reference()
    actual = (DOCS / "cli.md").read_text()
    assert actual == expected, "docs/cli.md is stale: python -m embedpipe.cli.reference > docs/cli.md"


def test_every_command_is_documented():
    text = (DOCS / "cli.md").read_text()
    for command in ["extract", "info", "backbones", "index build", "search", "finetune", "run"]:
        assert f"## embedpipe {command}\n" in text
