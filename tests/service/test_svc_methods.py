"""The method registry through the API: `GET /methods` is its listing (public), a refused option's
422 names the field the core's ConfigError names, and `depth` is judged by the architecture's config,
not by the loaded weights."""

from __future__ import annotations

import time

import httpx
import pytest

from upt.auto import AUTO, CANDIDATES, auto_options, method_listing
from upt.methods import METHODS, REGISTRY

from svc_helpers import api_without_weights, task_form


def field_of(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()["errors"][0]["field"]


@pytest.mark.service
def test_get_methods_is_the_registry_listing_and_needs_no_key(stack):
    response = httpx.get(f"{stack.url}/methods", timeout=60)  # no API key
    assert response.status_code == 200
    assert response.json() == {"methods": method_listing()}
    names = [method["name"] for method in response.json()["methods"]]
    document = httpx.get(f"{stack.url}/openapi.json", timeout=60).json()
    form = document["paths"]["/tasks"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["method"]["enum"] == names[1:] + names[:1]  # the methods, then auto


@pytest.mark.service
@pytest.mark.parametrize("method, options, field", [
    ("tip-adapter", {"ctx_init": "a photo of a"}, "ctx_init"),  # "tip-adapter does not use this option; ..."
    ("upt", {"ctx_init": "a photo of a"}, "ctx_init"),
    ("tip-adapter-f", {"batch_size": 8}, "batch_size"),
    ("coop", {"n_ctx": "65"}, "n_ctx"),
    ("coop", {"lr": "nan"}, "lr"),
    ("vpt-shallow", {"depth": "2"}, "depth"),
    ("auto", {"candidates": "coop,vpt-shallow", "depth": "2"}, "depth"),
])
def test_a_refused_option_is_named_by_its_field(stack, method, options, field):
    data, files = task_form(per_class=1, method=method, **options)
    assert field_of(stack.client("acme").post("/tasks", data=data, files=files)) == field


@pytest.mark.service
@pytest.mark.parametrize("method, options, field", [
    ("cocoop", {"depth": 12}, "depth"),
    ("zero-shot", {"lr": 0.01}, "lr"),
    ("zero-shot", {"epochs": 5000}, "epochs"),  # over UPT_MAX_EPOCHS, but not used: said so first
    ("tip-adapter", {"n_ctx": 8}, "n_ctx"),
    ("tip-adapter", {"ctx_init": "a photo of a"}, "ctx_init"),
    ("auto", {"candidates": "tip-adapter,zero-shot", "lr": 0.01}, "lr"),  # no candidate uses it
    ("auto", {"candidates": "vpt-deep,upt", "ctx_init": "a photo of a"}, "ctx_init"),
])
def test_an_option_the_method_does_not_use_is_refused_naming_it_and_the_options_it_takes(stack, method, options,
                                                                                      field):
    data, files = task_form(per_class=1, method=method, shots=1, **options)
    client = stack.client("acme")
    before = client.get("/tasks").json()["items"]
    response = client.post("/tasks", data=data, files=files)
    assert field_of(response) == field
    if method == AUTO:
        candidates = tuple(options[CANDIDATES.name].split(","))
        who, takes = f"auto with candidates {', '.join(candidates)}", auto_options(candidates)
    else:
        who, takes = method, REGISTRY[method].options
    message = f"{who} does not use this option; its options are {', '.join(o.name for o in takes)}."
    assert response.json()["detail"] == f"{field}: {message}" and response.json()["errors"][0]["message"] == message
    assert client.get("/tasks").json()["items"] == before  # nothing created


@pytest.mark.service
@pytest.mark.parametrize("method", [*METHODS, AUTO])
def test_every_method_accepts_each_of_its_own_options(stack, method, option_values):
    listed = next(row for row in method_listing() if row["name"] == method)["options"]  # GET /methods' list
    own = {o["name"]: option_values[o["name"]] for o in listed if o["name"] != CANDIDATES.name}
    data, files = task_form(per_class=1, method=method, **own)
    client = stack.client("acme")
    response = client.post("/tasks", data=data, files=files)
    assert response.status_code == 202, response.text
    task = response.json()
    stored = task["config"]
    assert all(stored[name] == value for name, value in own.items()), (stored, own)
    assert client.delete(f"/tasks/{task['id']}").status_code == 204


def test_depth_is_checked_against_the_architecture_without_the_weights(tmp_path, tiny_checkpoint):
    """A service whose weights cannot be loaded still judges `depth` by ViT-B-16's config (12 layers)."""
    with api_without_weights(tmp_path, tiny_checkpoint) as url:
        for method, depth, field in (("upt", 13, "depth"), ("vpt-deep", 13, "depth"), ("coop", 13, "depth")):
            data, files = task_form(per_class=1, method=method, depth=depth)
            started = time.monotonic()
            response = httpx.post(f"{url}/tasks", data=data, files=files, timeout=60)
            assert field_of(response) == field and "12 layers" in response.json()["detail"], response.text
            assert time.monotonic() - started < 30
        data, files = task_form(per_class=1, method="upt", depth=12)  # fits: then the weights are needed
        assert httpx.post(f"{url}/tasks", data=data, files=files, timeout=60).status_code == 503
