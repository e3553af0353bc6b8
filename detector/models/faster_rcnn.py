"""Faster R-CNN + FPN (Ren et al.; Lin et al.) from torchvision, behind the detectors' common interface.

`FasterRCNNFPN` is torchvision's `FasterRCNN` (same modules and ``state_dict`` keys as
``fasterrcnn_resnet50_fpn``, so its COCO checkpoints load) with three adaptations:

* it is called like every sdetr detector, ``model(images, masks)`` on a zero-padded batch, and cuts
  each image back to its unpadded size before torchvision batches it again;
* torchvision's own resizing and normalisation are switched off: the data pipeline has already done
  both (DETR's augmentation, ImageNet normalisation), so all detectors see the same pixels;
* it computes its losses itself, as torchvision does: in training mode it takes the targets
  (``model(images, masks, targets)``, see ``takes_targets``) and returns ``{"losses": {...}}``, which
  `ModelLossCriterion` passes through; in eval mode it returns ``{"detections": [...]}``, boxes
  normalised to each image, which `PostProcess` scales like the DETRs' boxes.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from sdetr.detector.backbones.resnet import FrozenBatchNorm2d
from sdetr.detector.backbones.weights import (
    load_backbone_weights,
    load_imagenet_state_dict,
    read_backbone_weights,
)
from sdetr.detector.config import ModelConfig
from sdetr.detector.losses.criterion import drop_crowd

# torchvision's loss names.
RCNN_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class _PreparedImages(GeneralizedRCNNTransform):
    """Batches the images (padded to a multiple of 32) without resizing or normalising them again."""

    def __init__(self):
        super().__init__(min_size=800, max_size=1333, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(self, image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
        return image, target


def unpadded_sizes(masks: Tensor) -> list[tuple[int, int]]:
    """bool [N, H, W] (True = padding, right/bottom) -> each image's (h, w)."""
    heights = (~masks[:, :, 0]).sum(1).tolist()
    widths = (~masks[:, 0, :]).sum(1).tolist()
    return [(int(h), int(w)) for h, w in zip(heights, widths)]


class FasterRCNNFPN(FasterRCNN):
    """torchvision's Faster R-CNN on sdetr batches (see the module docstring)."""

    takes_targets = True  # the trainer passes the targets to forward in training mode

    def __init__(self, backbone: BackboneWithFPN, num_classes: int):
        super().__init__(backbone, num_classes=num_classes)
        self.transform = _PreparedImages()

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:  # type: ignore[override]
        """
        Args:
            images: [N, 3, H, W] normalised, zero-padded; masks: bool [N, H, W], True at padding.
            targets (training only): N dicts with ``labels`` [n] and ``boxes`` [n, 4] (cx, cy, w, h
                normalised to the image), optional ``iscrowd``.
        Returns:
            training: ``{"losses": {loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg}}``;
            eval: ``{"detections": N dicts with boxes [k, 4] (x1, y1, x2, y2 normalised to the image),
            scores [k], labels [k]}``.
        """
        sizes = unpadded_sizes(masks)
        crops = [images[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
        if self.training:
            if targets is None:
                raise ValueError(
                    "FasterRCNNFPN: training mode needs the targets: model(images, masks, targets)"
                )
            rcnn_targets = [_to_pixels(t, h, w) for t, (h, w) in zip(drop_crowd(targets), sizes)]
            return {"losses": super().forward(crops, rcnn_targets)}
        detections = super().forward(crops)
        out = []
        for det, (h, w) in zip(detections, sizes):
            scale = det["boxes"].new_tensor([w, h, w, h])
            out.append({"boxes": det["boxes"] / scale, "scores": det["scores"], "labels": det["labels"]})
        return {"detections": out}


def _to_pixels(target: dict, h: int, w: int) -> dict[str, Tensor]:
    """Normalised (cx, cy, w, h) -> pixel (x1, y1, x2, y2); boxes without area are dropped (torchvision
    refuses them)."""
    boxes = box_convert(target["boxes"], "cxcywh", "xyxy") * target["boxes"].new_tensor([w, h, w, h])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep], "labels": target["labels"][keep]}


def build_faster_rcnn(cfg: ModelConfig) -> FasterRCNNFPN:
    """Faster R-CNN + FPN on ``cfg.backbone`` (a ResNet) with an FPN ``cfg.hidden_dim`` wide (256 for
    R50, as torchvision), ``cfg.num_classes`` classes (index 0 is background, so COCO's ids fit as
    they are). ``backbone_freeze_early`` freezes the stem and layer1 (torchvision's default of 3
    trainable layers), ``backbone_norm`` picks frozen or trainable BatchNorm, ``backbone_weights`` the
    backbone's weights (``none``: random, like torchvision's ``weights_backbone=None``)."""
    norm = FrozenBatchNorm2d if cfg.backbone_norm == "frozen_bn" else nn.BatchNorm2d
    net = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=norm)
    if cfg.backbone_freeze_early:
        for name, p in net.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
    stage2 = net.inplanes // 8  # channels of layer1's output: 256 (ResNet-50) or 64 (ResNet-18/34)
    backbone = BackboneWithFPN(
        net,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[stage2 * 2**i for i in range(4)],
        out_channels=cfg.hidden_dim,
        extra_blocks=LastLevelMaxPool(),
    )
    if cfg.backbone_weights == "imagenet":
        source = f"imagenet ({cfg.backbone})"
        load_backbone_weights(backbone.body, load_imagenet_state_dict(cfg.backbone), source)
    elif cfg.backbone_weights != "none":
        state_dict = read_backbone_weights(cfg.backbone_weights, cfg.backbone)
        load_backbone_weights(backbone.body, state_dict, cfg.backbone_weights)
    return FasterRCNNFPN(backbone, num_classes=cfg.num_classes)


class ModelLossCriterion(nn.Module):
    """The criterion of a detector that computes its own losses: passes ``outputs["losses"]`` through;
    `weighted_total` sums them with ``weight_dict`` (all 1 for Faster R-CNN, as torchvision trains)."""

    def __init__(self, weight_dict: dict[str, float] | None = None):
        super().__init__()
        self.weight_dict = dict(weight_dict or dict.fromkeys(RCNN_LOSSES, 1.0))

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        if "losses" not in outputs:
            raise ValueError("ModelLossCriterion: the model returned no losses (is it in training mode?)")
        return dict(outputs["losses"])

    def weighted_total(self, loss_dict: dict[str, Tensor]) -> Tensor:
        terms = [loss_dict[k] * w for k, w in self.weight_dict.items() if k in loss_dict]
        if not terms:
            raise ValueError("ModelLossCriterion.weighted_total: no weighted loss in the loss dict")
        return torch.stack(terms).sum()
