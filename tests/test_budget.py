"""Budget parsing and the split of buffer rows among layers."""

from __future__ import annotations

import pytest

from flashjax.budget import parse_budget, split_rows


@pytest.mark.parametrize("text,expected", [
    (123456, 123456), ("6GB", 6 * 10**9), ("512MiB", 512 * 2**20), ("1.5 GB", 1.5e9),
    (0.5, 500), ("50%", 500), ("0.25", 250), ("1024", 1024), ("1.0", 1000),
])
def test_parse_budget(text, expected):
    assert parse_budget(text, model_bytes=1000) == int(expected)


@pytest.mark.parametrize("bad", ["", "12XB", "-5", "0%", "150%", 1.5, 0, True, None])
def test_parse_budget_refuses(bad):
    with pytest.raises(ValueError, match="dram_budget"):
        parse_budget(bad, model_bytes=1000)


@pytest.mark.parametrize("bad,message", [
    ("1.5", "dram_budget 1.5: a fraction must be in \\(0, 1\\] \\(bytes need a unit or an integer >= 1024\\)"),
    (1.5, "a fraction must be in"), ("1000", "a byte count must be >= 1024"),
    (512, "a byte count must be >= 1024"),
])
def test_budget_typos_are_not_bytes(bad, message):
    """1.5 is a fraction out of range, not 1.5 bytes; a bare 1000 is not a budget either."""
    with pytest.raises(ValueError, match=message):
        parse_budget(bad, model_bytes=10**9)


def test_split_rows_follows_weights_and_caps():
    assert split_rows(3200, [1, 1, 2], 4096) == [800, 800, 1600]
    # a layer that would get more than all its neurons is capped; the rest goes to the others
    rows = split_rows(3000, [10, 1, 1], 1024)
    assert rows[0] == 1024 and rows[1] == rows[2] == 976
    assert split_rows(10**9, [1, 2], 512) == [512, 512]
    assert sum(split_rows(1000, [0.3, 0.05, 0.1], 4096)) <= 1000
