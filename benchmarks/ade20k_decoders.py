"""The linear head beside mmseg's UPerHead (``--set head.decoder=uper``, ``pip install -e ".[seg]"``) for full,
lookwhere and tome, on the tests' tiny ADE20K fixture (``tests/fixtures.py::make_ade20k``: the real
ADEChallengeData2016 layout, synthetic pictures).

    python benchmarks/ade20k_decoders.py [--out results.md]

A smoke check of the wiring (every method's densified tokens through both decoders, mIoU and GMACs in the row),
not a segmentation result: the fixture has a handful of images and the backbone is lwbench's 2-block test ViT.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TINY = ["teacher.steps=30", "teacher.batch_size=4", "train.steps=10", "train.batch_size=4",
        "measure.min_run_time=0.05", "measure.throughput_batch=2", "measure.warmup=1", "measure.flops_images=1",
        "measure.isolate=false", "methods.lookwhere.distill.steps=10", "methods.lookwhere.distill.batch_size=4",
        "method.selector_size=16"]
POINTS = [("full", None), ("lookwhere", "k=8"), ("tome", "r=2")]


def main() -> None:
    from fixtures import make_ade20k

    import lwbench

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lwbench-ade-"))
    root = make_ade20k(tmp / "ade", train=8, val=4)
    rows = []
    for method, budget in POINTS:
        for decoder in ("linear", "uper"):
            sets = {k: v for k, v in (s.split("=", 1) for s in TINY)}
            if method != "lookwhere":
                sets = {k: v for k, v in sets.items() if not k.startswith("method.")}
            row = lwbench.run(method, "ade20k", budget, data_root=str(root), img_size=(32, 32),
                              backbone="lw_vit_test_p8", results=str(tmp / "results"), quiet=True,
                              **{**sets, "head.decoder": decoder})
            rows.append([method, row["budget"], decoder, row["regime"], f"{row['miou']:.1f}",
                         f"{row['gmacs']:.4f}", f"{row['gmacs_head']:.4f}"])
            print(rows[-1], flush=True)
    table = tabulate(rows, headers=["method", "budget", "decoder", "regime", "mIoU %", "GMACs", "head GMACs"],
                     tablefmt="github")
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
