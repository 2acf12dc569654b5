"""VFlowOpt's importance map and recycling, checked by hand on tiny tensors."""

from __future__ import annotations

import math

import torch

from vflowopt.methods.vflowopt import calibrated_attention
from vflowopt.ops.recycle import grid_cells, select_with_recycling
from vflowopt.signals.entropy import entropy_of_levels, grey_levels, patch_entropy


def test_calibrated_attention_uses_only_tokens_above_threshold():
    # 3 tokens; rows are queries. Received attention: col sums = [1.7, 0.9, 0.4], mean = 1.
    a = torch.tensor([[[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.6, 0.2, 0.2]]])
    # t = 1.2: tau = 1.2 * (3 / 3) = 1.2, K = {0}; I_i = A[0, i]
    assert torch.allclose(calibrated_attention(a, 1.2), torch.tensor([[0.6, 0.3, 0.1]]))
    # t = 0.8: K = {0, 1}; I_i = A[0, i] + A[1, i] (a sum, as in eq. 4) ...
    assert torch.allclose(calibrated_attention(a, 0.8), torch.tensor([[1.1, 0.7, 0.2]]))
    # ... or the official code's mean over K
    assert torch.allclose(calibrated_attention(a, 0.8, "mean"), torch.tensor([[0.55, 0.35, 0.1]]))


def test_empty_k_falls_back_to_all_tokens_and_stays_finite():
    a = torch.softmax(torch.randn(2, 5, 5), -1)
    out = calibrated_attention(a, 1e6)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, a.sum(-2))


def test_entropy_flat_patch_is_zero_and_two_levels_is_ln2():
    flat = torch.full((1, 16), 77)
    assert entropy_of_levels(flat).item() == 0.0
    half = torch.tensor([[10] * 8 + [200] * 8])
    assert math.isclose(entropy_of_levels(half).item(), math.log(2), rel_tol=1e-6)
    four = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4 + [3] * 4])
    assert math.isclose(entropy_of_levels(four).item(), math.log(4), rel_tol=1e-6)


def test_patch_entropy_denormalises_and_follows_vit_order():
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    img = torch.zeros(1, 3, 4, 4)  # normalised 0 = grey 0.5 -> level 128 (127.5 rounds to 128)
    img[:, :, 0:2, 2:4] = -1.0  # top-right patch: black
    img[:, :, 2:4, 0:2] = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]])  # bottom-left: half black, half white
    assert grey_levels(img, mean, std)[0, 0, 0].item() == 128
    h = patch_entropy(img, 2, mean, std)[0]
    assert h.shape == (4,)
    assert h[0].item() == 0 and h[1].item() == 0 and h[3].item() == 0
    assert math.isclose(h[2].item(), math.log(2), rel_tol=1e-6)


def test_entropy_term_is_a_softmax_over_the_image():
    h = torch.tensor([[0.0, math.log(2), 1.0]])
    sm = torch.softmax(h, -1)
    assert torch.allclose(sm.sum(-1), torch.ones(1))
    assert torch.allclose(sm[0, 1] / sm[0, 0], torch.tensor(2.0))


def _grid(side):
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    return rows, cols


def test_recycling_on_a_known_grid():
    # 4x4 grid, a = 2 -> four 2x2 cells. Scores decrease with the token index.
    rows, cols = _grid(4)
    cells = grid_cells(torch.zeros(16, dtype=torch.long), rows, cols, 2.0)
    assert cells.unique().numel() == 4
    assert cells[0] == cells[1] == cells[4] == cells[5]
    scores = torch.linspace(1.0, 0.25, 16)
    feats = torch.arange(16, dtype=torch.float32).unsqueeze(-1).repeat(1, 3)
    rec = select_with_recycling(scores, cells, 6, feats)
    assert int(rec.keep.sum()) == 6
    # f(k) = k + cells(k): k = 2 directly kept (tokens 0, 1), pruned 2..15 fill all 4 cells -> 6
    assert rec.keep[:2].all()
    replaced = rec.replaced.nonzero().squeeze(-1).tolist()
    # each cell's fused token sits at its most important pruned member
    assert replaced == [2, 4, 8, 10]
    # cell {0,1,4,5}: pruned members are 4 and 5, fused by importance
    w = scores[[4, 5]]
    expected = (w[0] * 4 + w[1] * 5) / w.sum()
    assert torch.allclose(rec.features[4], expected.repeat(3))
    # cell {2,3,6,7}: all pruned
    w = scores[[2, 3, 6, 7]]
    expected = (w * torch.tensor([2.0, 3, 6, 7])).sum() / w.sum()
    assert torch.allclose(rec.features[2], expected.repeat(3))
    # untouched tokens keep their features
    assert torch.equal(rec.features[0], feats[0])


