"""One API for every technique: a verb takes a registered name or a config object and dispatches
through ``METHODS`` to the method's handler; ``report(result)`` says what it did, for every verb::

    q = sk.quantize(model, "int8", data=calib)                     # alias -> quant.ptq, defaults
    q = sk.quantize(model, sk.quant.PTQ(calibration="entropy"), data=calib)
    p = sk.prune(model, sk.prune.Magnitude(sparsity=0.8))          # config -> prune.magnitude
    f = sk.optimize(model, "graph_opt.fuse", example_inputs=(x,))
    print(sk.report(q).summary())                                  # method, config, changes, notes

What ``dispatch`` guarantees for every method, so no handler has to:

- **The input is never changed.** The handler sees the model in eval mode (shape propagation and
  calibration move no BatchNorm statistic), and every module's train/eval flag is restored
  afterwards. Pruned results keep the input's flags; quantized and optimised results are
  inference graphs, in eval mode.
- **Inputs are checked once, the same way.** ``data`` is normalised and checked (empty, NaN/Inf,
  shapes changing between batches: ``DataError`` naming the batch) even by methods that do not read
  it; the model must run on the first batch and on ``example_inputs`` (else ``DataError`` with the
  model's complaint); ``example_inputs`` come from the first batch of ``data`` when a method needs
  them and none were given.
- **No argument is silently ignored.** A ``scope`` (or any option) that the method does not take
  is a ``ConfigError``; a method that needs ``data`` or ``example_inputs`` says so.
- **One report.** The result carries a :class:`Report` (``report(result)``): the method, its
  resolved config, what changed (parameters, bytes, zero weights, layer types, before -> after) and
  the method's own record and notes.

Names: a registered name (``"quant.ptq"``), the part after the dot (``"ptq"``), or an alias the
method declares (``"int8"``); ``-`` and ``_`` are the same. A name or config of another technique
gets a ``ConfigError`` naming the verb to call; an unknown name, the closest known ones.

``make_callable`` turns a technique package into its verb (``sk.prune(...)``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
import sys
import types
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimkit.core.config import Config
from slimkit.core.data import Batch, collect_batches, model_failed
from slimkit.core.registry import Entry, did_you_mean, load_methods
from slimkit.errors import ConfigError, DataError, SlimkitError


class Technique(NamedTuple):
    verb: str  # the public function: sk.<verb>(model, config, ...)
    noun: str  # for messages: "unknown quantization method 'int3'"
    default: str | None  # the method a verb runs without a config
    keeps_mode: bool  # results keep the input's train/eval flags (else: eval, for inference)


TECHNIQUES: dict[str, Technique] = {
    "quant": Technique("quantize", "quantization", "quant.ptq", keeps_mode=False),
    "prune": Technique("prune", "pruning", "prune.channel", keeps_mode=True),
    "graph_opt": Technique("optimize", "graph optimisation", "graph_opt.optimize", False),
    "lowrank": Technique("decompose", "low-rank decomposition", "lowrank.svd", keeps_mode=True),
    "distill": Technique("distill", "distillation", "distill.response", keeps_mode=True),
    "lightweight": Technique("lighten", "lightweight-block", "lightweight.separable", True),
}

_NEEDS_FIX = {
    "data": "pass data=... (an iterable of input batches: a DataLoader, a list of tensors or of "
    "(inputs, target) tuples; a few batches are enough)",
    "example_inputs": "pass example_inputs=(x,) with the model's input shape, or data=... (its "
    "first batch is used)",
}
_REPORT_ATTR = "_slimkit_report"


def make_callable(module_name: str, target: str) -> None:
    """Make module ``module_name`` callable; calls go to ``"pkg.mod:function"`` (lazily).

    ``slimkit.prune`` is a package (configs, criteria, helpers) and, by the API's convention, the
    verb that prunes. A module cannot be called, and once any of its submodules is imported Python
    binds the package itself to ``slimkit.prune``, so a plain function of that name would be
    shadowed. The package's module object therefore gets a class with ``__call__``.
    """
    mod_name, _, attr = target.partition(":")

    class _VerbModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(mod_name), attr)(*args, **kwargs)

    sys.modules[module_name].__class__ = _VerbModule


# --- names and configs -> registered methods ---------------------------------------------------


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def names(technique: str) -> dict[str, tuple[Entry[Any], dict[str, Any]]]:
    """Every name a verb accepts for ``technique`` -> (method entry, config fields): registered
    names, the part after the dot, and declared aliases."""
    out: dict[str, tuple[Entry[Any], dict[str, Any]]] = {}
    for e in load_methods().entries(f"{technique}.*"):
        out[e.name] = (e, {})
        out.setdefault(e.name.partition(".")[2], (e, {}))
    for e in load_methods().entries(f"{technique}.*"):
        for alias, fields in e.meta.get("aliases", {}).items():
            key = _norm(alias)
            if key in out and out[key][0].name != e.name:
                raise ConfigError(
                    f"alias {alias!r} of {e.name} is already a name of {out[key][0].name}",
                    fix="give one of them another alias",
                )
            out[key] = (e, dict(fields))
    return out


def _technique(technique: str) -> Technique:
    try:
        return TECHNIQUES[technique]
    except KeyError:
        raise ConfigError(
            f"no verb for technique {technique!r}", fix=f"use one of {', '.join(TECHNIQUES)}"
        ) from None


def _wrong_verb(technique: str, entry: Entry[Any], what: str) -> ConfigError:
    other = entry.name.partition(".")[0]
    mine, theirs = _technique(technique), TECHNIQUES.get(other)
    if theirs is None:
        return ConfigError(f"{what} ({entry.name}) has no verb", fix="call its handler directly")
    return ConfigError(
        f"{what} is a {theirs.noun} method ({entry.name}), not {mine.noun}",
        fix=f"call sk.{theirs.verb}(model, {what}, ...) instead of sk.{mine.verb}",
    )


def resolve(technique: str, config: str | Config | None) -> tuple[Entry[Any], Config]:
    """The registered method and the config a verb of ``technique`` runs for ``config``."""
    tech = _technique(technique)
    if config is None:
        if tech.default is None:
            raise ConfigError(f"sk.{tech.verb} needs a method", fix="pass a name or a config")
        config = tech.default
    if isinstance(config, str):
        key = _norm(config)
        own = names(technique)
        if key in own:
            entry, fields = own[key]
            return entry, entry.meta["config"].from_dict(fields)
        for other in TECHNIQUES:
            if other != technique and key in names(other):
                raise _wrong_verb(technique, names(other)[key][0], repr(config))
        hint = did_you_mean(key, list(own))
        known = {e.name: [k for k, (x, _) in own.items() if x is e and k != e.name]
                 for e, _ in own.values()}  # fmt: skip
        listed = "; ".join(f"{n} ({', '.join(short)})" for n, short in known.items())
        raise ConfigError(
            f"unknown {tech.noun} method {config!r}",
            fix=f"{hint + ' ' if hint else ''}sk.{tech.verb} knows {listed}; or pass a config "
            "object (`slimkit list` shows every method)",
        )
    if isinstance(config, Config):
        entries = load_methods().entries()
        match = [e for e in entries if type(config) is e.meta["config"]] or [
            e for e in entries if isinstance(config, e.meta["config"])
        ]
        if not match:
            raise ConfigError(
                f"{type(config).__name__} is not the config of a registered method",
                fix="register the method with @METHODS.register(name, config=..., summary=...) or "
                f"pass one of: {', '.join(e.meta['config'].__name__ for e in entries)}",
            )
        if not match[0].name.startswith(technique + "."):
            raise _wrong_verb(technique, match[0], f"{type(config).__name__}(...)")
        return match[0], config
    raise ConfigError(
        f"sk.{tech.verb} got a {type(config).__name__} as its method",
        fix=f"pass a method name (e.g. {tech.default!r}) or a config object",
    )


# --- checking inputs and guarding the model ----------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the duration; every module's own flag is restored afterwards
    (``model.train(was)`` would not restore a model whose modules had mixed flags)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def _as_inputs(x: Any) -> tuple[torch.Tensor, ...]:
    inputs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise DataError(
            "example_inputs must be a tensor or a tuple of tensors",
            fix="pass example_inputs=(x,) with the shape and dtype the model is called with",
        )
    return inputs


def _check_data(data: Any, what: str, n_inputs: int, limit: int) -> tuple[Any, Batch]:
    """Check ``data`` (at most ``limit`` batches); returns data to hand on and its first batch.
    A one-pass iterator is checked on its first batch only and handed on whole."""
    if isinstance(data, Iterator):
        try:
            head = next(data)
        except StopIteration:
            raise DataError(f"{what} is empty", fix="pass at least one batch") from None
        first = collect_batches([head], what=what, n_inputs=n_inputs)[0]
        return itertools.chain([head], data), first
    return data, collect_batches(data, what=what, n_inputs=n_inputs, limit=limit)[0]


def _runs_on(model: nn.Module, b: Batch, what: str) -> None:
    try:
        with torch.no_grad():
            b.run(model)
    except SlimkitError:
        raise
    except Exception as e:
        raise model_failed(model, what, b, e) from None


def _check_inputs(
    model: nn.Module, data: Any, example: tuple[torch.Tensor, ...] | None, limit: int
) -> tuple[Any, Batch | None]:
    what = "calibration data"
    first = None
    if example is not None:
        ex = Batch(0, example)
        collect_batches([example], what="example_inputs", n_inputs=len(example))  # NaN / Inf
        _runs_on(model, ex, "example_inputs")
    if data is not None:
        data, first = _check_data(data, what, len(example) if example else 1, limit)
        if example is not None and not first.kwargs and len(first.args) == len(example):
            for i, (a, x) in enumerate(zip(first.args, example, strict=True)):
                if a.dim() != x.dim() or a.dtype != x.dtype:
                    raise DataError(
                        f"{what}: batch 0 input {i} is {tuple(a.shape)} {a.dtype}, but "
                        f"example_inputs[{i}] is {tuple(x.shape)} {x.dtype}",
                        fix="give the data the rank and dtype of the model's input (the first "
                        "dimension is the batch), or pass matching example_inputs",
                    )
        _runs_on(model, first, f"{what} batch 0")
    return data, first


def _batch_limit(cfg: Config) -> int:
    for key in ("num_batches", "calibration_batches", "taylor_batches"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return 32


# --- dispatch ----------------------------------------------------------------------------------


def dispatch(
    technique: str,
    model: nn.Module,
    config: str | Config | None,
    *,
    data: Any = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    scope: Any = None,
    **options: Any,
) -> nn.Module:
    """Run the method ``config`` names (a registered name, alias or config object) on ``model``
    through its registered handler, with the guarantees of the module docstring. ``options`` are
    handler keywords (``progress``, ``loss_fn``, ``inplace``, ...); ``None`` means not given."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"expected a torch.nn.Module to compress, got {type(model).__name__}",
            fix="pass the model object first: sk.<verb>(model, method, ...)",
        )
    entry, cfg = resolve(technique, config)
    params = dict(list(inspect.signature(entry.obj).parameters.items())[2:])
    example = _as_inputs(example_inputs) if example_inputs is not None else None
    # a config field given as a keyword (sk.distill(s, t, "response", epochs=1)) sets that field
    own = type(cfg).model_fields
    fields = {k: options.pop(k) for k in list(options)
              if k not in params and k in own and options[k] is not None}  # fmt: skip
    if fields:
        cfg = cfg.replace(**fields)
    given: dict[str, Any] = {"data": data, "example_inputs": example, "scope": scope, **options}
    notes: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in given.items():
        if value is None or (key == "progress" and key not in params):
            continue
        if key in params:
            kwargs[key] = value
        elif key != "data" and key != "example_inputs":
            takes = ", ".join(f"{k}=" for k in params) or "no keyword arguments"
            fields_text = ", ".join(type(cfg).model_fields) or "none"
            raise ConfigError(
                f"{entry.name} does not take {key}=",
                fix=f"it takes {takes} and its config's fields ({fields_text}); drop {key}= (or "
                "choose a method that takes it)",
            )
    was = {n: m.training for n, m in model.named_modules()}
    before, inherited = measure(model), method_record(model)
    with eval_mode(model):
        data, first = _check_inputs(model, data, example, _batch_limit(cfg))
        if "data" in kwargs:
            kwargs["data"] = data
        if "example_inputs" in params and example is None and first and not first.kwargs:
            kwargs["example_inputs"] = first.args
            notes.append("example_inputs: the first batch of data")
        elif data is not None and "data" not in params:
            notes.append(f"data was checked but not read: {entry.name} does not use data")
        for key, p in params.items():
            if p.kind is p.KEYWORD_ONLY and p.default is p.empty and kwargs.get(key) is None:
                raise ConfigError(
                    f"{entry.name} needs {key}=",
                    fix=_NEEDS_FIX.get(key, f"pass {key}=... (see help({entry.obj.__name__}))"),
                )
        if "return_report" in params:  # fold_constants / fuse: the report comes as a pair
            kwargs["return_report"] = True
        result = entry.obj(model, cfg, **kwargs)
    out, detail = result if isinstance(result, tuple) else (result, None)
    if TECHNIQUES[technique].keeps_mode:
        for n, m in out.named_modules():
            if n in was:
                m.training = was[n]
    else:
        out.eval()
    rep = make_report(entry.name, cfg, before, out, detail, notes, inherited=inherited)
    out.__dict__[_REPORT_ATTR] = rep
    return out


