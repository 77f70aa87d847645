"""`python -m clicklens VERB ...` is the `clicklens` console script."""

import sys

from clicklens.cli import main

sys.exit(main())
