"""``cdc-bridge verify``: reconcile the stream against the tables (README "Delivery
guarantees"). :mod:`.fold` and :mod:`.report` are pure; :mod:`.run` orders the steps,
:mod:`.stream` reads the stream, :mod:`.table` the tables, :mod:`.repair` republishes,
:mod:`.results` keeps the last result for ``cdc-bridge status``."""

from cdc_bridge.verify.report import TableResult, VerifyResult
from cdc_bridge.verify.results import RESULT_BUCKET, load_last_result
from cdc_bridge.verify.run import VerifyOptions, run_verify

__all__ = [
    "RESULT_BUCKET",
    "TableResult",
    "VerifyOptions",
    "VerifyResult",
    "load_last_result",
    "run_verify",
]
