"""Every command setup.py installs resolves to a function that parses `--help` and exits 0: a renamed module or
`main` breaks the operator's command while every unit test still passes."""

import importlib.metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _declared_commands() -> dict[str, str]:
    """`name=module:function` pairs from setup.py itself (the installed metadata may be stale in a dev checkout)."""
    text = (REPO / "setup.py").read_text()
    block = text[text.index('"console_scripts"') : text.index("]", text.index('"console_scripts"'))]
    pairs = [line.strip().strip('",') for line in block.splitlines()[1:] if "=" in line]
    return dict(pair.split("=", 1) for pair in pairs)


COMMANDS = _declared_commands()


def test_the_commands_are_declared_and_installed():
    assert {"bitmind-miner", "bitmind-validator", "bitmind-train", "bitmind-fit-stack", "bitmind-index"} <= set(COMMANDS)
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert {name: installed.get(name) for name in COMMANDS} == COMMANDS, "reinstall: pip install -e ."


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_answers_help(name, capsys):
    module, function = COMMANDS[name].split(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out
