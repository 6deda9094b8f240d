"""memc.schema: typed configs from plain dicts, with errors that name the exact key path."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from memc.errors import ConfigError
from memc.schema import coerce, describe_fields, from_dict, option, to_dict, type_name


@dataclass
class Leaf:
    name: str = option(doc="required name")
    mode: Literal["fast", "exact"] = option("exact", "how")
    flag: bool = option(False, "a switch")
    count: int = option(1, "how many")
    scale: float = option(1.0, "a factor")

    def validate(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


@dataclass
class Root:
    leaf: Leaf = option(factory=lambda: Leaf("default"), doc="one leaf")
    leaves: list[Leaf] = option(factory=list, doc="many leaves")
    table: dict[str, int] = option(factory=dict, doc="name -> int")
    maybe: Optional[int] = option(None, "an optional int")
    grid: list[list[int]] = option(factory=list, doc="nested lists")


def _err(cls, data, path=""):
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data, path)
    return str(info.value)


def test_defaults_and_nested_dataclasses_are_built():
    root = from_dict(Root, {"leaves": [{"name": "a"}, {"name": "b", "mode": "fast", "count": 3}]})
    assert root.leaf == Leaf("default")
    assert [l.name for l in root.leaves] == ["a", "b"]
    assert isinstance(root.leaves[1], Leaf) and root.leaves[1].mode == "fast" and root.leaves[1].count == 3


def test_int_is_accepted_for_float_and_converted():
    leaf = from_dict(Leaf, {"name": "x", "scale": 2})
    assert leaf.scale == 2.0 and isinstance(leaf.scale, float)


def test_unknown_key_names_path_and_suggests():
    msg = _err(Root, {"leaf": {"name": "x", "moed": "fast"}})
    assert msg.startswith("leaf.moed: unknown key")
    assert "did you mean 'mode'" in msg
    assert "count, flag, mode, name, scale" in msg  # the valid keys, sorted


def test_unknown_key_without_a_close_match_lists_valid_keys():
    msg = _err(Leaf, {"name": "x", "zzzzzz": 1})
    assert msg.startswith("zzzzzz: unknown key")
    assert "did you mean" not in msg
    assert "Valid keys here: count, flag, mode, name, scale" in msg


def test_list_entry_paths():
    msg = _err(Root, {"leaves": [{"name": "ok"}, {"name": "bad", "count": "three"}]})
    assert msg.startswith("leaves[1].count: expected int, got str 'three'")


def test_nested_list_paths():
    msg = _err(Root, {"grid": [[1, 2], [3, "x"]]})
    assert msg.startswith("grid[1][1]: expected int")


def test_dict_value_paths():
    msg = _err(Root, {"table": {"a": 1, "b": "two"}})
    assert msg.startswith("table.b: expected int, got str 'two'")


def test_literal_choices_are_listed():
    msg = _err(Root, {"leaves": [{"name": "x", "mode": "slow"}]})
    assert msg == "leaves[0].mode: 'slow' is not one of 'fast', 'exact'"


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("flag", 1, "flag: expected bool (true/false), got int 1"),
        ("flag", "true", "flag: expected bool (true/false), got str 'true'"),
        ("count", True, "count: expected int, got bool True"),
        ("count", 1.0, "count: expected int, got float 1.0"),
        ("scale", False, "scale: expected float, got bool False"),
        ("scale", "1e-4", "scale: expected float, got str '1e-4'"),
        ("name", 3, "name: expected string, got int 3"),
    ],
)
def test_scalar_strictness(key, value, expected):
    assert _err(Leaf, {"name": "x", key: value} if key != "name" else {key: value}) == expected


def test_bool_is_not_an_int_and_int_is_not_a_bool():
    assert from_dict(Leaf, {"name": "x", "flag": True, "count": 0}).flag is True
    with pytest.raises(ConfigError):
        coerce(True, int, "p")
    with pytest.raises(ConfigError):
        coerce(0, bool, "p")


def test_missing_required_key_names_path_and_type():
    assert _err(Leaf, {}) == "name: required key is missing (str)"
    msg = _err(Root, {"leaves": [{"mode": "fast"}]})
    assert msg == "leaves[0].name: required key is missing (str)"


def test_wrong_container_types():
    assert _err(Root, {"leaf": "x"}) == "leaf: expected a table, got str 'x'"
    assert _err(Root, {"leaves": {"name": "x"}}).startswith("leaves: expected list[table], got a table")
    assert _err(Root, {"table": [1]}).startswith("table: expected table of int, got a list")
    assert _err(Leaf, [1, 2]) == "config: expected a table, got a list"


def test_optional():
    assert from_dict(Root, {"maybe": None}).maybe is None
    assert from_dict(Root, {"maybe": 3}).maybe == 3
    assert _err(Root, {"maybe": "x"}) == "maybe: expected int | none, got str 'x'"


def test_validate_errors_carry_the_path():
    msg = _err(Root, {"leaves": [{"name": "x", "count": -1}]})
    assert msg == "leaves[0]: count must be >= 0"


def test_path_prefix_is_used():
    msg = _err(Leaf, {"name": "x", "count": "1"}, "pipeline[2]")
    assert msg.startswith("pipeline[2].count: expected int")


def test_instance_passes_through():
    leaf = Leaf("x")
    assert from_dict(Leaf, leaf) is leaf


def test_type_names():
    assert type_name(Literal["a", "b"]) == "'a' | 'b'"
    assert type_name(list[int]) == "list[int]"
    assert type_name(dict[str, float]) == "table of float"
    assert type_name(Optional[int]) == "int | none"
    assert type_name(Leaf) == "table"


def test_to_dict_round_trip():
    root = from_dict(Root, {"leaves": [{"name": "a"}], "table": {"k": 1}, "grid": [[1, 2]]})
    data = to_dict(root)
    assert data["leaves"] == [{"name": "a", "mode": "exact", "flag": False, "count": 1, "scale": 1.0}]
    assert from_dict(Root, data) == root


def test_describe_fields():
    rows = {name: (tp, default, doc) for name, tp, default, doc in describe_fields(Leaf)}
    assert rows["name"] == ("str", "(required)", "required name")
    assert rows["mode"] == ("'fast' | 'exact'", "exact", "how")
    assert rows["count"][1] == 1
    assert {name: d for name, _, d, _ in describe_fields(Root)}["leaves"] == []
