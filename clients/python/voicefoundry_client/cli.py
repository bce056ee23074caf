"""The client commands (`say`, `voices ...`, `jobs ...`), built only on the SDK.

`register(subparsers)` adds them to another argparse CLI (the `voicefoundry` script does);
`main()` is the standalone `voicefoundry-client` script. Records print as JSON on stdout;
lists print as a table on a terminal and as JSON otherwise (`--json` forces JSON). Every
failure prints one `error: ...` line on stderr and exits non-zero.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from voicefoundry_client._core import DEFAULT_URL
from voicefoundry_client._sync import Client
from voicefoundry_client.errors import JobFailed, VoicefoundryError
from voicefoundry_client.models import Job, Voice

Handler = Callable[[argparse.Namespace], int]
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".oga", ".opus")
FORMATS = ("wav", "flac", "pcm", "mp3", "opus", "aac")  # what the server encodes
EXIT_FAILED = 1  # the server refused, or the job failed
EXIT_USAGE = 2  # a bad local input: missing file, mismatched transcripts
CLI_TIMEOUT_S = 600.0


# --- argument parsing -------------------------------------------------------------------------
def _connection_flags(parser: argparse.ArgumentParser, *, leaf: bool) -> None:
    """--url / --api-key on a command group (defaults from the environment) and again on each
    leaf (SUPPRESS: only a value actually given there overrides), so both orders work."""
    url_default = argparse.SUPPRESS if leaf else os.environ.get("VOICEFOUNDRY_URL", DEFAULT_URL)
    key_default = argparse.SUPPRESS if leaf else os.environ.get("VOICEFOUNDRY_API_KEY")
    parser.add_argument(
        "--url", default=url_default, help="server URL (env VOICEFOUNDRY_URL; %(default)s)"
    )
    parser.add_argument("--api-key", default=key_default, help="API key (env VOICEFOUNDRY_API_KEY)")


def _leaf(sub: Any, name: str, handler: Handler, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, **kwargs)
    _connection_flags(parser, leaf=True)
    parser.set_defaults(handler=_guarded(handler))
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `say`, `voices list|get|create|clone|delete|import` and `jobs list|watch|cancel`."""
    say = subparsers.add_parser("say", help="speak text with a voice of a running server")
    _connection_flags(say, leaf=False)
    say.add_argument("text")
    say.add_argument("-s", "--speaker", required=True)
    say.add_argument("-o", "--output", required=True, help="audio file to write ('-': stdout)")
    say.add_argument("--format", choices=FORMATS, help="default: from the output suffix, or wav")
    say.add_argument("--language")
    say.add_argument("--seed", type=int)
    say.add_argument("--temperature", type=float)
    say.add_argument("--top-p", type=float)
    say.add_argument("--top-k", type=int)
    say.add_argument("--max-tokens", type=int)
    say.add_argument("--stream", action="store_true", help="write audio as it arrives")
    say.set_defaults(handler=_guarded(_say))

    voices = subparsers.add_parser("voices", help="the voices of a running server")
    _connection_flags(voices, leaf=False)
    vsub = voices.add_subparsers(dest="voices_command", required=True)
    listing = _leaf(vsub, "list", _voices_list, help="list the voices")
    listing.add_argument("--json", action="store_true", help="JSON even on a terminal")
    get = _leaf(vsub, "get", _voices_get, help="one voice as JSON")
    get.add_argument("name")
    create = _leaf(vsub, "create", _voices_create, help="fine-tune a new voice from clips")
    create.add_argument("name")
    create.add_argument(
        "--clips", nargs="+", required=True, type=Path, help="audio files or folders of them"
    )
    texts = create.add_mutually_exclusive_group()
    texts.add_argument(
        "--transcripts",
        type=Path,
        help="JSON (list, or file name -> text) or a text file with one line per clip",
    )
    texts.add_argument(
        "--transcript", action="append", help="one per clip, in --clips order (repeat)"
    )
    create.add_argument("--strategy", choices=("speaker", "language", "duplex"), default="speaker")
    create.add_argument("--ref", action="append", type=Path, help="reference clip (repeat)")
    create.add_argument(
        "--user-clips", nargs="+", type=Path, help="duplex: the user's side of each clip"
    )
    create.add_argument("--text-prompt", help="duplex: the persona prompt")
    create.add_argument("--base-model")
    create.add_argument("--language")
    create.add_argument("--lora-rank", type=int)
    create.add_argument("--epochs", type=int)
    create.add_argument("--max-steps", type=int)
    create.add_argument("--learning-rate", type=float)
    create.add_argument("--batch-size", type=int)
    create.add_argument("--wait", action="store_true", help="follow the job until it ends")
    create.add_argument("--timeout", type=float, help="with --wait: give up after N seconds")
    clone = _leaf(vsub, "clone", _voices_clone, help="a voice from one clip, no training")
    clone.add_argument("name")
    clone.add_argument("--ref", required=True, type=Path, help="the reference clip (2-30 s)")
    clone.add_argument("--text", help="the clip's transcript: clone in context (ICL)")
    clone.add_argument("--base-model")
    clone.add_argument("--language")
    delete = _leaf(vsub, "delete", _voices_delete, help="delete a voice")
    delete.add_argument("name")
    imp = _leaf(vsub, "import", _voices_import, help="register a `voicefoundry bake` package")
    imp.add_argument("package", type=Path, help="package directory, .tar.gz or .zip")
    imp.add_argument("--name")
    imp.add_argument("--base-model")
    imp.add_argument("--ref-clip", type=Path)

    jobs = subparsers.add_parser("jobs", help="fine-tune jobs of a running server")
    _connection_flags(jobs, leaf=False)
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    jlist = _leaf(jsub, "list", _jobs_list, help="list the jobs")
    jlist.add_argument("--json", action="store_true", help="JSON even on a terminal")
    watch = _leaf(jsub, "watch", _jobs_watch, help="follow a job; exit 0 on success, 1 on failure")
    watch.add_argument("job_id")
    watch.add_argument("--timeout", type=float, help="give up after N seconds")
    cancel = _leaf(jsub, "cancel", _jobs_cancel, help="cancel a job")
    cancel.add_argument("job_id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voicefoundry-client", description="Talk to a running voicefoundry server."
    )
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


