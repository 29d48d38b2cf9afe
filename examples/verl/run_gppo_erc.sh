#!/usr/bin/env bash
# GPPO + ERC: the authors' second recipe. Same as run_dapo_erc.sh except the loss mode
# (gradient-preserving clip: the clip bounds keep passing gradient, scaled by the bound) and a
# symmetric clip range 0.2 / 0.2. Extra Hydra overrides are passed through.
set -euo pipefail
LOSS_MODE=erc_gppo CLIP_RATIO_HIGH=0.2 exec bash "$(dirname "$0")/run_dapo_erc.sh" "$@"
