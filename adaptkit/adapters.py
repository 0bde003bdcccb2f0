"""Several named adapters on one base model: load, switch, disable, combine, save (imports torch).

Example::

    from adaptkit.adapters import AdapterSet

    adapters = AdapterSet.from_run("runs/lora_a", name="a")   # base = run a's spec without methods; 'a' active
    adapters.load("b", "runs/lora_b")                         # a second adapter on the same backbone
    model = adapters.model                                    # one nn.Module, e.g. model.logits(images)
    adapters.use("b")                                         # only b (and b's head)
    adapters.use("a", "b")                                    # both updates added
    adapters.disable()                                        # the base backbone
    adapters.combine("mix", {"a": 0.5, "b": 0.5}, how="svd", rank=4)
    adapters.use("mix")
    adapters.save("mix", "runs/mix")                          # a run directory: adaptkit merge/export take it

Each adapter is the methods of a run's spec, applied to the same model: its modules
get their usual names while it is applied (``qkv.lora``), then move aside
(``qkv.lora_b``) so that the next adapter's get the usual names too; files keep the
usual names, so a saved adapter loads into a fresh ``adaptkit.build`` of its spec.
Methods must be switchable (``AppliedMethod.set_enabled``: LoRA, bottleneck adapters).
The task's own trained tensors (a classification head) belong to each adapter and are
swapped in by :meth:`AdapterSet.use`; adapters in one set share the task's shapes.

Combining works on low-rank methods (LoRA): ``cat`` and ``svd`` give the exact
weighted sum of the updates (``svd`` truncated to a rank), ``linear`` a same-rank
factor-wise sum (see :mod:`adaptkit.lowrank`). The combination is an ordinary LoRA
spec (whole layers, per-layer ranks) with its tensors, so it saves, loads, merges
and exports like any run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptkit.errors import CheckpointError, CompatibilityError
from adaptkit.method import AppliedMethod, free_child_name

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class NamedAdapter:
    """One adapter of a set: its method params, applied methods, and tensors by file name."""

    name: str
    params: list[Any]
    methods: list[AppliedMethod]
    #: file (canonical) name -> the parameter in the set's model
    parameters: dict[str, nn.Parameter]
    #: other tensors of the model it trained (the task's head; norms an ``adapter`` trains),
    #: swapped in by ``use``
    task_state: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the adapter under the names a fresh build of its spec uses."""
        return {**{n: p.detach() for n, p in self.parameters.items()}, **self.task_state}


