"""evaluate.py beyond one number: calibration, TTA, robustness, confident errors, --image, the summary."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import evaluate
import train
from conftest import synthetic_images
from data import normalize_batch, to_device_images
from reports import corruptions, metrics

PNG = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")
FIGURES = ("confusion_matrix.png", "per_class_accuracy.png", "reliability_diagram.png", "confident_errors.png",
           "robustness.png", "loss_curve.png", "accuracy_curve.png", "summary.png")


# ----------------------------------------------------------------------------- metrics

def _toy_predictions(n: int, gap: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """10-class probabilities whose top class is right with probability (confidence - gap)."""
    g = torch.Generator().manual_seed(seed)
    confidence = 0.35 + 0.65 * torch.rand(n, generator=g)
    probs = ((1 - confidence) / 9).view(-1, 1).repeat(1, 10)
    top = torch.randint(0, 10, (n,), generator=g)
    probs[torch.arange(n), top] = confidence
    right = torch.rand(n, generator=g) < confidence - gap
    labels = torch.where(right, top, (top + torch.randint(1, 10, (n,), generator=g)) % 10)
    return probs, labels


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    calibrated = metrics.expected_calibration_error(metrics.reliability_bins(*_toy_predictions(50_000, 0.0)))
    overconfident = metrics.expected_calibration_error(metrics.reliability_bins(*_toy_predictions(50_000, 0.3)))
    assert calibrated < 0.01
    assert 0.27 < overconfident < 0.33


def test_reliability_bins_place_and_average_exactly():
    # confidences 0.9 (right), 0.9 (wrong), 0.5 (right): 0.9 is in bin 13 = (13/15, 14/15], 0.5 in bin 7
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5]])
    bins = metrics.reliability_bins(probs, torch.tensor([0, 1, 0]), n_bins=15)
    assert [b["count"] for b in bins] == [0] * 7 + [1] + [0] * 5 + [2] + [0]
    assert bins[13]["accuracy"] == 0.5 and bins[13]["confidence"] == pytest.approx(0.9)
    # ECE = 2/3 * |0.5 - 0.9| + 1/3 * |1 - 0.5|
    assert metrics.expected_calibration_error(bins) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.5)
    edge = metrics.reliability_bins(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert edge[-1]["count"] == 1  # a confidence of exactly 1 is in the last bin


def test_top_k_and_most_confident_errors():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0.0, 5.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 0])
    assert metrics.top_k_accuracy(logits, labels, 1) == 25.0
    assert metrics.top_k_accuracy(logits, labels, 2) == 50.0 and metrics.top_k_accuracy(logits, labels, 3) == 100.0
    probs = logits.softmax(1)
    assert metrics.most_confident_errors(probs, labels, 2).tolist() == [3, 1]  # 3 is the surest mistake
    top = metrics.top_k_classes(probs, ("a", "b", "c"), 3)
    assert [name for name, _ in top[2]] == ["c", "b", "a"] and sum(p for _, p in top[2]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- corruptions

@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(3)
    return synthetic_images(rng.integers(0, 10, 24), rng)


@pytest.mark.parametrize("name", list(corruptions.CORRUPTIONS))
def test_corruptions_are_seeded_keep_dtype_and_shape_and_grow_with_severity(images, name):
    original = images.copy()
    change = []
    for severity in (1, 2, 3):
        a = corruptions.corrupt(images, name, severity, corruptions.corruption_rng(0, name, severity))
        b = corruptions.corrupt(images, name, severity, corruptions.corruption_rng(0, name, severity))
        assert a.dtype == np.uint8 and a.shape == images.shape
        assert np.array_equal(a, b)
        # corrupting in two batches draws the same noise as in one: results do not depend on --batch-size
        rng = corruptions.corruption_rng(0, name, severity)
        halves = np.concatenate([corruptions.corrupt(images[:7], name, severity, rng),
                                 corruptions.corrupt(images[7:], name, severity, rng)])
        assert np.array_equal(a, halves)
        change.append(np.abs(a.astype(float) - images).mean())
    assert 0 < change[0] < change[1] < change[2], change
    assert np.array_equal(images, original)  # the input is not modified in place
    if name == "gaussian_noise":
        other = corruptions.corrupt(images, name, 1, corruptions.corruption_rng(1, name, 1))
        assert not np.array_equal(other, corruptions.corrupt(images, name, 1, corruptions.corruption_rng(0, name, 1)))


def test_corrupt_rejects_bad_input(images):
    rng = corruptions.corruption_rng(0, "jpeg", 1)
    with pytest.raises(ValueError, match="unknown corruption"):
        corruptions.corrupt(images, "fog", 1, rng)
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupt(images, "jpeg", 4, rng)
    with pytest.raises(ValueError, match="uint8"):
        corruptions.corrupt(images.astype(np.float32), "jpeg", 1, rng)


def _fitted_toy_model() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """A small CNN fitted to synthetic images (200 train), with 200 fresh test images.

    The 2-epoch ResNet9 of `trained_run` is near chance, so robustness is measured on a model that
    learns: this one reaches 100% on clean test images in 40 full-batch Adam steps (~2 s)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    train_labels, test_labels = (rng.permutation(np.repeat(np.arange(10), 20)) for _ in range(2))
    train_images, test_images = synthetic_images(train_labels, rng), synthetic_images(test_labels, rng)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x, y = normalize_batch(to_device_images(train_images, CPU)), torch.from_numpy(train_labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), test_images, test_labels


