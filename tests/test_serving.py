"""The served champion against the model in this process: raw uint8 images in, the same classes out.

A tiny MLP is trained on synthetic images (tests/conftest.py `make_split`), logged with pipeline.serving to a
temporary SQLite store and registered as `champion`; then loaded with pyfunc, served with `mlflow models serve`,
and asked by `python -m pipeline.stages.predict` on PNG and JPEG files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline import model as mlp
from pipeline import serving
from pipeline.datasets import class_names
from pipeline.errors import PipelineError
from pipeline.stages import predict
from tests.conftest import REAL_FASHION_MNIST, REPO, VENV_BIN, free_port, make_split, tool_env

NAMES = class_names("fashion_mnist")
REGISTERED = "served-mlp"


def train_tiny(impl: str, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float) -> torch.nn.Module:
    """A few full-batch SGD steps on normalized pixels: enough to separate make_split's bands."""
    net = mlp.build(impl, (32,), "relu", 0.1, torch.Generator().manual_seed(0))
    x = normalized(images, mean, std)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(net(x), labels.long()).backward()
        optimizer.step()
    return net.eval()


def normalized(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """What the prepare stage feeds the model: pixels / 255, then standardized (same ops, same order)."""
    return images.reshape(len(images), -1).float().div_(255).sub_(mean).div_(std)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both forms of the MLP, trained on synthetic images and saved as served models (no tracking store)."""
    root = tmp_path_factory.mktemp("serving")
    (train_images, train_labels), (test_images, test_labels) = make_split(600, seed=1), make_split(100, seed=2)
    pixels = train_images.reshape(len(train_images), -1).double().div(255)
    mean, std = pixels.mean().item(), pixels.std().item()
    nets, paths = {}, {}
    for impl in ("module", "scratch"):
        nets[impl] = train_tiny(impl, train_images, train_labels, mean, std)
        paths[impl] = root / impl
        serving.save_model(nets[impl], architecture(impl), mean, std, NAMES, paths[impl])
    return {
        "nets": nets,
        "paths": paths,
        "mean": mean,
        "std": std,
        "images": test_images.numpy(),
        "labels": test_labels.numpy(),
    }


def architecture(impl: str) -> dict:
    """As the train stage writes it to model.json."""
    return {"impl": impl, "hidden": [32], "activation": "relu", "inputs": 784, "outputs": 10, "diverged": False}


def reference(served: dict, impl: str) -> tuple[np.ndarray, np.ndarray]:
    """Classes and probabilities from the in-process model on normalized float inputs."""
    with torch.no_grad():
        logits = served["nets"][impl](normalized(torch.from_numpy(served["images"]), served["mean"], served["std"]))
    return logits.argmax(1).numpy(), torch.softmax(logits, 1).numpy()


@pytest.mark.parametrize("impl", ["module", "scratch"])
def test_pyfunc_on_raw_images_matches_the_model_on_normalized_inputs(served, impl):
    classes, probabilities = reference(served, impl)
    predictions = mlflow.pyfunc.load_model(str(served["paths"][impl])).predict(served["images"])
    assert list(predictions.columns) == list(serving.OUTPUT_COLUMNS)
    assert np.array_equal(predictions["class_index"].to_numpy(), classes)
    assert list(predictions["class_name"]) == [NAMES[index] for index in classes]
    # The same float32 operations in the same order: equal, not merely close.
    assert np.array_equal(np.array(predictions["probabilities"].tolist(), dtype=np.float32), probabilities)
    assert (classes == served["labels"]).mean() > 0.9  # the tiny model did learn something


def test_flat_images_give_the_same_answer_as_square_ones(served):
    model = mlflow.pyfunc.load_model(str(served["paths"]["module"]))
    square = model.predict(served["images"])
    flat = model.unwrap_python_model().predict(None, served["images"].reshape(-1, 784))
    assert flat.equals(square)


def test_pyfunc_loads_without_pickle(served, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # MLflow 3.17 allows it by default
    local = served["paths"]["module"]
    assert len(mlflow.pyfunc.load_model(str(local)).predict(served["images"][:2])) == 2
    files = {path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()}
    assert not {name for name in files if name.endswith((".pkl", ".pickle", ".cloudpickle"))}
    assert {"MLmodel", "serving_model.py", "artifacts/model.pt"} <= files
    weights = torch.load(local / "artifacts/model.pt", weights_only=True)
    assert all(isinstance(tensor, torch.Tensor) for tensor in weights.values())
    (spec,) = mlflow.models.Model.load(local).signature.inputs.inputs
    assert (spec.type, spec.shape) == (np.dtype(np.uint8), (-1, 28, 28))


BAD_INPUTS = {
    "scaled floats": (np.full((1, 28, 28), 0.5, dtype=np.float32), "expected integer pixels 0-255"),
    "one image, no batch": (np.full((28, 28), 9, dtype=np.uint8), "expected images of shape (N, 28, 28)"),
    "wrong size": (np.full((2, 32, 32), 9, dtype=np.uint8), "got (2, 32, 32)"),
    "empty batch": (np.zeros((0, 28, 28), dtype=np.uint8), "with N >= 1"),
    "above 255": (np.full((1, 784), 300, dtype=np.int64), "pixel values must be 0-255, got 300 to 300"),
    "negative": (np.full((1, 784), -1, dtype=np.int64), "pixel values must be 0-255, got -1 to -1"),
    "scaled to 0-1, then cast": (np.ones((2, 28, 28), dtype=np.uint8), "image 0: its brightest pixel is 1 of 255"),
    "text": (np.array([["a"] * 784]), "expected integer pixels 0-255"),
    "a list": ([[0] * 784], "expected a numpy array of images, got list"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_refused_with_one_line(served, name):
    images, message = BAD_INPUTS[name]
    model = mlflow.pyfunc.load_model(str(served["paths"]["module"])).unwrap_python_model()
    with pytest.raises(MlflowException) as raised:
        model.predict(None, images)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert message in raised.value.message and "\n" not in raised.value.message


def test_pyfunc_enforces_the_signature(served):
    """Through pyfunc, MLflow checks dtype and shape against the signature before our code runs."""
    model = mlflow.pyfunc.load_model(str(served["paths"]["module"]))
    for images, message in [
        (served["images"].astype(np.float32), "dtype of input float32 does not match"),
        (served["images"].reshape(-1, 784), "does not match expected shape (-1, 28, 28)"),
    ]:
        with pytest.raises(MlflowException, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
            model.predict(images)
        assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def test_refuses_to_log_a_diverged_model():
    net = mlp.build("module", (4,), "relu", 0.1)
    with pytest.raises(PipelineError, match="diverged"):
        serving.log_model(net, {**architecture("module"), "diverged": True}, 0.0, 1.0, NAMES)


def write_image(path: Path, image: np.ndarray, size: int = 28) -> Path:
    """An image file of `image` (uint8, 28 x 28), resized to `size` and in the format the suffix names."""
    picture = Image.fromarray(image)
    if size != 28:
        picture = picture.resize((size, size), Image.Resampling.BILINEAR)
    picture.convert("RGB").save(path, quality=95) if path.suffix == ".jpg" else picture.save(path)
    return path


def test_load_image_matches_the_dataset_form(tmp_path):
    image = make_split(10, seed=3)[0][4].numpy()
    assert np.array_equal(predict.load_image(write_image(tmp_path / "same.png", image)), image)
    light = predict.load_image(write_image(tmp_path / "light.png", 255 - image))
    assert np.array_equal(light, image)  # inverted back: dark background, light garment
    large = predict.load_image(write_image(tmp_path / "large.jpg", image, size=64))
    assert large.shape == (28, 28) and large.dtype == np.uint8
    assert np.abs(large.astype(int) - image).mean() < 20
    wide = np.zeros((28, 84), dtype=np.uint8)
    wide[:, 28:56] = image
    padded = predict.load_image(write_image(tmp_path / "wide.png", wide))  # padded to 84 x 84, then shrunk
    outside = [padded[:9], padded[19:], padded[:, :9], padded[:, 19:]]
    assert padded[9:19, 9:19].max() > 100 and max(part.max() for part in outside) < 20  # not stretched


def test_load_image_refuses_what_is_not_a_png_or_jpeg(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(PipelineError, match="notes.png: not a PNG or JPEG image"):
        predict.load_image(tmp_path / "notes.png")
    with pytest.raises(PipelineError, match="missing.png: no such file"):
        predict.load_image(tmp_path / "missing.png")
    Image.new("L", (28, 28)).save(tmp_path / "image.gif")
    with pytest.raises(PipelineError, match="image.gif: not a PNG or JPEG image"):
        predict.load_image(tmp_path / "image.gif")
    write_image(tmp_path / "cut.png", np.full((28, 28), 200, dtype=np.uint8), size=64)
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:-40])
    with pytest.raises(PipelineError, match="cut.png: not a readable PNG or JPEG image: "):
        predict.load_image(tmp_path / "cut.png")


@pytest.mark.filterwarnings("ignore:.*Add type hints")  # the stand-in model is a bare lambda on purpose
def test_predict_refuses_a_model_that_takes_no_raw_images(tmp_path, monkeypatch):
    code = tmp_path / "identity.py"
    code.write_text("import mlflow\nmlflow.models.set_model(lambda model_input: model_input)\n")
    mlflow.pyfunc.save_model(tmp_path / "identity", python_model=str(code), pip_requirements=["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    previous_uri = mlflow.get_tracking_uri()
    try:
        with pytest.raises(PipelineError, match="takes no raw images: it was not logged by pipeline.serving"):
            predict.load_model(str(tmp_path / "identity"))
    finally:
        mlflow.set_tracking_uri(previous_uri)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_real_champion_on_raw_test_images_scores_what_evaluate_says(tmp_path):
    """Issue #14: on raw test images the logged model scored 0.77 where evaluate said 0.86."""
    import dataclasses

    from pipeline import batched, config, idx
    from pipeline.stages.train import run

    raw = {name: idx.read(REAL_FASHION_MNIST / f"{name}-idx3-ubyte.gz") for name in ("train-images", "t10k-images")}
    labels = [idx.read(REAL_FASHION_MNIST / f"{name}-idx1-ubyte.gz").long() for name in ("train-labels", "t10k-labels")]
    pixels = raw["train-images"].reshape(60000, -1).double().div(255)
    mean, std = pixels.mean().item(), pixels.std().item()
    train_images, test_images = (normalized(raw[name], mean, std) for name in ("train-images", "t10k-images"))
    params = config.load(REPO / "params.yaml").variant("d2l_scratch")
    params = dataclasses.replace(params, seeds=params.seeds[:1], device="cpu")
    (result,) = run(params, (train_images, labels[0]), (test_images, labels[1]))
    serving.save_model(
        result.model.cpu(),
        architecture("scratch") | {"hidden": list(params.hidden)},
        mean,
        std,
        NAMES,
        tmp_path / "model",
    )
    predictions = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(raw["t10k-images"].numpy())
    accuracy = (predictions["class_index"].to_numpy() == labels[1].numpy()).mean()
    evaluated = batched.evaluate(batched.stack([result.model], torch.device("cpu")), test_images, labels[1])
    assert accuracy == evaluated.accuracy[0].item()
    assert accuracy > 0.84


@pytest.fixture(scope="module")
def registered(served: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The scratch model logged with serving.log_model to a fresh SQLite store, registered as champion."""
    root = tmp_path_factory.mktemp("registry")
    uri, previous_uri = f"sqlite:///{root / 'mlflow.db'}", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=mlflow.create_experiment("serving", (root / "artifacts").as_uri())):
            info = serving.log_model(
                served["nets"]["scratch"], architecture("scratch"), served["mean"], served["std"], NAMES
            )
        version = mlflow.register_model(info.model_uri, REGISTERED).version
        mlflow.MlflowClient().set_registered_model_alias(REGISTERED, "champion", version)
        champion = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@champion").predict(served["images"])
    finally:
        mlflow.set_tracking_uri(previous_uri)
    return {"root": root, "uri": uri, "champion": champion}


@pytest.fixture(scope="module")
def server(registered: dict) -> str:
    """`mlflow models serve` of the champion on a free port; its whole process group is stopped afterwards."""
    port, log_path = free_port(), registered["root"] / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                f"models:/{REGISTERED}@champion",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=tool_env(MLFLOW_TRACKING_URI=registered["uri"]),
            start_new_session=True,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", process, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until_up(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer within {timeout_s} s: {log_path.read_text()[-3000:]}")


def invoke(url: str, body: object) -> tuple[int, dict]:
    """POST /invocations as JSON; the status and the decoded answer, also for errors."""
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.integration
def test_registered_champion_matches_the_saved_model(served, registered):
    saved = mlflow.pyfunc.load_model(str(served["paths"]["scratch"])).predict(served["images"])
    assert registered["champion"].equals(saved)


@pytest.mark.integration
@pytest.mark.parametrize("key", ["inputs", "instances"])
def test_server_answers_as_pyfunc_does(served, registered, server, key):
    status, answer = invoke(server, {key: served["images"][:20].tolist()})
    assert status == 200
    assert answer == {"predictions": registered["champion"][:20].to_dict(orient="records")}


SERVER_BAD_INPUTS = {  # MLflow's own checks answer BAD_REQUEST, ours INVALID_PARAMETER_VALUE; both are HTTP 400
    "flat rows": (
        lambda images: images.reshape(-1, 784),
        "INVALID_PARAMETER_VALUE",
        "does not match expected shape (-1, 28, 28)",
    ),
    "pixels scaled to 0-1": (lambda images: images / 255, "INVALID_PARAMETER_VALUE", "its brightest pixel is 0 of"),
    "normalized": (
        lambda images: (images / 255 - 0.286) / 0.353,
        "INVALID_PARAMETER_VALUE",
        "its brightest pixel is 1 of",
    ),
    "above 255": (lambda images: images.astype(int) + 200, "BAD_REQUEST", "out of bounds for uint8"),
    "text": (lambda images: np.array("a picture of a shoe"), "BAD_REQUEST", "Failed to convert data"),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", SERVER_BAD_INPUTS)
def test_server_refuses_bad_input_with_400(served, server, name):
    make_body, error_code, message = SERVER_BAD_INPUTS[name]
    status, answer = invoke(server, {"inputs": make_body(served["images"][:2]).tolist()})
    assert status == 400
    assert answer["error_code"] == error_code and message in answer["message"], answer


def predict_command(registered: dict, *args: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.stages.predict` as a user runs it, against the test's tracking store."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.stages.predict", *args],
        check=False,
        cwd=REPO,
        env=tool_env(MLFLOW_TRACKING_URI=registered["uri"]),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.integration
def test_predict_prints_the_champions_top_classes(served, registered, tmp_path):
    params = tmp_path / "params.yaml"  # the default model URI comes from mlflow.registered_model
    params.write_text(
        (REPO / "params.yaml").read_text().replace("registered_model: d2l-mlp", f"registered_model: {REGISTERED}")
    )
    images, labels = served["images"], served["labels"]
    files = {
        write_image(tmp_path / "trouser.png", images[1]): labels[1],
        write_image(tmp_path / "coat_64.jpg", images[4], size=64): labels[4],
        write_image(tmp_path / "bag_light.png", 255 - images[8]): labels[8],
    }
    result = predict_command(registered, *map(str, files), "--params", str(params))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line, (path, label) in zip(lines, files.items()):
        assert line.startswith(f"{path}: {NAMES[label]} "), line
        assert line.count(",") == 2  # the top three


@pytest.mark.integration
def test_predict_fails_with_one_error_line(registered, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    write_image(tmp_path / "image.png", make_split(1, seed=4)[0][0].numpy())
    for args, message in [
        ((str(tmp_path / "notes.png"),), "notes.png: not a PNG or JPEG image"),
        (
            (str(tmp_path / "image.png"), "--model", f"models:/{REGISTERED}@nosuch"),
            f"error: cannot load model models:/{REGISTERED}@nosuch",
        ),
    ]:
        result = predict_command(registered, *args)
        assert result.returncode == 2 and result.stdout == ""
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.stderr
