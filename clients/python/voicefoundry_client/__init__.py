"""Python SDK for the voicefoundry speech service.

from voicefoundry_client import Client

with Client("http://127.0.0.1:8000", api_key="vf_...") as client:
    wav = client.speak("Hello there.", "demo-baked")
    job = client.voices.create("newvoice", ["a.wav", "b.wav"], ["Text a.", "Text b."],
                               ref="ref.wav", max_steps=200)
    client.jobs.wait(job.id)
"""

from voicefoundry_client._async import AsyncClient, AsyncJobs, AsyncVoices
from voicefoundry_client._retry import RetryPolicy, parse_retry_after
from voicefoundry_client._sync import Client, Jobs, Voices
from voicefoundry_client.duplex import (
    AudioFrame,
    Control,
    DuplexError,
    DuplexEvent,
    DuplexMetadata,
    DuplexSession,
    TextPiece,
)
from voicefoundry_client.errors import (
    APIConnectionError,
    APITimeoutError,
    BadRequest,
    Conflict,
    DuplexClosed,
    Forbidden,
    InvalidResponse,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    Validation,
    VoicefoundryError,
    WaitTimeout,
)
from voicefoundry_client.models import (
    Health,
    Job,
    JobEvent,
    PhaseEvent,
    ProgressEvent,
    StateEvent,
    Voice,
)
from voicefoundry_client.speak_input import SpeechDone, SpeechEvent, SpeechSegment

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncJobs",
    "AsyncVoices",
    "AudioFrame",
    "BadRequest",
    "Client",
    "Conflict",
    "Control",
    "DuplexClosed",
    "DuplexError",
    "DuplexEvent",
    "DuplexMetadata",
    "DuplexSession",
    "Forbidden",
    "Health",
    "InvalidResponse",
    "Job",
    "JobEvent",
    "JobFailed",
    "Jobs",
    "NotFound",
    "PayloadTooLarge",
    "PhaseEvent",
    "ProgressEvent",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "SpeechDone",
    "SpeechEvent",
    "SpeechSegment",
    "StateEvent",
    "TextPiece",
    "Unauthorized",
    "Validation",
    "Voice",
    "VoicefoundryError",
    "Voices",
    "WaitTimeout",
    "__version__",
    "parse_retry_after",
]
