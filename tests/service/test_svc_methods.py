"""The method registry through the API: `GET /methods` is its listing (public), a refused option's
422 names the field the core's ConfigError names, and `depth` is judged by the architecture's config,
not by the loaded weights."""

from __future__ import annotations

import time

import httpx
import pytest

from upt.auto import method_listing

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
    ("tip-adapter", {"ctx_init": "a photo of a"}, "ctx_init"),  # "learns no prompts: n_ctx, depth and ctx_init ..."
    ("upt", {"ctx_init": "a photo of a"}, "ctx_init"),  # "ctx_init applies to methods ..."
    ("tip-adapter-f", {"batch_size": 8}, "batch_size"),
    ("coop", {"n_ctx": "65"}, "n_ctx"),
    ("coop", {"lr": "nan"}, "lr"),
    ("vpt-shallow", {"depth": "2"}, "depth"),
    ("auto", {"candidates": "coop,vpt-shallow", "depth": "2"}, "depth"),
])
def test_a_refused_option_is_named_by_its_field(stack, method, options, field):
    data, files = task_form(per_class=1, method=method, **options)
    assert field_of(stack.client("acme").post("/tasks", data=data, files=files)) == field


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
