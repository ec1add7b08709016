"""Classify image files with a logged model (by default the registered champion) and print the top 3 classes.

`python -m pipeline.stages.predict IMAGE... [--model URI]`: PNG or JPEG of any size, in color or gray, on a
dark or a light background; each is made to look like a Fashion-MNIST image (28 x 28 gray, light garment on
black) before the model sees it. Not a DVC stage: it reads params.yaml only for the registered model's name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import cli, config, tracking
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError, first_line

SIDE = 28
TOP = 3
FORMATS = ("PNG", "JPEG")


def load_image(path: Path) -> np.ndarray:
    """The file as a uint8 (28, 28) image with a dark background, as the dataset stores its images."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=FORMATS) as image:
            # convert() decodes the whole file, so a truncated one fails here. Gray stays gray: torchvision's
            # RGB-to-gray on uint8 rounds down, which would darken a gray image by one level.
            pixels = image.convert("L" if image.mode == "L" else "RGB")
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise PipelineError(f"{path}: not a {' or '.join(FORMATS)} image") from None
    except OSError as error:  # a directory, no permission, a truncated or corrupt file
        raise PipelineError(f"{path}: not a readable {' or '.join(FORMATS)} image: {first_line(error)}") from None
    return _dark_background(_to_dataset_size(pixels))


def _to_dataset_size(image: object) -> np.ndarray:
    """Gray, padded to a square with its background color and resized to 28 x 28, uint8.

    Fashion-MNIST was made the same way: each photo resized on its longer side and extended on the shorter one,
    so squeezing a wide photo instead would make every garment look taller than the dataset's.
    """
    import torch
    from torchvision.transforms import v2

    gray = v2.Compose([v2.ToImage(), v2.Grayscale()])(image)
    height, width = gray.shape[-2:]
    side = max(height, width)
    left, top = (side - width) // 2, (side - height) // 2
    square = v2.functional.pad(
        gray, [left, top, side - width - left, side - height - top], fill=round(float(np.mean(_border(gray[0]))))
    )
    return v2.Compose([v2.Resize((SIDE, SIDE), antialias=True), v2.ToDtype(torch.uint8)])(square)[0].numpy()


def _border(image: object) -> list[int]:
    """The pixels on the edge of a 2-d image (numpy array or tensor): its background, in a photo of one garment."""
    return image[[0, -1], :].reshape(-1).tolist() + image[1:-1, [0, -1]].reshape(-1).tolist()


def _dark_background(image: np.ndarray) -> np.ndarray:
    """Invert a light background: the dataset has light garments on black."""
    return 255 - image if np.mean(_border(image)) > 127 else image


def run(images: list[Path], model_uri: str) -> list[list[tuple[str, float]]]:
    """The top classes with their probabilities, per image, best first."""
    batch = np.stack([load_image(path) for path in images])  # every file is checked before the slow model load
    model = load_model(model_uri)
    names = model.model_config["class_names"]
    return [
        sorted(zip(names, probabilities), key=lambda pair: -pair[1])[:TOP]
        for probabilities in model.predict(batch)["probabilities"]
    ]


def load_model(model_uri: str) -> object:
    """The pyfunc model at `model_uri` from the stages' tracking store; only one that pipeline.serving logged."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        raise PipelineError(
            f"cannot load model {model_uri} from {tracking.tracking_uri()}: {first_line(error)}"
        ) from None
    if "class_names" not in model.model_config:
        raise PipelineError(f"{model_uri} takes no raw images: it was not logged by pipeline.serving.log_model")
    return model


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument("--model", help="model URI (default: models:/<mlflow.registered_model>@champion)")
    args = parser.parse_args()
    model_uri = args.model or f"models:/{config.load(args.params).mlflow.registered_model}@{tracking.CHAMPION_ALIAS}"
    for path, top in zip(args.images, run(args.images, model_uri)):
        print(f"{path}: " + ", ".join(f"{name} {probability:.3f}" for name, probability in top))


if __name__ == "__main__":
    main()
