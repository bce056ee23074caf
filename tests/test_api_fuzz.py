"""Property-based fuzzing of every HTTP route of a real server (schemathesis over the served
OpenAPI document): valid and invalid bodies, multipart parts, path and query parameters and
auth headers. Never a 5xx, every error is problem+json, and the server is ready afterwards.

The operations come from the document the app serves, and every HTTP route the app has must be
in it, so a new route is fuzzed without touching this file. Examples are derandomized (same
cases on every run) and bounded per route.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from litestar.routes import HTTPRoute
from schemathesis import GenerationMode

from server import console
from server.app import create_app
from server.auth import KeyStore
from server.settings import Settings
from tests.service_helpers import server_process

# Examples per route and generation mode (valid, invalid): most where there is most to vary.
EXAMPLES_WITH_BODY = 30
EXAMPLES_WITH_PARAMETERS = 12
EXAMPLES_WITHOUT_INPUT = 8
TIMEOUT_S = 60.0
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
HEADER_VALUE = st.text(PRINTABLE, max_size=80).map(str.strip)  # what an HTTP client may send
CONTENT_TYPES = (
    "application/json",
    "text/plain",
    "multipart/form-data",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
)


def _app_operations() -> list[tuple[str, str]]:
    """Every (method, path) the app routes over HTTP, in OpenAPI's path spelling."""
    app = create_app(Settings(data_dir="/nonexistent-fuzz"))
    out = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue  # /duplex: a WebSocket (tests/test_duplex_server.py)
        if route.path == "/" or route.path.startswith(f"{console.PREFIX}/"):
            continue  # the web console's page and files (tests/test_console_files.py)
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        out |= {(method, path) for method in route.methods if method not in ("OPTIONS", "HEAD")}
    return sorted(out)


OPERATIONS = _app_operations()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_custom: Path):
    root = tmp_path_factory.mktemp("fuzz")
    store = KeyStore([])
    speak_key, _ = store.add("speak", label="fuzz speak")
    admin_key, _ = store.add("admin", label="fuzz admin")
    store.save(root / "keys.json")
    config = {
        "data_dir": str(root / "data"),
        "models": {"m": {"path": str(tiny_qwen3_custom)}},
        "api_keys_file": str(root / "keys.json"),
        # Small enough that a valid /speak is quick, large enough that every path is taken.
        "max_tokens_per_sentence": 3,
        "max_text_chars": 400,
        "max_json_bytes": 64 * 1024,
        "max_upload_bytes": 4 * 1024 * 1024,
    }
    with server_process(config) as url:
        key = {"X-API-Key": speak_key}
        answer = httpx.get(f"{url}/schema/openapi.json", headers=key, timeout=30)
        assert answer.status_code == 200, answer.text
        document = answer.json()
        voices = httpx.get(f"{url}/voices", headers=key, timeout=30).json()["voices"]
        speakers = sorted(v["name"] for v in voices)
        models = sorted({v["base_model"] for v in voices})
        known: dict[str, list[str | None]] = {"speaker": [*speakers], "voice": [*speakers]}
        known["name"] = [*speakers]
        known |= {"model": models, "base_model": models}
        # Fields whose valid values the server decides at run time: left out of those cases.
        known |= {"language": [None], "instruct": [None]}
        yield url, document, {"speak": speak_key, "admin": admin_key}, known


def _auth_headers(keys: dict[str, str]) -> st.SearchStrategy[dict[str, str]]:
    """A real key of either scope in either header (three cases in four, so most requests get
    past the guards), else no key, a wrong or a malformed one."""
    real = st.sampled_from([keys["admin"], keys["admin"], keys["speak"]])
    garbage = HEADER_VALUE
    valid = st.one_of(
        real.map(lambda k: {"Authorization": f"Bearer {k}"}), real.map(lambda k: {"X-API-Key": k})
    )
    invalid = st.one_of(
        st.just({}),
        st.just({"Authorization": "Bearer vf_00000000_wrong"}),
        garbage.map(lambda g: {"Authorization": g}),
        garbage.map(lambda g: {"X-API-Key": g}),
    )
    return st.integers(0, 3).flatmap(lambda i: valid if i < 3 else invalid)


def _headers(keys: dict[str, str]) -> st.SearchStrategy[dict[str, str]]:
    """The auth headers, now and then with a content type that does not match the body."""
    content_type = st.one_of(st.sampled_from(CONTENT_TYPES), HEADER_VALUE)
    other = st.one_of(st.just({}), content_type.map(lambda c: {"Content-Type": c}))
    return st.tuples(_auth_headers(keys), other, st.integers(0, 5)).map(
        lambda t: {**t[0], **t[1]} if t[2] == 0 else t[0]
    )


def _noise_query() -> st.SearchStrategy[dict[str, str]]:
    """Query parameters no route declares (and `api_key`, which HTTP routes do not read)."""
    names = st.one_of(
        st.sampled_from(["api_key", "format", "stream"]),
        st.text(PRINTABLE, min_size=1, max_size=12),
    )
    return st.dictionaries(names, st.text(PRINTABLE, max_size=40), max_size=2)


