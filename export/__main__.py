"""``python -m export`` is ``python -m export.onnx``."""
import sys

from export.onnx import main

sys.exit(main())