# --- reports -----------------------------------------------------------------------------------


@dataclass
class Report:
    """What a verb did, the same for every verb (``sk.report(result)``).

    ``changed`` is measured on the model before and after (``[before, after]``): ``params``,
    ``bytes`` (parameters and buffers; an ONNX Runtime result: its file), ``zero_weights`` (the
    fraction of zeros in layer weights) and ``layers`` (leaf module types whose count changed).
    ``record`` is the method's own record in full (JSON-ready); ``notes`` are its remarks (layers
    skipped and why, choices made) and the verb's (arguments it did not read, no change at all).
    ``detail`` is the method's report object where it has one (``FuseReport``, ``OptimizeReport``).
    """

    method: str
    config: dict[str, Any]
    changed: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    detail: Any = field(default=None, repr=False, compare=False)

    def summary(self) -> str:
        parts = [self.method]
        for key in ("params", "bytes", "zero_weights"):
            if key in self.changed:
                b, a = self.changed[key]
                parts.append(f"{key} {b:g} -> {a:g}")
        layers = self.changed.get("layers", {})
        if layers:
            parts.append("layers " + ", ".join(f"{k} {b}->{a}" for k, (b, a) in layers.items()))
        text = "; ".join(parts)
        return text + "".join(f"\n  {n}" for n in self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.config,
            "changed": self.changed,
            "notes": self.notes,
            "record": self.record,
        }


