"""Fine-tune jobs: an upload is checked (`intake`), turned into the trainer's files (`spec`), run
as `python -m finetune run-job` (`runner`), followed through its progress events (`events`) and
registered as a voice when it succeeds (`service.JobService`)."""

from server.jobs.events import PRIVATE_EVENT_FIELDS, JobEvents
from server.jobs.intake import (
    BOUNDS,
    FLAGS,
    MAX_CLIP_S,
    MIN_CLIP_S,
    JobRequest,
    TrainClip,
    hyper_parameters,
    model_kind,
)
from server.jobs.runner import LOG_TAIL, Outcome, TrainerRun
from server.jobs.service import ACTIVE, TERMINAL, JobService
from server.jobs.spec import PREVIEWS

# The names these had when the service was one module (tests and callers use them).
_hyper_parameters = hyper_parameters
_model_kind = model_kind

__all__ = [
    "ACTIVE",
    "BOUNDS",
    "FLAGS",
    "LOG_TAIL",
    "MAX_CLIP_S",
    "MIN_CLIP_S",
    "PREVIEWS",
    "PRIVATE_EVENT_FIELDS",
    "TERMINAL",
    "JobEvents",
    "JobRequest",
    "JobService",
    "Outcome",
    "TrainClip",
    "TrainerRun",
    "_hyper_parameters",
    "_model_kind",
    "hyper_parameters",
    "model_kind",
]
