"""``python -m zoo.experiments NAME``."""
import sys

from zoo.experiments import main

sys.exit(main())
