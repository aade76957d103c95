"""InferenceService and its MicroBatcher on tiny real runs: classify, batch, explain, swap, bad files."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from upload_cases import BROKEN, write_broken_files, write_unusual_images

from demo.batching import MicroBatcher
from demo.service import MAX_BATCH_FILES, InferenceService
from finetune.checkpoint import load_run, save_run
from finetune.errors import ConfigError, ImageError
from finetune.inference import Classifier
from finetune.modeling import create_model_and_transforms

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture
def service(untrained_run_dir: Path):
    service = InferenceService.from_checkpoint(untrained_run_dir, runtime="torch")
    try:
        yield service
    finally:
        service.close()


@pytest.fixture(scope="module")
def digits_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second run with other labels and provenance/metrics in its config, as a trained run has."""
    created = create_model_and_transforms("test_vit", num_classes=2, weights="none", img_size=64)
    run_dir = tmp_path_factory.mktemp("vit_run")
    studio = {"weights_source": "file:backbone.safetensors", "metrics": {"val_acc": 0.875, "val_loss": 0.31}}
    save_run(run_dir, created.model, ["zero", "one"], created.data_config, studio)
    return run_dir


def test_predict_topk_gives_k_classes_of_the_run_best_first(service: InferenceService) -> None:
    prediction = service.predict_topk(photo("chelsea"), k=2)
    assert len(prediction.labels) == 2
    assert set(prediction.labels) <= {"cat", "coffee", "rocket"}
    assert prediction.probs[0] >= prediction.probs[1]


def test_predict_topk_matches_a_plain_classifier(service: InferenceService, untrained_run_dir: Path) -> None:
    """The batcher changes how requests are grouped, never the numbers."""
    reference = Classifier(load_run(untrained_run_dir)).predict([photo("coffee")], k=3)[0]
    prediction = service.predict_topk(photo("coffee"), k=3)
    assert prediction.labels == reference.labels
    np.testing.assert_allclose(prediction.probs, reference.probs, rtol=1e-5, atol=1e-6)


def test_predict_topk_rejects_a_k_that_is_not_a_positive_number(service: InferenceService) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        service.predict_topk(photo("chelsea"), k=0)
    with pytest.raises(ConfigError, match="whole number"):
        service.predict_topk(photo("chelsea"), k="five")


def test_concurrent_requests_each_get_their_own_answer(service: InferenceService, photo_dir: Path) -> None:
    files = [photo_dir / f"{name}.jpg" for name in PHOTOS] * 4
    expected = [service.predict_topk(file, k=3) for file in files]
    start = threading.Barrier(len(files))

    def request(file: Path):
        start.wait()
        return service.predict_topk(file, k=3)

    with ThreadPoolExecutor(len(files)) as pool:
        answers = list(pool.map(request, files))
    for answer, reference in zip(answers, expected, strict=True):
        assert answer.labels == reference.labels
        np.testing.assert_allclose(answer.probs, reference.probs, rtol=1e-4, atol=1e-6)
    sizes = service.batch_sizes()
    assert sum(size * count for size, count in sizes.items()) == 2 * len(files)


