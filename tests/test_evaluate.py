"""mIoU against an independent computation, the evaluation protocol, and `depict eval`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix
from typer.testing import CliRunner

from depict_analysis.cli.main import app
from depict_analysis.models import create_model, save_checkpoint
from depict_analysis.models.data import build_dataset
from depict_analysis.models.evaluate import ConfusionMatrix, evaluate, image_probs, miou


def sklearn_scores(labels: np.ndarray, preds: np.ndarray, K: int) -> dict:
    """IoU / accuracies from sklearn's confusion matrix over the non-ignored pixels, NaN-mean over present classes."""
    keep = labels != 255
    cm = confusion_matrix(labels[keep], preds[keep], labels=list(range(K))).astype(float)
    tp, gt, pr = np.diag(cm), cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = np.array([tp[c] / union[c] if union[c] > 0 else np.nan for c in range(K)])
    acc = np.array([tp[c] / gt[c] if gt[c] > 0 else np.nan for c in range(K)])
    return {"cm": cm, "iou": iou, "miou": np.nanmean(iou), "acc": acc, "mean_acc": np.nanmean(acc), "pixel_acc": tp.sum() / cm.sum()}


def test_miou_matches_sklearn_with_ignore_and_absent_classes():
    K, rng = 6, np.random.default_rng(0)
    # class 5: never labelled nor predicted (excluded from the mean); class 4: predicted, never labelled (IoU 0)
    labels = rng.integers(0, 4, size=(3, 17, 23))
    preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, 5, size=labels.shape))
    labels[rng.random(labels.shape) < 0.2] = 255
    confusion = ConfusionMatrix(K)
    for label, pred in zip(labels, preds):  # accumulated image by image
        confusion.update(torch.from_numpy(pred), torch.from_numpy(label))
    ours, expected = miou(confusion), sklearn_scores(labels, preds, K)
    np.testing.assert_array_equal(confusion.counts.numpy(), expected["cm"])
    np.testing.assert_allclose(ours["iou"], expected["iou"], rtol=1e-12)
    np.testing.assert_allclose(ours["acc"], expected["acc"], rtol=1e-12)
    assert np.isnan(ours["iou"][5]) and ours["iou"][4] == 0.0
    for key in ("miou", "mean_acc", "pixel_acc"):
        assert ours[key] == pytest.approx(expected[key], rel=1e-12)
    assert ours["n_pixels"] == int((labels != 255).sum())


def test_confusion_matrix_rejects_labels_outside_the_classes():
    confusion = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="label value 7 is not a class index 0..2"):
        confusion.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 7, 255, 1]))


def _folder(root, sizes, K=3):
    """Folder dataset with images of ``sizes`` (h, w), random masks with ignore pixels."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("classes: [" + ", ".join(f"{{name: c{i}}}" for i in range(K)) + "]\n")
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        mask = rng.integers(0, K, (h, w)).astype(np.uint8)
        mask[: h // 4] = 255
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


def test_evaluate_scores_predictions_at_the_label_resolution(tmp_path):
    data = build_dataset("folder", _folder(tmp_path / "d", [(37, 50), (64, 41), (20, 20)]), "val")
    torch.manual_seed(0)
    model = create_model("depict-sa-tiny", n_cls=3).eval()
    scores = evaluate(model, data, window=32, stride=16, short_side=40, scales=(0.75, 1.0), flip=True)
    labels, preds = [], []
    for i in range(len(data)):  # each image's prediction (test_official_protocol checks it), scored by sklearn
        image, label = data.load_raw(i)
        with torch.inference_mode():
            probs = image_probs(model, image, window=32, stride=16, img_scale=(160, 40), scales=(0.75, 1.0), flip=True)
        assert probs.shape[-2:] == label.shape
        labels.append(label.ravel())
        preds.append(probs.argmax(0).ravel().numpy())
    expected = sklearn_scores(np.concatenate(labels), np.concatenate(preds), 3)
    assert scores["miou"] == pytest.approx(expected["miou"], rel=1e-12)
    assert scores["pixel_acc"] == pytest.approx(expected["pixel_acc"], rel=1e-12)
    assert (scores["window"], scores["stride"], scores["short_side"], scores["n_images"]) == (32, 16, 40, 3)
    assert scores["img_scale"] == [160, 40] and scores["amp"] is False
    assert model.training is False
    with pytest.raises(ValueError, match="predicts 3 classes but synthetic has 8"):
        evaluate(model, build_dataset("synthetic", None, "val", length=1))


def test_eval_cli_prints_a_table_and_writes_json(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", create_model("depict-sa-tiny", n_cls=8))
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(
        app, ["eval", str(tmp_path / "m.pt"), "--dataset", "synthetic", "--num-images", "3", "--multiscale", "--out", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    assert "ellipse" in result.stdout and "pixel accuracy" in result.stdout
    scores = json.loads(out.read_text())  # strict JSON: absent classes are null, not NaN
    assert scores["n_images"] == 3 and len(scores["iou"]) == 8 and scores["classes"][0] == "background"
    assert scores["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and scores["flip"] is True and scores["amp"] is False
    assert scores["short_side"] == 0 and scores["img_scale"] is None  # synthetic scenes keep their size
    assert 0 <= scores["miou"] <= 1


@pytest.mark.parametrize("case, fragment", [
    ("no dataset", "pass --dataset"),
    ("missing root", "does not exist"),
    ("label >= K", "contains value 9"),
    ("class count", "predicts 8 classes but folder has 3"),
])
def test_eval_cli_bad_input_is_one_line_and_exit_2(tmp_path, case, fragment):
    save_checkpoint(tmp_path / "m.pt", create_model("depict-sa-tiny", n_cls=8 if case == "class count" else 3))
    args = ["eval", str(tmp_path / "m.pt")]
    if case == "missing root":
        args += ["--dataset", "cityscapes", "--data-root", str(tmp_path / "nowhere")]
    elif case != "no dataset":
        root = _folder(tmp_path / "d", [(20, 20)])
        if case == "label >= K":
            Image.fromarray(np.full((20, 20), 9, dtype=np.uint8)).save(root / "masks" / "0.png")
        args += ["--dataset", "folder", "--data-root", str(root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.stdout, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
