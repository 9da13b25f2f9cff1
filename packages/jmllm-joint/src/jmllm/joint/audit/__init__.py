"""The hallucination audit at dataset scale: the authors' yes/no study, POPE, CHAIR, and their reports.

Before 0.2 ``jmllm.joint.audit`` was one module, now :mod:`jmllm.joint.audit.run`; what it held is
importable from here as before.
"""

from jmllm.joint.audit import run as _run
from jmllm.joint.audit.run import (
    AUTHORS_QUERY_TEMPLATE,
    PARSE_RULES,
    AnsweredQuestion,
    AuditRecord,
    AuditResult,
    AuditSettings,
    YesNoAuditor,
    ask_one_by_one,
    claim_folder,
    exclusive_folder,
    kv_cache_bytes,
    model_identity,
    parse_answer,
    process_state,
    run_audit,
    settings_digest,
)
from jmllm.joint.compat import forward_to

__all__ = [
    "AUTHORS_QUERY_TEMPLATE",
    "PARSE_RULES",
    "AnsweredQuestion",
    "AuditRecord",
    "AuditResult",
    "AuditSettings",
    "YesNoAuditor",
    "ask_one_by_one",
    "claim_folder",
    "exclusive_folder",
    "kv_cache_bytes",
    "model_identity",
    "parse_answer",
    "process_state",
    "run_audit",
    "settings_digest",
]

__getattr__ = forward_to(_run, __name__)