# --- plumbing ---------------------------------------------------------------------------------
def _guarded(handler: Handler) -> Handler:
    """One `error: ...` line and a non-zero exit instead of a traceback."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except VoicefoundryError as exc:
            _error(str(exc))
        except (OSError, ValueError, TypeError) as exc:
            _error(str(exc))
            return EXIT_USAGE
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
        return EXIT_FAILED

    return run


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, api_key=args.api_key or None, timeout=CLI_TIMEOUT_S)


def _print_record(record: msgspec.Struct) -> None:
    print(json.dumps(msgspec.to_builtins(record), indent=2))


def _as_table(args: argparse.Namespace) -> bool:
    return not getattr(args, "json", False) and sys.stdout.isatty()


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# --- say --------------------------------------------------------------------------------------
def _say(args: argparse.Namespace) -> int:
    options = {
        "language": args.language,
        "seed": args.seed,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_tokens": args.max_tokens,
    }
    with _client(args) as client:
        if args.output == "-":
            fmt = args.format or "wav"
            if args.stream:
                for chunk in client.speak_stream(args.text, args.speaker, format=fmt, **options):
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
            else:
                sys.stdout.buffer.write(
                    client.speak(args.text, args.speaker, format=fmt, **options)
                )
            return 0
        path = client.speak_to_file(
            args.output,
            args.text,
            args.speaker,
            format=args.format,
            stream=args.stream,
            **options,
        )
    print(f"wrote {path} ({path.stat().st_size} bytes)", file=sys.stderr)
    return 0


# --- voices -----------------------------------------------------------------------------------
def _voices_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        voices = client.voices.list()
    if _as_table(args):
        rows = [[v.name, v.kind, v.base_model, _voice_flags(v)] for v in voices]
        _table(rows, ["NAME", "KIND", "BASE MODEL", "HAS"])
    else:
        print(json.dumps({"voices": msgspec.to_builtins(voices)}, indent=2))
    return 0


def _voice_flags(voice: Voice) -> str:
    flags = [f for f, on in (("adapter", voice.has_adapter), ("ref", voice.has_ref_clip)) if on]
    return ",".join(flags) or "-"


def _voices_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_record(client.voices.get(args.name))
    return 0


def _voices_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_record(client.voices.delete(args.name))
    return 0


def _voices_clone(args: argparse.Namespace) -> int:
    with _client(args) as client:
        voice = client.voices.clone(
            args.name,
            args.ref,
            text=args.text,
            base_model=args.base_model,
            language=args.language,
        )
    _print_record(voice)
    return 0


def _voices_import(args: argparse.Namespace) -> int:
    with _client(args) as client:
        voice = client.voices.import_package(
            args.package, name=args.name, base_model=args.base_model, ref_clip=args.ref_clip
        )
    _print_record(voice)
    return 0


def expand_clips(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a folder stands for the audio files inside it, sorted by name."""
    clips: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise ValueError(f"{path}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
            clips.extend(found)
        elif path.is_file():
            clips.append(path)
        else:
            raise FileNotFoundError(f"no such clip: {path}")
    return clips


def read_transcripts(path: Path) -> list[str] | dict[str, str]:
    """A JSON list / {file name: text} mapping, or plain text with one line per clip."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if isinstance(data, list) and all(isinstance(t, str) for t in data):
            return data
        if isinstance(data, dict) and all(isinstance(t, str) for t in data.values()):
            return data
        raise ValueError(f"{path}: expected a list of texts or a file name -> text mapping")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _voices_create(args: argparse.Namespace) -> int:
    clips = expand_clips(args.clips)
    transcripts: list[str] | dict[str, str] | None
    if args.transcripts is not None:
        transcripts = read_transcripts(args.transcripts)
    else:
        transcripts = args.transcript  # None: CLIP.txt beside each clip
    hyper = {
        "lora_rank": args.lora_rank,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
    }
    with _client(args) as client:
        job = client.voices.create(
            args.name,
            clips,
            transcripts,
            strategy=args.strategy,
            ref=args.ref,
            base_model=args.base_model,
            language=args.language,
            user_clips=expand_clips(args.user_clips) if args.user_clips else None,
            text_prompt=args.text_prompt,
            **{k: v for k, v in hyper.items() if v is not None},
        )
        print(f"job {job.id} {job.state} for voice {job.name!r}", file=sys.stderr)
        if not args.wait:
            _print_record(job)
            return 0
        return _follow(client, job.id, args.timeout)


# --- jobs -------------------------------------------------------------------------------------
def _jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.jobs.list()
    if _as_table(args):
        rows = [[j.id, j.name, j.state, _job_steps(j), j.created_at or ""] for j in jobs]
        _table(rows, ["ID", "NAME", "STATE", "STEP", "CREATED"])
    else:
        print(json.dumps({"jobs": msgspec.to_builtins(jobs)}, indent=2))
    return 0


def _job_steps(job: Job) -> str:
    return f"{job.step}/{job.total_steps}" if job.total_steps else str(job.step or "-")


def _jobs_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _follow(client, args.job_id, args.timeout)


def _follow(client: Client, job_id: str, timeout: float | None) -> int:
    """Progress on stderr, the final job as JSON on stdout; 0 succeeded, 1 failed/cancelled."""
    try:
        job = client.jobs.wait(job_id, progress=True, timeout=timeout)
    except JobFailed as exc:  # the progress display already printed the reason
        _print_record(exc.job)
        return EXIT_FAILED
    _print_record(job)
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.jobs.cancel(args.job_id)
    print(f"job {job.id}: cancel requested (now {job.state})", file=sys.stderr)
    _print_record(job)
    return 0
