"""Relative error of verl's entropy formula and of erc_gym's, against float64 (the doc's table).

Rows of fp32 logits over Qwen's vocabulary (V = 151,936) with one dominant token and a common
offset of 80 (real logits carry one), reference = float64 entropy of the *same* fp32 logits, so
only the formula's error is measured. Run in the verl environment:

    .venv-verl/bin/python examples/verl/entropy_accuracy.py
"""

from __future__ import annotations

import torch
import verl.utils.torch_functional as verl_f

from erc_gym.entropy import entropy_from_logits

VOCAB = 151_936
ROWS = 16
OFFSET = 80.0


def main() -> None:
    torch.manual_seed(0)
    print("| H range (nats) | verl `entropy_from_logits` | erc_gym |")
    print("|---|---|---|")
    for gap in (10.0, 14.0, 18.0, 22.0):  # a larger gap to the other logits: lower entropy
        z = torch.randn(ROWS, VOCAB, dtype=torch.float64)
        z[:, 0] += gap + torch.linspace(0, 2, ROWS, dtype=torch.float64)
        logits = (z + OFFSET).float()
        exact64 = logits.double()
        exact = -(torch.softmax(exact64, -1) * torch.log_softmax(exact64, -1)).sum(-1)
        verl_err = ((verl_f.entropy_from_logits(logits).double() - exact) / exact).abs().max()
        ours_err = ((entropy_from_logits(logits).double() - exact) / exact).abs().max()
        print(f"| [{exact.min():.1e}, {exact.max():.1e}] | {verl_err:.1e} | {ours_err:.1e} |")


if __name__ == "__main__":
    main()
