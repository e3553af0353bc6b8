"""Typed configuration: the one source of truth for every default.

A `Config` is a tree of dataclasses. It loads from and dumps to YAML, and any leaf can be overridden
with ``key=value`` strings (``model.rho=0.2``; a leaf name alone such as ``rho=0.2`` works when it is
unambiguous). Values are parsed as YAML scalars and checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdetr.detector.errors import ConfigError
from sdetr.detector.precision import AMP_MODES


@dataclass
class ModelConfig:
    """Architecture. Field names follow the official repositories' command-line flags."""

    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | swin_t
    # none | imagenet (torchvision's ImageNet weights, downloaded when online) | a local file (for example
    # an SCRL checkpoint, as the official --scrl_pretrained_path, or a plain backbone state_dict).
    backbone_weights: str = "none"
    dilation: bool = False
    # Official: ResNet stem + layer1 (Swin: patch embedding + first stage) frozen, FrozenBatchNorm2d.
    # Training from random init (the tiny CPU presets) wants everything trainable and real BatchNorm.
    backbone_freeze_early: bool = True
    backbone_norm: str = "frozen_bn"  # frozen_bn | bn (ResNet only)
    swin_drop_path_rate: float = 0.2
    position_embedding: str = "sine"
    position_embedding_scale: float = 6.283185307179586  # 2*pi
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    num_classes: int = 91  # COCO's largest category id + 1, as in DETR
    aux_loss: bool = True
    with_box_refine: bool = False
    two_stage: bool = False
    eff_query_init: bool = False
    eff_specific_head: bool = False
    # Encoder token keeping ratio; 0 disables sparsification (dense Deformable DETR encoder).
    rho: float = 0.0
    use_enc_aux_loss: bool = False
    # The detector family: deformable_detr (Deformable / Efficient / Sparse / Lite DETR: everything
    # above), detr (DETR: C5 only, dense 6+6 transformer, softmax classes with a no-object column) or
    # faster_rcnn (torchvision's Faster R-CNN + FPN; uses backbone, backbone_*, hidden_dim as the FPN
    # width and num_classes).
    arch: str = "deformable_detr"
    # Deformable DETR's encoder: deformable (every token updated in every layer) or lite (Lite DETR's
    # interleaved encoder: `lite_layout` sets its shape and enc_layers is not used).
    encoder: str = "deformable"
    # Lite DETR's name for the interleaved layout: H<high levels>L<low levels>-(<A>+1)x<K>: K blocks, each
    # updating the high-level (coarsest) tokens A times and the low-level (finest) tokens once.
    lite_layout: str = "H3L1-(3+1)x2"
    # How the lite encoder reads the layout: official (as the released code builds it: each block is A
    # layers, A - 1 with the high-level tokens as queries, then one with all tokens as queries; A*K layers)
    # or paper_text (this project's earlier reading of the paper: A high-level layers, then one layer with
    # only the low-level tokens as queries; A*K + K layers).
    lite_structure: str = "official"
    # Key-aware deformable attention in the lite encoder (attention weights from q·k of sampled keys
    # instead of a linear layer on the query).
    use_kda: bool = False
    # Key-aware attention in the decoder's cross-attention too (the released code's key_aware=True); the
    # decoder's KDA keeps the released defaults (keys = values, offsets per level).
    dec_use_kda: bool = False
    # The encoder's KDA, named as the released code's flags: keys from their own projection (key_proj)
    # instead of the value projection; one set of sampling offsets per head shared by all levels.
    proj_key: bool = False
    same_loc: bool = False
    # official structure: in the all-token layers the low-level tokens get their own feed-forward layer
    # (the released code's small_expand) of hidden width lite_low_ffn_dim (0 = hidden_dim, as released);
    # false: they share the layer's dim_feedforward one. paper_text structure: lite_low_ffn_dim is the
    # hidden width of the low-level layers' feed-forward layer (0 = dim_feedforward).
    small_expand: bool = True
    lite_low_ffn_dim: int = 0


@dataclass
class LossConfig:
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # Weight of the DAM (decoder attention map) loss that trains the scoring network.
    mask_prediction_coef: float = 1.0
    # Multiplier on every encoder auxiliary loss term (1.0 = the official setting).
    enc_aux_loss_coef: float = 1.0
    # DETR (arch=detr) only: weight of the no-object class in the cross-entropy classification loss.
    eos_coef: float = 0.1


@dataclass
class DataConfig:
    root: str = "data/coco"
    train_split: str = "train2017"
    val_split: str = "val2017"
    # DETR's multi-scale training: short side drawn from these sizes, long side capped.
    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    train_max_size: int = 1333
    # DETR's random crop: resize to one of these short sides, then crop a random region of this size range.
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min_size: int = 384
    crop_max_size: int = 600
    random_crop: bool = True
    val_scale: int = 800
    val_max_size: int = 1333
    num_workers: int = 2
    # Optional cap on images per split (0 = all); handy for quick runs.
    max_train_images: int = 0
    max_val_images: int = 0


