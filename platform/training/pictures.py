"""Pictures of what a detector does (`sdetr.detector.evaluation.visualize`) on a few fixed val images:
written by every trial at each evaluation into ``<run>/pictures/epoch_NNN/`` and to its MLflow run under
the same path, and by ``sdetr predict`` for the images it is given.
"""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import torch
from torch import nn

from sdetr.detector.data import make_transforms
from sdetr.detector.evaluation.postprocess import PostProcess
from sdetr.detector.evaluation.visualize import picture
from sdetr.platform.shards.dataset import ShardDataset

PICTURES_DIR = "pictures"
NUM_PICTURES = 2  # val images drawn at each evaluation: enough to see the method, cheap on a CPU
THRESHOLD = 0.3  # boxes drawn from this score up


def epoch_dir_name(epoch: int) -> str:
    """``epoch_001`` for the evaluation after the first epoch (0-based ``epoch`` 0): counted from 1."""
    return f"epoch_{epoch + 1:03d}"


@torch.no_grad()
def draw(
    model: nn.Module,
    image: torch.Tensor,
    device: torch.device | str = "cpu",
    threshold: float = THRESHOLD,
    names: dict[int, str] | None = None,
) -> tuple[PIL.Image.Image, dict[str, torch.Tensor]]:
    """One unpadded model input [3, h, w] through the eval-mode model: its picture and its detections
    (``scores``, ``labels``, ``boxes`` [K, 4] in the input's pixels)."""
    was_training = model.training
    model.eval()
    try:
        h, w = image.shape[-2:]
        mask = torch.zeros((1, h, w), dtype=torch.bool, device=device)
        outputs = model(image[None].to(device), mask)
        dets = PostProcess()(outputs, torch.tensor([[h, w]], device=device))[0]
        dets = {k: v.cpu() for k, v in dets.items()}
        outputs = {k: v.cpu() if torch.is_tensor(v) else v for k, v in outputs.items()}
        rho = getattr(model, "rho", None) or getattr(getattr(model, "transformer", None), "rho", None)
        pic = picture(image.cpu(), (h, w), dets, outputs, 0, threshold, names, rho)
    finally:
        model.train(was_training)
    return pic, dets


def save_png(img: PIL.Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def val_pictures(
    model: nn.Module, data: str, cfg, out_dir: Path, device, names: dict[int, str] | None = None
) -> list[Path]:
    """The pictures of the first `NUM_PICTURES` val images of the shard folder ``data`` after the val
    transform, written as ``<out_dir>/<image id>.png``."""
    dataset = ShardDataset(data, "val", make_transforms("val", cfg.data), max_images=NUM_PICTURES)
    paths = []
    for i in range(min(NUM_PICTURES, len(dataset))):
        image, target = dataset[i][:2]
        pic, _ = draw(model, image, device, names=names)
        paths.append(save_png(pic, out_dir / f"{int(target['image_id'])}.png"))
    return paths