def test_heavier_corruption_lowers_a_trained_models_accuracy_and_reruns_match():
    model, images, labels = _fitted_toy_model()
    with torch.inference_mode():
        clean = metrics.top_k_accuracy(model(normalize_batch(to_device_images(images, CPU))),
                                       torch.from_numpy(labels), 1)
    assert clean >= 90
    accuracy = evaluate.robustness(model, images, labels, CPU, batch_size=64, seed=0)
    assert set(accuracy) == set(corruptions.CORRUPTIONS) and all(len(v) == 3 for v in accuracy.values())
    mean = np.mean(list(accuracy.values()), axis=0)
    assert clean >= mean[0] >= mean[1] >= mean[2] and mean[2] < clean - 10, (clean, accuracy)
    # seeded: the same numbers again, whatever the batch size
    assert evaluate.robustness(model, images, labels, CPU, batch_size=33, seed=0) == accuracy


# ----------------------------------------------------------------------------- the whole report

def test_report_figures_and_printed_sections(trained_run, tiny_cifar, tmp_path, capsys):
    out = tmp_path / "eval"
    ckpt = trained_run / train.BEST_NAME
    assert evaluate.main([str(ckpt), "--data-dir", str(tiny_cifar), "--out-dir", str(out), "--tta", "--robustness",
                          "--limit", "30", "--batch-size", "16", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 30 and report["limit"] == 30
    cal = report["calibration"]
    assert cal["n_bins"] == 15 and sum(b["count"] for b in cal["bins"]) == 30 and 0 <= cal["ece"] <= 100
    assert f"ECE {cal['ece']:.2f}%" in text
    tta = report["tta"]
    assert 0 <= tta["accuracy"] <= 100 and tta["gain"] == pytest.approx(tta["accuracy"] - report["accuracy"])
    assert f"top-1 accuracy {tta['accuracy']:.2f}%" in text
    rob = report["robustness"]
    assert set(rob["accuracy"]) == set(corruptions.CORRUPTIONS) and rob["seed"] == 0
    assert rob["parameters"]["jpeg"] == list(corruptions.SEVERITIES["jpeg"])
    for name, accs in rob["accuracy"].items():
        assert len(accs) == 3 and name in text and f"{accs[2]:8.2f}" in text
    errors = report["confident_errors"]
    wrong = round(30 * (1 - report["accuracy"] / 100))
    assert len(errors) == min(wrong, evaluate.ERRORS_SHOWN)
    assert all(e["true"] != e["predicted"] for e in errors)
    assert [e["confidence"] for e in errors] == sorted((e["confidence"] for e in errors), reverse=True)
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name
        assert str(out / name) in report["figures"] and str(out / name) in text


def test_robustness_is_off_by_default_on_the_cpu(trained_run, tiny_cifar, tmp_path, capsys):
    assert evaluate.main([str(trained_run / train.BEST_NAME), "--data-dir", str(tiny_cifar), "--out-dir",
                          str(tmp_path), "--limit", "10", "--device", "cpu"]) == 0
    assert "robustness: skipped on the CPU (15 more passes over the 10 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["robustness"] is None


@pytest.mark.parametrize(("history", "problem"), [
    (None, "holds no training history"), ("text", "not a non-empty list"), ([], "not a non-empty list"),
    ([{"epoch": 1, "train_loss": 2.0}], "row 0 lacks"), ([3, 4], "row 0 lacks"),
    ([{k: 1.0 for k in evaluate.HISTORY_KEYS}, {**{k: 1.0 for k in evaluate.HISTORY_KEYS}, "val_acc": True}],
     "row 1 lacks"),
])
def test_history_problems_are_named(history, problem):
    assert problem in evaluate.history_problem(history)


def test_usable_history_has_no_problem(trained_run):
    assert evaluate.history_problem(torch.load(trained_run / train.BEST_NAME, weights_only=True)["history"]) is None


def test_malformed_history_skips_the_curves_and_no_robustness_skips_robustness(trained_run, tiny_cifar, tmp_path,
                                                                              capsys):
    ckpt = torch.load(trained_run / train.BEST_NAME, weights_only=True)
    ckpt["history"] = [{"epoch": 1, "train_loss": "two"}]
    torch.save(ckpt, tmp_path / "odd.pth")
    out = tmp_path / "eval"
    assert evaluate.main([str(tmp_path / "odd.pth"), "--data-dir", str(tiny_cifar), "--out-dir", str(out),
                          "--no-robustness", "--limit", "10", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    notes = [line for line in text.splitlines() if line.startswith("note: no training curves")]
    assert notes == ["note: no training curves: history row 0 lacks a number for one of "
                     + ", ".join(evaluate.HISTORY_KEYS)]
    report = json.loads((out / "report.json").read_text())
    assert report["robustness"] is None and report["tta"] is None and "robustness:" not in text
    assert not (out / "loss_curve.png").exists() and not (out / "robustness.png").exists()
    assert (out / "summary.png").read_bytes()[:8] == PNG


def test_bad_limit_is_rejected(trained_run, capsys):
    assert evaluate.main([str(trained_run / train.BEST_NAME), "--limit", "-1"]) == 2
    assert "--limit must be" in capsys.readouterr().err


# ----------------------------------------------------------------------------- your own images

def _image_files(folder):
    rng = np.random.default_rng(0)
    files = {
        "odd.png": Image.fromarray(rng.integers(0, 256, (45, 71, 3), dtype=np.uint8)),
        "grey.jpg": Image.fromarray(rng.integers(0, 256, (17, 100), dtype=np.uint8), mode="L"),
        "alpha.png": Image.fromarray(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8), mode="RGBA"),
        "palette.gif": Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)).convert("P"),
    }
    for name, image in files.items():
        image.save(folder / name)
    return [str(folder / name) for name in files]


def test_image_mode_prints_top3_and_survives_unreadable_files(trained_run, tmp_path, capsys):
    good = _image_files(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a JPEG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "odd.png").read_bytes()[:200])
    bad = [str(tmp_path / "broken.jpg"), str(truncated), str(tmp_path / "missing.png")]
    # the data folder does not exist: --image must not read (or download) the test set
    args = [str(trained_run / train.BEST_NAME), "--data-dir", str(tmp_path / "nowhere"), "--device", "cpu", "--image"]
    assert evaluate.main(args + [good[0], *bad[:2], *good[1:], bad[2]]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split(": ")[0] for line in lines] == good
    for line in lines:
        top = [part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", ")]
        assert len(top) == 3 and all(name in evaluate.CLASSES for name, _ in top)
        probs = [float(p.rstrip("%")) for _, p in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.05
    errors = captured.err.splitlines()
    assert len(errors) == 3 and all(e.startswith(f"error: {path}: ") for e, path in zip(errors, bad, strict=True))
    assert "not an image" in errors[0] and "no such file" in errors[2]
    assert not (tmp_path / "nowhere").exists()
    assert evaluate.main(args + good[:1]) == 0


def test_read_image_crops_the_centre_square_then_resizes(tmp_path):
    image = np.zeros((30, 90, 3), dtype=np.uint8)
    image[:, :30] = (255, 0, 0)
    image[:, 30:60] = (0, 200, 0)  # the centre square
    image[:, 60:] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(image).save(path)
    out = evaluate.read_image(str(path))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # the red and blue sides are cut away; bilinear support may bleed into the outermost pixels only
    assert np.abs(out[:, 1:-1].astype(int) - (0, 200, 0)).max() <= 2
    assert np.abs(out.astype(int) - (0, 200, 0)).max() < 20


# ----------------------------------------------------------------------------- real images

def test_a_few_hundred_real_test_images(proxy_dir, trained_run, tmp_path, capsys):
    """The first 300 test images of the real-image folder, through the whole report but robustness;
    and on them, each corruption's parameter does what its comment says."""
    out = tmp_path / "eval"
    assert evaluate.main([str(trained_run / train.BEST_NAME), "--data-dir", str(proxy_dir), "--out-dir", str(out),
                          "--limit", "300", "--no-robustness", "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 300 and sum(map(sum, report["confusion_matrix"])) == 300
    assert all(0 <= e["index"] < 300 for e in report["confident_errors"])
    images, _ = evaluate.load_test_set(str(proxy_dir), 300)
    x = images.astype(float)
    for severity, sigma in enumerate(corruptions.SEVERITIES["gaussian_noise"], 1):
        noisy = corruptions.corrupt(images, "gaussian_noise", severity, np.random.default_rng(0)).astype(float)
        inside = (x > 3 * sigma) & (x < 255 - 3 * sigma)  # away from clipping
        assert (noisy - x)[inside].std() == pytest.approx(sigma, rel=0.05)
    for severity, factor in enumerate(corruptions.SEVERITIES["contrast"], 1):
        flat = corruptions.corrupt(images, "contrast", severity, np.random.default_rng(0)).astype(float)
        assert flat.std(axis=(1, 2, 3)).mean() == pytest.approx(factor * x.std(axis=(1, 2, 3)).mean(), rel=0.05)
    sharp = [np.abs(np.diff(corruptions.corrupt(images, "gaussian_blur", s, None).astype(float), axis=2)).mean()
             for s in (1, 2, 3)]
    assert np.abs(np.diff(x, axis=2)).mean() > sharp[0] > sharp[1] > sharp[2]
