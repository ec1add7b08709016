"""Stage `prepare`: IDX files to flat float32 tensors: train, a stratified validation split held out of it, and test.

The validation split (prepare.validation images, the same share of every class, fixed by prepare.seed) is what
models are chosen on; the test split is read once, by evaluate. Pixels are scaled to [0, 1] and, with
`normalize: true`, standardized with the mean and std of the remaining train images only.
`validation: 0` and `normalize: false` reproduce d2l's loader exactly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from pipeline import cli, config, idx, tracking
from pipeline.cli import stage_entry
from pipeline.datasets import FILE_KINDS
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, write_json
from pipeline.tensors import save_split

SPLITS = ("train", "validation", "test")


def run(
    raw_dir: Path,
    out_dir: Path,
    normalize: bool,
    validation: int = 0,
    seed: int = 0,
    counts: Mapping[str, int] | None = None,
) -> dict:
    """Write train.pt, validation.pt and test.pt ({"images": float32 [N, 784], "labels": int64 [N]}); return stats.
    `counts` (items per split, when known) bounds what the IDX reader accepts."""
    train_images, train_labels = read_raw_split(raw_dir, "train", counts)
    held_out = validation_indices(train_labels, validation, seed)
    kept = torch.ones(len(train_labels), dtype=torch.bool)
    kept[held_out] = False
    splits = {
        "train": (train_images[kept], train_labels[kept]),
        "validation": (train_images[held_out], train_labels[held_out]),
        "test": read_raw_split(raw_dir, "test", counts),
    }
    # float64 for the statistics: a float32 sum over 43M pixels loses digits.
    pixels = splits["train"][0].double()
    mean, std = (pixels.mean().item(), pixels.std().item()) if normalize else (0.0, 1.0)
    del pixels
    with atomic_dir(out_dir) as temp:
        for split, (images, labels) in splits.items():
            save_split(temp / f"{split}.pt", images.sub_(mean).div_(std) if normalize else images, labels)
    classes = int(train_labels.max()) + 1
    return {
        "normalize": normalize,
        "mean": mean,
        "std": std,
        "classes": classes,
        "validation_seed": seed,
        **{f"{split}_count": len(labels) for split, (_, labels) in splits.items()},
        **{
            f"{split}_class_counts": torch.bincount(labels, minlength=classes).tolist()
            for split, (_, labels) in splits.items()
            if split != "test"
        },
    }


def validation_indices(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` indices drawn per class in proportion to its size (largest remainder), fixed by `seed`, sorted."""
    if not 0 <= count < len(labels):
        raise PipelineError(
            f"prepare.validation: got {count}, expected 0 to {len(labels) - 1} (the train split has "
            f"{len(labels)} images)"
        )
    sizes = torch.bincount(labels)
    quotas = sizes * count // len(labels)
    remainders = sizes * count - quotas * len(labels)
    for label in sorted(range(len(sizes)), key=lambda c: (-remainders[c].item(), c))[: count - int(quotas.sum())]:
        quotas[label] += 1
    if count and (quotas[sizes > 0] == 0).any():
        empty = int(((quotas == 0) & (sizes > 0)).nonzero()[0])
        raise PipelineError(
            f"prepare.validation: got {count}, which leaves class {empty} without validation "
            f"images; expected at least one per class"
        )
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label, quota in enumerate(quotas.tolist()):
        members = (labels == label).nonzero().squeeze(1)
        picked.append(members[torch.randperm(len(members), generator=generator)[:quota]])
    return torch.cat(picked).sort().values


def read_raw_split(
    raw_dir: Path, split: str, counts: Mapping[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [0, 1], flattened to 784 columns, and labels as int64."""
    images, labels = (
        idx.read(raw_dir / FILE_KINDS[f"{split}_{part}"], max_bytes=idx.max_file_bytes(counts, f"{split}_{part}"))
        for part in ("images", "labels")
    )
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise PipelineError(
            f"{raw_dir}: {split} images {tuple(images.shape)} do not match labels {tuple(labels.shape)}"
        )
    return images.reshape(len(images), -1).float().div_(255), labels.long()


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--raw", type=Path, required=True, help="directory of the four IDX files")
    parser.add_argument("--out", type=Path, required=True, help="directory for train.pt, validation.pt and test.pt")
    parser.add_argument("--stats", type=Path, required=True, help="JSON metrics: split sizes and normalization")
    args = parser.parse_args()
    params = config.load(args.params)
    tracking.check_reachable()  # before any work: the runs are logged once the figures exist

    started = time.monotonic()
    stats = {
        "dataset": params.data.dataset,
        **run(
            args.raw,
            args.out,
            params.prepare.normalize,
            params.prepare.validation,
            params.prepare.seed,
            params.data.spec().counts,
        ),
    }
    seconds = time.monotonic() - started
    with tracking.logged_run("prepare", params.mlflow.experiment):
        import mlflow

        mlflow.log_params(
            {
                "dataset": params.data.dataset,
                "normalize": params.prepare.normalize,
                "validation": params.prepare.validation,
                "validation_seed": params.prepare.seed,
            }
        )
        mlflow.log_metrics({key: stats[key] for key in ("mean", "std", *(f"{s}_count" for s in SPLITS))})
        mlflow.log_metric("seconds", seconds)
        mlflow.log_dict(stats, "stats.json")
    write_json(args.stats, stats)
    print(
        f"prepared {stats['train_count']} train / {stats['validation_count']} validation / "
        f"{stats['test_count']} test images, mean {stats['mean']:.4f}, std {stats['std']:.4f}"
    )


if __name__ == "__main__":
    main()
