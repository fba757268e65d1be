"""`python -m trainer` is the `onnx-trainer` command."""

import sys

from trainer.cli import main

sys.exit(main())