def measure(model: nn.Module) -> dict[str, Any]:
    """Parameters, bytes, the fraction of zero layer weights and leaf module types of ``model``."""
    seen: set[int] = set()
    params = nbytes = zeros = weights = 0
    for kind, tensors in (("p", model.parameters()), ("b", model.buffers())):
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            params += t.numel() if kind == "p" else 0
            nbytes += t.numel() * t.element_size()
    path = getattr(model, "path", None)
    if isinstance(path, str) and path.endswith(".onnx"):
        from pathlib import Path

        nbytes += Path(path).stat().st_size if Path(path).is_file() else 0
    layers: Counter[str] = Counter()
    for name, m in model.named_modules():
        if "parametrizations" in name.split("."):
            continue  # a weight's mask, not a layer
        own = any(True for _ in itertools.chain(m.parameters(False), m.buffers(False)))
        if own or next(m.children(), None) is None:  # a layer (not a mere container)
            layers[parametrize.type_before_parametrizations(m).__name__] += 1
        w = None if isinstance(m, nn.modules.batchnorm._BatchNorm) else getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            zeros += int((w.detach() == 0).sum())
            weights += w.numel()
    zero = round(zeros / weights, 4) if weights else 0.0
    return {"params": params, "bytes": nbytes, "zero_weights": zero, "layers": layers}


