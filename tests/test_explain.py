"""Filters, feature maps, saliency and galleries: the numbers are right before the pictures."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_image
from PIL import Image
from torch import nn

from embedpipe.backbones import load_backbone, load_classifier
from embedpipe.backbones.lenet import LeNet5
from embedpipe.cli import main
from embedpipe.errors import ImageDecodeError
from embedpipe.explain import (
    ClassTarget,
    ExplainError,
    NeighbourTarget,
    TargetKind,
    UnknownLayerError,
    describe_model,
    embed,
    feature_maps,
    filter_grid,
    first_conv,
    grid_columns,
    input_gradient,
    layer_names,
    parse_target,
    saliency,
    saliency_map,
    smoothgrad,
    top_feature_maps,
)
from embedpipe.gallery import render_gallery
from embedpipe.provenance import WeightsInfo, WeightsKind

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return Image.open(io.BytesIO(data)).size


# --- saliency: the gradient itself ---------------------------------------------------


def _finite_difference(f, x: torch.Tensor, positions, eps: float = 1e-6) -> np.ndarray:
    out = []
    for pos in positions:
        plus, minus = x.clone(), x.clone()
        plus[pos] += eps
        minus[pos] -= eps
        out.append((f(plus) - f(minus)) / (2 * eps))
    return np.array(out)


@pytest.fixture(scope="module")
def lenet64():
    """LeNet-5, random init, in float64 so that finite differences are exact to ~1e-9."""
    model, _, _ = load_classifier("lenet5", weights="none", seed=0)
    return model.double()


def test_class_gradient_matches_finite_differences(lenet64):
    torch.manual_seed(1)
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    target = ClassTarget(3)
    grad, score = input_gradient(lenet64, x, target)
    assert grad.dtype == np.float64 and grad.shape == (1, 1, 32, 32)
    with torch.no_grad():
        assert score[0] == pytest.approx(lenet64(x)[0, 3].item())
    rng = np.random.default_rng(0)
    positions = [(0, 0, int(i), int(j)) for i, j in rng.integers(0, 32, (25, 2))]

    def f(z):
        with torch.no_grad():
            return lenet64(z)[0, 3].item()

    numeric = _finite_difference(f, x, positions)
    analytic = np.array([grad[p] for p in positions])
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-9 * np.abs(grad).max())


def test_neighbour_gradient_matches_finite_differences():
    """Cosine of two embeddings, through a backbone without a head (LeNet-5's GAP)."""
    backbone = load_backbone("lenet5", weights="none", seed=0).double()
    torch.manual_seed(2)
    x, other = torch.randn(2, 1, 1, 32, 32, dtype=torch.float64)
    target = NeighbourTarget(embed(backbone, other))
    grad, score = input_gradient(backbone, x, target)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(backbone(x), backbone(other)).item()
    assert score[0] == pytest.approx(cos)
    positions = [(0, 0, i, j) for i, j in [(0, 0), (5, 7), (16, 16), (31, 30), (20, 3), (9, 28)]]

    def f(z):
        with torch.no_grad():
            return torch.nn.functional.cosine_similarity(backbone(z), backbone(other)).item()

    numeric = _finite_difference(f, x, positions)
    np.testing.assert_allclose(
        [grad[p] for p in positions], numeric, rtol=1e-5, atol=1e-9 * np.abs(grad).max()
    )


def test_neighbour_target_works_without_a_head():
    """A user backbone has no classifier: neighbour saliency works, a class target is
    refused with a hint rather than silently reading an embedding dimension."""
    backbone = load_backbone("userbackbone:build", weights="none")
    torch.manual_seed(0)
    x, other = torch.randn(2, 1, 3, 32, 32)
    result = saliency(backbone, x, NeighbourTarget(embed(backbone, other)))
    assert result.map.shape == (32, 32) and result.map.dtype == np.float32
    assert result.map.max() == pytest.approx(1.0) and result.map.min() >= 0
    assert -1 <= result.score < 0.9999
    with pytest.raises(ExplainError, match="classifier head.*NeighbourTarget"):
        saliency(backbone, x, ClassTarget(0))


def test_targets_refuse_shapes_that_do_not_fit(lenet64):
    x = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    with pytest.raises(ExplainError, match=r"class index 10 is out of range.*0\.\.9"):
        input_gradient(lenet64, x, ClassTarget(10))
    with pytest.raises(ExplainError, match="reference embedding has 7 dims"):
        input_gradient(lenet64, x, NeighbourTarget(np.zeros(7)))
    with pytest.raises(ExplainError, match="training mode"):
        input_gradient(LeNet5(), x.float(), ClassTarget(0))


@pytest.mark.parametrize(
    "gradient, percentile, expected",
    [
        # max |g| across channels, divided by the maximum
        ([[[1, -4], [0, 2]], [[-3, 1], [0, -1]]], 100, [[0.75, 1.0], [0.0, 0.5]]),
        # a percentile below 100 clips the top
        ([[[1, 2], [3, 100]]], 50, [[0.4, 0.8], [1.0, 1.0]]),
        ([[[0, 0], [0, 0]]], 99, [[0, 0], [0, 0]]),
    ],
)
def test_saliency_map(gradient, percentile, expected):
    out = saliency_map(np.array(gradient, dtype=np.float64), clip_percentile=percentile)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_smoothgrad_averages_noisy_gradients(lenet64):
    torch.manual_seed(3)
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    target = ClassTarget(1)
    plain, _ = input_gradient(lenet64, x, target)
    # without noise every sample is the clean image: the average is the plain gradient
    np.testing.assert_allclose(smoothgrad(lenet64, x, target, samples=5, noise=0.0), plain[0])
    a = smoothgrad(lenet64, x, target, samples=6, seed=4, batch_size=4)
    b = smoothgrad(lenet64, x, target, samples=6, seed=4, batch_size=6)
    np.testing.assert_allclose(a, b)  # batching does not change the samples
    # by hand: the same noise, one sample at a time
    sigma = 0.15 * float(x.max() - x.min())
    eps = torch.randn(
        (6, 1, 32, 32), generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    by_hand = np.mean(
        [input_gradient(lenet64, x + sigma * e[None], target)[0][0] for e in eps], axis=0
    )
    np.testing.assert_allclose(a, by_hand, rtol=1e-10)
    assert not np.allclose(a, plain[0])


# --- saliency: a trained model looks where the label is ------------------------------

REGION = (slice(4, 12), slice(4, 12))


def _region_dataset(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose label is the sign of a faint 8x8 patch at REGION; an equally
    strong patch of random sign elsewhere carries no information."""
    x = rng.normal(0, 1.0, (n, 1, 32, 32)).astype(np.float32)
    y = rng.integers(0, 2, n)
    x[:, 0, REGION[0], REGION[1]] += np.where(y == 1, 0.5, -0.5)[:, None, None]
    corners, signs = rng.integers(14, 24, (n, 2)), rng.choice([-0.5, 0.5], n)
    for i, (r, c) in enumerate(corners):
        x[i, 0, r : r + 8, c : c + 8] += signs[i]
    return torch.from_numpy(x), torch.from_numpy(y)


def _inside_outside(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean saliency (for each image's true class) inside REGION over outside it."""
    maps = [saliency(model, xi, ClassTarget(int(yi))).map for xi, yi in zip(x, y)]
    inside = np.zeros((32, 32), bool)
    inside[REGION] = True
    maps = np.stack(maps)
    return float(maps[:, inside].mean() / maps[:, ~inside].mean())


def test_trained_model_saliency_is_concentrated_in_the_label_region():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    x_train, y_train = _region_dataset(1024, rng)
    x_test, y_test = _region_dataset(32, rng)
    model = LeNet5(num_classes=2).eval()
    untrained = _inside_outside(model, x_test, y_test)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        order = torch.randperm(len(x_train))
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.9, "the model did not learn the task; the saliency check would be moot"
    trained = _inside_outside(model, x_test, y_test)
    # the architecture alone favours the interior a little (borders feed fewer windows)
    assert untrained < 2.0
    assert trained > 4.0 and trained > 2 * untrained, (trained, untrained)


# --- filters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected_columns, expected_shape",
    [
        (64, 3, 11, 8, (8 * 12 + 1, 8 * 12 + 1, 3)),  # AlexNet's conv1: 8x8
        (32, 3, 3, 8, (4 * 4 + 1, 8 * 4 + 1, 3)),  # EfficientNet's stem: 8x4, none empty
        (6, 1, 5, 3, (2 * 6 + 1, 3 * 6 + 1, 1)),  # LeNet-5's C1: grey
        (7, 3, 2, 3, (3 * 3 + 1, 3 * 3 + 1, 3)),  # prime: 3x3 with two empty cells
        (5, 4, 3, 5, (1 * 4 + 1, 5 * 4 + 1, 1)),  # not RGB: channel mean; one full row
    ],
)
def test_filter_grid_tiles(n, c, k, expected_columns, expected_shape):
    rng = np.random.default_rng(n)
    w = rng.normal(size=(n, c, k, k)).astype(np.float32)
    assert grid_columns(n) == expected_columns
    grid = filter_grid(w)
    assert grid.shape == expected_shape and grid.dtype == np.float32
    step = k + 1
    tiles = [
        grid[1 + r * step : 1 + r * step + k, 1 + col * step : 1 + col * step + k]
        for r in range(expected_shape[0] // step)
        for col in range(expected_columns)
    ]
    for i in range(n):
        f = w[i].transpose(1, 2, 0)
        if c != 3:
            f = f.mean(axis=2, keepdims=True)
        np.testing.assert_allclose(tiles[i], (f - f.min()) / (f.max() - f.min()), atol=1e-6)
    for empty in tiles[n:]:
        assert (empty == 1.0).all()
    assert (grid[0] == 1.0).all() and (grid[:, 0] == 1.0).all()  # separators


def test_filter_grid_constant_filter_is_mid_grey():
    grid = filter_grid(np.ones((1, 3, 2, 2)), pad=0)
    np.testing.assert_array_equal(grid, np.full((2, 2, 3), 0.5, np.float32))


def test_first_conv_of_registered_backbones():
    name, conv = first_conv(load_backbone("alexnet", weights="none"))
    assert name == "features.0" and tuple(conv.weight.shape) == (64, 3, 11, 11)
    name, conv = first_conv(load_backbone("lenet5", weights="none"))
    assert name == "features.0" and tuple(conv.weight.shape) == (6, 1, 5, 5)


# --- feature maps --------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    return load_backbone("resnet18", weights="none", seed=0)


@pytest.mark.parametrize("layer, n", [("layer1", 5), ("layer2.0.conv1", 200)])
def test_top_feature_maps_match_an_independent_hook(resnet18, layer, n):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    seen = {}

    def hook(module, inputs, output):  # returns None: the output is left as it is
        seen["out"] = output.detach()[0]

    handle = resnet18.model.get_submodule(layer).register_forward_hook(hook)
    with torch.no_grad():
        resnet18(x)
    handle.remove()
    out = seen["out"]
    means = out.mean(dim=(1, 2))
    expected = torch.argsort(means, descending=True, stable=True)[:n].numpy()

    fm = top_feature_maps(resnet18, x, layer, n=n)
    assert fm.num_channels == out.shape[0] and len(fm.channels) == min(n, out.shape[0])
    np.testing.assert_array_equal(fm.channels, expected)
    np.testing.assert_allclose(fm.maps, out[expected].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fm.means, means[expected].numpy(), rtol=1e-5, atol=1e-6)
    assert (np.diff(fm.means) <= 1e-6).all()
    np.testing.assert_allclose(
        feature_maps(resnet18, x[0], layer), out.numpy(), rtol=1e-5, atol=1e-6
    )


def test_unknown_layer_lists_the_valid_ones(resnet18):
    with pytest.raises(UnknownLayerError) as err:
        feature_maps(resnet18, torch.zeros(1, 3, 32, 32), "layer5")
    message = str(err.value)
    assert "no layer 'layer5'" in message and "Did you mean" in message
    for name in ("conv1", "layer1", "layer1.0", "layer4.1", "avgpool"):
        assert name in layer_names(resnet18)
        assert name in message
    assert "layer1.0.conv1" not in layer_names(resnet18)  # deeper paths work, unlisted
    with pytest.raises(UnknownLayerError):
        feature_maps(resnet18, torch.zeros(1, 3, 32, 32), "")


def test_a_layer_that_is_not_a_feature_map_is_refused(lenet64):
    with pytest.raises(ExplainError, match=r"'classifier' outputs \(1, 10\), not a \(1, C, H, W\)"):
        feature_maps(lenet64, torch.zeros(1, 1, 32, 32, dtype=torch.float64), "classifier")


# --- gallery and titles --------------------------------------------------------------


def test_gallery_renders_with_fewer_neighbours_than_k(tmp_path):
    query = make_image(tmp_path / "q.jpg", size=(120, 80))
    pixels = np.asarray(Image.open(make_image(tmp_path / "n1.png", size=(50, 90), seed=1)))
    grey = np.asarray(Image.open(make_image(tmp_path / "n2.png", seed=2)).convert("L"))
    neighbours = [
        (pixels, "cats/n1.png", 0.91),
        (grey, "n2", 0.5),
        (tmp_path / "missing.jpg", "gone/" + "x" * 60 + ".jpg", 0.1),
    ]
    two_of_eight = png_size(render_gallery(query, neighbours[:2], title="t", k=8))
    three = png_size(render_gallery(str(query), neighbours, title="t", k=8))
    none = png_size(render_gallery(Image.open(query), [], title="t", k=8))
    assert none[0] < two_of_eight[0] < three[0]
    # rows of at most per_row, balanced: ten neighbours are two rows of five
    ten = png_size(render_gallery(query, [neighbours[0]] * 10, title="t", k=10, per_row=8))
    five = png_size(render_gallery(query, [neighbours[0]] * 5, title="t", k=10, per_row=8))
    assert ten[0] == five[0] and ten[1] > five[1]
    with pytest.raises(ImageDecodeError, match="not_found"):
        render_gallery(tmp_path / "missing.jpg", neighbours, title="t")


def test_titles_name_backbone_and_weights():
    random = WeightsInfo(WeightsKind.NONE, "none", pretrained=False, seed=3)
    assert describe_model("alexnet", random) == "alexnet · random init, seed 3 (NOT pretrained)"
    tv = WeightsInfo(WeightsKind.TORCHVISION, "ResNet50_Weights.IMAGENET1K_V2", pretrained=True)
    assert describe_model("resnet50", tv) == "resnet50 · ResNet50_Weights.IMAGENET1K_V2"
    ckpt = WeightsInfo(WeightsKind.CHECKPOINT, "/runs/7/best.pth", pretrained=True)
    assert describe_model("resnet50", ckpt) == "resnet50 · checkpoint best.pth"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("class:967", (TargetKind.CLASS, "967")),
        ("neighbour:a/b:c.jpg", (TargetKind.NEIGHBOUR, "a/b:c.jpg")),
        ("class:-1", None),
        ("class:cat", None),
        ("neighbor:b.jpg", None),
        ("967", None),
        ("class:", None),
    ],
)
def test_parse_target(text, expected):
    if expected is None:
        with pytest.raises(ExplainError):
            parse_target(text)
    else:
        assert parse_target(text) == expected


# --- CLI -----------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, ["-q", "explain", *map(str, args)], catch_exceptions=False)


def test_cli_writes_pngs(tmp_path):
    a = make_image(tmp_path / "a.jpg", size=(64, 48))
    b = make_image(tmp_path / "b.png", size=(40, 40), seed=3)
    out = tmp_path / "viz"
    model = ["--backbone", "lenet5", "--weights", "none", "--out", out]
    commands = [
        (["filters", *model], "filters_lenet5_random-seed0.png"),
        (
            ["featuremaps", a, "--layer", "features.3", "--top", 4, *model],
            "featuremaps_lenet5_random-seed0_a_features.3.png",
        ),
        (
            ["saliency", a, "--target", "class:3", *model],
            "saliency_lenet5_random-seed0_a_class3.png",
        ),
        (
            ["saliency", a, "--target", f"neighbour:{b}", "--smoothgrad", 3, *model],
            "saliency_lenet5_random-seed0_a_neighbour-b_smoothgrad3.png",
        ),
        (["saliency", a, *model], None),  # default target: the predicted class
    ]
    for args, name in commands:
        r = run(*args)
        assert r.exit_code == 0, r.output
        path = out / name if name else out / r.output.strip().rpartition("/")[2]
        assert r.output.strip() == str(path)
        assert png_size(path.read_bytes())[0] > 100


def test_cli_errors_name_the_fix(tmp_path):
    a = make_image(tmp_path / "a.jpg")
    model = ["--backbone", "lenet5", "--weights", "none", "--out", tmp_path / "viz"]
    r = run("featuremaps", a, "--layer", "features.30", *model)
    assert r.exit_code == 1 and "features.3" in r.output and "classifier" in r.output
    r = run("saliency", a, "--target", "class:12", *model)
    assert r.exit_code == 1 and "out of range" in r.output
    r = run("saliency", a, "--target", "neighbour", *model)
    assert r.exit_code == 1 and "neighbour:OTHER_IMAGE" in r.output
    r = run(
        "saliency",
        a,
        "--target",
        "class:0",
        "--backbone",
        "userbackbone:build",
        "--weights",
        "none",
        "--out",
        tmp_path / "viz",
    )
    assert r.exit_code == 1 and "neighbour:OTHER_IMAGE" in r.output
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    r = run("saliency", tmp_path / "junk.jpg", "--target", "class:0", *model)
    assert r.exit_code == 1 and "not_an_image" in r.output and "junk.jpg" in r.output
    assert not (tmp_path / "viz").exists() or not list((tmp_path / "viz").iterdir())
