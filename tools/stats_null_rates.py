"""The false-positive table of docs/statistics.md: null comparisons at 3, 5 and 10 seeds.

For each null shape (the per-seed scores of tests/test_stats.py) and seed count, two groups are
drawn from the same distribution; the script prints the share of 95% intervals that exclude 0
for the paired t-interval the reports use (20,000 draws) and, in brackets, for the unpaired
percentile bootstrap of the IQM difference that earlier reports used (400 draws).

    python tools/stats_null_rates.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_stats import NULL_SHAPES, null_draws

from erc_gym.lab import stats


def main() -> None:
    rng = np.random.default_rng(123)
    print("| null shape | n = 3 | n = 5 | n = 10 |")
    print("|---|---|---|---|")
    for shape in NULL_SHAPES:
        cells = []
        for n in (3, 5, 10):
            a, b = null_draws(shape, n, 20_000, rng), null_draws(shape, n, 20_000, rng)
            _, lo, hi, _ = stats.paired_t(a, b)
            t_rate = float(((lo > 0) | (hi < 0)).mean())
            boot = 0
            for i in range(400):
                _, low, high = stats.diff_ci(a[i], b[i], reps=1000, seed=i)
                boot += (low > 0) or (high < 0)
            cells.append(f"{t_rate:.1%} ({boot / 400:.0%})")
        print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
