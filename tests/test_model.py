import hashlib

import numpy as np
import pytest

from artnet import metrics
from artnet.config import ConfigError, JobConfig, ModelConfig, flatten, override
from artnet.model import backbones
from artnet.model.classifier import STUDY_HEAD, build_classifier, head_widths, set_trainable_blocks
from artnet.train import schedule
from conftest import WEIGHTS, requires_weights

MOBILENET_V2_FILE = WEIGHTS / "mobilenet_v2_1.0_224_imagenet1001.weights.h5"


def test_head_widths_make_the_study_chain():
    assert head_widths(STUDY_HEAD.head_depth, STUDY_HEAD.head_width, True) == [512, 256, 128, 64, 32, 16, 8]
    assert head_widths(3, 100, False) == [100, 100, 100]
    assert head_widths(0, 512, True) == []


def test_trainable_mask_selects_exactly_the_top_blocks():
    names = ["in", "a1", "a_end", "b1", "b_end", "c1", "c_end", "pool"]
    pattern = r"._end"
    assert backbones.block_ends(names, pattern) == [2, 4, 6]
    assert backbones.trainable_mask(names, pattern, 0) == [False] * 8
    assert backbones.trainable_mask(names, pattern, 1) == [False] * 5 + [True] * 3
    assert backbones.trainable_mask(names, pattern, 2) == [False] * 3 + [True] * 5
    assert backbones.trainable_mask(names, pattern, 9) == [True] * 8


def test_inception_unfreezes_mixed9_and_mixed10_only_and_batchnorm_stays_frozen():
    import keras

    spec = backbones.get("inception_v3")
    model = build_classifier(spec, ModelConfig(weights="none", head_depth=1, head_width=8), 3, 75)
    backbone = model.get_layer("backbone")
    assert backbones.block_ends([layer.name for layer in backbone.layers], spec.block_end)[-3:] == [248, 279, 310]
    set_trainable_blocks(model, spec, 2)
    trainable = {i for i, layer in enumerate(backbone.layers) if layer.trainable}
    expected = {i for i, layer in enumerate(backbone.layers)
                if i > 248 and not isinstance(layer, keras.layers.BatchNormalization)}
    assert trainable == expected
    assert not any(layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    head = {v.path for v in model.trainable_variables if not v.path.startswith("backbone")}
    assert any("logits" in p for p in head) and any("head_dense0" in p for p in head)
    set_trainable_blocks(model, spec, 0)
    assert all(not v.path.startswith("backbone") for v in model.trainable_variables)


def test_batchnorm_statistics_do_not_move_in_training_mode():
    spec = backbones.get("tiny")
    model = build_classifier(spec, ModelConfig(backbone="tiny", weights="none", dropout=0), 2, 32)
    set_trainable_blocks(model, spec, 2)
    bn = model.get_layer("backbone").get_layer("tiny_bn1")
    before = [w.copy() for w in bn.get_weights()]
    model(np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32), training=True)
    for a, b in zip(before, bn.get_weights()):
        np.testing.assert_array_equal(a, b)


@requires_weights
def test_weights_file_with_top_gives_the_features_keras_gives():
    import keras

    spec = backbones.get("mobilenet_v2")
    ours = backbones.build_backbone(spec, ModelConfig(backbone="mobilenet_v2", weights=str(MOBILENET_V2_FILE)), 224)
    reference = keras.applications.MobileNetV2(input_shape=(224, 224, 3), include_top=True, weights=None, classes=1001)
    reference.load_weights(str(MOBILENET_V2_FILE))
    features = keras.Model(reference.input, reference.layers[-2].output)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(ours(x).numpy(), features(x).numpy(), atol=1e-5)
    # The full classifier preprocesses raw RGB itself: 0..255 in, the same features as Keras' preprocess_input.
    clf = build_classifier(spec, ModelConfig(backbone="mobilenet_v2", weights=str(MOBILENET_V2_FILE)), 3, 224)
    raw = np.random.default_rng(1).uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)
    inner = clf.get_layer("backbone")(clf.get_layer("preprocess")(raw))
    expected = features(keras.applications.mobilenet_v2.preprocess_input(raw.copy())).numpy()
    np.testing.assert_allclose(inner.numpy(), expected, atol=1e-4)


