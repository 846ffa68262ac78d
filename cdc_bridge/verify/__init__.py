"""``cdc-bridge verify``: reconcile the stream against the tables (README "Delivery
guarantees"). :mod:`.fold` and :mod:`.report` are pure; :mod:`.run` does the I/O."""

from cdc_bridge.verify.report import TableResult, VerifyResult
from cdc_bridge.verify.run import RESULT_BUCKET, VerifyOptions, load_last_result, run_verify

__all__ = [
    "RESULT_BUCKET",
    "TableResult",
    "VerifyOptions",
    "VerifyResult",
    "load_last_result",
    "run_verify",
]
