"""Evaluation protocols against independent references (scipy zoom + medpy), with stub predictors.

The stubs are numpy functions of the image, so these tests need no model and no compilation.
"""

import json

import numpy as np
import pytest
from scipy.ndimage import zoom

from rwkvunet_jax.eval.images import evaluate_images
from rwkvunet_jax.eval.inference import predict_probabilities, probabilities
from rwkvunet_jax.eval.volumes import evaluate_volumes, segment_volume

from medpy_reference import transunet_case  # noqa: E402  (skips without medpy)

NUM_CLASSES = 3
NET = (32, 32)


def intensity_classifier(images):
    """Logits favouring class k where the intensity is near k / (K - 1): a deterministic stand-in model."""
    levels = np.linspace(0, 1, NUM_CLASSES, dtype=np.float32)
    return -50.0 * (images[..., :1] - levels) ** 2


def _volume(seed, depth=3, shape=(40, 48)):
    rng = np.random.default_rng(seed)
    label = np.zeros((depth, *shape), np.int32)
    for z in range(depth):
        label[z, 5 + z:20, 6:25] = 1
        label[z, 24:34, 30 - z:44] = 2
    image = label / (NUM_CLASSES - 1) + rng.normal(0, 0.08, size=label.shape)
    return {"image": image.astype(np.float32), "label": label, "id": f"case{seed}"}


def _reference_prediction(image):
    """TransUNet's test_single_volume, written out: zoom(order 3) in, argmax, zoom(order 0) back."""
    out = np.zeros(image.shape, np.int32)
    for z, sl in enumerate(image):
        x, y = sl.shape
        small = zoom(sl, (NET[0] / x, NET[1] / y), order=3)
        pred = np.argmax(intensity_classifier(small[None, ..., None])[0], axis=-1)
        out[z] = zoom(pred, (x / NET[0], y / NET[1]), order=0)
    return out


def test_segment_volume_follows_the_transunet_protocol():
    case = _volume(0)
    ours = segment_volume(intensity_classifier, case["image"], image_size=NET, batch_size=2)
    np.testing.assert_array_equal(ours, _reference_prediction(case["image"]))


def test_evaluate_volumes_matches_medpy_mean_over_cases_then_classes():
    cases = [_volume(1), _volume(2)]
    cases[1]["label"][:, 24:34, :] = 0  # class 2 absent in case 2 but maybe predicted: the (1, 0) convention
    summary, rows = evaluate_volumes(intensity_classifier, cases, num_classes=NUM_CLASSES, image_size=NET,
                                     batch_size=4, class_names=("bg", "a", "b"), progress=False)
    scores = np.array([[transunet_case(_reference_prediction(c["image"]) == k, c["label"] == k)
                        for k in (1, 2)] for c in cases])
    per_class = scores.mean(axis=0)
    assert summary["mean_dice"] == pytest.approx(per_class[:, 0].mean(), abs=1e-9)
    assert summary["mean_hd95"] == pytest.approx(per_class[:, 1].mean(), abs=1e-9)
    assert summary["per_class"]["b"]["dice"] == pytest.approx(per_class[1, 0], abs=1e-9)
    assert summary["num_cases"] == 2
    assert [r["id"] for r in rows] == ["case1", "case2"]
    assert rows[0]["a_hd95"] == pytest.approx(scores[0, 0, 1], abs=1e-9)


def _asymmetric(images):  # depends on position (not flip-equivariant), so flipping changes the answer
    h, w = images.shape[1:3]
    ramp = np.linspace(-1, 1, w)[None, None, :, None] + np.linspace(0, 0.5, h)[None, :, None, None]
    return np.concatenate([images[..., :1] + ramp, 2 * images[..., :1] - ramp, 0 * ramp + images[..., :1]], -1)


