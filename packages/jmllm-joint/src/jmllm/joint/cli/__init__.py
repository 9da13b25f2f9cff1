"""Command line: ``jmllm-joint demo | chat | describe | detect`` (and plug-in subcommands).

The package's parts: :mod:`jmllm.joint.cli.common` (the helpers every subcommand shares: errors,
the built-in models behind ``--tiny``, the model options, loading J; it imports no subcommand)
and :mod:`jmllm.joint.cli.commands` (the core subcommands, the parser with its plug-ins, and
:func:`main`). Every name of both is importable from here, as before the split.

Extending: for every module of :data:`PLUGINS` that exists, :func:`build_parser` calls its
``register(subparsers, common_args)``; a plug-in imports what it shares from
:mod:`jmllm.joint.cli.common`, never from this package (which imports the plug-ins).
"""

from __future__ import annotations

import importlib  # noqa: F401  (jmllm.joint.cli.importlib, as before the split)

from jmllm.joint.cli.commands import (
    PLUGINS,
    build_parser,
    cmd_chat,
    cmd_demo,
    cmd_describe,
    cmd_detect,
    main,
)
from jmllm.joint.cli.common import (
    DEFAULT_QUESTION,
    DEMO_QUERIES,
    DEMO_QUESTIONS,
    PROG,
    RANDOM_WEIGHTS_NOTE,
    REAL_CHECKPOINTS_HINT,
    TOY_DEMO_QUERIES,
    TOY_DEMO_QUESTIONS,
    TOY_DEMO_SCENE,
    TOY_WORLD_ENV,
    TOY_WORLD_NOTE,
    CliError,
    CommonArguments,
    add_common_arguments,
    builtin_sources,
    builtin_vocabulary,
    common_arguments,
    detection_arguments,
    generation_arguments,
    generation_kwargs,
    image_arg,
    load_builtin_model,
    load_model,
    nms_of,
    notice,
    out_dir,
    output_folder,
    queries_of,
    template_argument,
    tiny_cache_dir,
)
from jmllm.joint.cli.common import (
    _add_common_arguments as _add_common_arguments,
)
from jmllm.joint.cli.common import (
    _detection_arguments as _detection_arguments,
)
from jmllm.joint.cli.common import (
    _generation_arguments as _generation_arguments,
)
from jmllm.joint.cli.common import (
    _generation_kwargs as _generation_kwargs,
)
from jmllm.joint.cli.common import (
    _image_arg as _image_arg,
)
from jmllm.joint.cli.common import (
    _nms as _nms,
)
from jmllm.joint.cli.common import (
    _out_dir as _out_dir,
)
from jmllm.joint.cli.common import (
    _queries as _queries,
)

__all__ = [
    "DEFAULT_QUESTION",
    "DEMO_QUERIES",
    "DEMO_QUESTIONS",
    "PLUGINS",
    "PROG",
    "RANDOM_WEIGHTS_NOTE",
    "REAL_CHECKPOINTS_HINT",
    "TOY_DEMO_QUERIES",
    "TOY_DEMO_QUESTIONS",
    "TOY_DEMO_SCENE",
    "TOY_WORLD_ENV",
    "TOY_WORLD_NOTE",
    "CliError",
    "CommonArguments",
    "add_common_arguments",
    "build_parser",
    "builtin_sources",
    "builtin_vocabulary",
    "cmd_chat",
    "cmd_demo",
    "cmd_describe",
    "cmd_detect",
    "common_arguments",
    "detection_arguments",
    "generation_arguments",
    "generation_kwargs",
    "image_arg",
    "load_builtin_model",
    "load_model",
    "main",
    "nms_of",
    "notice",
    "out_dir",
    "output_folder",
    "queries_of",
    "template_argument",
    "tiny_cache_dir",
]