def test_micro_batcher_groups_requests_that_wait_for_a_busy_model() -> None:
    release = threading.Event()
    seen: list[list[int]] = []

    def predict(items: list[int]) -> list[int]:
        seen.append(list(items))
        release.wait(timeout=10)  # the first batch holds the "model" until the others are queued
        return [item * 10 for item in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(predict, max_batch_size=4, max_wait_s=0)
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(batcher.submit, 0)
        while not seen:
            time.sleep(0.001)
        rest = [pool.submit(batcher.submit, item) for item in range(1, 6)]
        while batcher._queue.qsize() < 5:
            time.sleep(0.001)
        release.set()
        results = [first.result(timeout=10)] + [future.result(timeout=10) for future in rest]
    batcher.close()
    assert results == [0, 10, 20, 30, 40, 50]
    assert [len(batch) for batch in seen] == [1, 4, 1]  # capped at max_batch_size
    assert batcher.batch_sizes == {1: 2, 4: 1}


def test_micro_batcher_gives_a_failed_batch_error_to_its_requests_and_keeps_working() -> None:
    def predict(items: list[int]) -> list[int]:
        if -1 in items:
            raise ValueError("model failed")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(predict)
    with pytest.raises(ValueError, match="model failed"):
        batcher.submit(-1, timeout_s=10)
    assert batcher.submit(7, timeout_s=10) == 7
    batcher.close()
    assert batcher.submit(8, timeout_s=10) == 8  # a request that arrives after a model swap is still answered


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_are_refused_with_a_message_and_service_keeps_serving(
    service: InferenceService, tmp_path: Path, name: str
) -> None:
    path = write_broken_files(tmp_path)[name]
    with pytest.raises(ImageError, match=BROKEN[name]) as refused:
        service.predict_topk(path, k=3, name=name)
    assert str(tmp_path) not in str(refused.value)  # named by the upload's name, not a server path
    assert service.predict_topk(photo("rocket"), k=3).labels


def test_unusual_but_valid_images_are_classified(
    service: InferenceService, untrained_run_dir: Path, tmp_path: Path
) -> None:
    """Each gets the answer the plain classifier gives the same file (not just some numbers in [0, 1])."""
    reference = Classifier(load_run(untrained_run_dir))
    for name, path in write_unusual_images(tmp_path).items():
        prediction = service.predict_topk(path, k=3)
        expected = reference.predict([reference.open(path)], k=3)[0]
        assert prediction.labels == expected.labels, name
        np.testing.assert_allclose(prediction.probs, expected.probs, rtol=1e-4, atol=1e-5, err_msg=name)


def test_predict_batch_gives_one_row_per_file_in_order(
    service: InferenceService, photo_dir: Path, tmp_path: Path
) -> None:
    broken = write_broken_files(tmp_path)
    files = [
        photo_dir / "chelsea.jpg",
        broken["not_an_image.jpg"],
        photo_dir / "rocket.jpg",
        broken["empty.png"],
    ]
    rows = service.predict_batch(files, k=2)
    assert [row.file for row in rows] == [file.name for file in files]
    assert [bool(row.error) for row in rows] == [False, True, False, True]
    assert "not an image" in rows[1].error and "empty" in rows[3].error
    for row in (rows[0], rows[2]):
        assert row.top1 in {"cat", "coffee", "rocket"} and 0.0 < row.confidence <= 1.0
        assert row.top_k.count("%") == 2


def test_predict_batch_refuses_no_files_and_too_many(service: InferenceService, photo_dir: Path) -> None:
    with pytest.raises(ImageError, match="no files"):
        service.predict_batch([])
    with pytest.raises(ConfigError, match=f"at most {MAX_BATCH_FILES}"):
        service.predict_batch([photo_dir / "chelsea.jpg"] * (MAX_BATCH_FILES + 1))


def test_replacing_a_run_keeps_answering_requests_that_started_on_the_old_one(
    service: InferenceService, untrained_run_dir: Path, digits_run_dir: Path
) -> None:
    """Each answer during swaps is exactly the old model's or the new one's; afterwards, the new one's."""
    name = service.default_model
    image = photo("coffee")
    runs = {"old": load_run(untrained_run_dir), "new": load_run(digits_run_dir)}
    expected = {key: Classifier(run).predict([image], k=2)[0] for key, run in runs.items()}
    answers = []

    def keep_asking() -> None:
        for _ in range(20):
            answers.append(service.predict_topk(image, k=2))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    for key in ("new", "old", "new"):
        service.add_run(name, runs[key])
    asker.join(timeout=60)
    assert not asker.is_alive() and len(answers) == 20

    def model_of(answer) -> str:
        for key, reference in expected.items():
            if answer.labels == reference.labels and np.allclose(answer.probs, reference.probs, atol=1e-5):
                return key
        raise AssertionError(f"an answer from neither model: {answer}")

    for answer in answers:
        model_of(answer)  # raises for an answer that no model gives (mixed labels, wrong probabilities)
    assert model_of(service.predict_topk(image, k=2)) == "new"
    assert service.available_models() == [name]


def test_each_request_names_its_model_and_none_means_the_default(
    service: InferenceService, digits_run_dir: Path
) -> None:
    first = service.default_model
    service.add_run("digits", load_run(digits_run_dir), make_default=False)
    assert service.available_models() == [first, "digits"] and service.default_model == first
    assert set(service.predict_topk(photo("chelsea"), k=2, model="digits").labels) == {"zero", "one"}
    assert set(service.predict_topk(photo("chelsea"), k=3).labels) == {"cat", "coffee", "rocket"}
    assert service.info("digits").labels == ["zero", "one"]
    service.set_default("digits")
    assert set(service.predict_topk(photo("chelsea"), k=2).labels) == {"zero", "one"}
    service.set_default(first)
    with pytest.raises(ConfigError, match="no model 'nope'"):
        service.predict_topk(photo("chelsea"), model="nope")
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        service.set_default("nope")


def test_info_reports_provenance_and_validation_metrics(digits_run_dir: Path) -> None:
    service = InferenceService.from_checkpoint(digits_run_dir)
    try:
        info = service.info()
    finally:
        service.close()
    assert info.architecture == "test_vit"
    assert info.labels == ["zero", "one"]
    assert info.weights_source == "file:backbone.safetensors"
    assert info.metrics == {"val_acc": 0.875, "val_loss": 0.31}
    assert info.source == str(digits_run_dir)


def test_explain_gives_maps_for_the_predicted_or_a_chosen_class(service: InferenceService) -> None:
    predicted = service.explain(photo("chelsea"))
    assert predicted.label == predicted.predicted.label
    chosen = service.explain(photo("chelsea"), target="rocket", scales=(1.0, 2.0))
    assert chosen.label == "rocket" and chosen.scales == (1.0, 2.0)
    for cam in (chosen.cam, chosen.multi_scale_cam):
        assert cam.shape == (64, 64)  # the run's input size
        assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert min(chosen.view.size) >= 64
    with pytest.raises(ConfigError, match="unknown class 'dog'"):
        service.explain(photo("chelsea"), target="dog")


def test_default_service_serves_the_embedded_imagenet_model() -> None:
    service = InferenceService.from_checkpoint(None)
    try:
        info = service.info()
        prediction = service.predict_topk(photo("chelsea"), k=3)
    finally:
        service.close()
    assert info.architecture == "tf_efficientnet_lite0" and len(info.labels) == 1000
    assert info.weights_source.startswith("embedded:") and info.source == "embedded"
    assert prediction.label in {"tiger cat", "Egyptian cat", "tabby"}