def method_record(model: nn.Module) -> dict[str, Any] | None:
    """The record a method left on its result: ``meta["slimkit"]`` of a quantized graph, the
    pruning record of a pruned module, or None."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and isinstance(meta.get("slimkit"), dict):
        return dict(meta["slimkit"])
    rec = model.__dict__.get("_slimkit_pruning")  # prune.channel's set_record
    return dict(rec) if isinstance(rec, dict) else None


def make_report(
    method: str,
    cfg: Config,
    before: dict[str, Any] | None,
    out: nn.Module,
    detail: Any = None,
    notes: Sequence[str] = (),
    *,
    inherited: dict[str, Any] | None = None,
) -> Report:
    """The :class:`Report` of ``out``, made by ``method`` with ``cfg`` from a model measured as
    ``before`` (``None``: unknown, nothing is compared). ``inherited`` is the record the input
    already carried: a copy of it on ``out`` is not this method's record."""
    record = method_record(out) or {}
    if inherited is not None and record == inherited:
        record = {}
    if detail is not None and hasattr(detail, "to_dict"):
        record = {**record, **detail.to_dict()}
    record.pop("method", None)
    record.pop("config", None)
    changed: dict[str, Any] = {}
    all_notes = [f"{k}: {v}" for k, v in record.items() if isinstance(v, str) and v]
    if detail is not None and hasattr(detail, "summary"):
        all_notes.append(detail.summary())
    if before is not None:
        after = measure(out)
        for key in ("params", "bytes", "zero_weights"):
            changed[key] = [before[key], after[key]]
        kinds = sorted(set(before["layers"]) | set(after["layers"]))
        changed["layers"] = {
            k: [before["layers"][k], after["layers"][k]]
            for k in kinds
            if before["layers"][k] != after["layers"][k]
        }
        same = all(b == a for b, a in (changed[k] for k in ("params", "bytes", "zero_weights")))
        if same and not changed["layers"] and "history" not in record:  # (trained: new weights)
            all_notes.append(
                "no measurable change: same parameters, bytes, zero weights and layer types"
            )
    return Report(method, cfg.to_dict(), changed, [*all_notes, *notes], record, detail)


def report(result: Any) -> Report:
    """What the verb that produced ``result`` did: a :class:`Report` (method, config, what
    changed, notes). ``result`` is a verb's result (a module, or ``(module, report)`` as
    ``sk.optimize(model, (x,))`` returns). A module made by calling a method's function directly
    gets a report built from the record the method left (without before/after measures)."""
    module = result[0] if isinstance(result, tuple) and result else result
    if isinstance(module, nn.Module):
        rep = module.__dict__.get(_REPORT_ATTR)
        if isinstance(rep, Report):
            return rep
        record = method_record(module)
        if record and isinstance(record.get("method"), str):
            entry = load_methods().entry(record["method"])
            cfg = entry.meta["config"].from_dict(record.get("config") or {})
            rep = make_report(record["method"], cfg, None, module)
            rep.notes.append("built from the method's record: no before/after measures")
            return rep
    raise ConfigError(
        f"this {type(module).__name__} was not produced by a slimkit verb, so it has no report",
        fix="pass the result of sk.quantize / sk.prune / sk.optimize",
    )
