"""The ``--emo-*`` flags are generated from ``EMOTransformerConfig``.

One flag per ``emo_*`` field, ``dest`` = field, default = field default, help = the field's
attribute docstring, and a field added to the config gets a flag without touching ``add_emo_args``.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_arguments.py -q``
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Literal

import pytest

from megatron_emo.mcore.config import EMOTransformerConfig
from megatron_emo.training.arguments import add_emo_args


def _attribute_docstring(cls: type, name: str) -> str:
    """The attribute docstring of ``cls.name`` as help text, read naively from the source."""
    after_field = re.split(rf"\n\s*{name}:", inspect.getsource(cls), maxsplit=1)[1]
    return " ".join(after_field.split('"""')[1].split()).replace("``", "")


def _emo_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name.startswith("emo_")]


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)
    return by_dest


def test_every_config_field_has_exactly_one_flag_with_its_default_and_docstring():
    parser = add_emo_args(argparse.ArgumentParser())
    by_dest = _actions_by_dest(parser)
    fields = _emo_fields(EMOTransformerConfig)
    assert len(fields) >= 11  # the released ones; a new field needs no edit here
    for field in fields:
        actions = by_dest[field.name]
        assert len(actions) == 1, field.name
        (action,) = actions
        assert len(action.option_strings) == 1, action.option_strings
        assert action.default == field.default, field.name
        assert action.help == _attribute_docstring(EMOTransformerConfig, field.name)
        assert parser.parse_args([]).__dict__[field.name] == field.default


def test_flag_spellings_actions_and_choices_are_the_released_ones():
    parser = add_emo_args(argparse.ArgumentParser())
    flags = {a.dest: (a.option_strings, type(a).__name__, a.choices) for a in parser._actions}
    assert flags["emo_routing"] == (["--emo-routing"], "_StoreAction", ["emo", "standard"])
    assert flags["emo_pool_size_min"] == (["--emo-pool-size-min"], "_StoreAction", None)
    assert flags["emo_renormalize_probs"] == (
        ["--emo-renormalize-probs"], "_StoreTrueAction", None)
    assert flags["emo_router_fusion"] == (
        ["--emo-router-fusion"], "_StoreAction", ["auto", "on", "off"])
    assert flags["emo_scale_aux_loss_by_num_layers"] == (
        ["--emo-no-scale-aux-loss-by-num-layers"], "_StoreFalseAction", None)
    assert flags["emo_log_routing_metrics"][0] == [
        "--emo-log-routing-metrics", "--no-emo-log-routing-metrics"]
    assert flags["emo_dry_run"][0] == ["--emo-dry-run"] and flags["cpu"][0] == ["--cpu"]
    args = parser.parse_args(["--emo-pool-size-min", "4", "--emo-no-scale-aux-loss-by-num-layers",
                              "--emo-lb-accumulate-microbatches", "--emo-routing", "standard"])
    assert args.emo_pool_size_min == 4 and args.emo_routing == "standard"
    assert args.emo_scale_aux_loss_by_num_layers is False
    assert args.emo_lb_accumulate_microbatches is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--emo-routing", "pools"])


def test_a_field_added_to_the_config_gets_a_flag():
    @dataclass
    class ExtendedConfig(EMOTransformerConfig):
        emo_new_count: int = 3
        """A new count, 50% of the time."""

        emo_new_mode: Literal["a", "b"] = "b"
        """A new mode."""

        emo_new_switch: bool = True
        """A new switch."""

    parser = add_emo_args(argparse.ArgumentParser(), config_cls=ExtendedConfig)
    by_dest = _actions_by_dest(parser)
    for field in _emo_fields(ExtendedConfig):
        assert len(by_dest[field.name]) == 1, field.name
    new = {a.dest: a for a in parser._actions if a.dest.startswith("emo_new_")}
    assert new["emo_new_count"].option_strings == ["--emo-new-count"]
    assert new["emo_new_count"].help == "A new count, 50%% of the time."  # argparse-escaped
    assert new["emo_new_mode"].choices == ["a", "b"] and new["emo_new_mode"].default == "b"
    assert new["emo_new_switch"].option_strings == ["--emo-no-new-switch"]
    args = parser.parse_args(["--emo-new-count", "5", "--emo-no-new-switch"])
    assert (args.emo_new_count, args.emo_new_mode, args.emo_new_switch) == (5, "b", False)
    assert "50% of the time" in parser.format_help().replace("\n", " ")


def test_a_field_without_a_docstring_is_refused():
    @dataclass
    class Undocumented(EMOTransformerConfig):
        emo_silent: int = 1

    with pytest.raises(TypeError, match="Undocumented.emo_silent needs a default and an attribute"):
        add_emo_args(argparse.ArgumentParser(), config_cls=Undocumented)