@requires_weights
def test_weights_from_s3_are_cached_and_checksum_verified(s3_bucket, tmp_path, monkeypatch):
    from artnet.data import storage

    monkeypatch.setenv("ARTNET_CACHE", str(tmp_path / "cache"))
    data = (WEIGHTS / "mobilenet_0.25_224_no_top.h5").read_bytes()
    uri = f"s3://{s3_bucket}/weights/mobilenet_0.25_224_no_top.h5"
    storage.write_bytes(uri, data)
    digest = hashlib.sha256(data).hexdigest()
    path = backbones.fetch_weights(uri, digest)
    assert path.startswith(str(tmp_path / "cache")) and open(path, "rb").read() == data
    spec = backbones.get("mobilenet")
    model = backbones.build_backbone(spec, ModelConfig(backbone="mobilenet", alpha=0.25, weights=uri,
                                                       weights_sha256=digest), 128)
    assert model.output_shape == (None, 256)
    with pytest.raises(ConfigError) as err:
        backbones.fetch_weights(uri, "0" * 64)
    assert err.value.field == "model.weights_sha256"


def test_missing_weights_file_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        backbones.fetch_weights("/nowhere/weights.h5")
    assert err.value.field == "model.weights"


def test_schedule_rules():
    assert schedule.scaled_lr(1e-3, 512) == pytest.approx(2e-3)
    lrs = [schedule.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01
    assert [schedule.phase_of(e, 2) for e in range(4)] == [1, 1, 2, 2]
    assert schedule.steps_per_epoch(1000, 2, 32) == 15
    assert not schedule.should_stop([1.0, 0.9, 0.8], patience=2)
    assert schedule.should_stop([1.0, 0.8, 0.85, 0.81], patience=2)
    assert not schedule.should_stop([1.0, 0.8, 0.85, 0.81], patience=0)


def test_metrics_from_confusion_matrix():
    labels = np.array([0, 0, 1, 1, 2, 2])
    logits = np.array([[3, 1, 0], [1, 3, 0], [0, 3, 1], [0, 3, 1], [1, 0, 3], [3, 0, 2]], float)
    cm = metrics.confusion(labels, logits.argmax(1), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    stats = metrics.per_class(cm)
    np.testing.assert_allclose(stats["precision"], [0.5, 2 / 3, 1.0])
    np.testing.assert_allclose(stats["recall"], [0.5, 1.0, 0.5])
    summary = metrics.summarize(cm, metrics.top_k_correct(labels, logits, 2), loss_sum=3.0)
    assert summary["accuracy"] == pytest.approx(4 / 6) and summary["top3_accuracy"] == 1.0
    assert summary["macro_f1"] == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))


def test_job_config_overrides_and_flatten_round_trip():
    job = override(JobConfig(catalog="c"), {"train.lr": "0.01", "model.head_halving": "no", "data.augment.zoom": "0.2"})
    assert job.train.lr == 0.01 and job.model.head_halving is False and job.data.augment.zoom == 0.2
    flat = flatten(job)
    assert override(JobConfig(), {k: str(v) for k, v in flat.items() if v is not None}) == job
    with pytest.raises(ConfigError) as err:
        override(job, {"train.lrr": "1"})
    assert err.value.field == "train.lrr" and "train.lr" in str(err.value)


def test_confusion_figures_stay_readable_and_small_with_many_painters(tmp_path):
    """1,000 painters: the CSV holds the whole matrix; the PNG shows the largest confusions at a fixed size."""
    from PIL import Image

    from artnet.track import plots

    rng = np.random.default_rng(0)
    n = 1000
    cm = np.diag(rng.integers(5, 20, n))
    cm[3, 7] = 50  # the one big confusion
    names = [f"painter_{i}" for i in range(n)]
    plots.confusion_matrix(cm, names, str(tmp_path / "cm.png"))
    plots.confusion_csv(cm, names, str(tmp_path / "cm.csv"))
    lines = (tmp_path / "cm.csv").read_text().splitlines()
    assert len(lines) == n + 1 and lines[4].split(",")[8] == "50"
    width, height = Image.open(tmp_path / "cm.png").size
    assert width < 1500 and height < 1500 and (tmp_path / "cm.png").stat().st_size < 300_000
    small = np.array([[5, 1], [2, 4]])
    plots.confusion_matrix(small, ["a", "b"], str(tmp_path / "small.png"))  # the full matrix below the limit
    assert Image.open(tmp_path / "small.png").size[0] < 800


