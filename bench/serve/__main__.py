"""``python -m bench.serve``: see :mod:`bench.serve`."""
import sys

from bench.serve.cli import main

sys.exit(main())
