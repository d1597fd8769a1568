"""``python -m lightning_curvature``: the ``lightning-curvature`` command."""

import sys

from lightning_curvature.cli import main

if __name__ == "__main__":
    sys.exit(main())
