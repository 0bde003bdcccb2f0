"""Typed registration records: what a plugin hook returns.

A record says everything a user needs to write a spec (name, params model, one-line
summary) and how to build the component (``factory``), without building it. Records
are plain data: creating and listing them never imports torch or a model library.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from adaptkit.params import ComponentParams

if TYPE_CHECKING:  # torch-free at run time: records are listed without building anything
    from adaptkit.backbone import Backbone
    from adaptkit.builder import BuildContext
    from adaptkit.data import DataBundle, DataInfo
    from adaptkit.method import AppliedMethod
    from adaptkit.surface import Surface
    from adaptkit.task import TaskModel


class BackboneFactory(Protocol):
    """``factory(params, ctx) -> Backbone``: build the backbone the params describe."""

    def __call__(self, params: Any, ctx: BuildContext, /) -> Backbone: ...


class MethodFactory(Protocol):
    """``factory(params, surface, ctx) -> AppliedMethod``: apply the method to the surface's sites."""

    def __call__(self, params: Any, surface: Surface, ctx: BuildContext, /) -> AppliedMethod: ...


class TaskFactory(Protocol):
    """``factory(params, backbone, data_info, ctx) -> TaskModel``: the task's model around the backbone."""

    def __call__(self, params: Any, backbone: Backbone, data_info: DataInfo, ctx: BuildContext, /) -> TaskModel: ...


class GenerateOptions(Protocol):
    """The flags a generating task adds to ``adaptkit generate`` (see :class:`adaptkit.capabilities.Generates`).

    ``add_arguments(group)`` adds them to the command's argument group for the task (cheap:
    no torch). ``read(args, model)`` checks their values once the run is loaded (raising
    :class:`~adaptkit.errors.AdaptkitError` for a bad one, printing ``note:`` lines where it
    adapts an input) and returns the keyword arguments for ``model.generate`` and the input
    files they name (which the outputs must never overwrite).
    """

    def add_arguments(self, group: Any) -> None: ...

    def read(self, args: Any, model: Any) -> tuple[dict[str, Any], list[str]]: ...


class DataFactory(Protocol):
    """``factory(params, ctx) -> DataBundle``: the data source's splits (lazily read)."""

    def __call__(self, params: Any, ctx: BuildContext, /) -> DataBundle: ...

#: Site kinds a tower can offer (see design.md, "the adaptation surface").
SITE_KINDS = ("layers", "blocks", "attention", "tokens", "text")


@dataclass(frozen=True)
class TowerInfo:
    """What one tower of a backbone offers, known without building it.

    ``sites`` is a subset of :data:`SITE_KINDS`; ``roles`` the layer roles present
    (``attn.q``, ``mlp.in``, ...). Methods check these at validation time.
    """

    sites: frozenset[str]
    roles: frozenset[str] = frozenset()
    modality: str = "image"


