"""Mixed precision: the deformable-attention op under autocast, and a tiny Sparse DETR trained a few steps
under CPU bf16 autocast (as ``train.amp=bf16`` runs it: the forward under autocast, losses in fp32)."""

from __future__ import annotations

import pytest
import torch

from sdetr.detector import ops
from sdetr.detector.build import build_criterion, build_model
from sdetr.detector.errors import ConfigError
from sdetr.detector.layers.ms_deform_attn import ms_deform_attn_pytorch
from sdetr.detector.precision import amp_dtype, slow_bf16_note
from sdetr.detector.presets import get_preset
from sdetr.platform.training.engine import to_float32
from tests.test_model import padded_batch
from tests.test_ms_deform_attn_op import CONFIGS, make_inputs


class _RecordDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Dtypes of the floating inputs each call of the sdetr op receives."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) == "sdetr.ms_deform_attn.default":
            self.calls.append([a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()])
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def cpu_op():
    if not ops.load().loaded:
        pytest.skip(f"compiled op unavailable: {ops.backend_status(load=False)['reason']}")
    return torch.ops.sdetr.ms_deform_attn


def test_op_under_cpu_bf16_autocast(cpu_op):
    """Locations and weights are cast to fp32, value keeps bf16; gradients reach every input."""
    v, ss, lsi, loc, attn = make_inputs(**CONFIGS["D32"], dtype=torch.float32)
    value = v.bfloat16().requires_grad_()
    loc16 = loc.bfloat16().requires_grad_()
    attn32 = attn.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), _RecordDtypes() as rec:
        out = cpu_op(value, ss, lsi, loc16, attn32)
    assert rec.calls == [[torch.bfloat16, torch.float32, torch.float32]]
    assert out.dtype == torch.bfloat16
    ref = ms_deform_attn_pytorch(value.detach().double(), ss, lsi, loc16.detach().double(), attn.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert value.grad.dtype == torch.bfloat16 and loc16.grad.dtype == torch.bfloat16
    assert all(
        torch.isfinite(g.float()).all() and g.abs().sum() > 0 for g in (value.grad, loc16.grad, attn32.grad)
    )


def test_amp_modes_checked(monkeypatch):
    assert amp_dtype("bf16", "cpu") == torch.bfloat16 and amp_dtype("none", "cpu") is None
    # auto: bf16 only on a CPU with bf16 arithmetic (AMX or AVX512-BF16), else fp32.
    for amx, avx512_bf16, expected in (
        (False, False, None),
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
    ):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert amp_dtype("auto", "cpu") == expected
        # An explicit bf16 on a CPU that emulates it trains, with a note in the log; auto never needs one.
        note = slow_bf16_note("bf16", "cpu")
        assert (note is None) == (expected is not None), note
        assert note is None or "train.amp=auto" in note
        assert slow_bf16_note("auto", "cpu") is None and slow_bf16_note("none", "cpu") is None
    assert slow_bf16_note("bf16", "cuda") is None
    assert amp_dtype("fp16", "cuda") == torch.float16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        amp_dtype("fp16", "cpu")
    with pytest.raises(ConfigError, match="train.amp must be one of"):
        get_preset("tiny_sparse_detr_rho_0.1", ["train.amp=fp8"])


def _targets(n_classes: int, count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for k in (2, 3)[:count]:
        centre = 0.25 + 0.5 * torch.rand(k, 2, generator=g)
        size = 0.1 + 0.3 * torch.rand(k, 2, generator=g)
        labels = torch.randint(1, n_classes, (k,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([centre, size], -1)})
    return targets


def test_tiny_sparse_detr_trains_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    cfg = get_preset("tiny_sparse_detr_rho_0.1", ["train.amp=bf16"])
    cfg.model.num_queries = 20
    model = build_model(cfg.model)
    criterion = build_criterion(cfg.model, cfg.loss)
    dtype = amp_dtype(cfg.train.amp, "cpu")
    # Small images: bf16 matmuls are slow on CPUs without bf16 instructions.
    images, masks = padded_batch([(96, 128), (80, 112)], seed=1)
    targets = _targets(cfg.model.num_classes, 2, seed=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    losses = []
    with _RecordDtypes() as rec:
        for _ in range(5):
            with torch.autocast("cpu", dtype=dtype):
                outputs = model(images, masks)
            loss = criterion.weighted_total(criterion(to_float32(outputs), targets))
            assert torch.isfinite(loss), f"non-finite loss {loss.item()} after {len(losses)} steps"
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            losses.append(loss.item())
    # The compiled op ran with bf16 values (autocast reached it) wherever it is available.
    if ops.load().loaded:
        assert rec.calls and all(c[0] == torch.bfloat16 and c[1:] == [torch.float32] * 2 for c in rec.calls)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert min(losses[-2:]) < losses[0] * 0.95, f"loss did not decrease: {losses}"


def test_placement_layers_stay_fp32_under_bf16_autocast():
    """Sampling offsets, attention weights and box heads compute in fp32 under autocast (bf16 rounding of
    offsets and logit-space box deltas cost the demo's trials ~10 points of AP50), the rest in bf16."""
    torch.manual_seed(0)
    cfg = get_preset("tiny_sparse_detr_rho_0.1")
    model = build_model(cfg.model).eval()
    images, masks = padded_batch([(96, 128)], seed=1)
    seen: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, out.dtype)  # returns None: the output is kept

        return hook

    hooks = [
        model.transformer.encoder.layers[0].self_attn.sampling_offsets.register_forward_hook(
            record("offsets")
        ),
        model.transformer.encoder.layers[0].self_attn.attention_weights.register_forward_hook(
            record("weights")
        ),
        model.transformer.encoder.layers[0].self_attn.value_proj.register_forward_hook(record("value_proj")),
        model.bbox_embed[0].register_forward_hook(record("bbox_embed")),
    ]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, masks)
    for h in hooks:
        h.remove()
    assert seen == {
        "offsets": torch.float32,
        "weights": torch.float32,
        "value_proj": torch.bfloat16,
        "bbox_embed": torch.float32,
    }
    assert out["pred_boxes"].dtype == torch.float32
    assert out["sampling_locations_dec"].dtype == torch.float32
    # Outside autocast the layers are plain fp32 linears with the official state_dict keys.
    assert isinstance(model.transformer.encoder.layers[0].self_attn.sampling_offsets, torch.nn.Linear)
    assert "transformer.encoder.layers.0.self_attn.sampling_offsets.weight" in model.state_dict()
