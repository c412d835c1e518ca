"""The quick teacher's dense object loss: cell targets follow the boxes and the shift."""

from __future__ import annotations

import torch

from lwbench.training.teacher import ObjectCells, cell_targets


def test_cell_targets_mark_cells_whose_centre_is_in_the_box():
    # 2x3 grid of 10 px patches; box covers centres (5,15) and (15,15) i.e. cells 1 and 4
    cells = cell_targets([{"box": (10, 0, 20, 20), "label": 2}], (2, 3), 10)
    assert cells.tolist() == [0, 3, 0, 0, 3, 0]
    shifted = cell_targets([{"box": (10, 0, 20, 20), "label": 2}], (2, 3), 10, shift=(0, 10))
    assert shifted.tolist() == [0, 0, 3, 0, 0, 3]


def test_cell_targets_label_the_read_box_when_an_object_has_one():
    """A billiard ball's number disc (``read_box``), not its whole box, names the cells the dense loss labels."""
    ball = {"box": (0, 0, 30, 20), "read_box": (10, 0, 20, 10), "label": 4}
    assert cell_targets([ball], (2, 3), 10).tolist() == [0, 5, 0, 0, 0, 0]
    assert cell_targets([{k: v for k, v in ball.items() if k != "read_box"}], (2, 3), 10).tolist() == [5] * 6


def test_object_cells_shift_moves_image_and_cells_together():
    from lwbench.tasks.traffic_signs import TrafficSigns

    torch.manual_seed(0)
    task = TrafficSigns(source="synthetic", img_size=(96, 128), n_train=8, n_val=4, n_test=4)
    plain = task.dataset("train")
    ds = ObjectCells(task, "train", patch=16, max_shift=0.1)
    for i in (1, 2, 3):  # items with a sign
        x, t = ds[i]
        assert t["label"] == plain[i][1] and x.shape == plain[i][0].shape
        assert (t["cells"] == t["label"] + 1).any() and set(t["cells"].unique().tolist()) <= {0, t["label"] + 1}
        # the sign is red: the red channel of cells marked as sign is higher than the image average
        red = x[0].unfold(0, 16, 16).unfold(1, 16, 16).mean((-1, -2)).flatten()
        assert red[t["cells"] > 0].max() > red.mean()
    x, t = ds[0]  # EMPTY
    assert t["label"] == 0 and (t["cells"] == 0).all()
