"""Every entry script's --help shows each flag's default and says what each flag is for."""
from __future__ import annotations

import argparse
import importlib
import re

import pytest

SCRIPTS = ("test", "train_enhancer", "train_memory", "export_onnx", "enhance_video")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_defaults_are_shown(script):
    parser = importlib.import_module(script).get_args_parser()
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.help in (None, "") and not isinstance(a, argparse._HelpAction)]
    assert not missing, f"{script}.py flags without help: {missing}"
    text = parser.format_help()
    assert "(default:" in text


def flag_helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each flag's help as --help prints it (the formatter's text, one line)."""
    formatter = parser._get_formatter()
    return {a.option_strings[-1]: " ".join(formatter._expand_help(a).split())
            for a in parser._actions if a.option_strings and a.help}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_default_is_said_once_and_never_for_required_flags(script):
    parser = importlib.import_module(script).get_args_parser()
    helps = flag_helps(parser)
    assert not [f for f, h in helps.items() if h.count("(default:") > 1], helps
    assert not [f for f, h in helps.items() if "(default: None)" in h]
    required = [a.option_strings[-1] for a in parser._actions if a.required]
    assert not [f for f in required if "(default:" in helps[f]]
    assert "(default: None)" not in parser.format_help()


def test_train_memory_help_names_the_recommended_setting_of_its_script_and_training_defaults():
    """train_memory.py's defaults are the release's; its help names the setting that
    train_memory_script.sh runs (read from the script) as the recommended one, and the read
    flags say what the new memory stores, not what test.py does with a stored one."""
    from conftest import REPO

    parser = importlib.import_module("train_memory").get_args_parser()
    script = (REPO / "train_memory_script.sh").read_text()
    description = " ".join(parser.description.split())
    for var, flag in (("ENTRIES", "entries"), ("QUERY_ENCODER", "query_encoder"), ("MEM_SIZE", "mem_size"),
                      ("NEPOCH", "nepoch"), ("TESTING_TOP_K", "testing_top_k"), ("ABSTAIN", "abstain")):
        value = re.search(rf"^{var}=\${{{var}:-([^}}]*)}}", script, re.M).group(1)
        assert f"--{flag} {value}" in description, (flag, value, description)
        assert str(parser.get_default(flag)) != value or flag == "testing_top_k"  # they differ: hence the note
    helps = flag_helps(parser)
    for flag in ("--testing_top_k", "--pooling_size", "--temperature", "--strength", "--query_encoder"):
        assert "as stored in the memory" not in helps[flag] and "(default: " in helps[flag], helps[flag]
