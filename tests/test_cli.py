"""The CLI is a thin shell: its commands reach the API and report errors without tracebacks."""

from __future__ import annotations

import json
import urllib.error

import torch
from click.testing import CliRunner

from embedpipe.cli import main
from embedpipe.store import read_embeddings


def run(*args: str):
    return CliRunner().invoke(main, ["-q", *args], catch_exceptions=False)


def test_backbones_table():
    r = run("backbones")
    assert r.exit_code == 0
    header, *rows = r.output.splitlines()
    assert header.split() == ["name", "family", "gap", "penultimate", "input", "weights", "offline"]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name["resnet50"][1:5] == ["resnet", "2048", "2048", "224"]
    assert by_name["inception_v3"][4] == "299"
    assert by_name["lenet5"][2:4] == ["120", "84"]
    assert "IMAGENET1K_V1,IMAGENET1K_V2" in by_name["resnet50"][5]


def test_backbones_json():
    rows = json.loads(run("backbones", "--format", "json").output)
    alexnet = next(r for r in rows if r["name"] == "alexnet")
    assert (alexnet["gap"], alexnet["penultimate"], alexnet["input"]) == (256, 4096, 224)


def test_extract_then_info(image_folder, tmp_path):
    out = tmp_path / "emb"
    r = run("extract", str(image_folder), "--backbone", "resnet18", "--weights", "none",
            "--out", str(out), "--batch-size", "4", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("10 embedded, 0 already done, 0 errors")
    assert read_embeddings(out).vectors.shape == (10, 512)
    r = run("info", str(out))
    assert "rows: 10" in r.output and "dim: 512" in r.output
    assert "weights: none (random init, seed 0)" in r.output
    assert "labels: cats: 5, dogs: 5" in r.output
    d = json.loads(run("info", str(out), "--json").output)
    assert d["rows"] == 10 and d["weights"]["pretrained"] is False
    again = run("extract", str(image_folder), "--backbone", "resnet18", "--weights", "none",
                "--out", str(out), "--workers", "1")
    assert again.output.startswith("0 embedded, 10 already done")


def test_missing_pretrained_weights_exit_non_zero_with_the_fix(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    r = CliRunner().invoke(main, ["extract", str(image_folder), "--backbone", "resnet50",
                                  "--weights", "DEFAULT", "--out", str(tmp_path / "emb")])
    assert r.exit_code == 1
    assert "Error: pretrained weights ResNet50_Weights.IMAGENET1K_V2" in r.output
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in r.output
    assert not (tmp_path / "emb").exists()  # nothing written, nothing random


def test_unknown_backbone_and_bad_choice(image_folder, tmp_path):
    r = CliRunner().invoke(main, ["extract", str(image_folder), "--backbone", "resnet5",
                                  "--weights", "none", "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "unknown backbone 'resnet5'" in r.output
    r = CliRunner().invoke(main, ["extract", str(image_folder), "--backbone", "resnet18",
                                  "--weights", "none", "--layer", "fc9", "--out", str(tmp_path / "e")])
    # not gap, penultimate or stages: a stage module, and resnet18 has none by that name
    assert r.exit_code == 1 and "resnet18 has no module 'fc9'. Did you mean fc?" in r.output


def test_a_folder_without_images_is_an_error_and_leaves_nothing(tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "notes.txt").write_text("no images here")
    r = CliRunner().invoke(main, ["-q", "extract", str(tmp_path / "src"), "--backbone", "lenet5",
                                  "--weights", "none", "--out", str(tmp_path / "emb")])
    assert r.exit_code == 1
    assert f"no images in '{tmp_path / 'src'}': looked for files ending in .bmp, .gif" in r.output
    assert not (tmp_path / "emb").exists()


def test_weight_names_are_case_insensitive():
    from embedpipe.backbones import get_spec, resolve_weights

    spec = get_spec("resnet50")
    assert resolve_weights(spec, "default") is resolve_weights(spec, "DEFAULT") is spec.weights_enum.DEFAULT
    assert resolve_weights(spec, "imagenet1k_v1") is spec.weights_enum.IMAGENET1K_V1
    assert resolve_weights(spec, "None") is None
    assert resolve_weights(get_spec("efficientnet_lite0"), "default") == "DEFAULT"


def _commands(group, prefix=()):
    import click

    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


def test_every_option_has_help_and_every_summary_fits():
    import click

    for path, cmd in _commands(main):
        missing = [p.opts[0] for p in cmd.params if isinstance(p, click.Option) and not p.hidden and not p.help]
        assert not missing, f"{' '.join(path)}: options without help {missing}"
        summary = cmd.get_short_help_str(limit=80 - 2 - 13)  # the column click gives it
        assert not summary.endswith("..."), f"{' '.join(path)}: summary cut: {summary}"


def test_describing_commands_take_format_json_and_the_json_alias(tmp_path):
    import numpy as np
    from conftest import tiny_dataset

    tiny_dataset(tmp_path / "emb", np.ones((1, 4)))
    by_format = run("info", str(tmp_path / "emb"), "--format", "json").output
    assert json.loads(by_format)["rows"] == 1
    assert run("info", str(tmp_path / "emb"), "--json").output == by_format
    assert json.loads(run("backbones", "--filter", "lenet*", "--json").output)[0]["name"] == "lenet5"
