"""The one text-table printer (owl2.tables) and the tables built on it."""

import pytest

from owl2.eval.suite import Row, Suite
from owl2.tables import Column, format_table


def test_columns_align_format_and_keep_their_least_width():
    columns = [Column("name", align="<"), Column("score", spec=".2f", width=7), Column("n", width=4)]
    rows = [{"name": "a", "score": 0.5, "n": 3}, {"name": "longer", "score": None, "n": 12}, {"name": "b"}]
    assert format_table(rows, columns, title="scores").splitlines() == [
        "scores",
        "name      score     n",
        "a          0.50     3",
        "longer             12",
        "b",
    ]


def test_a_cell_wider_than_the_least_width_widens_its_column():
    columns = [Column("name", "metric", align="<"), Column("count", "n", width=3)]
    table = format_table([{"name": "x", "count": 12345}, {"name": "yy", "count": 7}], columns)
    assert table.splitlines() == ["metric      n", "x       12345", "yy          7"]


def test_rules_frame_the_body_and_the_footer():
    columns = [Column("group", align="<"), Column("params", spec=",")]
    rows = [{"group": "decoder", "params": 1_000_000}, {"group": "vision", "params": 24}]
    table = format_table(rows, columns, rules=True, footer=[{"group": "total", "params": 1_000_024}])
    assert table.splitlines() == [
        "group       params",
        "------------------",
        "decoder  1,000,000",
        "vision          24",
        "------------------",
        "total    1,000,024",
    ]


def test_a_table_without_header_can_be_indented():
    columns = [Column("name", align="<"), Column("value", width=6)]
    table = format_table([{"name": "layers", "value": 2}, {"name": "eps", "value": 1e-06}], columns, header=False)
    assert table == "layers       2\neps      1e-06"
    assert format_table([{"name": "x", "value": "y"}], columns, header=False, indent="  ") == "  x       y"


def test_a_column_refuses_an_unknown_alignment():
    with pytest.raises(ValueError, match="column 'x': align must be one of"):
        Column("x", align="^")


def test_the_eval_table_shows_chance_where_known():
    # The layout `owl2 eval` has always printed (checked against the printer this one replaced).
    rows = [Row("shapes/vqa/accuracy", 0.5, 12, 1 / 3), Row("shapes/captions/cider", 0.123456, 6)]
    assert Suite.table(rows, "shapes: ckpt").splitlines() == [
        "shapes: ckpt",
        "metric                     value   chance       n",
        "shapes/vqa/accuracy       0.5000   0.3333      12",
        "shapes/captions/cider     0.1235                6",
    ]
