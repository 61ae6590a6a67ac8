"""Options generated from settings dataclasses: every field offered, defaults and rules kept.

The CLI's recover and deploy options come from ``TrainSettings``, ``LocalSettings`` and
``TritonOptions``; parsing nothing must give the dataclass's defaults back, every option
must land in its field, and the declared rules must refuse bad values for API callers too.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from layerfuse.cli.settings import add_settings_options, settings_from_args
from layerfuse.deploy.triton_config import TritonOptions
from layerfuse.errors import LayerfuseError
from layerfuse.options import check_options, option_name, options_of
from layerfuse.recover.local import LocalSettings
from layerfuse.recover.settings import TrainSettings

SETTINGS = (TrainSettings, LocalSettings, TritonOptions)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda c: c.__name__)
def test_no_arguments_give_the_defaults_back(settings):
    parser = argparse.ArgumentParser()
    add_settings_options(parser, settings)
    fixed = {f.name: f.default for f in fields(settings) if f not in options_of(settings)}
    assert settings_from_args(settings, parser.parse_args([]), **fixed) == settings()


def test_every_option_lands_in_its_field():
    parser = argparse.ArgumentParser()
    for settings in (TrainSettings, LocalSettings):
        add_settings_options(parser, settings)
    args = parser.parse_args(
        ["--budget-minutes", "2.5", "--clip", "0", "--local-tokens", "512",
         "--local-inputs", "sequential", "--steps", "7"]
    )  # fmt: skip
    train = settings_from_args(TrainSettings, args)
    local = settings_from_args(LocalSettings, args, seed=3)
    assert (train.budget_minutes, train.clip, train.steps) == (2.5, 0.0, 7)
    assert (local.cache_tokens, local.inputs, local.seed) == (512, "sequential", 3)
    names = [option_name(f) for s in SETTINGS for f in options_of(s)]
    assert "--local-tokens" in names and "--seed" in names and names.count("--seed") == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainSettings(steps=0), "--steps must be positive"),
        (lambda: TrainSettings(lr=float("nan")), "--lr must be a finite number"),
        (lambda: LocalSettings(inputs="later"), "unknown --local-inputs 'later'"),
        (lambda: TritonOptions(instances=0), "--instances must be positive"),
        (lambda: TritonOptions(device="tpu"), "unknown --device 'tpu'"),
    ],
)
def test_declared_rules_refuse_bad_values(make, message):
    with pytest.raises(LayerfuseError, match=message):
        check_options(make())  # TritonOptions checks itself on construction
