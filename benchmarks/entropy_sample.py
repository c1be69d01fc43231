"""How closely MEDA's sampled cross-modal entropy tracks the exact one (all rows, fp64).

The synthetic layers of ``tests/unit/test_entropy.py`` (5 layers with query scales 0.5 to
3, GQA 2, D 16, image 60 % of the prompt; ``--heterogeneous`` also draws a per-row query
temperature from U[0.25, 1.75]), causal and non-causal, over ``--seeds`` seeds. Prints the
worst relative error |E_sampled - E_exact| / E_exact for each visual-row cap. CPU only:

    python benchmarks/entropy_sample.py --n 2400 --caps 0,128,32 --seeds 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from _util import entropy_request  # noqa: E402 (the tests' own synthetic layers)

from meda_vllm.entropy import cross_modal_entropy_exact, layer_entropy  # noqa: E402
from meda_vllm.modality import entropy_query_positions  # noqa: E402

WINDOW, STRIDE = 32, 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2400)
    ap.add_argument("--caps", default="0,128,32", help="kv_meda_visual_rows values (0: none)")
    ap.add_argument("--seeds", type=int, default=6)
    args = ap.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    print("| N | visual tokens | cap | visual rows | rows alike | sharpness per row |")
    print("|---|---|---|---|---|---|")
    for cap in caps:
        worst = {False: 0.0, True: 0.0}
        for heterogeneous in (False, True):
            for seed in range(args.seeds):
                req = entropy_request(seed, heterogeneous, args.n)
                pos = entropy_query_positions(req.n, req.vis, WINDOW, STRIDE, cap)
                for causal in (False, True):
                    for layer in range(5):
                        exact = cross_modal_entropy_exact(
                            req.queries[layer], req.keys[layer], req.vis, causal=causal
                        )
                        view = req.view(layer, pos)
                        got = layer_entropy(view, WINDOW, STRIDE, causal, cap)
                        worst[heterogeneous] = max(worst[heterogeneous], abs(got - exact) / exact)
        rows = int(req.vis[pos].sum())
        print(
            f"| {args.n} | {int(req.vis.sum())} | {cap or 'none'} | {rows} | "
            f"{worst[False]:.1%} | {worst[True]:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
