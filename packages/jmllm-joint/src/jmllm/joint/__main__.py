"""``python -m jmllm.joint`` (and ``accelerate launch -m jmllm.joint``) runs the CLI."""

import sys

from jmllm.joint.cli import main

sys.exit(main())
