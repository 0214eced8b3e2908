#!/usr/bin/env bash
# The main job: set up, then the Fashion-MNIST default recipe (float model, mixed precision under a
# weight budget of 2.5 bits per weight with 4-bit activations, report and plots), then the packed
# integer model with its parity and budget check. Extra arguments go to `mixq train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/fmnist-default}
mixq train --recipe fmnist_default --out "$RUN" "$@"
mixq report "$RUN"
mixq export "$RUN" --out "$RUN/model.mixq"
