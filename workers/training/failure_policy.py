"""Ray Train's trainer as alexray runs it: a failure that a restart cannot fix ends the run at once.

Ray's default failure policy restarts the worker group after any worker error, up to
``failure.max_failures`` times. A restart helps a crashed process or a lost node; it cannot help
an unreadable shard, data over the skipped-samples ceiling, or a resume the spec refuses: those
raise ``AlexrayError`` on a worker, and each restart would only fail the same way minutes later.

Ray 2.60 has no public hook to choose the policy: ``TorchTrainer.fit`` builds it and hands it to
the controller through the private ``_initialize_and_run_controller``. This module is the one
place that relies on that; if Ray renames it, ``FailFastTrainer`` fails loudly at its first run.
"""

from __future__ import annotations

import json
import logging
import time

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import (
    FailureDecision,
    FailurePolicy,
)
from ray.train.v2.api.exceptions import WorkerGroupError

from alexray_core import goodput
from alexray_core.errors import AlexrayError

log = logging.getLogger("alexray.launch")


def user_errors(error: BaseException) -> dict[int, AlexrayError]:
    """The workers' errors, by rank, that only the user can fix (empty for anything else)."""
    failures = getattr(error, "worker_failures", None) or {}
    return {rank: e for rank, e in sorted(failures.items()) if isinstance(e, AlexrayError)}


class FailFastPolicy(FailurePolicy):
    """Ray's own policy, except that a worker's AlexrayError is raised without a restart.

    It is where the controller learns of each failure, so it records it in the run directory
    (``alexray_core.goodput``): the run's account charges the time after it to recovery."""

    def __init__(self, inner: FailurePolicy, run_dir: str | None = None):
        super().__init__(inner.failure_config)
        self.inner, self.run_dir = inner, run_dir

    def make_decision(self, training_failed_error) -> FailureDecision:
        self._record(training_failed_error)
        if isinstance(training_failed_error, WorkerGroupError) and user_errors(training_failed_error):
            return FailureDecision.RAISE
        return self.inner.make_decision(training_failed_error)

    def _record(self, error) -> None:
        if self.run_dir is None:
            return
        from ray.train.v2._internal.execution.failure_handling.default import (
            _is_preemption_failure,
        )

        from alexray_core.storage import open_storage

        now = time.time()
        try:
            record = {"time": now, "preemption": bool(_is_preemption_failure(error)), "error": type(error).__name__}
            open_storage(self.run_dir).write_bytes(goodput.failure_name(now), json.dumps(record).encode())
        except Exception as e:  # noqa: BLE001 - the account is worth less than the decision
            log.warning("goodput: failure at %.0f not recorded (%s: %s)", now, type(e).__name__, e)


class FailFastTrainer(TorchTrainer):
    def __init__(self, *args, run_dir: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_dir = run_dir

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        policy = controller_init_kwargs.get("failure_policy")
        if not isinstance(policy, FailurePolicy):  # Ray changed the private call this relies on
            raise RuntimeError("Ray Train no longer passes failure_policy to its controller: "
                               "update workers/raytrain.py for this Ray version")
        controller_init_kwargs["failure_policy"] = FailFastPolicy(policy, self.run_dir)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
