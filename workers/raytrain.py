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

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
from ray.train.v2.api.exceptions import WorkerGroupError

from alexray_core.errors import AlexrayError


def user_errors(error: BaseException) -> dict[int, AlexrayError]:
    """The workers' errors, by rank, that only the user can fix (empty for anything else)."""
    failures = getattr(error, "worker_failures", None) or {}
    return {rank: e for rank, e in sorted(failures.items()) if isinstance(e, AlexrayError)}


class FailFastPolicy(FailurePolicy):
    """Ray's own policy, except that a worker's AlexrayError is raised without a restart."""

    def __init__(self, inner: FailurePolicy):
        super().__init__(inner.failure_config)
        self.inner = inner

    def make_decision(self, training_failed_error) -> FailureDecision:
        if isinstance(training_failed_error, WorkerGroupError) and user_errors(training_failed_error):
            return FailureDecision.RAISE
        return self.inner.make_decision(training_failed_error)


class FailFastTrainer(TorchTrainer):
    def _initialize_and_run_controller(self, **controller_init_kwargs):
        policy = controller_init_kwargs.get("failure_policy")
        if not isinstance(policy, FailurePolicy):  # Ray changed the private call this relies on
            raise RuntimeError("Ray Train no longer passes failure_policy to its controller: "
                               "update workers/raytrain.py for this Ray version")
        controller_init_kwargs["failure_policy"] = FailFastPolicy(policy)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
