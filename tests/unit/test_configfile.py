"""Config files for `bpfnet <app> apply -f`: data, or one line naming the file and the problem."""

from __future__ import annotations

import pytest

from bpfnet.configfile import ConfigFileError, load_config_file, parse_yaml

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\xff", "f.yaml: not a UTF-8 text file (byte 0: invalid start byte)"),
    (b"vips: [\n  {address: 10.0.0.1\n", "f.yaml: not valid YAML or JSON: line 3, column 1: expected ',' or '}', "
                                         "but got '<stream end>' (while parsing a flow mapping)"),
    (b"rules:\n\t- expr: udp\n", "f.yaml: not valid YAML or JSON: line 2, column 1: found character '\\t' that "
                                 "cannot start any token (while scanning for the next token)"),
    (b"[" * 1500 + b"]" * 1500, "f.yaml: nested too deeply"),
    (b"settings: {udp_timeout: .nan}\n", "f.yaml: settings.udp_timeout: nan is not a finite number"),
    (b"- {expr: udp, expires: -.inf}\n", "f.yaml: 0.expires: -inf is not a finite number"),
])
def test_broken_files_give_one_line_naming_file_and_problem(tmp_path, content, message):
    path = tmp_path / "f.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigFileError) as caught:
        load_config_file(path)
    assert str(caught.value) == message.replace("f.yaml", str(path))
    assert "\n" not in str(caught.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigFileError, match="missing.yaml: No such file or directory"):
        load_config_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigFileError, match="Is a directory"):
        load_config_file(tmp_path)


def test_good_files_and_shared_aliases_load():
    assert parse_yaml("vips: [{address: 10.0.0.1, port: 80}]") == {"vips": [{"address": "10.0.0.1", "port": 80}]}
    assert parse_yaml('{"rules": []}') == {"rules": []}  # JSON is YAML
    assert parse_yaml("a: 1\n---\nb: 2\n", all_documents=True) == [{"a": 1}, {"b": 2}]
    laughs = parse_yaml(LAUGHS)  # 9**9 leaves if expanded; checked node by node, each once
    assert laughs["i"][0] is laughs["h"]
