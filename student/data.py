"""The training data, in three rooms: ``train_data`` (what a run trains on, opened and checked), ``loader``
(the lockstep loader: the epoch's plan and the views its workers render; its docstring is the stream's
contract) and ``eval_data`` (the validation images). This module keeps their public names together for
callers that import ``student.data``."""

from .eval_data import EvalImages, eval_loader
from .loader import Batch, EpochChannel, EpochIter, EpochPlan, LockstepLoader, RankSteps, ReplayBatches, plan_epoch
from .train_data import TrainData, check_complete, check_probe_drift, open_train_data

__all__ = ["Batch", "EpochChannel", "EpochIter", "EpochPlan", "EvalImages", "LockstepLoader", "RankSteps",
           "ReplayBatches", "TrainData", "check_complete", "check_probe_drift", "eval_loader", "open_train_data",
           "plan_epoch"]
