"""The method registry is the one list of methods and options: everything that lists them (the
`upt train` flags, `upt methods`, the API's form description and `GET /methods`) agrees with it,
and every method's spec builds what the method trains."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from upt.auto import (
    AUTO,
    CANDIDATES,
    DEFAULT_CANDIDATES,
    AutoConfig,
    auto_options,
    base_config,
    config_from_dict,
    method_listing,
)
from upt.cli import build_parser
from upt.errors import ConfigError
from upt.methods import CACHE_METHODS, METHODS, PROMPT_METHODS, REGISTRY, SPECS, PromptConfig, PromptedCLIP
from upt.methods import cocoop, prompts
from upt.methods.registry import methods_taking, train_options
from upt.options import AUGMENT_VIEWS, OPTIONS, UnusedOptionError
from upt.training import TrainConfig

EVERY_METHOD_MODULE = {"coop": prompts.TextContext, "vpt-shallow": prompts.VisualPrompts,
                       "vpt-deep": prompts.VisualPrompts, "upt": prompts.UnifiedPrompts, "joint": prompts.JointPrompts,
                       "shared": prompts.UnifiedPrompts, "mlp": prompts.UnifiedPrompts,
                       "cocoop": cocoop.ConditionalContext, "promptsrc": prompts.JointPrompts}


def test_every_method_has_one_spec_and_the_name_lists_derive_from_it():
    assert METHODS == tuple(spec.name for spec in SPECS) and set(REGISTRY) == set(METHODS)
    assert len(set(METHODS)) == len(METHODS)
    assert CACHE_METHODS == {"tip-adapter", "tip-adapter-f", "gda"}
    assert set(PROMPT_METHODS) == set(METHODS) - CACHE_METHODS - {"clip-lora"}  # it adapts weights, learns no prompts
    for spec in SPECS:
        assert spec.title and spec.description and "\n" not in spec.description
        assert all(option.name in OPTIONS for option in spec.options), spec.name
        assert (spec.build is not None) == (spec.name in EVERY_METHOD_MODULE), spec.name


@pytest.mark.parametrize("method", list(EVERY_METHOD_MODULE))
def test_each_spec_builds_its_method_module(method, tiny):
    model = PromptedCLIP(tiny, ["cat", "dog"], PromptConfig(method))
    assert isinstance(model.prompts, EVERY_METHOD_MODULE[method])
    assert model.config.learns_text == REGISTRY[method].learns_text


def test_the_train_flags_are_the_registry_options():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {action.dest: action for action in train._actions}
    assert set(flags["method"].choices) == {*METHODS, AUTO}
    for option in train_options():
        action = flags[option.name]
        assert action.option_strings == [option.flag] and action.type is option.type
        assert option.help in action.help
        takers = methods_taking(option.name)
        assert (f"methods: {', '.join(takers)}; refused by the others" in action.help) is (len(takers) < len(SPECS))
    assert CANDIDATES.flag in flags[CANDIDATES.name].option_strings
    assert [o.name for o in train_options()] == list(dict.fromkeys(o.name for s in SPECS for o in s.options))


def test_upt_methods_lists_the_registry():
    done = subprocess.run([sys.executable, "-m", "upt", "methods", "--json"], capture_output=True, text=True,
                          timeout=120, check=True)
    listed = json.loads(done.stdout)["methods"]
    assert listed == method_listing()
    assert [row["name"] for row in listed] == [AUTO, *METHODS]
    for row in listed[1:]:
        assert row == REGISTRY[row["name"]].as_dict()
        assert [o["name"] for o in row["options"]] == [o.name for o in REGISTRY[row["name"]].options]


def test_the_api_form_description_is_the_registry():
    from service.api.forms import TASK_FORM

    properties = TASK_FORM["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert properties["method"]["enum"] == [*METHODS, AUTO]
    listed = {row["name"]: {o["name"] for o in row["options"]} for row in method_listing()}  # GET /methods
    for option in train_options():
        schema = properties[option.name]
        assert schema["type"] == option.type_name and schema["description"].startswith(option.help)
        takers = [name for name in METHODS if option.name in listed[name]]  # the others refuse it
        assert (f"(methods: {', '.join(takers)}; refused by the others" in schema["description"]) \
            is (len(takers) < len(METHODS)), schema["description"]
        # auto takes exactly the options that some default candidate uses (not PromptSRC's own, say)
        assert (option.name in listed[AUTO]) is any(option.name in listed[m] for m in DEFAULT_CANDIDATES)
        assert schema.get("minimum", schema.get("exclusiveMinimum")) == option.minimum
        assert schema.get("maximum", schema.get("exclusiveMaximum")) == option.maximum
    assert properties[CANDIDATES.name]["default"] == CANDIDATES.default


def test_options_are_checked_by_their_spec_and_errors_name_the_field():
    for option, bad in (("n_ctx", 0), ("n_ctx", 65), ("epochs", -1), ("lr", 0.0), ("lr", float("nan")),
                        ("batch_size", 0), ("augment_views", 101), ("shots", 0)):
        with pytest.raises(ConfigError) as raised:
            TrainConfig.of("tip-adapter" if option == "augment_views" else "coop", **{option: bad}).validate()
        assert raised.value.field == option and option in str(raised.value)
    for options, field in (({"method": "nope"}, "method"), ({"method": "upt", "ctx_init": "a photo"}, "ctx_init"),
                           ({"method": "vpt-shallow", "depth": 2}, "depth"),
                           ({"method": "tip-adapter", "n_ctx": 8}, "n_ctx"),
                           ({"method": "coop", "templates": ("no slot",)}, "templates")):
        with pytest.raises(ConfigError) as raised:
            PromptConfig(**options)
        assert raised.value.field == field
    with pytest.raises(ConfigError) as raised:
        TrainConfig.of("tip-adapter-f", lr=0.1).validate()
    assert raised.value.field == "lr"


def test_ctx_init_is_refused_exactly_by_the_methods_that_do_not_take_it():
    for spec in SPECS:
        if spec.name in methods_taking("ctx_init"):
            PromptConfig(spec.name, ctx_init="a photo of a")
        else:
            with pytest.raises(ConfigError, match="ctx_init"):
                PromptConfig(spec.name, ctx_init="a photo of a")


def test_train_config_holds_a_prompt_config_and_reads_the_flat_stored_form():
    config = TrainConfig.of("upt", shots=4, n_ctx=8, depth=2, dropout=0.2, lr=0.01)
    assert config.prompt == PromptConfig("upt", n_ctx=8, depth=2, dropout=0.2)
    stored = config.to_dict()
    assert stored["method"] == "upt" and stored["n_ctx"] == 8 and "prompt" not in stored  # the stored form: flat
    assert TrainConfig.from_dict(json.loads(json.dumps(stored))) == config
    with pytest.raises(ConfigError, match="Unknown training options: colour") as raised:
        TrainConfig.from_dict(stored | {"colour": "red"})
    assert raised.value.field == "colour"


def test_a_config_error_keeps_its_field_across_processes():
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("depth 9 exceeds the 3 layers", field="depth")))
    assert error.field == "depth" and str(error) == "depth 9 exceeds the 3 layers"


def test_every_method_takes_its_own_options_and_refuses_the_others_naming_them(option_values):
    for spec in SPECS:
        own = [option.name for option in spec.options]
        config = TrainConfig.of(spec.name, **{name: option_values[name] for name in own}).validate()
        assert all(config.to_dict()[name] == option_values[name] for name in own), spec.name
        for name in set(option_values) - set(own):
            with pytest.raises(UnusedOptionError) as raised:
                TrainConfig.of(spec.name, **{name: option_values[name]})
            assert raised.value.field == name and isinstance(raised.value, ConfigError)
            assert str(raised.value) == (f"{spec.name} does not use this option; its options are "
                                         f"{', '.join(own)}.")
    assert TrainConfig.of("cocoop", depth=None).prompt.depth is None  # None: not given, the method's own


def test_the_stored_form_is_read_whole_even_with_an_option_its_method_ignored():
    stored = TrainConfig.of("cocoop").to_dict() | {"depth": 12}  # a row written before such options were refused
    assert TrainConfig.from_dict(stored).prompt.depth == 12


def test_auto_takes_the_options_one_of_its_candidates_uses_and_passes_each_its_own(option_values):
    used = [o for o in train_options() if any(REGISTRY[m].takes(o.name) for m in DEFAULT_CANDIDATES)]
    assert [o["name"] for o in method_listing()[0]["options"]] == [CANDIDATES.name, *(o.name for o in used)]
    assert auto_options(DEFAULT_CANDIDATES) == [CANDIDATES, *used]
    config = AutoConfig(base_config(DEFAULT_CANDIDATES, ctx_init="a photo of a", augment_views=3, lr=0.01),
                        DEFAULT_CANDIDATES).validate()
    by_method = {one.method: one for one in config.configs()}
    assert by_method["coop"].prompt.ctx_init == "a photo of a" and by_method["coop"].lr == 0.01
    assert by_method["upt"].prompt.ctx_init is None and by_method["vpt-deep"].prompt.ctx_init is None
    assert by_method["tip-adapter-f"].augment_views == 3 and by_method["tip-adapter-f"].step_lr == 0.002
    assert by_method["coop"].augment_views == AUGMENT_VIEWS.default
    assert config_from_dict(config.to_dict()).to_dict() == config.to_dict()
    # Tip-Adapter-F keeps its recipe's epochs in auto: with only cache methods, epochs is used by none.
    for candidates, option in ((("tip-adapter", "zero-shot"), "lr"), (("tip-adapter-f", "tip-adapter"), "epochs"),
                               (("vpt-deep", "upt"), "ctx_init"), (("coop", "vpt-deep"), "augment_views")):
        with pytest.raises(UnusedOptionError) as raised:
            base_config(candidates, **{option: option_values[option]})
        takes = ", ".join(o.name for o in auto_options(candidates))
        assert raised.value.field == option and str(raised.value) == (
            f"auto with candidates {', '.join(candidates)} does not use this option; its options are {takes}.")


def test_an_unused_option_error_keeps_its_field_and_listing_across_processes():
    import pickle

    with pytest.raises(UnusedOptionError) as raised:
        TrainConfig.of("zero-shot", lr=0.1)
    error = pickle.loads(pickle.dumps(raised.value))
    assert (error.field, str(error), error.takes) == ("lr", str(raised.value), REGISTRY["zero-shot"].options)
