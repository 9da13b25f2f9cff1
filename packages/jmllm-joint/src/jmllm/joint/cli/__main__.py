"""``python -m jmllm.joint.cli`` runs the CLI."""

import sys

from jmllm.joint.cli import main

sys.exit(main())
