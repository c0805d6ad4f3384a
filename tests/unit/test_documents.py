"""`read_document`: one JSON or TOML file the user named, with the same three messages everywhere (cannot read,
not valid JSON/TOML with its line, wrong top-level type with the fix)."""

from __future__ import annotations

import re

import pytest

from maisi_cli.errors import UsageError
from maisi_cli.io.documents import read_document


class CustomError(Exception):
    pass


def test_good_json_and_toml_documents(tmp_path):
    as_json = tmp_path / "a.json"
    as_json.write_text('{"epochs": 2, "lr": 0.5, "tags": ["x"]}')
    as_toml = tmp_path / "a.toml"
    as_toml.write_text('epochs = 2\nlr = 0.5\ntags = ["x"]\n[sub]\nkey = "v"\n')
    assert read_document(as_json, "--config") == {"epochs": 2, "lr": 0.5, "tags": ["x"]}
    assert read_document(as_toml, "--config") == {"epochs": 2, "lr": 0.5, "tags": ["x"], "sub": {"key": "v"}}
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    assert read_document(listing, "mask database", expect=list) == [1, 2]
    with_bom = tmp_path / "bom.json"
    with_bom.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert read_document(with_bom, "--config") == {"a": 1}


def test_suffix_picks_the_parser_unless_kind_is_given(tmp_path):
    toml_text = 'name = "x"\n'
    upper = tmp_path / "SETTINGS.TOML"
    upper.write_text(toml_text)
    assert read_document(upper, "--config") == {"name": "x"}
    # any other suffix is JSON …
    odd = tmp_path / "settings.cfg"
    odd.write_text(toml_text)
    with pytest.raises(UsageError, match="is not valid JSON"):
        read_document(odd, "--config")
    # … unless the caller names the kind
    assert read_document(odd, "--config", kind="toml") == {"name": "x"}
    json_named_toml = tmp_path / "really.toml"
    json_named_toml.write_text('{"name": "x"}')
    assert read_document(json_named_toml, "--config", kind="json") == {"name": "x"}


def test_missing_file_names_option_path_and_reason(tmp_path):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(UsageError) as caught:
        read_document(missing, "--config")
    assert str(caught.value) == f"--config: cannot read '{missing}' (No such file or directory)"
    with pytest.raises(UsageError, match=r"^--profile: cannot read .*\(Is a directory\)$"):
        read_document(tmp_path, "--profile", kind="toml")


def test_binary_file_is_not_a_traceback(tmp_path):
    binary = tmp_path / "weights.json"
    binary.write_bytes(b"\x80\x81\x82")
    with pytest.raises(UsageError, match=r"^--model: cannot read '.*weights\.json' \(not UTF-8 text: byte 0x80 at "
                                         r"offset 0\); save it as UTF-8 JSON$"):
        read_document(binary, "--model")


def test_invalid_json_gives_line_column_and_problem(tmp_path):
    broken = tmp_path / "db.json"
    broken.write_text('[\n  {"a": 1},\n  {"b": 2,}\n]\n')
    with pytest.raises(UsageError) as caught:
        read_document(broken, "mask database", expect=list)
    message = str(caught.value)
    assert message.startswith(f"mask database: '{broken}' is not valid JSON (line 3, column ")
    assert "Expecting property name enclosed in double quotes" in message
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(UsageError, match=re.escape("is not valid JSON (line 1, column 1): Expecting value")):
        read_document(empty, "--model")


def test_invalid_toml_gives_line_column_and_problem(tmp_path):
    broken = tmp_path / "p.toml"
    broken.write_text('name = "x"\ndevice = \n')
    with pytest.raises(UsageError) as caught:
        read_document(broken, "--profile")
    message = str(caught.value)
    assert message.startswith(f"--profile: '{broken}' is not valid TOML (line 2, column 10): ")
    assert "(at line" not in message  # the position is given once, up front
    # "at end of document" becomes the last line
    truncated = tmp_path / "t.toml"
    truncated.write_text('name = "x"\nlist = [1,')
    with pytest.raises(UsageError, match=re.escape("is not valid TOML (line 2, column 11): ")):
        read_document(truncated, "--profile")


def test_wrong_top_level_type_names_the_fix(tmp_path):
    listing = tmp_path / "c.json"
    listing.write_text("[1, 2]")
    with pytest.raises(UsageError) as caught:
        read_document(listing, "--config", shape="a table/object of options")
    assert str(caught.value) == f"--config: '{listing}' must hold a table/object of options, not a list"
    scalar = tmp_path / "db.json"
    scalar.write_text('{"entries": []}')
    with pytest.raises(UsageError, match="must hold a JSON list, not an object$"):
        read_document(scalar, "mask database", expect=list)
    null = tmp_path / "n.json"
    null.write_text("null")
    with pytest.raises(UsageError, match="must hold a JSON object, not null$"):
        read_document(null, "--model")
    assert read_document(listing, "--data", expect=(dict, list)) == [1, 2]
    number = tmp_path / "num.json"
    number.write_text("3")
    with pytest.raises(UsageError, match="must hold a JSON object or a JSON list, not a number$"):
        read_document(number, "--data", expect=(dict, list))


def test_caller_chooses_the_error_class(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(CustomError, match="^mask database: cannot read"):
        read_document(missing, "mask database", error=CustomError)
    broken = tmp_path / "b.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="^spec file: .* is not valid JSON"):
        read_document(broken, "spec file", error=ValueError)
    with pytest.raises(CustomError, match="must hold"):
        broken.write_text("[]")
        read_document(broken, "x", error=CustomError)


def test_each_caller_keeps_its_prefix_and_error_class(tmp_path):
    from maisi_cli.engine.masks.database import MaskDatabaseError, read_database
    from maisi_cli.engine.train.common import read_config_file
    from maisi_cli.io.datalists import read_datalist
    from maisi_cli.models import get_model
    from maisi_cli.profiles import get_profile

    listing = tmp_path / "list.json"
    listing.write_text("[]")
    obj = tmp_path / "obj.json"
    obj.write_text("{}")
    with pytest.raises(UsageError, match="^--config: .* must hold a table/object of options, not a list$"):
        read_config_file(listing)
    with pytest.raises(UsageError, match=r'^--data: .* must hold \{"training": .*, not a list$'):
        read_datalist(listing)
    with pytest.raises(UsageError, match=r'^--data: .* must hold \{"training"'):
        read_datalist(obj)
    with pytest.raises(MaskDatabaseError, match="^mask database: .* must hold a JSON list of entries, not an object$"):
        read_database(obj)
    with pytest.raises(UsageError, match=r"^--model: .* must hold a JSON object \(a model spec\), not a list$"):
        get_model(str(listing))
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("name = ")
    with pytest.raises(UsageError, match=r"^--profile: .* is not valid TOML \(line 1, column 8\): "):
        get_profile(str(bad_toml))
