"""``python -m jmllm.bias`` (and ``accelerate launch -m jmllm.bias``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
