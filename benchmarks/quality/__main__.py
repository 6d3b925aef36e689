"""`python -m benchmarks.quality`."""

import sys

from .harness import main


sys.exit(main())
