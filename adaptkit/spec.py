"""The run spec: one typed object from a YAML file or from Python.

A :class:`RunSpec` names a backbone, the methods applied to it in order, a task and a
data source (each validated by the params model its plugin registered), plus the
training and output settings below. Python users build it from typed objects::

    spec = RunSpec(backbone=VitParams(model="vit_tiny_digits"),
                   methods=[LoraParams(rank=4)],
                   task=ClassificationParams(), data=DigitsParams())

YAML users write the same structure; :func:`load_spec` validates it and reports every
problem with its YAML path (``methods[0].rank: Input should be greater than 0``).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from adaptkit.errors import CheckpointError, PluginError, SpecError, did_you_mean
from adaptkit.params import ComponentParams

#: Spec fields holding one component, and the registry kind of each.
SINGLE_COMPONENTS = {"backbone": "backbone", "task": "task", "data": "data"}


#: seeds go to torch, numpy and Python's random; torch takes 64 bits
MAX_SEED = 2**63 - 1
#: where a run may train: ``auto`` (cuda when present, else cpu), cpu, cuda, cuda:N, mps
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class StrictModel(BaseModel):
    # a number a user writes is finite: inf (or 1e400) as a learning rate trains nothing
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Beta = Annotated[float, Field(ge=0, lt=1)]


class TrainSpec(StrictModel):
    """How to train. Unset ``lr`` / ``weight_decay`` take the first method's recommendation."""

    epochs: int = Field(10, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(64, gt=0, description="global batch per optimizer step")
    eval_batch_size: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0, le=100, description="peak learning rate; default: the method's recommended rate")
    weight_decay: float | None = Field(None, ge=0, description="AdamW decoupled weight decay; default: the method's")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW's moment decay rates, each in [0, 1)")
    warmup: float = Field(0.05, ge=0, description="warm-up: a fraction of all steps when < 1, else a step count")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null disables clipping")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    eval_every: int | None = Field(None, gt=0, description="evaluate every N steps; default once per epoch")
    checkpoint_every: int | None = Field(None, gt=0, description="save resumable state every N steps; default at each evaluation")
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16"] = "fp32"
    resume: bool = Field(False, description="continue from the output directory's last checkpoint")
    progress: bool = Field(True, description="show the progress bar (when its logger is on)")
    loggers: list[str] | None = Field(
        None, description="experiment loggers by name (`adaptkit plugins logger` lists them); "
        "default: registry.yaml's loggers, which write metrics.jsonl and draw the progress bar"
    )
    threads: int | None = Field(None, gt=0, description="torch CPU threads")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="under torchrun: ddp (a full copy per process) or fsdp (parameters sharded per block); auto = ddp"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each surface block in backward instead of keeping its activations: "
        "less memory, about a third more compute; the same loss and gradients"
    )
    compile: bool = Field(False, description="torch.compile each surface block (compiled at the first step; see the README for where it helps)")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_accum(self) -> "TrainSpec":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        return self


class OutputSpec(StrictModel):
    """Where a run writes its files."""

    dir: str | None = Field(None, description="output directory; default runs/<spec name>")
    overwrite: bool = Field(False, description="replace a directory that already holds another run")