def test_device_schedule_equals_the_pure_rule():
    """The Keras schedule the optimizer evaluates on the device follows `schedule.lr_at` step by step."""
    from artnet.train import trainer

    for total, warmup in ((100, 10), (50, 0)):
        rate = trainer.warmup_cosine(total, warmup, 0.3)
        device = [float(rate(step)) for step in range(total + 5)]
        np.testing.assert_allclose(device, [schedule.lr_at(step, total, warmup, 0.3) for step in range(total + 5)],
                                   rtol=1e-5, atol=1e-7)


def test_precision_auto_follows_the_gpus_and_use_gpu_without_one_is_refused():
    from artnet.train import trainer

    assert trainer.precision_policy("auto", []) == "float32"
    assert trainer.precision_policy("auto", [(9, 0), (9, 0)]) == "mixed_bfloat16"  # H100
    assert trainer.precision_policy("auto", [(7, 5)]) == "mixed_float16"  # T4: no fast bfloat16
    assert trainer.precision_policy("auto", [(8, 0), (7, 0)]) == "mixed_float16"  # the slowest GPU decides
    assert trainer.precision_policy("float32", [(9, 0)]) == "float32"
    assert trainer.visible_gpus(False, 0) == []  # this machine: TensorFlow sees no GPU
    with pytest.raises(ConfigError, match="scaling.use_gpu.*worker 1 sees no GPU"):
        trainer.visible_gpus(True, 1)


def test_validation_is_decoded_once_and_replayed_while_it_fits():
    from artnet.train import trainer

    reads = []

    def read():
        reads.append(1)
        return ({"image": np.full((2, 4, 4, 3), i, np.uint8), "label": np.array([i, i])} for i in range(3))

    fits = trainer.Replay(read, budget=3 * 2 * 48)  # exactly the three batches' images
    next(iter(fits))  # a first pass cut short keeps nothing: it would replay a partial split
    passes = [[b["label"].tolist() for b in fits] for _ in range(3)]
    assert passes == [[[0, 0], [1, 1], [2, 2]]] * 3 and len(reads) == 2  # the cut pass, then one full read
    too_big = trainer.Replay(read, budget=3 * 2 * 48 - 1)
    passes = [[b["label"].tolist() for b in too_big] for _ in range(2)]
    assert passes == [[[0, 0], [1, 1], [2, 2]]] * 2 and len(reads) == 4  # read again every time


def test_an_epochs_iterator_is_destroyed_off_the_training_thread():
    import threading

    from artnet.train import trainer

    destroyed_on = []
    done = threading.Event()

    class Iterator:
        def __del__(self):
            destroyed_on.append(threading.current_thread().name)
            done.set()

    trainer._release_in_background([Iterator()])
    assert done.wait(10) and destroyed_on == ["artnet-release-iterator"]


def test_explained_examples_spread_over_painters_when_a_share_comes_painter_by_painter():
    import tensorflow as tf

    from artnet.train import trainer

    labels = np.repeat([0, 1, 2], 20)
    images = np.arange(60, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    batches = [{"image": images[i:i + 8], "label": labels[i:i + 8]} for i in range(0, 60, 8)]

    def predict(x):  # logits, and a feature map that carries the image's number
        return tf.zeros((len(x), 3)), tf.constant(x[:, :1, :1, :1])

    y, logits, (kept, kept_labels, maps) = trainer.collect_logits(predict, batches, 3, keep=12)
    assert (y == labels).all() and logits.shape == (60, 3)
    assert kept[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23, 40, 41, 42, 43]
    assert kept_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert (maps[:, 0, 0, 0] == kept[:, 0, 0, 0]).all()  # each image with its own feature map