def _with_known_names(
    draw: Callable[[st.SearchStrategy[Any]], Any], case: Any, known: dict[str, list[str | None]]
) -> Any:
    """Half the cases name a speaker, model or voice the server has (in the body and the path)
    and leave out what only the server knows (languages), so valid requests go past the lookups
    into synthesis too."""
    if draw(st.booleans()):
        for values in (case.path_parameters, case.body):
            if isinstance(values, dict):
                for key in sorted(values.keys() & known.keys()):
                    value = draw(st.sampled_from(known[key]))
                    if value is None:
                        del values[key]
                    else:
                        values[key] = value
    return case


def check_response(response: Any, label: str) -> None:
    status = response.status_code
    assert status < 500, f"{label}: {status} {response.text[:2000]}"
    if status < 400:
        return
    headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
    content_type = headers.get("content-type", "")
    assert content_type.startswith("application/problem+json"), (label, status, content_type)
    body = json.loads(response.content)
    assert body["status"] == status, (label, body)
    assert isinstance(body["title"], str) and body["title"], (label, body)
    assert isinstance(body["detail"], str) and body["detail"], (label, body)


def test_every_http_route_is_in_the_served_document(served):
    _, document, _, _ = served
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method.upper() in ("GET", "POST", "PUT", "PATCH", "DELETE")
    }
    assert set(OPERATIONS) <= documented, set(OPERATIONS) - documented


def test_the_document_describes_the_request_bodies_with_their_bounds(served):
    _, document, _, _ = served
    paths = document["paths"]

    def body(path: str, media_type: str) -> dict[str, Any]:
        return paths[path]["post"]["requestBody"]["content"][media_type]["schema"]

    speak = body("/speak", "application/json")
    assert speak["required"] == ["speaker", "text"]
    assert speak["additionalProperties"] is False
    seed = speak["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (0, 2**32 - 1)
    openai = body("/v1/audio/speech", "application/json")
    assert openai["properties"]["speed"]["minimum"] == 0.25
    assert "aac" in openai["properties"]["response_format"]["enum"]
    assert openai["properties"]["stream_format"]["anyOf"][0]["enum"] == ["audio", "sse"]
    job = body("/voices", "multipart/form-data")
    assert job["required"] == ["name"]  # clips: the fine-tune strategies; design takes none
    assert "design" in job["properties"]["strategy"]["enum"]
    assert job["properties"]["description"]["maxLength"] == 2000
    assert job["properties"]["clips"]["items"]["format"] == "binary"
    assert job["properties"]["lora_rank"]["maximum"] == 64
    package = body("/voices/import", "multipart/form-data")
    assert package["required"] == ["package"]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_route(served, method: str, path: str):
    url, document, keys, known = served
    schema = schemathesis.openapi.from_dict(document)
    operation = schema[path][method]
    modes = [GenerationMode.POSITIVE]
    examples = EXAMPLES_WITHOUT_INPUT
    if operation.path_parameters or operation.query or operation.body:
        modes.append(GenerationMode.NEGATIVE)  # nothing to make invalid without inputs
        examples = EXAMPLES_WITH_BODY if operation.body else EXAMPLES_WITH_PARAMETERS
    cases = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes))

    @settings(
        max_examples=examples * len(modes),
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases, headers=_headers(keys), query=_noise_query(), data=st.data())
    def fuzz(case: Any, headers: dict[str, str], query: dict[str, str], data: Any) -> None:
        case = _with_known_names(data.draw, case, known)
        response = case.call(base_url=url, headers=headers, params=query, timeout=TIMEOUT_S)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        sent = case.as_curl_command(headers=headers)[:3000]
        check_response(response, f"{method} {path} {sent} query={query!r}")

    statuses: dict[int, int] = {}
    fuzz()
    print(f"{method} {path}: {dict(sorted(statuses.items()))}")
    # Past the guards too, not only 401 / 403.
    assert set(statuses) - {401, 403}, statuses
    ready = httpx.get(f"{url}/readyz", timeout=TIMEOUT_S)
    assert ready.status_code == 200, ready.text


@pytest.mark.anyio
async def test_an_unknown_schema_page_is_problem_json(tmp_path: Path, tiny_qwen3_custom: Path):
    """Found by the fuzzer: Litestar answers `/schema/<anything>` with an HTML 404 page."""
    from litestar.testing import AsyncTestClient

    from server.settings import ModelSpec

    settings = Settings(
        data_dir=str(tmp_path / "data"),
        models={"m": ModelSpec(path=str(tiny_qwen3_custom))},
        schema_auth="none",
    )
    async with AsyncTestClient(create_app(settings), timeout=60) as client:
        for page in ("/schema/0", "/schema/nope.html", "/schema/x.json"):
            check_response(await client.get(page), page)
            assert (await client.get(page)).status_code == 404
