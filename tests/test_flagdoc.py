"""The README's flag reference is generated from the parsers; this keeps it from drifting."""

from pathlib import Path

from neurons import flagdoc

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_flag_section_matches_the_parsers():
    text = README.read_text()
    assert flagdoc.BEGIN in text and flagdoc.END in text, "README lost its flags markers"
    current = flagdoc.BEGIN + text.split(flagdoc.BEGIN, 1)[1].split(flagdoc.END, 1)[0] + flagdoc.END
    assert current == flagdoc.render(), "flags changed: run `python -m neurons.flagdoc --write`"


def test_every_flag_of_ours_has_help_text():
    for command, module in flagdoc.PROCESSES:
        parser = __import__(module, fromlist=["build_parser"]).build_parser()
        missing = [flag for flag, _default, meaning in flagdoc.flag_rows(parser) if not meaning]
        assert not missing, f"{command}: flags without help: {missing}"