class RunSpec(StrictModel):
    """One run: backbone + methods (applied in order) + task + data + train + output."""

    name: str | None = Field(None, description="run name; default: the YAML file's stem")
    description: str = ""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    backbone: SerializeAsAny[ComponentParams]
    methods: list[SerializeAsAny[ComponentParams]] = Field(default_factory=list)
    task: SerializeAsAny[ComponentParams]
    data: SerializeAsAny[ComponentParams]
    train: TrainSpec = Field(default_factory=TrainSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @model_validator(mode="before")
    @classmethod
    def _resolve_components(cls, data: Any) -> Any:
        if isinstance(data, dict) and _has_raw_components(data):
            from adaptkit.registry import registry

            return resolve(data, registry())
        return data

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what a YAML file would hold)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """A stable hash of the spec, ignoring where and how it is run."""
        import hashlib

        data = self.to_dict()
        for key in ("resume", "progress", "loggers", "device", "threads", "strategy", "gradient_checkpointing", "compile"):
            data["train"].pop(key, None)
        data.pop("output", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _has_raw_components(data: dict[str, Any]) -> bool:
    values = [data.get(key) for key in SINGLE_COMPONENTS] + list(data.get("methods") or [])
    return any(v is not None and not isinstance(v, ComponentParams) for v in values)


# --------------------------------------------------------------------- validation
def format_location(loc: tuple[Any, ...] | list[Any]) -> str:
    """``('methods', 0, 'rank')`` -> ``methods[0].rank``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def validation_problems(error: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[str]:
    """One ``path: message`` line per pydantic error of ``model``, with a did-you-mean for unknown keys."""
    problems = []
    for item in error.errors():
        loc = prefix + tuple(item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            parent_fields = _fields_at(model, item["loc"][:-1])
            hint = did_you_mean(str(loc[-1]), parent_fields) if parent_fields else ""
            message = f"unknown key{hint}"
            if parent_fields:
                message += f"; allowed keys: {', '.join(sorted(parent_fields))}"
        elif item["type"] == "missing":
            message = "required but missing"
        problems.append(f"{format_location(loc)}: {message}")
    return problems


def _fields_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def _validate_component(value: Any, kind: str, loc: tuple[Any, ...], registry: Any, problems: list[str]) -> ComponentParams | None:
    where = format_location(loc)
    if isinstance(value, ComponentParams):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping with a 'name' (or just the {kind} name), got {type(value).__name__}")
        return None
    name = value.get("name")
    if name is None:
        problems.append(f"{where}.name: required but missing; registered {kind}s: {', '.join(registry.names(kind))}")
        return None
    try:
        record = registry.get(kind, str(name))
    except PluginError:
        problems.append(f"{where}.name: {registry.unknown_message(kind, str(name))}")
        return None
    try:
        return record.params.model_validate(value)
    except ValidationError as exc:
        problems.extend(validation_problems(exc, record.params, loc))
        return None


def resolve(data: dict[str, Any], registry: Any, source: str | None = None) -> dict[str, Any]:
    """Validate every component of raw spec ``data`` against its plugin's params model.

    Returns a copy of ``data`` with the components as params objects. Raises
    :class:`SpecError` listing every problem (in components and in the rest).
    """
    problems: list[str] = []
    out = dict(data)
    placeholder = ComponentParams.model_construct(name="<invalid>")
    for key, kind in SINGLE_COMPONENTS.items():
        if data.get(key) is None:
            if key in data:
                problems.append(f"{key}: required but missing")
            continue  # let pydantic report the missing field
        out[key] = _validate_component(data[key], kind, (key,), registry, problems) or placeholder
    methods = data.get("methods")
    if methods is not None:
        if not isinstance(methods, list):
            problems.append(f"methods: expected a list of methods, got {type(methods).__name__}")
            out["methods"] = []
        else:
            out["methods"] = [
                _validate_component(m, "method", ("methods", i), registry, problems) or placeholder
                for i, m in enumerate(methods)
            ]
    loggers = data.get("train", {}).get("loggers") if isinstance(data.get("train"), dict) else None
    if isinstance(loggers, list):
        problems += [f"train.loggers[{i}]: {registry.unknown_logger_message(name)}"
                     for i, name in enumerate(loggers) if isinstance(name, str) and name not in {r.name for r in registry.loggers()}]
    if problems:
        try:
            RunSpec.model_validate(out)
        except ValidationError as exc:
            problems.extend(validation_problems(exc, RunSpec))
        raise SpecError(problems, source)
    return out


def validate_spec(data: Any, registry: Any = None, source: str | None = None) -> RunSpec:
    """Validate raw spec ``data`` (a dict) into a :class:`RunSpec`, or raise :class:`SpecError`."""
    if registry is None:
        from adaptkit.registry import registry as default_registry

        registry = default_registry()
    if isinstance(data, RunSpec):
        return data
    if not isinstance(data, dict):
        raise SpecError(f"a spec must be a mapping with backbone, task and data, got {type(data).__name__}", source)
    resolved = resolve(data, registry, source)
    try:
        return RunSpec.model_validate(resolved)
    except ValidationError as exc:
        raise SpecError(validation_problems(exc, RunSpec), source) from None


# --------------------------------------------------------------------- loading
#: a spec file is a page or two of YAML: beyond this it is a mistake (or an attack), not a spec
MAX_SPEC_BYTES = 1 << 20
#: how deep mappings and lists may nest in a spec (a real one nests 4 or 5 levels)
MAX_YAML_DEPTH = 64
#: how many values a spec may hold once its aliases are expanded (each alias counts its whole value)
MAX_YAML_NODES = 100_000


def load_yaml(text: str, source: str | None = None) -> Any:
    """Parse YAML safely for a spec: no Python objects, no duplicate keys, bounded depth and alias expansion.

    Raises :class:`SpecError` with the line and column of the problem.

    Example::

        >>> load_yaml("a: 1\na: 2")
        SpecError: line 2, column 1: not valid YAML: duplicate key 'a' (first on line 1)
    """
    import yaml

    loader = None
    try:
        loader = _spec_loader()(text)  # (the reader refuses control characters here)
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{where}not valid YAML: {problem}", source) from None
    except RecursionError:  # nesting the composer's own recursion cannot take (the depth bound normally comes first)
        raise SpecError(f"not valid YAML: nested deeper than {MAX_YAML_DEPTH} levels", source) from None
    finally:
        if loader is not None:
            loader.dispose()


_LOADER: Any = None


def _spec_loader() -> Any:
    """yaml.SafeLoader with the limits of :func:`load_yaml` (built once, on first use: yaml loads lazily)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml
    from yaml.constructor import ConstructorError
    from yaml.composer import ComposerError

    class SpecLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    raise ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def compose_document(self) -> Any:
            node = super().compose_document()
            size = _expanded_size(node, {})
            if size is None:
                raise ComposerError(None, None, "an alias refers to the value that holds it (a loop)", node.start_mark)
            if size > MAX_YAML_NODES:
                raise ComposerError(None, None, f"its aliases expand to more than {MAX_YAML_NODES:,} values "
                                    "(an alias bomb?); write the values out", node.start_mark)
            return node

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node)
                    except TypeError:
                        continue  # an unhashable key: the base class says so
                    if first is not key_node:
                        raise ConstructorError(None, None, f"duplicate key {key!r} (first on line {first.start_mark.line + 1})",
                                               key_node.start_mark)
            return super().construct_mapping(node, deep)

    _LOADER = SpecLoader
    return _LOADER