def _softmax64(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("channels", [3, 1])
def test_tta_modes_match_numpy_references(channels):
    rng = np.random.default_rng(3)
    images = rng.normal(size=(3, 8, 8, 1))

    def net(x):
        return _asymmetric(np.asarray(x, np.float64))[..., :channels]

    def probs(logits):  # float64 softmax, or sigmoid for one channel
        return 1 / (1 + np.exp(-logits)) if channels == 1 else _softmax64(logits)

    hflip = net(images[:, :, ::-1])[:, :, ::-1]  # W flipped in, the output flipped back
    vflip = net(images[:, ::-1])[:, ::-1]
    expected = {
        "none": probs(net(images)),
        "hflip_logits": probs((net(images) + hflip) / 2),  # ttach's mean of raw outputs, then softmax
        "hv_probs": (probs(net(images)) + probs(hflip) + probs(vflip)) / 3,
    }
    got = {mode: predict_probabilities(net, images.astype(np.float32), batch_size=2, tta=mode) for mode in expected}
    for mode in expected:
        np.testing.assert_allclose(got[mode], expected[mode], rtol=1e-5, atol=1e-6, err_msg=mode)
    assert np.abs(got["hflip_logits"] - got["none"]).max() > 1e-3
    if channels > 1:  # mean of logits then softmax is not the mean of the softmaxes
        hflip_probs = (probs(net(images)) + probs(hflip)) / 2
        assert np.abs(got["hflip_logits"] - hflip_probs).max() > 1e-3
    # A bool means the paper's mode (True) or none (False); a bad name is refused with the valid ones.
    np.testing.assert_array_equal(predict_probabilities(net, images, batch_size=2, tta=True), got["hflip_logits"])
    np.testing.assert_array_equal(predict_probabilities(net, images, batch_size=2, tta=False), got["none"])
    with pytest.raises(ValueError, match="hflip_logits"):
        predict_probabilities(net, images, batch_size=2, tta="flips")


def test_predict_function_always_sees_the_full_batch_shape():
    shapes = []

    def record(images):
        shapes.append(images.shape)
        return intensity_classifier(images)

    out = predict_probabilities(record, np.zeros((5, 8, 8, 1), np.float32), batch_size=4)
    assert out.shape == (5, 8, 8, NUM_CLASSES) and set(shapes) == {(4, 8, 8, 1)}


class ListSource:
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def test_binary_image_evaluation_matches_direct_dice_and_iou():
    rng = np.random.default_rng(4)
    examples = []
    for i in range(5):
        image = rng.uniform(0, 1, size=(*NET, 3)).astype(np.float32)
        label = (rng.uniform(size=NET) > 0.5).astype(np.int32)
        examples.append({"image": image, "label": label, "id": f"img{i}"})
    examples[4]["image"][:] = 0.1  # predicts nothing ...
    examples[4]["label"][:] = 0  # ... on an empty label: Dice = IoU = 1 by convention

    def threshold(images):
        return (images[..., :1] - 0.5) * 10.0

    summary, rows = evaluate_images(threshold, ListSource(examples), num_outputs=1, image_size=NET, batch_size=2,
                                    progress=False)
    dices, ious = [], []
    for ex in examples:
        pred, gt = ex["image"][..., 0] > 0.5, ex["label"] > 0
        inter, union = np.sum(pred & gt), np.sum(pred | gt)
        dices.append(2 * inter / (pred.sum() + gt.sum()) if union else 1.0)
        ious.append(inter / union if union else 1.0)
    assert [r["dice"] for r in rows] == pytest.approx(dices)
    assert summary["mean_dice"] == pytest.approx(np.mean(dices)) and summary["mean_iou"] == pytest.approx(np.mean(ious))
    assert summary["num_images"] == 5


def test_multiclass_images_are_scored_at_their_original_size():
    cases = [_volume(5, depth=1, shape=(40, 48)), _volume(6, depth=1, shape=(32, 32))]
    examples = [{"image": c["image"][0][..., None], "label": c["label"][0], "id": c["id"]} for c in cases]
    seen = []
    summary, rows = evaluate_images(intensity_classifier, ListSource(examples), num_outputs=NUM_CLASSES,
                                    image_size=NET, batch_size=2, on_image=lambda i, p: seen.append((i, p.shape)),
                                    progress=False)
    assert seen == [(0, (40, 48)), (1, (32, 32))]
    assert summary["num_images"] == 2 and set(summary["per_class"]) == {"class1", "class2"}
    assert 0.5 < summary["mean_dice"] <= 1.0


def test_evaluate_dataset_writes_report_for_phantom_volumes(tmp_path):
    from rwkvunet_jax.data.phantom import write_phantom_dataset
    from rwkvunet_jax.eval.evaluate import evaluate_dataset

    root = write_phantom_dataset(tmp_path / "data", num_train=2, num_val=2, num_test=5, image_size=(32, 32),
                                 num_classes=NUM_CLASSES, seed=0, slices_per_volume=2)
    summary = evaluate_dataset(intensity_classifier, dataset="phantom", root=root, split="test", protocol="volume",
                               num_outputs=NUM_CLASSES, image_size=NET, batch_size=2, outdir=tmp_path / "eval",
                               num_overlays=2, paper={"mean_dice": 80.0, "mean_hd95": -1.0}, progress=False)
    payload = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert payload["mean_dice"] == pytest.approx(summary["mean_dice"])
    assert set(payload) >= {"mean_dice", "mean_hd95", "per_class", "cases", "paper"}
    assert payload["paper"] == {"mean_dice": 80.0}
    assert len(payload["cases"]) == 3  # 5 test images in volumes of 2
    assert (tmp_path / "eval" / "metrics.csv").read_text().count("\n") == 4
    # Overlays of the worst and the best case by mean Dice.
    cases = sorted(payload["cases"], key=lambda c: c["mean_dice"])
    names = sorted(p.name for p in (tmp_path / "eval" / "overlays").glob("*.png"))
    assert [n.split("_slice")[0] for n in names] == [f"1_worst_{cases[0]['id']}", f"2_best_{cases[-1]['id']}"]


def test_overlay_cases_are_the_worst_median_and_best():
    from rwkvunet_jax.eval.evaluate import pick_cases

    scores = [0.5, 0.9, 0.1, 0.7, 0.3, 0.8]
    ranked = sorted(range(len(scores)), key=lambda i: scores[i])  # 2, 4, 0, 3, 5, 1
    assert pick_cases(scores, 3) == [(ranked[0], "worst"), (ranked[2], "median"), (ranked[-1], "best")]
    picked = pick_cases(scores, 4)
    assert picked[0] == (ranked[0], "worst") and picked[-1] == (ranked[-1], "best") and len(picked) == 4
    assert (ranked[2], "median") in picked
    assert pick_cases(scores, 2) == [(ranked[0], "worst"), (ranked[-1], "best")]
    assert pick_cases(scores, 1) == [(ranked[2], "median")]
    assert pick_cases(scores, 10) == [(i, n) for i, n in pick_cases(scores, 6)] and len(pick_cases(scores, 10)) == 6
    assert pick_cases([], 3) == [] and pick_cases(scores, 0) == []
