from __future__ import annotations

from retrieval.query import DEFINITION_CHARS, query_text


def test_definition_then_input() -> None:
    assert query_text("Count the objects.", "I have a car.") == "Count the objects.\nI have a car."


def test_long_definitions_are_cut_at_a_word_so_the_input_stays_visible() -> None:
    definition = "Definition: " + "word " * 500
    text = query_text(definition, "THE INPUT")
    head, body = text.split("\n")
    assert len(head) <= DEFINITION_CHARS
    assert not head.endswith(" ") and head.endswith("word")
    assert body == "THE INPUT"


def test_whitespace_in_definitions_is_normalized() -> None:
    assert query_text("  Sort \n the\twords ", " a b ") == "Sort the words\na b"


def test_either_part_may_be_empty() -> None:
    assert query_text("", "just input") == "just input"
    assert query_text("just a definition", "") == "just a definition"


def test_input_line_breaks_are_kept() -> None:
    assert query_text("d", "x\nOptions:\n- a") == "d\nx\nOptions:\n- a"
