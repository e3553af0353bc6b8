"""Set-prediction losses of Deformable DETR / Sparse DETR.

For every set of predictions the model emits (final decoder layer, intermediate decoder layers, the
two-stage proposal head, the encoder auxiliary heads) the queries are Hungarian-matched to the targets and
supervised with a sigmoid focal classification loss, an L1 box loss and a GIoU loss, each normalised by the
number of target boxes in the (distributed) batch. Sparse DETR adds the DAM loss that trains the token
scoring network (see dam.py).

Loss keys (official names): ``loss_ce``, ``loss_bbox``, ``loss_giou`` and the logged-only ``class_error``,
``cardinality_error`` for the final layer; the same with suffix ``_{i}`` for decoder layer i < L-1, ``_enc``
for the proposal head, ``_enc_{i}`` for encoder layer i < L_enc-1 (class_error only for the final layer);
``loss_mask_prediction`` and the diagnostic ``corr_mask_attn_map_dec_*`` for the final outputs only.

Crowd boxes (``iscrowd == 1``) are removed from the targets first, so they are neither matched nor
counted in the normaliser: this is what the official COCO loader does before targets reach the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from sdetr.detector.config import LossConfig, ModelConfig
from sdetr.detector.losses.dam import attn_map_to_flat_grid, dam_correlation, dam_loss, dam_target
from sdetr.detector.losses.matcher import HungarianMatcher, non_crowd

Targets = list[dict[str, Tensor]]
Indices = list[tuple[Tensor, Tensor]]

# Losses computed on every set of predictions; the others use only the final outputs (official behaviour).
_PER_LAYER_LOSSES = ("labels", "boxes", "cardinality")


# Per-box target fields, filtered together when crowd boxes are dropped; anything else (image_id, sizes)
# is per image and passes through untouched.
_PER_BOX_KEYS = ("labels", "boxes", "iscrowd", "area", "masks", "keypoints")


def drop_crowd(targets: Targets) -> Targets:
    """Shallow copies of the target dicts without their crowd boxes; dicts without ``iscrowd`` pass as is."""
    out = []
    for t in targets:
        if "iscrowd" not in t:
            out.append(t)
            continue
        keep = non_crowd(t)
        out.append({k: v[keep] if k in _PER_BOX_KEYS else v for k, v in t.items()})
    return out


def _src_permutation_idx(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx) of all matched predictions, concatenated image by image, on ``device``."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), src_idx.to(device)


def _num_boxes(targets: Targets, device: torch.device) -> float:
    """Targets per worker, averaged over the DDP world so every worker uses the same normaliser; >= 1."""
    num = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num)
        world = torch.distributed.get_world_size()
    return max(num.item() / world, 1.0)


class SetCriterion(nn.Module):
    """Matches predictions to targets and computes the weighted-by-`weight_dict` set losses.

    Args:
        num_classes: classifier width C (number of sigmoid outputs; no no-object column).
        matcher: the Hungarian matcher.
        weight_dict: loss name -> coefficient; `weighted_total` sums only these keys.
        losses: subset of ``labels``, ``boxes``, ``cardinality``, ``mask_prediction``, ``corr``.
        focal_alpha, focal_gamma: focal loss parameters of ``loss_ce``.
        eff_specific_head: the two-stage proposal head is class-specific (Efficient DETR); otherwise it is
            trained as a binary foreground classifier on class 0, as in plain two-stage Deformable DETR.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        losses: list[str],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        eff_specific_head: bool = False,
    ):
        super().__init__()
        unknown = set(losses) - {*_PER_LAYER_LOSSES, "mask_prediction", "corr"}
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.eff_specific_head = eff_specific_head

    # -- individual losses -------------------------------------------------------------------------
    def loss_labels(
        self, outputs: dict, targets: Targets, indices: Indices, num_boxes: float, log: bool = True
    ) -> dict[str, Tensor]:
        """Sigmoid focal loss over all queries x classes; matched (query, label) pairs are the positives."""
        logits = outputs["pred_logits"]  # [B, Q, C]
        idx = _src_permutation_idx(indices, logits.device)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)
        onehot[idx[0], idx[1], labels] = 1.0
        # The official code averages over queries, sums over images and classes, divides by num_boxes and
        # multiplies back by Q: that is the plain sum over all entries divided by num_boxes.
        loss_ce = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
        losses = {"loss_ce": loss_ce / num_boxes}
        if log:
            losses["class_error"] = self._class_error(logits[idx], labels)
        return losses

    @staticmethod
    @torch.no_grad()
    def _class_error(matched_logits: Tensor, labels: Tensor) -> Tensor:
        """100 - top-1 accuracy (%) of the matched queries; 100 without targets (as DETR's `accuracy`)."""
        if labels.numel() == 0:
            return matched_logits.new_tensor(100.0)
        correct = (matched_logits.argmax(-1) == labels).float().mean()
        return 100.0 * (1.0 - correct)

    @torch.no_grad()
    def loss_cardinality(
        self, outputs: dict, targets: Targets, indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """Logged only: mean |#queries predicted as objects - #targets| per image.

        Inherited from DETR: a query counts as an object when its argmax is not the last class. With sigmoid
        classification there is no no-object class, so this is kept only for log parity with the official
        code.
        """
        logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(
        self, outputs: dict, targets: Targets, indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        """L1 and GIoU losses of the matched boxes (cx, cy, w, h normalised), summed and / num_boxes."""
        idx = _src_permutation_idx(indices, outputs["pred_boxes"].device)
        src = outputs["pred_boxes"][idx]  # [M, 4]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum()
        # Pairwise GIoU then the diagonal, as the official code: torchvision's elementwise giou loss adds an
        # eps that is not negligible for tiny boxes. M is at most a few hundred, so M x M is cheap.
        giou = generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
        loss_giou = (1 - torch.diagonal(giou)).sum()
        return {"loss_bbox": loss_bbox / num_boxes, "loss_giou": loss_giou / num_boxes}

    def loss_mask_prediction(self, outputs: dict, flat_map: Tensor) -> dict[str, Tensor]:
        """DAM loss of the scoring network (final outputs only); ``flat_map`` [B, S] from `flat_dam`."""
        target = dam_target(flat_map, outputs.get("mask_flatten"), outputs["sparse_token_nums"])
        return {"loss_mask_prediction": dam_loss(outputs["backbone_mask_prediction"], target)}

    @torch.no_grad()
    def loss_corr(self, outputs: dict, flat_map: Tensor) -> dict[str, Tensor]:
        """Logged only: how much decoder attention lands on the kept encoder tokens."""
        return dam_correlation(
            outputs["backbone_topk_proposals"],
            flat_map,
            outputs["spatial_shapes"],
            outputs["level_start_index"],
        )

    @staticmethod
    @torch.no_grad()
    def flat_dam(outputs: dict) -> Tensor:
        """Decoder attention map [B, S], summed over decoder layers and heads."""
        # No gradient: the map only selects the target tokens (via top-k), so nothing differentiable flows
        # from it, and skipping autograd saves the memory of the scatter.
        dam = attn_map_to_flat_grid(
            outputs["spatial_shapes"],
            outputs["level_start_index"],
            outputs["sampling_locations_dec"],
            outputs["attn_weights_dec"],
        )
        return dam.sum(dim=(1, 2))  # [B, S]

    # -- orchestration -----------------------------------------------------------------------------
    def _set_losses(self, outputs: dict, targets: Targets, num_boxes: float, suffix: str, log: bool) -> dict:
        """Match one set of predictions and compute the per-layer losses, keys suffixed."""
        indices = self.matcher(outputs, targets)
        losses: dict[str, Tensor] = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices, num_boxes, log=log))
        if "boxes" in self.losses:
            losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        if "cardinality" in self.losses:
            losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs: dict, targets: Targets) -> dict[str, Tensor]:
        """Compute every loss the outputs allow.

        Args:
            outputs: the model's output dict (``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] and the
                optional ``aux_outputs``, ``enc_outputs``, ``aux_outputs_enc``, DAM inputs; see the model).
            targets: B dicts with ``labels`` int64 [n_i], ``boxes`` [n_i, 4] (cx, cy, w, h normalised) and
                optionally ``iscrowd`` [n_i].
        Returns:
            loss name -> scalar tensor (unweighted; see `weighted_total`).
        """
        targets = drop_crowd(targets)
        num_boxes = _num_boxes(targets, outputs["pred_logits"].device)

        losses = self._set_losses(outputs, targets, num_boxes, suffix="", log=True)
        want_dam = "mask_prediction" in self.losses and "backbone_mask_prediction" in outputs
        want_corr = "corr" in self.losses and "backbone_topk_proposals" in outputs
        if want_dam or want_corr:
            flat_map = self.flat_dam(outputs)  # shared by both
            if want_dam:
                losses.update(self.loss_mask_prediction(outputs, flat_map))
            if want_corr:
                losses.update(self.loss_corr(outputs, flat_map))

        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._set_losses(aux, targets, num_boxes, suffix=f"_{i}", log=False))

        if "enc_outputs" in outputs:
            enc_targets = targets
            if not self.eff_specific_head:
                # Plain two-stage proposals are foreground/background: every box is class 0.
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._set_losses(outputs["enc_outputs"], enc_targets, num_boxes, "_enc", log=False))

        for i, aux in enumerate(outputs.get("aux_outputs_enc", [])):
            losses.update(self._set_losses(aux, targets, num_boxes, suffix=f"_enc_{i}", log=False))
        return losses

    def weighted_total(self, loss_dict: dict[str, Tensor]) -> Tensor:
        """Sum of ``weight_dict[k] * loss_dict[k]`` over keys present in both (logged metrics excluded)."""
        terms = [loss_dict[k] * w for k, w in self.weight_dict.items() if k in loss_dict]
        if not terms:
            raise ValueError("SetCriterion.weighted_total: no weighted loss in the loss dict")
        return torch.stack(terms).sum()


def build_weight_dict(model_cfg: ModelConfig, loss_cfg: LossConfig) -> dict[str, float]:
    """Loss coefficients, laid out as the official ``build``.

    Two official quirks are left out because they never match a computed loss: ``*_backbone`` keys (the model
    emits no ``backbone_outputs``) and ``loss_mask_prediction`` when rho == 0.
    """
    base = {
        "loss_ce": loss_cfg.cls_loss_coef,
        "loss_bbox": loss_cfg.bbox_loss_coef,
        "loss_giou": loss_cfg.giou_loss_coef,
    }
    weights = dict(base)
    if model_cfg.aux_loss:
        for i in range(model_cfg.dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    if model_cfg.two_stage:
        weights.update({f"{k}_enc": v for k, v in base.items()})
    if model_cfg.use_enc_aux_loss:
        for i in range(model_cfg.enc_layers - 1):
            weights.update({f"{k}_enc_{i}": v * loss_cfg.enc_aux_loss_coef for k, v in base.items()})
    if model_cfg.rho > 0:
        weights["loss_mask_prediction"] = loss_cfg.mask_prediction_coef
    return weights
