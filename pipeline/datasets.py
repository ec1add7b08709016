"""The IDX datasets we know: file names, pinned hashes of the decompressed files, and sources."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Kind of file -> its name in every IDX release (the .gz on mirrors adds ".gz").
FILE_KINDS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_PIXELS = 28 * 28  # idx.IMAGE_SHAPE; not imported, so that params checks do not depend on the IDX reader


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    sha256: Mapping[str, str]  # kind -> SHA-256 of the decompressed IDX file
    sources: tuple[str, ...]  # local directories first, then HTTP(S) mirrors
    counts: Mapping[str, int] | None = None  # items per split, when known
    classes: int = 10


# SHA-256 of the *decompressed* files: the .gz bytes differ between repackagings (Debian recompresses),
# the IDX content does not. Cross-checked against public pins (e.g. EntroMorphic/sstt's Makefile) and,
# for Fashion-MNIST, against Debian's dataset-fashion-mnist package.
BUILT_IN = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        sha256={
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        sources=(
            "/usr/share/datasets/fashion-mnist",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
        counts={"train": 60000, "test": 10000},
    ),
    "mnist": DatasetSpec(
        name="mnist",
        sha256={
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        sources=(
            "/usr/share/datasets/mnist",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        counts={"train": 60000, "test": 10000},
    ),
}

CLASS_NAMES = {
    "fashion_mnist": (
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ),
}


def resolve(
    name: str, sources: tuple[str, ...], sha256: Mapping[str, str], counts: Mapping[str, int] | None = None
) -> DatasetSpec:
    """The spec for `name`; params' sources (when given) replace the built-in ones."""
    if name in BUILT_IN:
        spec = BUILT_IN[name]
        return DatasetSpec(name, spec.sha256, tuple(sources) or spec.sources, spec.counts, spec.classes)
    return DatasetSpec(name, dict(sha256), tuple(sources), dict(counts) if counts else None)


def class_names(dataset: str, classes: int = 10) -> tuple[str, ...]:
    return CLASS_NAMES.get(dataset, tuple(str(index) for index in range(classes)))