class AdapterSet:
    """Named adapters on one built base model (see the module docstring)."""

    def __init__(self, base: Any, registry: Any = None) -> None:
        """``base``: a spec (its methods are dropped) or a model built without methods."""
        from adaptkit.builder import build
        from adaptkit.registry import registry as default_registry
        from adaptkit.spec import RunSpec, load_spec

        self.registry = registry or default_registry()
        if isinstance(base, nn.Module):
            if base.adaptkit.methods:
                raise CompatibilityError("an AdapterSet starts from a model built without methods")
            self.model = base
        else:
            spec = load_spec(base, registry=self.registry) if not isinstance(base, RunSpec) else base
            self.model = build(load_spec({**spec.to_dict(), "methods": []}, registry=self.registry), registry=self.registry, keep_data=True)
        self.base_spec = self.model.adaptkit.spec
        self.task_names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self._base_task_state = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.task_names}
        #: the base values of every model tensor some adapter swaps (the head; trained norms)
        self._base_values = dict(self._base_task_state)
        self.adapters: dict[str, NamedAdapter] = {}
        self.active: list[str] = []
        self._broken = ""

    @classmethod
    def from_run(cls, source: str | Path, name: str = "default", registry: Any = None) -> "AdapterSet":
        """A set on the base of a run (directory or adapter file), holding that run as ``name``, active."""
        from adaptkit.rundir import RunDir

        spec, _ = RunDir.trained(source).spec_and_adapter()
        adapters = cls(spec, registry)
        adapters.load(name, source)
        adapters.use(name)
        return adapters

    # ----------------------------------------------------------------- loading
    def load(self, name: str, source: str | Path) -> NamedAdapter:
        """Add the adapter of a run directory or adapter file as ``name`` (switched off until :meth:`use`).

        The run must have been trained on this set's base: same backbone spec and base
        weights (fingerprint), same task.
        """
        from adaptkit.checkpoint import load_tensors
        from adaptkit.rundir import RunDir

        spec, path = RunDir.trained(source).spec_and_adapter()
        tensors, metadata = load_tensors(path)
        self._check_base(spec, metadata.get("base_fingerprint"), str(source))
        return self._add(name, list(spec.methods), tensors, str(source))

    def add(self, name: str, methods: Sequence[Any], state: Mapping[str, torch.Tensor] | None = None) -> NamedAdapter:
        """Add an adapter from method params (dicts or params objects) and, optionally, its tensors."""
        from adaptkit.spec import load_spec

        spec = load_spec({**self.base_spec.to_dict(), "methods": [_plain(m) for m in methods]}, registry=self.registry)
        return self._add(name, list(spec.methods), dict(state or {}), "python")

    def _check_base(self, spec: Any, fingerprint: str | None, where: str) -> None:
        ours, theirs = self.base_spec.backbone.model_dump(mode="json"), spec.backbone.model_dump(mode="json")
        if ours != theirs:
            differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
            shown = "; ".join(f"backbone.{k}: {theirs.get(k)!r} here, {ours.get(k)!r} in the set" for k in differ[:3])
            raise CompatibilityError(f"{where}: trained on another base model ({shown}); adapters combine only on one base")
        if fingerprint and fingerprint != self.model.adaptkit.base_fingerprint:
            raise CheckpointError(
                f"{where}: trained on other base weights (fingerprint {fingerprint}, this set's is {self.model.adaptkit.base_fingerprint})"
            )
        if spec.task.name != self.base_spec.task.name:
            raise CompatibilityError(f"{where}: task '{spec.task.name}' is not this set's task '{self.base_spec.task.name}'")

    def _add(self, name: str, params: list[Any], tensors: dict[str, torch.Tensor], source: str) -> NamedAdapter:
        self._require_usable()
        if not _NAME.match(name):
            raise CompatibilityError(f"adapter name '{name}': use letters, digits, '_' and '-'")
        if name in self.adapters:
            raise CompatibilityError(f"an adapter named '{name}' is already loaded; pick another name or remove it")
        if not params:
            raise CompatibilityError(f"adapter '{name}' has no methods")
        methods, parameters = self._apply(name, params)
        bad = [m.name for m in methods if not m.switchable]
        if bad:
            self._broken = f"adapter '{name}' holds method '{bad[0]}', which cannot be switched off"
            raise CompatibilityError(
                f"adapter '{name}': method '{bad[0]}' cannot be switched off and on, so it cannot be one of several "
                "adapters (switchable methods can); in Python, this AdapterSet's model now holds it: start a new one"
            )
        try:
            task_state = {n: t.clone() for n, t in self._base_task_state.items()}
            if tensors:
                modules = [m for a in self.adapters.values() for method in a.methods for m in method.added]
                modules += [m for method in methods for m in method.added]
                added = {id(p) for m in modules if isinstance(m, nn.Module) for p in m.parameters()}
                own = {n: p for n, p in self.model.named_parameters() if id(p) not in added}
                unknown = sorted(n for n in set(tensors) - set(parameters) if n not in own)
                if unknown:
                    raise CheckpointError(f"adapter '{name}': {len(unknown)} tensors fit neither its methods nor the model (e.g. {unknown[0]})")
                missing = sorted(set(parameters) - set(tensors))
                if missing:
                    raise CheckpointError(f"adapter '{name}': lacks {len(missing)} tensors of its methods (e.g. {missing[0]})")
                with torch.no_grad():
                    for key, parameter in parameters.items():
                        if parameter.shape != tensors[key].shape:
                            raise CheckpointError(f"adapter '{name}': {key} has shape {tuple(tensors[key].shape)}, expected {tuple(parameter.shape)}")
                        parameter.copy_(tensors[key])
                for key in set(tensors) - set(parameters):  # trained tensors of the model itself: swapped by use()
                    if key not in self._base_values:
                        self._base_values[key] = own[key].detach().clone()
                    if self._base_values[key].shape != tensors[key].shape:
                        raise CompatibilityError(
                            f"adapter '{name}': task tensor {key} has shape {tuple(tensors[key].shape)}, this set's "
                            f"{tuple(self._base_values[key].shape)} (adapters in one set share the task's shapes, e.g. its classes)"
                        )
                    task_state[key] = tensors[key].clone()
        except BaseException:
            self._discard(methods)
            raise
        adapter = NamedAdapter(name, params, methods, parameters, task_state, source)
        self.adapters[name] = adapter
        for method in methods:
            method.set_enabled(False)
        self._sync_info()
        return adapter

    def _apply(self, name: str, params: list[Any]) -> tuple[list[AppliedMethod], dict[str, nn.Parameter]]:
        """Apply methods so their modules get the names a fresh build gives them; then move them aside."""
        from adaptkit.builder import BuildContext

        model = self.model
        owned = {id(m) for a in self.adapters.values() for method in a.methods for m in method.added}
        hidden = [(parent, child_name, child) for parent in model.modules() for child_name, child in parent._modules.items()
                  if child is not None and id(child) in owned]
        for parent, child_name, _ in hidden:
            del parent._modules[child_name]
        try:
            before = {id(p) for p in model.parameters()}
            ctx = BuildContext(spec=self.base_spec, registry=self.registry, backbone=model.backbone)
            methods = [self.registry.get("method", p.name).factory(p, model.surface, ctx) for p in params]
            parameters = {n: p for n, p in model.named_parameters() if id(p) not in before}
            new = {id(m) for method in methods for m in method.added}
            taken = {(id(parent), child_name) for parent, child_name, _ in hidden}
            for parent in list(model.modules()):
                for child_name, child in list(parent._modules.items()):
                    if child is not None and id(child) in new and (id(parent), child_name) in taken:
                        del parent._modules[child_name]
                        mine = {n for owner, n in taken if owner == id(parent)}
                        parent._modules[free_child_name(parent, f"{child_name}_{name}", mine)] = child
        finally:
            for parent, child_name, child in hidden:
                parent._modules[child_name] = child
        return methods, parameters

    def _discard(self, methods: list[AppliedMethod]) -> None:
        """Undo an :meth:`_add` that failed after applying: switch its methods off and take their
        modules out of the model (so the next adapter's modules get the usual names)."""
        for method in methods:
            method.set_enabled(False)
        ids = {id(m) for method in methods for m in method.added}
        for parent in list(self.model.modules()):
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) in ids:
                    del parent._modules[child_name]

    def _sync_info(self) -> None:
        self.model.adaptkit.methods = [m for a in self.adapters.values() for m in a.methods]

    def _adapter(self, name: str) -> NamedAdapter:
        if name not in self.adapters:
            raise CompatibilityError(f"no adapter named '{name}'; loaded: {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]

    def _require_usable(self) -> None:
        if self._broken:
            raise CompatibilityError(f"this AdapterSet is unusable: {self._broken}; start a new one")

    # ----------------------------------------------------------------- switching
    def use(self, *names: str) -> None:
        """Switch on exactly the named adapters (their updates add up); the task tensors
        (the head) come from the first one."""
        self._require_usable()
        for name in names:
            self._adapter(name)
        for adapter in self.adapters.values():
            for method in adapter.methods:
                method.set_enabled(adapter.name in names)
        self.active = list(names)
        if names:
            self._load_task_state(self.adapters[names[0]].task_state)
        # tensors outside the task (norms an adapter trained) come from the first active adapter that has them
        for key, base in self._base_values.items():
            if key in self._base_task_state:
                continue
            owner = next((self.adapters[n] for n in names if key in self.adapters[n].task_state), None)
            self._load_task_state({key: owner.task_state[key] if owner is not None else base})

    def disable(self) -> None:
        """Switch every adapter off: the model computes the base backbone (with the current head)."""
        self.use()

    def _load_task_state(self, state: Mapping[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor)

    def remove(self, name: str) -> None:
        """Switch an adapter off for good and forget it (its modules stay, inert, in the model)."""
        adapter = self.adapters.pop(self._adapter(name).name)
        for method in adapter.methods:
            method.set_enabled(False)
        for parameter in adapter.parameters.values():
            parameter.requires_grad_(False)
        self.active = [n for n in self.active if n != name]
        self._sync_info()

    # ----------------------------------------------------------------- combining
    def combine(
        self,
        name: str,
        weights: Mapping[str, float] | Sequence[str],
        how: str = "cat",
        rank: int | None = None,
        head: str = "weighted",
    ) -> NamedAdapter:
        """A new adapter ``name``: the weighted combination of low-rank adapters.

        ``weights`` maps adapter names to weights (a list of names: weight 1 each). ``how``:
        ``cat`` (exact, rank = the sum), ``svd`` (exact sum truncated to ``rank``, default
        the largest input rank) or ``linear`` (factor-wise, same rank). ``head``:
        ``weighted`` (the task tensors averaged with the weights) or an adapter's name.
        """
        from adaptkit.lowrank import COMBINATIONS, combine_layer, stack_updates

        self._require_usable()
        if how not in COMBINATIONS:
            raise CompatibilityError(f"combination '{how}': choose one of {', '.join(COMBINATIONS)}")
        weights = {n: 1.0 for n in weights} if not isinstance(weights, Mapping) else dict(weights)
        if not weights:
            raise CompatibilityError("combine needs at least one adapter")
        for source in weights:
            self._adapter(source)
        per_layer: dict[str, dict[str, list[Any]]] = {}
        record = None
        for source in weights:
            for method in self.adapters[source].methods:
                candidate = self.registry.get("method", method.name)
                if record is None and candidate.for_layers is not None:
                    record = candidate
                for update in method.low_rank_updates():
                    per_layer.setdefault(update.layer, {}).setdefault(source, []).append(update)
        if record is None:
            raise CompatibilityError(f"no method of {', '.join(weights)} can hold a combination (no for_layers in its record)")
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, by_source in per_layer.items():
            rows = int(next(iter(by_source.values()))[0].module.weight.shape[0])
            terms = []
            for source, updates in by_source.items():
                a, b, scale = stack_updates(updates, rows)
                terms.append((weights[source], a, b, scale))
            try:
                factors[layer] = combine_layer(terms, how, rank)
            except ValueError as exc:
                raise CompatibilityError(f"layer {layer}: {exc}") from None
        params = record.for_layers({layer: (int(a.shape[0]), float(a.shape[0])) for layer, (a, _) in factors.items()})
        adapter = self._add(name, [params], {}, f"{how} of {', '.join(f'{w:g} x {n}' for n, w in weights.items())}")
        with torch.no_grad():
            for method in adapter.methods:
                for update in method.low_rank_updates():
                    a, b = factors[update.layer]
                    update.a.copy_(a)
                    update.b.copy_(b)
        adapter.task_state = self._combined_task_state(weights, head)
        return adapter

    def _combined_task_state(self, weights: Mapping[str, float], head: str) -> dict[str, torch.Tensor]:
        foreign = sorted({k for n in weights for k in self.adapters[n].task_state} - set(self._base_task_state))
        if foreign:
            raise CompatibilityError(f"the adapters trained tensors of the model itself (e.g. {foreign[0]}); a combination cannot mix those")
        if head != "weighted":
            if head not in weights:
                raise CompatibilityError(f"head '{head}': name one of the combined adapters ({', '.join(weights)}) or 'weighted'")
            return {k: t.clone() for k, t in self.adapters[head].task_state.items()}
        total = sum(weights.values())
        if total == 0:
            raise CompatibilityError("the weights sum to zero: name the adapter whose head the combination uses (head=...)")
        return {
            key: sum(w * self.adapters[n].task_state[key] for n, w in weights.items()) / total
            for key in self._base_task_state
        }

    # ----------------------------------------------------------------- saving
    def save(self, name: str, path: str | Path) -> list[str]:
        """Save adapter ``name``: a ``.safetensors`` file, or a run directory (spec.yaml,
        adapter.safetensors, run.json) that ``adaptkit merge`` / ``export`` / :meth:`load` take."""
        from adaptkit import __version__
        from adaptkit.checkpoint import FORMAT, save_tensors
        from adaptkit.spec import load_spec

        adapter = self._adapter(name)
        spec = load_spec({**self.base_spec.to_dict(), "name": name, "methods": [_plain(p) for p in adapter.params]}, registry=self.registry)
        metadata = {
            "format": FORMAT, "adaptkit_version": __version__, "spec": json.dumps(spec.to_dict()),
            "base_fingerprint": self.model.adaptkit.base_fingerprint, "methods": json.dumps([p.name for p in adapter.params]),
            "adapter_source": adapter.source,
        }
        path = Path(path)
        if path.suffix == ".safetensors":
            save_tensors(path, adapter.state(), metadata)
            return [path.name]
        from adaptkit.rundir import RUN_FILES, RunDir

        path.mkdir(parents=True, exist_ok=True)
        run = RunDir.at(path)
        save_tensors(run.adapter, adapter.state(), metadata)
        status = "combined" if adapter.source and " x " in adapter.source else "saved"
        run.write_saved(spec, status, name=name, note={"source": adapter.source})
        return list(RUN_FILES)

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}{'*' if n in self.active else ''}" for n in self.adapters)
        return f"AdapterSet({self.base_spec.backbone.name}; {shown or 'no adapters'})"


def _plain(params: Any) -> Any:
    return params.model_dump(mode="json") if hasattr(params, "model_dump") else params

