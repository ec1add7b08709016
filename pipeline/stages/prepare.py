"""Stage `prepare`: IDX files to flat float32 tensors, normalized with statistics of the train split only.

`normalize: false` reproduces d2l's loader exactly (pixels scaled to [0, 1], nothing more).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline import cli, config, idx
from pipeline.datasets import FILE_KINDS
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, write_json, write_torch


def run(raw_dir: Path, out_dir: Path, normalize: bool) -> dict:
    """Write train.pt and test.pt ({"images": float32 [N, 784], "labels": int64 [N]}); return stats."""
    splits = {split: read_raw_split(raw_dir, split) for split in ("train", "test")}
    train_images = splits["train"][0]
    # float64 for the statistics: a float32 sum over 47M pixels loses digits.
    mean, std = (train_images.double().mean().item(), train_images.double().std().item()) if normalize else (0.0, 1.0)
    with atomic_dir(out_dir) as temp:
        for split, (images, labels) in splits.items():
            if normalize:
                images.sub_(mean).div_(std)
            write_torch(temp / f"{split}.pt", {"images": images, "labels": labels})
    train_labels = splits["train"][1]
    return {"normalize": normalize, "mean": mean, "std": std,
            "train_count": len(train_labels), "test_count": len(splits["test"][1]),
            "classes": int(train_labels.max()) + 1,
            "train_class_counts": torch.bincount(train_labels).tolist()}


def read_raw_split(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [0, 1], flattened to 784 columns, and labels as int64."""
    images = idx.read(raw_dir / FILE_KINDS[f"{split}_images"])
    labels = idx.read(raw_dir / FILE_KINDS[f"{split}_labels"])
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise PipelineError(f"{raw_dir}: {split} images {tuple(images.shape)} do not match labels {tuple(labels.shape)}")
    return images.reshape(len(images), -1).float().div_(255), labels.long()


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--raw", type=Path, required=True, help="directory of the four IDX files")
    parser.add_argument("--out", type=Path, required=True, help="directory for train.pt and test.pt")
    parser.add_argument("--stats", type=Path, required=True, help="JSON metrics: normalization statistics")
    args = parser.parse_args()
    params = config.load(args.params)

    from pipeline import tracking

    with tracking.stage_run("prepare", params.mlflow.experiment) as mlflow_run:
        import mlflow

        started = time.monotonic()
        stats = {"dataset": params.data.dataset, **run(args.raw, args.out, params.prepare.normalize)}
        mlflow.log_params({"dataset": params.data.dataset, "normalize": params.prepare.normalize})
        mlflow.log_metrics({"mean": stats["mean"], "std": stats["std"], "train_count": stats["train_count"],
                            "test_count": stats["test_count"], "seconds": time.monotonic() - started})
        mlflow.log_dict(stats, "stats.json")
        write_json(args.stats, {**stats, "mlflow_run_id": mlflow_run.info.run_id})
        print(f"prepared {stats['train_count']} train / {stats['test_count']} test images, "
              f"mean {stats['mean']:.4f}, std {stats['std']:.4f}")


if __name__ == "__main__":
    main()