@dataclass
class OptimConfig:
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    # Parameters whose name contains one of these get lr * lr_linear_proj_mult.
    lr_linear_proj_names: list[str] = field(default_factory=lambda: ["reference_points", "sampling_offsets"])
    lr_linear_proj_mult: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 2  # per worker
    epochs: int = 50
    lr_drop: int = 40
    clip_max_norm: float = 0.1
    # Sparse DETR scales lr and lr_backbone by sqrt(global batch / lr_reference_batch).
    sqrt_lr_scaling: bool = True
    lr_reference_batch: int = 16


@dataclass
class TrainConfig:
    seed: int = 42
    output_dir: str = "runs/train"
    device: str = "auto"  # auto | cpu | cuda
    # Mixed precision of the model's forward (losses stay fp32): none | bf16 (CPU or GPU) | fp16 (GPU only,
    # with a gradient scaler) | auto (bf16 where the device has bf16 arithmetic: a GPU that supports it, a
    # CPU with AMX or AVX512-BF16; else none). `precision.amp_dtype` checks it against the device.
    amp: str = "none"
    # Convolution weights in channels-last (NHWC) memory order while training (their activations follow):
    # the same results up to rounding, in oneDNN's and cuDNN's faster layout (a `mini_*` step alone on this
    # machine's CPU 14 % quicker in fp32 and 21 % in bf16; docs/benchmarks.md, "Demo").
    channels_last: bool = True
    checkpoint_every_steps: int = 0  # 0 = only at the end of each epoch
    keep_checkpoints: int = 2
    eval_every_epochs: int = 1
    log_every_steps: int = 10
    # Stop after this many seconds (0 = no limit); the current epoch's checkpoint is still written.
    time_limit_s: float = 0.0
    progress: bool = True
    # Fine-tuning: initialise a fresh run from this checkpoint (official .pth, sdetr checkpoint or run
    # folder; detector/finetune.py). Class-dependent layers are re-initialised when the class count
    # differs, or always with reset_class_heads. Ignored when the run resumes from its own checkpoint.
    init_from: str = ""
    reset_class_heads: bool = False


@dataclass
class Config:
    preset: str = "r50_deformable_detr"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # -- conversion -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"model.rho": 0.1, ...}``: handy for logging params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                key = f"{prefix}{f.name}"
                if dataclasses.is_dataclass(value):
                    walk(key + ".", value)
                else:
                    out[key] = value

        walk("", self)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Config:
        cfg = cls()
        _update_dataclass(cfg, data, source, prefix="")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def override(self, assignments: list[str] | None, source: str = "--set") -> Config:
        """Apply ``key=value`` strings in place and return self."""
        for item in assignments or []:
            if "=" not in item:
                raise ConfigError(f"{source} {item!r}: expected key=value, e.g. model.rho=0.2")
            key, raw = item.split("=", 1)
            path = resolve_key(key.strip(), source)
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            set_by_path(self, path, value, source)
        return self


# -- helpers ---------------------------------------------------------------------------------------
def _leaf_paths(cls: type = Config, prefix: str = "") -> list[str]:
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            paths += _leaf_paths(tp, f"{prefix}{f.name}.")
        else:
            paths.append(f"{prefix}{f.name}")
    return paths


def resolve_key(key: str, source: str = "--set") -> str:
    """Turn ``rho`` or ``model.rho`` into the full dotted path, or raise a ConfigError."""
    leaves = _leaf_paths()
    if key in leaves:
        return key
    matches = [p for p in leaves if p.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"{source} {key!r}: ambiguous key, say one of {', '.join(matches)}")
    import difflib

    close = difflib.get_close_matches(key, leaves + [p.rsplit(".", 1)[-1] for p in leaves], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"{source} {key!r}: unknown config key{hint}")


def set_by_path(cfg: Config, path: str, value: Any, source: str) -> None:
    parts = path.split(".")
    obj: Any = cfg
    for part in parts[:-1]:
        obj = getattr(obj, part)
    hints = typing.get_type_hints(type(obj))
    setattr(obj, parts[-1], _checked(path, coerce(value, hints[parts[-1]], f"{source} {path}"), source))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against a (simple) type annotation, converting ints to floats where expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [coerce(v, item_tp, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _checked(path: str, value: Any, source: str) -> Any:
    """Values with a fixed set of choices (train.amp) are checked when they are set."""
    if path == "train.amp" and value not in AMP_MODES:
        raise ConfigError(f"{source}: train.amp must be one of {', '.join(AMP_MODES)}, got {value!r}")
    return value


def _update_dataclass(obj: Any, data: dict[str, Any], source: str, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in names:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {prefix}{key!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}{key} must be a mapping")
            _update_dataclass(current, value, source, prefix=f"{prefix}{key}.")
        else:
            value = coerce(value, hints[key], f"{source}: {prefix}{key}")
            setattr(obj, key, _checked(f"{prefix}{key}", value, source))
