"""schemathesis hooks for fuzzing ``leanlm serve`` (``SCHEMATHESIS_HOOKS=schemathesis_hooks``):
positive cases name the served model, so they reach generation instead of stopping at "model not
found"; negative cases are left as generated (an invalid name must be refused). The served name
is ``$LEANLM_FUZZ_MODEL`` (default ``leanlm-default``)."""

from __future__ import annotations

import os
from typing import Any

import schemathesis

MODEL = os.environ.get("LEANLM_FUZZ_MODEL", "leanlm-default")


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = getattr(case, "meta", None)
    if meta is not None and meta.generation.mode.is_negative:
        return case
    if isinstance(case.body, dict) and case.operation.path.startswith("/v1/"):
        case.body["model"] = MODEL
    return case
