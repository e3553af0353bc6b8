"""Typed config: presets, overrides, YAML round trip, and clear errors."""

from __future__ import annotations

import pytest

from sdetr.detector.config import Config
from sdetr.detector.errors import ConfigError
from sdetr.detector.presets import RHOS, get_preset, preset_names


def test_official_preset_flags_match_the_official_config_files():
    sparse = get_preset("r50_sparse_detr_rho_0.3").model
    assert (sparse.with_box_refine, sparse.two_stage, sparse.eff_query_init, sparse.eff_specific_head) == (
        True, True, True, True,
    )  # fmt: skip
    assert sparse.rho == 0.3 and sparse.use_enc_aux_loss and sparse.backbone == "resnet50"
    plain = get_preset("r50_deformable_detr").model
    assert not (plain.with_box_refine or plain.two_stage or plain.rho or plain.use_enc_aux_loss)
    assert get_preset("swint_efficient_detr").model.backbone == "swin_t"
    names = set(preset_names())
    for prefix in ("r50", "swint", "tiny"):
        assert {f"{prefix}_sparse_detr_rho_{r}" for r in RHOS} <= names
        assert f"{prefix}_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage" in names


def test_overrides_by_path_and_by_leaf_name_with_type_checks():
    cfg = get_preset(
        "tiny_sparse_detr_rho_0.1", ["rho=0.25", "optim.lr=1e-3", "data.train_scales=[128, 160]"]
    )
    assert cfg.model.rho == 0.25 and cfg.optim.lr == 1e-3 and cfg.data.train_scales == [128, 160]
    assert get_preset("tiny_deformable_detr", ["epochs=3"]).optim.epochs == 3
    with pytest.raises(ConfigError, match="unknown config key.*did you mean"):
        get_preset("tiny_deformable_detr", ["model.rhoo=0.1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        get_preset("tiny_deformable_detr", ["optim.epochs=many"])
    with pytest.raises(ConfigError, match="expected key=value"):
        get_preset("tiny_deformable_detr", ["rho"])
    with pytest.raises(ConfigError, match="unknown preset 'r50_sparse_detr_rho_0.7'.*did you mean"):
        get_preset("r50_sparse_detr_rho_0.7")


def test_yaml_round_trip_and_file_errors(tmp_path):
    cfg = get_preset("swint_sparse_detr_rho_0.2", ["optim.epochs=7"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert Config.from_yaml(path) == cfg
    path.write_text("model:\n  rho: 0.1\n  hiden_dim: 128\n")
    with pytest.raises(ConfigError, match=r"config.yaml: unknown config key model.'hiden_dim'.*hidden_dim"):
        Config.from_yaml(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml: not valid YAML"):
        Config.from_yaml(path)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        Config.from_yaml(tmp_path / "missing.yaml")
    assert cfg.flat()["model.rho"] == 0.2
