"""The README's flag reference is generated from the parsers; this keeps it from drifting."""

import re
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


# A measured rate or latency ("77 images/s", "12 ms per image", "3x faster"): figures go stale, so they live in the
# README's Benchmarks section and help states behaviour only.
_FIGURE = re.compile(r"\d[\d.,]*\s*(?:(?:served\s+)?(?:images|requests|queries|steps)/s|ms\b|x\s+(?:faster|slower))"
                     r"|\bmeasured\s+\d", re.IGNORECASE)


def test_help_states_behaviour_not_benchmark_figures():
    for command, module in flagdoc.PROCESSES:
        parser = __import__(module, fromlist=["build_parser"]).build_parser()
        figures = [(flag, meaning) for flag, _default, meaning in flagdoc.flag_rows(parser) if _FIGURE.search(meaning)]
        assert not figures, f"{command}: help with benchmark figures (move them to README's Benchmarks): {figures}"


def test_the_figure_check_catches_the_kind_of_text_it_is_for():
    assert _FIGURE.search("8 on CPU: 77 served images/s on 2 cores")
    assert _FIGURE.search("a lone query takes 27 ms")
    assert _FIGURE.search("measured 65 vs 39")
    assert not _FIGURE.search("Seconds between validator steps (0.5: two a second).")
