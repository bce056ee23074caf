"""POST /voices/import under attack: archive bombs, paths that leave the package, malformed and
unusable packages. Each is refused with problem+json and a reason, and leaves the voice list and
the voices folder as they were."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from litestar.testing import AsyncTestClient
from safetensors.numpy import load_file, save_file

from server.app import create_app
from server.errors import BadRequest, PayloadTooLarge
from server.package_archive import ArchiveLimits, unpack
from server.settings import ModelSpec, Settings
from server.voices import pack_directory

pytestmark = pytest.mark.anyio
MODEL = "tiny"
KIB, MIB = 1024, 1024 * 1024
# Small caps, so bombs stay small and fast; the valid package (~80 KB) fits them.
CAPS = {"package_max_bytes": MIB, "package_max_member_bytes": 512 * KIB, "package_max_members": 16}
LIMITS = ArchiveLimits(MIB, 512 * KIB, 16)


def _settings(data_dir: Path, models: dict[str, ModelSpec], **extra) -> Settings:
    return Settings(data_dir=str(data_dir), models=models, **CAPS, **extra)


@pytest.fixture
async def client(tmp_path, tiny_qwen3_base):
    settings = _settings(tmp_path / "data", {MODEL: ModelSpec(path=str(tiny_qwen3_base))})
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        yield c


def _voices_dir(client: AsyncTestClient) -> Path:
    return Path(client.app.state.settings.data_dir) / "voices"


async def _snapshot(client: AsyncTestClient) -> tuple[list[str], list[str]]:
    names = [v["name"] for v in (await client.get("/voices")).json()["voices"]]
    files = sorted(str(p.relative_to(_voices_dir(client))) for p in _voices_dir(client).rglob("*"))
    return names, files


async def _post(client: AsyncTestClient, archive: bytes, name: str | None = "v", **files):
    parts = {"package": ("p.tar.gz", archive, "application/octet-stream")}
    parts.update({k: (f"{k}.wav", v, "audio/wav") for k, v in files.items()})
    return await client.post("/voices/import", files=parts, data={"name": name} if name else {})


async def _refused(client, archive: bytes, status: int, needle: str, **kwargs) -> dict:
    before = await _snapshot(client)
    response = await _post(client, archive, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status and needle in problem["detail"], problem
    assert ".import-" not in json.dumps(problem)  # no server staging paths
    assert await _snapshot(client) == before  # nothing registered, nothing left on disk
    return problem


def _zip(folder: Path, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for item in sorted(folder.rglob("*")):
            if item.is_file():
                zf.write(item, str(item.relative_to(folder)))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _tar_gz(members: dict[str, bytes], folder: Path | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for item in sorted(folder.rglob("*")) if folder else []:
            tf.add(item, arcname=str(item.relative_to(folder)), recursive=False)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# --- the valid package still imports under the small caps -----------------------------------
async def test_a_valid_package_imports_within_the_caps(client, voice_package):
    for archive in (pack_directory(voice_package), _zip(voice_package)):
        response = await _post(client, archive, name=None)
        assert response.status_code == 201, response.text
        assert (await client.delete("/voices/packaged")).status_code == 200
    assert not [p for p in _voices_dir(client).iterdir() if p.name.startswith(".")]


# --- 1. archive bombs -------------------------------------------------------------------------
ZEROS = bytes(64 * MIB)  # deflates to ~64 KB


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda pkg: _zip(pkg, {"zeros.bin": ZEROS}), "per-member limit"),
        (lambda pkg: _tar_gz({"zeros.bin": ZEROS}, pkg), "per-member limit"),
        # members under the per-member cap that together pass the total
        (
            lambda pkg: _zip(pkg, {f"z{i}.bin": bytes(500 * KIB) for i in range(3)}),
            "unpacks to more than",
        ),
        (
            lambda pkg: _tar_gz({f"z{i}.bin": bytes(500 * KIB) for i in range(3)}, pkg),
            "unpacks to more than",
        ),
        (lambda pkg: _zip(pkg, {f"m{i}": b"" for i in range(2000)}), "members"),
        (lambda pkg: _tar_gz({f"m{i}": b"" for i in range(2000)}, pkg), "members"),
    ],
    ids=["zip-bomb", "tar-gz-bomb", "zip-total", "tar-gz-total", "zip-members", "tar-members"],
)
async def test_archive_bombs_are_refused_with_413(client, voice_package, make, needle):
    archive = make(voice_package)
    assert len(archive) < 2 * MIB  # a small upload...
    await _refused(client, archive, 413, needle)  # ...that would unpack far past the caps


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_unpack_stops_before_writing_past_a_cap(tmp_path, kind):
    """The caps hold while a member streams out: never more than a cap is on disk."""
    big = bytes(64 * MIB)
    many = {f"z{i}.bin": bytes(400 * KIB) for i in range(5)}  # each under 512 KiB, 2 MB in all
    for members, limit in ((big, LIMITS.max_member_bytes), (many, LIMITS.max_bytes)):
        members = {"zeros.bin": members} if isinstance(members, bytes) else members
        if kind == "zip":
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
            archive = buffer.getvalue()
        else:
            archive = _tar_gz(members)
        into = tmp_path / f"{kind}-{limit}"
        into.mkdir()
        with pytest.raises(PayloadTooLarge):
            unpack(archive, into, LIMITS)
        written = sum(p.stat().st_size for p in into.rglob("*") if p.is_file())
        assert written <= limit


def test_a_zip_naming_too_many_members_is_refused_before_anything_is_written(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(60_000):
            zf.writestr(f"m{i}", b"")
    with pytest.raises(PayloadTooLarge, match="more than 16 members"):
        unpack(buffer.getvalue(), tmp_path, LIMITS)
    assert list(tmp_path.iterdir()) == []


def test_tar_links_long_headers_and_escapes_are_refused(tmp_path):
    link = tarfile.TarInfo("voice.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    long_name = tarfile.TarInfo("a" * 200_000)  # a GNU long-name record of 200 KB
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(long_name, io.BytesIO(b""))
    for archive, needle in (
        (_tar_with(link), "link"),
        (buffer.getvalue(), "header record"),
        (_tar_gz({"/etc/evil": b"x"}), "escapes"),
        (_tar_gz({"../evil": b"x"}), "escapes"),
    ):
        into = tmp_path / str(abs(hash(archive)))
        into.mkdir()
        with pytest.raises(BadRequest, match=needle):
            unpack(archive, into, LIMITS)
    assert not (tmp_path / "evil").exists()


def _tar_with(info: tarfile.TarInfo) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        tf.addfile(info)
    return buffer.getvalue()


async def test_an_upload_past_max_upload_bytes_is_refused_and_leaves_nothing(
    tmp_path, tiny_qwen3_base, voice_package
):
    settings = _settings(
        tmp_path / "data", {MODEL: ModelSpec(path=str(tiny_qwen3_base))}, max_upload_bytes=MIB
    )
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        archive = pack_directory(voice_package) + bytes(2 * MIB)
        await _refused(c, archive, 413, "Too Large")  # from Content-Length, before reading


# --- 2 and 3. paths that leave the package; malformed and unusable packages ----------------
def _edit_meta(**changes) -> Callable[[Path], None]:
    def edit(pkg: Path) -> None:
        meta = json.loads((pkg / "voice.json").read_text())
        meta.update(changes)
        (pkg / "voice.json").write_text(json.dumps(meta))

    return edit


def _edit_adapter_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(pkg: Path) -> None:
        file = pkg / "adapter" / "adapter_config.json"
        config = json.loads(file.read_text())
        # allow_nan: the finding's `alpha: NaN` is what Python's json writes for a NaN
        file.write_text(json.dumps(change(config), allow_nan=True))

    return edit


def _set_lora(**values) -> Callable[[Path], None]:
    return _edit_adapter_config(lambda c: {**c, "lora": {**c["lora"], **values}})


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda pkg: (pkg / name).write_bytes(data)


def _embedding(value: np.ndarray) -> Callable[[Path], None]:
    return lambda pkg: save_file({"embedding": value}, str(pkg / "speaker_embedding.safetensors"))


def _rank_mismatch(pkg: Path) -> None:
    """Tensors of rank 4 under a config saying rank 2."""
    _set_lora(rank=2)(pkg)


def _lora_nan(pkg: Path) -> None:
    file = pkg / "adapter" / "adapters.safetensors"
    tensors = load_file(str(file))
    name = next(k for k in tensors if k.endswith(".lora_b"))
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, str(file))


def _clone_voice(ref: bytes) -> Callable[[Path], None]:
    """An adapter voice conditioned on its ref.wav (no baked embedding)."""

    def edit(pkg: Path) -> None:
        (pkg / "speaker_embedding.safetensors").unlink()
        _edit_meta(embedding=None, slot=None, conditioning={"speaker": "ref_clip"})(pkg)
        (pkg / "ref.wav").write_bytes(ref)

    return edit


def _only_meta_and_blob(pkg: Path) -> None:
    shutil.rmtree(pkg / "adapter")
    (pkg / "speaker_embedding.safetensors").unlink()
    _edit_meta(adapter=None, embedding=None, slot=None, conditioning={"speaker": "none"})(pkg)
    (pkg / "blob.bin").write_bytes(np.random.default_rng(0).bytes(300 * KIB))


CASES = {
    # 2. paths that are not plain names inside the package: the same 422 whether they exist
    "adapter-dotdot": (_edit_meta(adapter="../other-voice/adapter"), 422, "relative file name"),
    "adapter-absolute": (_edit_meta(adapter="/etc"), 422, "relative file name"),
    "embedding-etc-passwd": (_edit_meta(embedding="/etc/passwd"), 422, "relative file name"),
    "embedding-missing-abs": (_edit_meta(embedding="/no/such/file"), 422, "relative file name"),
    "embedding-registry": (_edit_meta(embedding="../../registry.sqlite3"), 422, "relative"),
    "adapter-is-a-file": (_edit_meta(adapter="voice.json"), 422, "not a folder"),
    # 3. malformed packages (were 500s)
    "rank-0": (_set_lora(rank=0), 422, "rank"),
    "rank-mismatch": (_rank_mismatch, 422, "does not match lora.rank 2"),
    "adapter-config-list": (_edit_adapter_config(lambda c: [c]), 422, "adapter_config.json"),
    "alpha-nan": (_set_lora(alpha=float("nan")), 422, "alpha"),
    "alpha-negative": (_set_lora(alpha=-8.0), 422, "alpha"),
    "lora-nan": (_lora_nan, 422, "not finite"),
    "voice-json-list": (_write("voice.json", b"[1, 2]"), 422, "JSON object"),
    "voice-json-not-json": (_write("voice.json", b"{nope"), 422, "not valid JSON"),
    "slot-abc": (_edit_meta(slot="abc"), 422, "slot"),
    "slot-negative": (_edit_meta(slot=-1), 422, "slot"),
    "adapter-5": (_edit_meta(adapter=5), 422, "adapter"),
    "language-rows-garbage": (_edit_meta(language_rows=[{"row": "x"}]), 422, "language_rows"),
    # 3. unusable packages (were registered)
    "embedding-nan": (_embedding(np.full(64, np.nan, np.float32)), 422, "finite"),
    "embedding-wrong-width": (_embedding(np.zeros(7, np.float32)), 422, "64 finite numbers"),
    "embedding-garbage": (_write("speaker_embedding.safetensors", b"junk"), 422, "embedding"),
    "garbage-ref-clip": (_clone_voice(b"RIFF....not audio"), 422, "cannot speak"),
    "meta-and-blob": (_only_meta_and_blob, 422, "does not name: blob.bin"),
    "stray-file": (_write("extra.bin", b"x" * 100), 422, "does not name: extra.bin"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_packages_are_refused_and_leave_nothing(client, voice_package, tmp_path, case):
    edit, status, needle = CASES[case]
    package = tmp_path / "package"
    shutil.copytree(voice_package, package)
    edit(package)
    await _refused(client, pack_directory(package), status, needle)


async def test_voice_json_without_a_name_needs_the_name_field(client, voice_package, tmp_path):
    package = tmp_path / "package"
    shutil.copytree(voice_package, package)
    meta = json.loads((package / "voice.json").read_text())
    del meta["name"]
    (package / "voice.json").write_text(json.dumps(meta))
    await _refused(client, pack_directory(package), 422, "no name", name=None)


async def test_a_garbage_ref_clip_upload_is_refused(client, voice_package, tmp_path):
    package = tmp_path / "package"
    shutil.copytree(voice_package, package)
    _clone_voice(b"")(package)
    (package / "ref.wav").unlink()  # the clip comes as the form's ref_clip instead
    await _refused(client, pack_directory(package), 422, "cannot speak", ref_clip=b"garbage")


async def test_a_path_outside_answers_the_same_whether_it_exists(client, voice_package, tmp_path):
    details = []
    for target in ("/etc/passwd", "/etc/no-such-file-here"):
        package = tmp_path / target.replace("/", "_")
        shutil.copytree(voice_package, package)
        _edit_meta(embedding=target)(package)
        problem = await _refused(client, pack_directory(package), 422, "relative")
        details.append(problem["detail"].replace(target, "<target>"))
    assert details[0] == details[1]


# --- CSM context clips -------------------------------------------------------------------------
def _csm_package(folder: Path, audio: str, clip: bytes) -> Path:
    from finetune.audio import write_wav

    folder.mkdir()
    meta = {
        "format": "voicefoundry.voice/1",
        "family": "csm",
        "name": "ctx",
        "speaker_id": 0,
        "context": [{"audio": audio, "text": "Hello there."}],
    }
    (folder / "voice.json").write_text(json.dumps(meta))
    if clip:
        (folder / "clip.wav").write_bytes(clip)
    else:
        write_wav(folder / "clip.wav", np.zeros(24_000, np.float32) + 0.01)
    return folder


async def test_csm_context_paths_are_confined_and_clips_must_decode(tmp_path, tiny_csm):
    settings = _settings(tmp_path / "data", {"csm": ModelSpec(path=str(tiny_csm), family="csm")})
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        for i, (audio, clip, needle) in enumerate(
            (
                ("../../registry.sqlite3", b"", "relative file name"),
                ("/etc/passwd", b"", "relative file name"),
                ("clip.wav", b"not audio at all", "cannot be used"),
            )
        ):
            package = _csm_package(tmp_path / f"csm{i}", audio, clip)
            await _refused(c, pack_directory(package), 422, needle)
        good = _csm_package(tmp_path / "good", "clip.wav", b"")
        assert (await _post(c, pack_directory(good))).status_code == 201


# --- PersonaPlex (duplex) voice prompts ---------------------------------------------------------
async def test_duplex_voice_prompt_is_confined_and_must_decode(
    tmp_path, tiny_personaplex, loaded_personaplex
):
    from tests.duplex_helpers import write_duplex_package

    base = write_duplex_package(loaded_personaplex, tmp_path / "duplex")
    models = {"pp": ModelSpec(path=str(tiny_personaplex), family="personaplex")}
    settings = Settings(data_dir=str(tmp_path / "data"), models=models)
    async with AsyncTestClient(create_app(settings), timeout=300) as c:
        details = []
        for i, (prompt, needle) in enumerate(
            (
                ("/etc/passwd", "relative file name"),
                ("/etc/no-such-file-here", "relative file name"),
                ("../../registry.sqlite3", "relative file name"),
                ("missing.wav", "not a file of the package"),
                ("voice_prompt.wav", "cannot be decoded"),
            )
        ):
            package = tmp_path / f"duplex{i}"
            shutil.copytree(base, package)
            _edit_meta(voice_prompt=prompt)(package)
            if needle == "cannot be decoded":
                (package / "voice_prompt.wav").write_bytes(b"RIFF garbage")
            problem = await _refused(c, pack_directory(package), 422, needle)
            details.append(problem["detail"].replace(prompt, "<target>"))
        assert details[0] == details[1]  # whether the file outside exists or not
        assert (await _post(c, pack_directory(base))).status_code == 201
