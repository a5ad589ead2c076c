"""`bitmind-detect`: per-file results and errors, JSON output, detector configs given by path."""

import json
from pathlib import Path

import pytest
import yaml

from base_miner.detect_cli import load_image, main
from bitmind.image_codec import DecodeLimits, ImageDecodeError
from tests._fixtures_camo import camo_config, mean_brightness, pictures  # noqa: F401 (fixture)


@pytest.fixture()
def detector_yaml(tmp_path):
    """A CAMO config file with stand-in experts: face 0.9, general = mean brightness of the image."""
    path = tmp_path / "camo-test.yaml"
    path.write_text(yaml.safe_dump(camo_config(face=0.9, general="mean")))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, pictures):
    tmp_path = tmp_path_factory.mktemp("images")
    paths = {}
    for name, image in pictures.items():
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    paths["garbage"] = tmp_path / "garbage.jpg"
    paths["garbage"].write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    paths["missing"] = tmp_path / "missing.png"
    return {name: str(path) for name, path in paths.items()}


def test_json_reports_good_and_bad_files_in_order(files, detector_yaml, capsys):
    code = main(["--json", "--device", "cpu", "--detector", detector_yaml, files["astronaut"], files["garbage"]])
    assert code != 0
    captured = capsys.readouterr()
    astronaut, garbage = json.loads(captured.out)
    assert astronaut["path"] == files["astronaut"] and "error" not in astronaut
    assert 0.0 <= astronaut["probability"] <= 1.0
    assert astronaut["route"] == "face" and set(astronaut["experts"]) == {"face", "general"}
    assert garbage["path"] == files["garbage"] and "probability" not in garbage
    assert "unreadable" in garbage["error"]
    assert files["garbage"] in captured.err


def test_missing_file_is_reported_and_the_others_still_scored(files, detector_yaml, capsys):
    code = main(["--device", "cpu", "--detector", detector_yaml, files["missing"], files["coffee"]])
    assert code == 1
    captured = capsys.readouterr()
    assert f"{files['missing']}: no such file" in captured.err
    [line] = captured.out.splitlines()
    path, probability, route, experts = line.split("\t")
    assert path == files["coffee"] and route == "route=general"
    assert float(probability) == pytest.approx(mean_brightness(load_image(Path(files["coffee"]))), abs=1e-4)
    assert experts.startswith("general=")


def test_all_good_files_exit_zero_and_keep_order_across_batches(files, detector_yaml, capsys):
    names = ["coffee", "astronaut", "chelsea", "astronaut", "coffee"]
    code = main(["--json", "--batch-size", "2", "--device", "cpu", "--detector", detector_yaml]
                + [files[name] for name in names])  # fmt: skip
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == [files[name] for name in names]
    assert [r["route"] for r in results] == ["general", "face", "general", "face", "general"]


def test_unknown_detector_config_is_a_usage_error(files, capsys):
    assert main(["--detector", "no_such_detector", files["coffee"]]) == 2
    assert "no_such_detector" in capsys.readouterr().err


def test_bad_batch_size_is_a_usage_error(files, detector_yaml, capsys):
    assert main(["--batch-size", "0", "--detector", detector_yaml, files["coffee"]]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_load_image_enforces_the_codec_limits(files, tmp_path):
    with pytest.raises(ImageDecodeError, match="more than the limit"):
        load_image(Path(files["coffee"]), DecodeLimits(max_bytes=1000))
    with pytest.raises(ImageDecodeError, match="pixels"):
        load_image(Path(files["coffee"]), DecodeLimits(max_pixels=100 * 100))
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        load_image(tmp_path)