def _expanded_size(node: Any, sizes: dict[int, int | None]) -> int | None:
    """How many nodes ``node`` becomes once every alias is written out (memoised: linear in the
    document), or None when an alias refers to a value that holds it (it would never end)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = None  # in progress: meeting it again below is a loop
    children = node.value if isinstance(node.value, list) else []
    total = 1
    for child in children:
        for part in child if isinstance(child, tuple) else (child,):
            size = _expanded_size(part, sizes)
            if size is None:
                return None
            total += size
    sizes[id(node)] = total
    return total


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML spec file (at most :data:`MAX_SPEC_BYTES`), turning every failure into a :class:`SpecError`."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:  # never more than the limit, even of /dev/zero
            raw = handle.read(MAX_SPEC_BYTES + 1)
        text = raw.decode()
    except FileNotFoundError:
        raise SpecError("file not found", str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read: {exc}", str(path)) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"larger than {MAX_SPEC_BYTES >> 20} MB; a spec is a page of YAML (is this the right file?)", str(path))
    data = load_yaml(text, str(path))
    if data is None:
        raise SpecError("the file is empty", str(path))
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping at the top level, got {type(data).__name__}", str(path))
    return data


def parse_value(text: str) -> Any:
    """Parse an override value: numbers (``1e-3`` too), booleans, null, lists, or a string."""
    for convert in (int, float):
        try:
            value = convert(text)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value) and text.strip().lower() not in ("inf", "-inf", "nan"):
            continue
        return value
    try:
        return load_yaml(text)
    except SpecError:
        return text


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for chunk in path.replace("[", ".").replace("]", "").split("."):
        if chunk == "":
            raise ValueError("empty key")
        parts.append(int(chunk) if chunk.lstrip("-").isdigit() else chunk)
    return parts


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str | None = None) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (``methods.0.rank=4`` or ``methods[0].rank=4``)."""
    data = copy.deepcopy(data)
    for override in overrides:
        if "=" not in override:
            raise SpecError(f"override '{override}' must look like key.path=value (e.g. train.lr=1e-3)", source)
        key, _, raw = override.partition("=")
        try:
            path = _split_path(key.strip())
        except ValueError:
            raise SpecError(f"override '{override}': '{key}' is not a key path like train.lr or methods.0.rank", source) from None
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            node = _descend(node, part, path[: depth + 1], override, source, path[depth + 1])
        last = path[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or not -len(node) <= last < len(node):
                raise SpecError(f"override '{override}': index {last} is out of range (the list has {len(node)} entries)", source)
        elif not isinstance(node, dict):
            raise SpecError(f"override '{override}': {format_location(path[:-1])} is not a mapping", source)
        node[last] = parse_value(raw)
    return data


def _descend(node: Any, part: str | int, walked: list[Any], override: str, source: str | None, next_part: Any) -> Any:
    where = format_location(walked)
    if isinstance(node, list):
        if not isinstance(part, int) or not -len(node) <= part < len(node):
            raise SpecError(f"override '{override}': {where} is out of range (the list has {len(node)} entries)", source)
        child = node[part]
        if isinstance(child, str):  # component shorthand `- lora` becomes a mapping
            child = node[part] = {"name": child}
        return child
    if not isinstance(node, dict):
        raise SpecError(f"override '{override}': {format_location(walked[:-1])} is not a mapping", source)
    child = node.get(part)
    if child is None:
        child = node[part] = [] if isinstance(next_part, int) else {}
    elif isinstance(child, str) and part in SINGLE_COMPONENTS:
        child = node[part] = {"name": child}
    return child


def stored_spec(value: Any, where: str) -> dict[str, Any]:
    """A spec kept inside a file (an adapter's metadata, ``adaptkit.json``): a mapping, never a path
    to open (``"/dev/zero"`` would be read without end). A :class:`CheckpointError` otherwise."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: the stored spec must be a mapping (backbone, task, data), got {type(value).__name__}")
    return value


def load_spec(path_or_dict: str | Path | dict[str, Any] | RunSpec, overrides: list[str] | None = None, registry: Any = None) -> RunSpec:
    """Load and validate a spec from a YAML path, a dict or a RunSpec, with overrides.

    Example::

        spec = adaptkit.load_spec("examples/quickstart.yaml", ["train.lr=1e-3", "methods.0.rank=4"])

    Raises :class:`~adaptkit.errors.SpecError` with every problem and its YAML path.
    """
    source = None
    if isinstance(path_or_dict, RunSpec):
        data = path_or_dict.to_dict()
    elif isinstance(path_or_dict, dict):
        data = path_or_dict
    else:
        source = str(path_or_dict)
        data = read_yaml(path_or_dict)
        if data.get("name") is None:
            data["name"] = Path(path_or_dict).stem
    if overrides:
        data = apply_overrides(data, list(overrides), source)
    return validate_spec(data, registry, source)


# --------------------------------------------------------------------- schema
def json_schema(registry: Any = None) -> dict[str, Any]:
    """JSON Schema of RunSpec with every registered component's params, for editors."""
    from typing import Union

    from pydantic import create_model

    if registry is None:
        from adaptkit.registry import registry as default_registry

        registry = default_registry()

    def union(kind: str) -> Any:
        models = tuple(r.params for r in registry.records(kind))
        if not models:
            return ComponentParams
        if len(models) == 1:
            return models[0]
        return Annotated[Union[models], Field(discriminator="name")]  # noqa: UP007

    schema_model = create_model(
        "RunSpec",
        __base__=StrictModel,
        name=(str | None, None),
        description=(str, ""),
        seed=(int, Field(0, ge=0, le=MAX_SEED)),
        backbone=(union("backbone"), ...),
        methods=(list[union("method")], []),
        task=(union("task"), ...),
        data=(union("data"), ...),
        train=(TrainSpec, TrainSpec()),
        output=(OutputSpec, OutputSpec()),
    )
    schema = schema_model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "adaptkit RunSpec"
    return schema
