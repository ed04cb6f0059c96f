"""The in-process hot-path benchmark prints its table."""

from __future__ import annotations

import pytest

from bench.engine_forward import main


def test_it_times_each_batch_size_and_prints_a_table(capsys):
    main(["--sizes", "1,4", "--calls", "3", "--turns", "1", "--label", "here"])
    out = capsys.readouterr().out
    assert "engine.forward, demo model (here)" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "4"]
    assert all(float(row.split("|")[2]) > 0 for row in rows)


def test_it_refuses_what_it_cannot_time():
    with pytest.raises(SystemExit):
        main(["--sizes", "0"])
