"""The component registry: built-in plugins from registry.yaml, others from entry points.

Built-in and third-party plugins go through the same door: a module with
``@hookimpl`` functions registered with a pluggy ``PluginManager``. A plugin that
fails to import or breaks the contract is reported by name and skipped; the others
keep working. Two plugins registering the same name is an error naming both.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import importlib.metadata
import os
import sys
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pluggy

from adaptkit import hookspecs
from adaptkit.errors import AdaptkitError, PluginError, did_you_mean
from adaptkit.params import ComponentParams
from adaptkit.records import RECORD_TYPES, ExportFormatRecord, LoggerRecord, PresetRecord, Record, RunInfo

KINDS = ("backbone", "method", "task", "data")
_HOOK_OF_KIND = {
    "backbone": "adaptkit_backbones",
    "method": "adaptkit_methods",
    "task": "adaptkit_tasks",
    "data": "adaptkit_data_sources",
}
ENTRY_POINT_GROUP = "adaptkit"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded: its name, where it came from, and why."""

    plugin: str
    source: str
    error: str

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' ({self.source}) was skipped: {self.error}"


def default_registry_file() -> Path:
    """Locate registry.yaml: ``$ADAPTKIT_REGISTRY`` or the one beside the plugins."""
    env = os.environ.get("ADAPTKIT_REGISTRY")
    if env:
        return Path(env)
    import adaptkit_plugins

    return Path(adaptkit_plugins.__file__).resolve().parent.parent / "registry.yaml"


def _read_registry_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise PluginError(f"registry file {path} not found") from exc
    except yaml.YAMLError as exc:
        raise PluginError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PluginError(f"{path}: expected a mapping with 'plugins' and 'presets'")
    return data


