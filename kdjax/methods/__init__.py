"""The distillation methods, one module each, found by looking in this package.

A module here may define:
  METHODS: `kdjax.engine.method.Method` subclasses: loss terms of the staged BERT run, whose
    fields are keys of every stage's `loss` section (kd, tinybert, pkd, distilbert, minilm, ...);
  RUN: a `kdjax.engine.method.StudentRun` class: a method with its own student or its own
    joint update, run by the engine's one run when `config.method` is its NAME (bilstm,
    newsbert);
  CONFIG_RULES: `(dotted key, check, what it demands)` for config sections it owns.

Nothing else lists the methods: a new module with a `METHODS` tuple is picked up by the configs
(`kdjax.recipes.loss_config`), the validation (`config_rules`) and the run (`distill`).
Terms are added to a stage's loss in the order of the modules' names, then of `METHODS`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pathlib
import pkgutil
from types import ModuleType
from typing import Any, Callable

import ml_collections

from kdjax import config as config_lib
from kdjax.engine import loss as engine_loss
from kdjax.engine import run as engine_run
from kdjax.engine.method import Method, StudentRun


@functools.cache
def modules() -> tuple[ModuleType, ...]:
    """Every method module of this package, by name."""
    names = sorted(info.name for info in pkgutil.iter_modules([str(pathlib.Path(__file__).parent)]))
    return tuple(importlib.import_module(f"{__name__}.{name}") for name in names)


def loss_methods() -> tuple[type[Method], ...]:
    """The loss-term methods, in the order their terms are added to a stage's loss."""
    return tuple(kind for module in modules() for kind in getattr(module, "METHODS", ()))


def run_methods() -> dict[str, type[StudentRun]]:
    """`config.method` values and their `StudentRun`s; "bert" is the engine's staged run."""
    runs = [engine_run.StagedBertRun] + [module.RUN for module in modules()
                                         if hasattr(module, "RUN")]
    return {run.NAME: run for run in runs}


def loss_section_defaults() -> dict[str, Any]:
    """The keys of a stage's `loss` section and their defaults: every method's fields, then the
    settings the methods share."""
    defaults = {}
    for kind in loss_methods():
        for key, value in kind.config_fields().items():
            if key in defaults:
                raise RuntimeError(f"loss key {key!r} is claimed by two methods ({kind.__name__})")
            defaults[key] = value
    return {**defaults, **engine_loss.SHARED_SETTINGS}


def config_rules(config: ml_collections.ConfigDict) -> list[tuple[str, Callable, str]]:
    """The range rules of every method for `config`: each stage's `loss` keys (term weights
    >= 0, each method's `RULES`, the shared settings') and the sections methods own."""
    stage_rules = list(engine_loss.SHARED_RULES)
    for kind in loss_methods():
        stage_rules += [(term, lambda v: v >= 0, "must be >= 0 (0 = off)") for term in kind.TERMS]
        stage_rules += list(kind.RULES)
    rules = []
    stages = config.get("stages", ()) if isinstance(config, ml_collections.ConfigDict) else ()
    for name in stages:
        rules += [(f"{name}.loss.{key}", ok, demand) for key, ok, demand in stage_rules]
    for module in modules():
        rules += list(getattr(module, "CONFIG_RULES", ()))
    names = tuple(run_methods())
    rules.append(("method", lambda v: v in names, f"must be one of {names}"))
    return rules


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.validate` with every method's rules."""
    return config_lib.validate(config, extra_rules=config_rules(config))


def loss_spec(**settings) -> engine_loss.LossSpec:
    """A `LossSpec` from flat settings, as a stage's `loss` section spells them:
    `loss_spec(ce=0.5, soft=0.5, temperature=2.0)`. Keys that are `LossSpec` fields
    (`layer_pairs`, `total_steps`, `student_layers`, `extra_terms`, ...) go to it; every other
    key must belong to a method.

    Raises:
      ValueError: a key no method or `LossSpec` knows.
    """
    spec_fields = {f.name for f in dataclasses.fields(engine_loss.LossSpec)} - {"methods"}
    known = {key for kind in loss_methods() for key in
             (f.name for f in dataclasses.fields(kind))}
    unknown = set(settings) - spec_fields - known
    if unknown:
        raise ValueError(f"unknown loss settings {sorted(unknown)}")
    methods = []
    for kind in loss_methods():
        fields = {f.name for f in dataclasses.fields(kind)}
        method = kind(**{k: v for k, v in settings.items() if k in fields})
        if method.active:
            methods.append(method)
    return engine_loss.LossSpec(methods=tuple(methods),
                                **{k: v for k, v in settings.items() if k in spec_fields})


def distill(config: ml_collections.ConfigDict, workdir, *, progress: bool = True,
            measure_throughput: bool = True, **kwargs) -> dict:
    """The run `config.method` names (the staged BERT run by default), with every loss method.

    Keyword arguments beyond these (`extra_terms`, `overwrite`) go to `kdjax.engine.run.run`."""
    name = config.get("method", "bert")
    runs = run_methods()
    if name not in runs:
        raise config_lib.ConfigError(f"config key 'method' must be one of {tuple(runs)}, got "
                                     f"{name!r}")
    return engine_run.run(config, workdir, runs[name], methods=loss_methods(),
                          progress=progress, measure_throughput=measure_throughput, **kwargs)