@dataclass(frozen=True)
class Record:
    """Common part of every registration record."""

    name: str
    params: type[ComponentParams]
    factory: Callable[..., Any]
    summary: str
    provider: str = ""
    #: a small working configuration, used by docs and by the contract tests:
    #: for a backbone, a spec fragment with tiny ``backbone`` params and a fitting
    #: ``task`` and ``data`` (e.g. ``{"backbone": {"model": "vit_tiny_digits"},
    #: "task": {"name": "classification"}, "data": {"name": "digits"}}``);
    #: for other kinds, params for the component itself (e.g. ``{"rank": 2}``).
    example: Mapping[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "component"


@dataclass(frozen=True)
class BackboneRecord(Record):
    """A backbone: ``factory(params, context) -> adaptkit.backbone.Backbone``.

    ``towers`` maps tower name to :class:`TowerInfo` (or is a function of the params
    returning that mapping); ``capabilities`` names what tasks can ask of the built
    backbone, e.g. ``{"image_features"}`` for ``encode_image``.
    """

    factory: BackboneFactory
    towers: Mapping[str, TowerInfo] | Callable[[Any], Mapping[str, TowerInfo]] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    kind: ClassVar[str] = "backbone"

    def towers_for(self, params: ComponentParams) -> Mapping[str, TowerInfo]:
        return self.towers(params) if callable(self.towers) else self.towers


@dataclass(frozen=True)
class MethodRecord(Record):
    """An adaptation method: ``factory(params, surface, context) -> AppliedMethod``.

    ``check(params, backbone_name, towers)`` returns the problems that make the
    method impossible on a backbone (empty list when it fits); it runs at validation
    time, before anything is built. ``recommended`` holds training defaults that suit
    the method (``{"lr": 1e-2, "weight_decay": 0.0}``), used when the spec leaves them
    unset.

    ``for_layers(layers, dropout=0.0, use_rslora=False)``, optional, is for low-rank
    methods (LoRA): it returns params of this method that put a whole-layer update on
    exactly the named layers (qualified names), ``layers`` mapping each to its
    ``(rank, alpha)``. PEFT imports and adapter combinations use it to become ordinary
    specs of the method.

    ``for_modules(names)``, optional, is for methods that train whole modules (full
    fine-tuning): it returns params of this method that train every weight of exactly
    the named modules (qualified names) and nothing else. PEFT imports use it for the
    backbone modules of ``modules_to_save``.
    """

    factory: MethodFactory
    check: Callable[[Any, str, Mapping[str, TowerInfo]], list[str]] | None = None
    recommended: Mapping[str, float] = field(default_factory=dict)
    for_layers: Callable[..., ComponentParams] | None = None
    for_modules: Callable[[list[str]], ComponentParams] | None = None
    kind: ClassVar[str] = "method"


@dataclass(frozen=True)
class TaskRecord(Record):
    """A task: ``factory(params, backbone, data_info, context) -> adaptkit.task.TaskModel``.

    ``needs`` lists backbone capabilities the task uses; ``data_kinds`` the kinds of
    data bundle it trains on (``"labelled_images"``, ...); ``generate_options`` the flags
    its ``adaptkit generate`` takes (a task that generates).
    """

    factory: TaskFactory
    needs: frozenset[str] = frozenset()
    data_kinds: frozenset[str] = frozenset()
    #: the flags of ``adaptkit generate`` for a task whose model generates images
    generate_options: GenerateOptions | None = None
    #: the towers this task's surface has instead of the backbone's (a task that trains a part the
    #: backbone keeps frozen everywhere else, e.g. ``autoencoder``'s VAE); None: the backbone's
    towers: Mapping[str, TowerInfo] | None = None
    kind: ClassVar[str] = "task"


@dataclass(frozen=True)
class DataRecord(Record):
    """A data source: ``factory(params, context) -> adaptkit.data.DataBundle``.

    ``provides`` is the kind of bundle it yields (``"labelled_images"``, ...).
    """

    factory: DataFactory
    provides: str = "labelled_images"
    kind: ClassVar[str] = "data"


@dataclass(frozen=True)
class PresetRecord:
    """A named configuration of a backbone (a tiny test model, a known architecture).

    ``config`` is interpreted by the backbone named in ``backbone``.
    """

    name: str
    backbone: str
    config: Mapping[str, Any]
    summary: str = ""
    provider: str = ""


@dataclass
class RunInfo:
    """What the training-lifecycle hooks receive about the run they observe.

    ``spec`` is the run's :class:`~adaptkit.spec.RunSpec` (None for a trainer built without
    one), ``train`` the :class:`~adaptkit.spec.TrainSpec` it trains with, ``output_dir`` the directory its files go to, ``total_steps`` the optimizer steps of
    the whole run and ``start_step`` where this process starts (0, or the step a resume
    continues from), ``history`` the evaluation records so far (restored ones when resuming),
    ``primary_metric`` the metric the task follows, ``log`` prints a line for the user.
    ``state`` is a scratch dict for observers that keep something per run.
    """

    spec: Any
    output_dir: Path
    total_steps: int
    start_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    primary_metric: str = "loss"
    log: Callable[[str], None] = print
    train: Any = None
    state: dict[str, Any] = field(default_factory=dict)


class LoggerFactory(Protocol):
    """``factory(run) -> observer``: an object with ``@hookimpl`` methods among the training-lifecycle
    hooks (``adaptkit_train_start``, ``adaptkit_train_step``, ``adaptkit_evaluate``,
    ``adaptkit_train_end``), registered for the duration of one run."""

    def __call__(self, run: RunInfo, /) -> object: ...


@dataclass(frozen=True)
class LoggerRecord:
    """An experiment logger a spec picks by name (``train.loggers: [jsonl, tensorboard]``).

    ``factory(run)`` returns the observer of one run; it raises a user error (e.g. a missing
    optional package) before any step is trained.
    """

    name: str
    factory: LoggerFactory
    summary: str = ""
    provider: str = ""


class ExportWriter(Protocol):
    """``write(model, directory, include_base=False) -> file names``: write a built, trained model
    (its methods applied, adapter loaded) into ``directory`` in the format's own layout."""

    def __call__(self, model: Any, directory: Path, /, *, include_base: bool = False) -> list[str]: ...


class ImportReader(Protocol):
    """``read(source, base_spec, method=None) -> model``: the built adaptkit model (methods applied,
    factors loaded) that computes what ``source`` (a file or directory in the format) does on the
    base model ``base_spec`` names (a spec, dict or YAML path; None: the spec ``source`` carries)."""

    def __call__(self, source: Path, base_spec: Any, /, method: str | None = None) -> Any: ...


@dataclass(frozen=True)
class ExportFormatRecord:
    """A format ``adaptkit export RUN OUT --format NAME`` writes (``peft``, ``diffusers``, ...), and
    that ``adaptkit import`` reads where the format gives ``read`` and ``recognises(source) -> bool``.

    ``write`` raises a :class:`~adaptkit.errors.CompatibilityError` for a run the format cannot
    carry (another backbone, a method that is not a low-rank update), naming what is wrong.
    """

    name: str
    write: ExportWriter
    summary: str = ""
    read: ImportReader | None = None
    recognises: Callable[[Path], bool] | None = None
    provider: str = ""


RECORD_TYPES: dict[str, type[Record]] = {
    cls.kind: cls for cls in (BackboneRecord, MethodRecord, TaskRecord, DataRecord)
}
