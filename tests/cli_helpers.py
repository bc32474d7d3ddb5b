"""Shared by the CLI tests: run the CLI in-process and insist on the one-line error."""

from __future__ import annotations

from crossdistill.cli import main


def one_line_error(capsys, argv) -> str:
    """``crossdistill ARGV`` must exit 2 with exactly one ``crossdistill: error:`` line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("crossdistill: error:"), err
    return lines[0]
