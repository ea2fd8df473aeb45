"""The OpenAPI document is the contract: every problem a route answers is listed there with an
application/problem+json body, and the multipart forms say which fields are required."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from svc_helpers import CLASSES, images

PNG = images("train", 1)[0][1].read_bytes()


@pytest.fixture(scope="module")
def document(stack) -> dict:
    return httpx.get(f"{stack.url}/openapi.json").json()


def documented(document: dict, method: str, path: str) -> dict:
    return document["paths"][path][method]["responses"]


@pytest.mark.service
def test_every_api_route_documents_its_problems_as_problem_json(document):
    assert set(document["components"]["schemas"]["Problem"]["required"]) >= {"type", "title", "status", "detail"}
    for path, operations in document["paths"].items():
        if path in ("/livez", "/readyz", "/metrics", "/methods"):  # public: no key, no database
            continue
        for method, operation in operations.items():
            responses = operation["responses"]
            for status in ("401", "408", "431", "503"):
                assert status in responses, (method, path, status)
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    assert list(response["content"]) == ["application/problem+json"], (method, path, status)
                    assert response["content"]["application/problem+json"]["schema"]["$ref"].endswith("/Problem")
    assert {"400", "409", "413", "415", "422", "429", "507"} <= set(documented(document, "post", "/tasks"))
    assert {"400", "404", "409", "413", "415", "422", "507"} <= set(documented(document, "post", "/classify"))


@pytest.mark.service
def test_multipart_forms_say_which_fields_are_required(document):
    task = document["paths"]["/tasks"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert task["required"] == ["method"]
    assert {"required": ["archive"]} in task["anyOf"]
    assert {"required": ["class_names", "files", "labels"]} in task["anyOf"]
    classify = document["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert classify["required"] == ["files"] and len(classify["anyOf"]) == 2


@pytest.mark.service
def test_answered_problems_are_documented(stack, document):
    """Problems really answered by the routes (a sample of each kind) are in the document."""
    client, anonymous = stack.client("acme"), httpx.Client(base_url=stack.url, timeout=60)
    answers = [
        ("get", "/tasks/{task_id}", anonymous.get(f"/tasks/{'a' * 32}")),
        ("get", "/tasks/{task_id}", client.get(f"/tasks/{'a' * 32}")),
        ("get", "/tasks", client.get("/tasks", params={"cursor": "x"})),
        ("post", "/classify", client.post("/classify", data={"class_names": CLASSES}, files=[
            ("files", (f"{i}.png", PNG, "image/png")) for i in range(65)])),
        ("post", "/classify", client.post("/classify", content=b"x", headers={"Content-Type": "text/plain"})),
        ("post", "/tasks", client.post("/tasks", data={"method": "nope"}, files=[("files", ("a.png", PNG))])),
    ]
    for method, path, response in answers:
        assert response.headers["content-type"].startswith("application/problem+json")
        assert str(response.status_code) in documented(document, method, path), (path, response.status_code)


@pytest.mark.service
@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_contradiction_of_the_document(stack, tmp_path):
    """A bounded property-based run (about 600 generated requests, well under a minute here) against the
    real `upt serve` with API keys on: no 5xx, and every status code, content type and body as documented."""
    pytest.importorskip("schemathesis", reason="schemathesis is part of the test extra: pip install -e '.[test]'")
    cli = Path(sys.executable).parent / "schemathesis"
    done = subprocess.run(
        [str(cli), "run", f"{stack.url}/openapi.json", "-H", f"Authorization: Bearer {stack.keys['acme']}",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                     "response_schema_conformance",
         "--max-examples", "30", "--phases", "coverage,fuzzing", "--generation-deterministic", "--no-color"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its cache folder goes there
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout.split("SUMMARY")[-1], done.stdout[-3000:]
