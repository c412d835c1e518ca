"""``lwbench show``: the panels' known answers (outlines, dimming, merge groups, captions), which methods have
something to draw, and the CLI end to end (a ToMe figure of merge groups; ``full`` refused before training)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import TINY, _one_line_error

from lwbench import show
from lwbench.cli import main
from lwbench.tokens import TokenOutput


def _out(positions, grid=(2, 3), assignment=None, aux=None) -> TokenOutput:
    positions = torch.as_tensor(positions)[None]
    m = positions.shape[1]
    return TokenOutput(torch.zeros(1, 1, 4), torch.zeros(1, m, 4), positions, grid,
                       assignment=None if assignment is None else torch.as_tensor(assignment)[None],
                       aux=aux or {})


# -- panels ------------------------------------------------------------------------------------------------

def test_border_of_one_corner_cell_has_four_sides_inside_the_image():
    cells = torch.tensor([True, False, False, False])  # top-left cell of a 2x2 grid on a 4x4 image
    segs = show.border_segments(cells, (2, 2), (4, 4))
    assert sorted(segs) == sorted([((0.0, 0.0), (1.5, 0.0)), ((0.0, 1.5), (1.5, 1.5)),
                                   ((0.0, 0.0), (0.0, 1.5)), ((1.5, 0.0), (1.5, 1.5))])


def test_border_of_two_neighbours_leaves_out_their_shared_side():
    cells = torch.tensor([True, True, False, False])  # the top row of a 2x2 grid on a 4x4 image
    segs = show.border_segments(cells, (2, 2), (4, 4))
    assert len(segs) == 6
    assert ((1.5, 0.0), (1.5, 1.5)) not in segs  # the side between the two cells
    assert ((3.0, 0.0), (3.0, 1.5)) in segs  # the right image border, half a pixel in


def test_unprocessed_pixels_are_darkened_and_processed_ones_kept():
    rng = np.random.default_rng(0)
    img = rng.random((4, 6, 3))
    keep = np.zeros((4, 6))
    keep[:, :3] = 1
    shown = show.dim_unprocessed(img, keep)
    np.testing.assert_array_equal(shown[:, :3], img[:, :3])
    grey = img[:, 3:].mean(axis=2, keepdims=True)
    np.testing.assert_allclose(shown[:, 3:], show.DIM * (0.5 * img[:, 3:] + 0.5 * grey))
    assert shown[:, 3:].max() <= show.DIM + 1e-12


def test_merge_groups_get_one_colour_each_and_singletons_none():
    # 2x3 grid: token 0 holds cells 0,1; token 1 cell 2 alone; token 2 cells 3,4,5.
    a = torch.tensor([0, 0, 1, 2, 2, 2])
    rgba = show.group_colours(a)
    assert (rgba[2] == 0).all()  # kept alone: transparent
    np.testing.assert_array_equal(rgba[0], rgba[1])
    np.testing.assert_array_equal(rgba[3], rgba[5])
    assert not np.array_equal(rgba[0], rgba[3]) and rgba[0, 3] == rgba[3, 3] == 1.0
    assert show.merge_caption(a) == "3 tokens for 6 cells, 2 groups of 2+ (largest 3 cells)"


def test_merge_panel_draws_borders_around_groups_only():
    # 2x3 grid, 2x2 pixels per cell: cells 2 and 3 merged into token 2, every other cell a token of its own.
    a = torch.tensor([0, 1, 2, 2, 3, 4])
    img = np.zeros((4, 6, 3))
    panel = show.merge_panel(img, a, (2, 3))
    np.testing.assert_array_equal(panel[0, 1], 0.0)  # cell 0 | cell 1: two lone tokens, no border, untinted
    np.testing.assert_array_equal(panel[0, 3], 1.0)  # cell 1 | cell 2 (a group): white border
    np.testing.assert_array_equal(panel[1, 0], 1.0)  # cell 0 above cell 3 (a group): white border
    np.testing.assert_array_equal(panel[2, 3], 0.0)  # cell 4 | cell 5: lone, no border
    assert panel[0, 4].sum() > 0 and panel[3, 0].sum() > 0  # the group's two cells are tinted
    np.testing.assert_array_equal(panel[0, 4], panel[3, 0])  # in one colour
    labels = np.array([[0, 0, 1], [2, 2, 2]])
    np.testing.assert_array_equal(show.group_borders(labels),
                                  [[True, True, True], [False, False, False]])  # right or below differs


def test_prediction_caption_marks_right_and_wrong():
    assert show.prediction_caption("stop", "stop", True) == ("pred stop: right", show.RIGHT)
    assert show.prediction_caption("stop", "60", False) == ("pred 60: wrong (label stop)", show.WRONG)


# -- what there is to show ------------------------------------------------------------------------------------

def test_spatial_content_of_each_kind_of_output():
    assert show.spatial_content(_out([0, 1, 2, 3, 4, 5])) is None  # full / lowres: every cell, own token
    assert show.spatial_content(_out([0, 2, 5])) == "selection"  # pruned / selected
    where = torch.arange(6.0)[None]
    assert show.spatial_content(_out([0, 1, 2, 3, 4, 5], aux={"where_map": where})) == "selection"
    assert show.spatial_content(_out([0, 2, 3], assignment=[0, 0, 1, 2, 2, 2])) == "merging"
    no_merge = _out([0, 1, 2, 3, 4, 5], assignment=[0, 1, 2, 3, 4, 5])  # ToMe at r=0
    assert show.spatial_content(no_merge) is None
    with pytest.raises(Exception, match="nothing to draw"):
        show.refuse_output("full", no_merge)


def test_selection_map_needs_one_score_per_cell():
    where = torch.arange(6.0)[None]
    scores, label = show.selection_map(_out([0, 1], aux={"where_map": where}))
    assert torch.equal(scores, where) and "where-map" in label
    assert show.selection_map(_out([0, 1], aux={"scores": torch.zeros(1, 5)})) is None  # not on the grid


# -- end to end ---------------------------------------------------------------------------------------------------

def _capture(monkeypatch) -> list[str]:
    texts = []
    real_save = show.save_figure

    def save(fig, out, rect=None):
        texts.extend(t.get_text() for t in fig.texts)
        texts.extend(ax.get_title() for ax in fig.axes)
        return real_save(fig, out, rect)

    monkeypatch.setattr(show, "save_figure", save)
    return texts


def test_show_tome_draws_merge_groups_and_predictions(monkeypatch, tmp_path):
    texts = _capture(monkeypatch)
    out = tmp_path / "figs" / "tome.png"
    assert main(["show", "--method", "tome", "--budget", "r=8", "--task", "traffic_signs", "--out", str(out),
                 "--n", "2", *TINY]) == 0
    assert any("tokens for 24 cells" in t for t in texts)
    assert sum(t.startswith("pred ") and (t.endswith(": right") or ": wrong (label " in t) for t in texts) == 2
    assert not any("patches processed" in t for t in texts)  # not "24/24 processed" twice
    mode = stat.S_IMODE(os.stat(out).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # an ordinary file's mode: colleagues can read it
    assert not list(out.parent.glob(".*.tmp"))


def test_show_hourglass_draws_its_clusters(monkeypatch, tmp_path):
    """Hourglass reconstructs every cell, so it has no assignment; its figure colours each cell's nearest cluster
    (it used to be refused as "processes every patch", which it does not: the later blocks run on the clusters)."""
    texts = _capture(monkeypatch)
    out = tmp_path / "hourglass.png"
    assert main(["show", "--method", "hourglass", "--budget", "k=6", "--task", "traffic_signs", "--out", str(out),
                 "--n", "1", *TINY]) == 0
    assert any(t.startswith("6 clusters for 24 cells (") for t in texts)  # 4 x 6 grid -> 2 x 3 clusters
    assert any("colour = one cluster" in t for t in texts)
    assert out.exists()


def test_show_selection_outlines_what_was_processed(monkeypatch, tmp_path):
    texts = _capture(monkeypatch)
    assert main(["show", "--method", "random", "--budget", "k=6", "--task", "traffic_signs", "--out",
                 str(tmp_path / "r.png"), "--n", "1", *TINY]) == 0
    assert any(t.startswith("6/24 patches processed") for t in texts)
    assert any("yellow outline = patches processed" in t for t in texts)


@pytest.mark.parametrize("method", [["full"], ["lowres", "--budget", "size=32"]])
def test_show_refuses_methods_with_nothing_spatial_before_training(method, tmp_path, capsys):
    cache = Path(os.environ["LWBENCH_CACHE"])
    trained = lambda: {p for p in cache.rglob("*") if p.relative_to(cache).parts[0] != "scenes"}  # noqa: E731
    before = trained()
    assert main(["show", "--method", *method, "--task", "traffic_signs", "--out", str(tmp_path / "f.png"),
                 *TINY]) == 2
    line = _one_line_error(capsys)
    assert f"{method[0]} processes every patch" in line and "nothing to draw" in line and "tome" in line
    assert not (tmp_path / "f.png").exists()
    assert trained() == before  # no teacher, no run stage: only the test images were drawn (the scene cache)