class Registry:
    """Every registered backbone, method, task, data source and preset.

    Example::

        reg = Registry()
        reg.names("method")            # ['adapter', 'full', 'lora', ...]
        reg.get("method", "lora")      # MethodRecord(name='lora', ...)
        reg.find("backbone", "vi*")    # fnmatch patterns, like timm.list_models

    ``plugins`` adds plugin objects or module names directly (handy in tests);
    ``entry_points=False`` ignores installed third-party packages.
    """

    def __init__(
        self,
        *,
        registry_file: str | Path | None = None,
        builtin: bool = True,
        entry_points: bool = True,
        plugins: Sequence[object | str] = (),
    ) -> None:
        self.failures: list[PluginFailure] = []
        self._sources: dict[str, str] = {}
        self._records: dict[str, dict[str, Record]] = {kind: {} for kind in KINDS}
        self._presets: dict[str, PresetRecord] = {}
        self._loggers: dict[str, LoggerRecord] = {}
        self._export_formats: dict[str, ExportFormatRecord] = {}
        #: the loggers of a spec that names none (registry.yaml's ``loggers``)
        self.default_loggers: list[str] = []
        #: the format ``adaptkit export`` writes without --format (registry.yaml's ``export_format``)
        self.default_export_format = ""
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)

        if builtin:
            path = Path(registry_file) if registry_file else default_registry_file()
            data = _read_registry_file(path)
            for module in data.get("plugins") or []:
                self._register_module(str(module), source="built-in", fatal=True)
            self.default_loggers = [str(name) for name in data.get("loggers") or []]
            self.default_export_format = str(data.get("export_format") or "")
            for name, entry in (data.get("presets") or {}).items():
                self._add_preset(_preset_from_yaml(name, entry, path), provider=str(path.name))
        if entry_points:
            self._load_entry_points()
        for plugin in plugins:
            if isinstance(plugin, str):
                self._register_module(plugin, source="argument", fatal=False)
            else:
                self._register_object(plugin, getattr(plugin, "__name__", repr(plugin)), "argument")
        self._collect()

    # ----------------------------------------------------------------- loading
    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            source = f"package {dist.name}" if dist is not None else "entry point"
            try:
                obj = ep.load()
            except (Exception, SystemExit) as exc:  # a broken third-party plugin (even one calling sys.exit) must not break the rest
                self.failures.append(PluginFailure(ep.name, source, f"import failed: {_raised(exc)}"))
                continue
            self._register_object(obj, ep.name, source)

    def _register_module(self, module: str, source: str, fatal: bool) -> None:
        try:
            obj = importlib.import_module(module)
        except (Exception, SystemExit) as exc:
            failure = PluginFailure(module, source, f"import failed: {_raised(exc)}")
            if fatal:
                raise PluginError(str(failure)) from exc
            self.failures.append(failure)
            return
        self._register_object(obj, module, source)

    def _register_object(self, obj: object, name: str, source: str) -> None:
        if self._pm.get_plugin(name) is not None or self._pm.is_registered(obj):
            return
        try:
            self._pm.register(obj, name=name)
        except pluggy.PluginValidationError as exc:
            self.failures.append(PluginFailure(name, source, f"breaks the hook contract: {exc}"))
            return
        self._sources[name] = source
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self._pm.unregister(obj)
            known = hook_names()
            bad = [h for h in dir(obj) if h.startswith("adaptkit_") and h not in known]
            hint = "".join(f" '{h}'{did_you_mean(h, known)}" for h in bad)
            self.failures.append(PluginFailure(name, source, f"defines an unknown hook:{hint or ' ' + str(exc)}"))

    def _collect(self) -> None:
        for kind, hook_name in _HOOK_OF_KIND.items():
            for provider, records in self._call_hook(hook_name):
                for record in records:
                    expected = RECORD_TYPES[kind]
                    if not isinstance(record, expected):
                        self._fail_provider(provider, f"{hook_name} returned {type(record).__name__}, expected {expected.__name__}")
                        continue
                    problem = _params_problem(record)
                    if problem:
                        self._fail_provider(provider, problem)
                        continue
                    self._add(replace(record, provider=provider))
        for provider, records in self._call_hook("adaptkit_presets"):
            for record in records:
                if not isinstance(record, PresetRecord):
                    self._fail_provider(provider, f"adaptkit_presets returned {type(record).__name__}, expected PresetRecord")
                    continue
                self._add_preset(record, provider)
        self._collect_named("adaptkit_loggers", LoggerRecord, self._loggers, "logger")
        self._collect_named("adaptkit_export_formats", ExportFormatRecord, self._export_formats, "export format")

    def _collect_named(self, hook_name: str, record_type: type, table: dict[str, Any], what: str) -> None:
        """Records of ``hook_name`` into ``table`` by name; a name registered twice is an error naming both providers."""
        for provider, records in self._call_hook(hook_name):
            for record in records:
                if not isinstance(record, record_type):
                    self._fail_provider(provider, f"{hook_name} returned {type(record).__name__}, expected {record_type.__name__}")
                    continue
                if record.name in table:
                    raise PluginError(f"{what} '{record.name}' is registered twice: by '{table[record.name].provider}' "
                                      f"and by '{provider}'; uninstall one of them or rename the {what}")
                table[record.name] = replace(record, provider=provider)

    def _call_hook(self, hook_name: str) -> Iterable[tuple[str, list[Any]]]:
        hook = getattr(self._pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):  # registration order
            provider = self._pm.get_name(impl.plugin) or repr(impl.plugin)
            try:
                result = impl.function()
                if result is not None and (isinstance(result, (str, bytes, dict)) or not isinstance(result, Iterable)):
                    self._fail_provider(provider, f"{hook_name}() returned {type(result).__name__}, expected a list of records")
                    continue
                records = list(result or [])  # a generator runs here: what it raises is the plugin's too
            except (Exception, SystemExit) as exc:
                self._fail_provider(provider, f"{hook_name}() raised {_raised(exc)}")
                continue
            yield provider, records

    def call_lifecycle(self, hook_name: str, **arguments: Any) -> None:
        """Call lifecycle hook ``hook_name`` (one with arguments) on every plugin, in registration
        order, each with the arguments it declares (pytest's rule).

        A user error (:class:`~adaptkit.errors.AdaptkitError`) propagates; anything else a
        built-in raises is a bug and propagates too; a third-party plugin that raises is recorded
        in :attr:`failures`, warned about on stderr, and the others still run."""
        self._call_each(hook_name, lambda provider: arguments)

    def add_commands(self, commands: Any) -> None:
        """Let every plugin add its subcommands (the ``adaptkit_commands`` hook) through
        ``commands`` (an :class:`adaptkit.commands.Commands`), each credited to its provider."""
        self._call_each("adaptkit_commands", lambda provider: {"commands": commands.for_provider(provider)})

    @contextlib.contextmanager
    def observing(self, run: RunInfo, loggers: Sequence[str]) -> Iterator[None]:
        """Create the named loggers for ``run`` and register them as plugins while the block runs,
        so the training-lifecycle hooks reach them with every other plugin's."""
        records = [self.logger(name) for name in loggers]
        observers = [record.factory(run) for record in records]
        names = []
        try:
            for record, observer in zip(records, observers):
                name = f"logger {record.name} of run {id(run)}"
                self._pm.register(observer, name=name)
                self._sources[name] = self._sources.get(record.provider, "plugin")  # a built-in's failure is a bug
                names.append(name)
            yield
        finally:
            for name in names:
                self._pm.unregister(name=name)
                self._sources.pop(name, None)

    def loggers(self) -> list[LoggerRecord]:
        """Every registered experiment logger, sorted by name."""
        return [self._loggers[name] for name in sorted(self._loggers)]

    def logger(self, name: str) -> LoggerRecord:
        """The logger called ``name``; a clear error with suggestions if none."""
        if name not in self._loggers:
            raise PluginError(self.unknown_logger_message(name))
        return self._loggers[name]

    def export_formats(self) -> list[ExportFormatRecord]:
        """Every registered export format, sorted by name."""
        return [self._export_formats[name] for name in sorted(self._export_formats)]

    def export_format(self, name: str) -> ExportFormatRecord:
        """The export format called ``name``; a clear error with suggestions if none."""
        if name not in self._export_formats:
            raise PluginError(f"unknown export format '{name}'{did_you_mean(name, self._export_formats)}; "
                              f"registered formats: {', '.join(sorted(self._export_formats)) or 'none'}")
        return self._export_formats[name]

    def unknown_logger_message(self, name: str) -> str:
        return (f"unknown logger '{name}'{did_you_mean(name, self._loggers)}; "
                f"registered loggers: {', '.join(sorted(self._loggers)) or 'none'}")

    def _call_each(self, hook_name: str, arguments_for: typing.Callable[[str], dict[str, Any]]) -> None:
        hook = getattr(self._pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):  # registration order
            provider = self._pm.get_name(impl.plugin) or repr(impl.plugin)
            given = arguments_for(provider)
            try:
                impl.function(**{name: given[name] for name in impl.argnames})
            except AdaptkitError:
                raise
            except Exception as exc:
                if self._sources.get(provider) == "built-in":
                    raise
                failure = PluginFailure(provider, self._sources.get(provider, "plugin"), f"{hook_name}() raised {_raised(exc)}")
                self.failures.append(failure)
                print(f"warning: {failure}", file=sys.stderr)

    def _fail_provider(self, provider: str, error: str) -> None:
        source = self._sources.get(provider, "plugin")
        if source == "built-in":
            raise PluginError(f"built-in plugin '{provider}': {error}")
        self.failures.append(PluginFailure(provider, source, error))

    def _add(self, record: Record) -> None:
        table = self._records[record.kind]
        if record.name in table:
            other = table[record.name]
            raise PluginError(
                f"{record.kind} '{record.name}' is registered twice: by '{other.provider}' and by "
                f"'{record.provider}'; uninstall one of them or rename the component"
            )
        table[record.name] = record

    def _add_preset(self, record: PresetRecord, provider: str) -> None:
        if record.name in self._presets:
            other = self._presets[record.name]
            raise PluginError(
                f"preset '{record.name}' is registered twice: by '{other.provider}' and by '{provider}'"
            )
        self._presets[record.name] = replace(record, provider=provider)

    # ----------------------------------------------------------------- lookup
    def names(self, kind: str) -> list[str]:
        """Sorted names of every registered component of ``kind``."""
        return sorted(self._table(kind))

    def records(self, kind: str) -> list[Record]:
        """Every record of ``kind``, sorted by name."""
        table = self._table(kind)
        return [table[name] for name in sorted(table)]

    def find(self, kind: str, pattern: str = "*") -> list[Record]:
        """Records of ``kind`` whose names match an fnmatch ``pattern``."""
        return [r for r in self.records(kind) if fnmatch.fnmatch(r.name, pattern)]

    def get(self, kind: str, name: str) -> Record:
        """The record of ``kind`` called ``name``; a clear error with suggestions if none."""
        table = self._table(kind)
        if name not in table:
            raise PluginError(self.unknown_message(kind, name))
        return table[name]

    def unknown_message(self, kind: str, name: str) -> str:
        table = self._table(kind)
        hint = did_you_mean(name, table)
        listing = ", ".join(sorted(table)) or "none"
        return f"unknown {kind} '{name}'{hint}; registered {kind}s: {listing}"

    def source(self, provider: str) -> str:
        """Where a provider came from: ``built-in``, ``package <dist>`` or ``argument``."""
        return self._sources.get(provider, "registry.yaml" if provider.endswith(".yaml") else "plugin")

    def presets(self, backbone: str | None = None) -> list[PresetRecord]:
        """Registered presets, optionally only those of one backbone."""
        return [p for _, p in sorted(self._presets.items()) if backbone is None or p.backbone == backbone]

    def preset(self, name: str) -> PresetRecord | None:
        """The preset called ``name``, or None."""
        return self._presets.get(name)

    def _table(self, kind: str) -> dict[str, Record]:
        if kind not in self._records:
            raise PluginError(f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")
        return self._records[kind]


def hook_names() -> list[str]:
    """Every hook a plugin may implement (the ``adaptkit_*`` functions of :mod:`adaptkit.hookspecs`)."""
    return sorted(name for name in vars(hookspecs) if name.startswith("adaptkit_"))


def _raised(exc: BaseException) -> str:
    """What a plugin raised, for its failure line (``sys.exit(0)`` at import included)."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _params_problem(record: Record) -> str | None:
    params = record.params
    if not (isinstance(params, type) and issubclass(params, ComponentParams)):
        return f"{record.kind} '{record.name}': params must subclass adaptkit.ComponentParams"
    field = params.model_fields.get("name")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal or typing.get_args(field.annotation) != (record.name,):
        return (
            f"{record.kind} '{record.name}': its params model {params.__name__} must declare "
            f"name: Literal['{record.name}'] = '{record.name}'"
        )
    if params.model_config.get("extra") != "forbid":
        return f"{record.kind} '{record.name}': its params model {params.__name__} must forbid extra keys"
    return None


def _preset_from_yaml(name: str, entry: Any, path: Path) -> PresetRecord:
    if not isinstance(entry, dict) or "backbone" not in entry:
        raise PluginError(f"{path}: preset '{name}' needs a mapping with 'backbone' and 'config'")
    return PresetRecord(
        name=name, backbone=entry["backbone"], config=entry.get("config") or {}, summary=entry.get("summary", "")
    )


_default: Registry | None = None


def registry(refresh: bool = False) -> Registry:
    """The process-wide default registry (built-ins plus installed entry points)."""
    global _default
    if _default is None or refresh:
        _default = Registry()
    return _default