def test_recycling_hits_every_count_and_survives_negative_weights():
    rows, cols = _grid(6)
    cells = grid_cells(torch.zeros(36, dtype=torch.long), rows, cols, 2.5)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(36, generator=g)  # negative importances (alpha < 0) included
    feats = torch.randn(36, 4, generator=g)
    for n_keep in range(0, 37):
        rec = select_with_recycling(scores, cells, n_keep, feats)
        assert int(rec.keep.sum()) == n_keep
        assert torch.isfinite(rec.features).all()
        assert not (rec.replaced & ~rec.keep).any()


def test_recycling_with_fewer_slots_than_cells_keeps_the_best_cells():
    rows, cols = _grid(4)
    cells = grid_cells(torch.zeros(16, dtype=torch.long), rows, cols, 2.0)
    scores = torch.zeros(16)
    scores[15] = 5.0  # the best token lies in the bottom-right cell
    rec = select_with_recycling(scores, cells, 1, torch.randn(16, 2))
    assert rec.keep.nonzero().squeeze(-1).tolist() == [15]
    assert rec.replaced[15]


def test_separate_grids_never_share_a_cell():
    rows, cols = _grid(2)
    cells = grid_cells(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), rows.repeat(2), cols.repeat(2), 4.0)
    assert cells[:4].unique().numel() == 1 and cells[4:].unique().numel() == 1 and cells[0] != cells[4]


def test_grey_level_is_the_rounded_float_mean_not_the_official_truncation():
    # one pixel with every channel at 10.6/255 after de-normalisation: the paper's 8-bit grey (ours)
    # rounds the float mean to 11; the official code truncates each channel to uint8 first (10).
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    value = (10.6 / 255 - 0.5) / 0.5
    px = torch.full((1, 3, 2, 2), value)
    assert grey_levels(px, mean, std).unique().tolist() == [11]
    truncated = ((px * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).float().mean(1).long()
    assert truncated.unique().tolist() == [10]
    # a hand-made 2×2 patch: grey levels 11, 12, 12, 12 by rounding, entropy of (1/4, 3/4) in nats
    chans = torch.tensor([10.6, 11.6, 11.6, 12.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2) / 255
    patch = (chans - 0.5) / 0.5
    ours = patch_entropy(patch, 2, mean, std)[0, 0].item()
    levels = grey_levels(patch, mean, std).flatten().tolist()
    assert levels == [11, 12, 12, 12] and math.isclose(ours, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)),
                                                      rel_tol=1e-6)


def test_vflowopt_reports_its_calibration_set_and_warns_once_when_empty(make_model):
    import warnings

    import vflowopt
    from conftest import one_image_inputs

    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.5, threshold=1e6)) as h, torch.no_grad():
            model(**inputs)
            model(**inputs)
            info = h.stats.method_info
    n = len(info["calibration_set_size"])
    assert n >= 1 and info["calibration_empty"] == n and set(info["calibration_set_size"]) == {0}
    assert sum("calibration set K was empty" in str(w.message) for w in caught) == 1  # once per handle
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.5, threshold=0.0)) as h, torch.no_grad():
        model(**inputs)
        info = h.stats.method_info
    assert info["calibration_empty"] == 0 and min(info["calibration_set_size"]) >= 1
    assert all(0.0 < m <= 1.0 for m in info["calibration_mass"])
    with vflowopt.pruned(model, vflowopt.config_for("random", budget=0.5)) as h, torch.no_grad():
        model(**inputs)
        assert h.stats.method_info == {}
