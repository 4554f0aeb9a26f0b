"""Every entry script's --help shows each flag's default and says what each flag is for."""
from __future__ import annotations

import argparse
import importlib

import pytest

SCRIPTS = ("test", "train_enhancer", "train_memory", "export_onnx", "enhance_video")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_defaults_are_shown(script):
    parser = importlib.import_module(script).get_args_parser()
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.help in (None, "") and not isinstance(a, argparse._HelpAction)]
    assert not missing, f"{script}.py flags without help: {missing}"
    text = parser.format_help()
    assert "(default:" in text
