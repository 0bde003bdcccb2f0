"""The plugin contract: pluggy hook specifications of the ``adaptkit`` project.

A plugin is a module (or any object) with functions decorated by :data:`hookimpl`
whose names match the hooks below. Built-in plugins are listed in registry.yaml;
third-party ones declare their module under the ``adaptkit`` entry-point group::

    [project.entry-points.adaptkit]
    my_plugin = "my_package.adaptkit_plugin"

Registration hooks take no arguments and return a list of typed records
(:mod:`adaptkit.records`). Records are data, not instances: keep hook bodies cheap
and import heavy libraries (torch, timm, ...) inside the factories.

Lifecycle hooks take arguments, as pytest's do (a plugin's function may declare only
those it uses): ``adaptkit_commands`` adds subcommands to the command line, and
``adaptkit_train_start`` / ``_step`` / ``adaptkit_evaluate`` / ``adaptkit_train_end``
observe a run (experiment loggers are plugins built on them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from adaptkit.records import BackboneRecord, DataRecord, ExportFormatRecord, LoggerRecord, MethodRecord, PresetRecord, RunInfo, TaskRecord

if TYPE_CHECKING:
    from adaptkit.commands import Commands

PROJECT = "adaptkit"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate a plugin's hook functions with this marker.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def adaptkit_backbones() -> list[BackboneRecord]:
    """Register backbones. Called once when the registry loads.

    Return one :class:`~adaptkit.records.BackboneRecord` per backbone::

        @hookimpl
        def adaptkit_backbones():
            return [BackboneRecord(name="convnext", params=ConvNextParams,
                                   factory=build_convnext, summary="timm ConvNeXt",
                                   towers={"vision": TowerInfo(sites=frozenset({"layers"}))},
                                   capabilities=frozenset({"image_features"}))]
    """


@hookspec
def adaptkit_methods() -> list[MethodRecord]:
    """Register adaptation methods. Called once when the registry loads.

    Return one :class:`~adaptkit.records.MethodRecord` per method::

        @hookimpl
        def adaptkit_methods():
            return [MethodRecord(name="bitfit", params=BitFitParams, factory=apply_bitfit,
                                 summary="train only the biases")]
    """


@hookspec
def adaptkit_tasks() -> list[TaskRecord]:
    """Register tasks. Called once when the registry loads.

    Return one :class:`~adaptkit.records.TaskRecord` per task::

        @hookimpl
        def adaptkit_tasks():
            return [TaskRecord(name="regression", params=RegressionParams,
                               factory=build_regression, summary="MSE on image features",
                               needs=frozenset({"image_features"}))]
    """


@hookspec
def adaptkit_data_sources() -> list[DataRecord]:
    """Register data sources. Called once when the registry loads.

    Return one :class:`~adaptkit.records.DataRecord` per source::

        @hookimpl
        def adaptkit_data_sources():
            return [DataRecord(name="my_images", params=MyImagesParams,
                               factory=load_my_images, summary="images listed in a CSV")]
    """


@hookspec
def adaptkit_presets() -> list[PresetRecord]:
    """Register named backbone configurations (presets). Called once at load.

    The built-in presets come from registry.yaml; a plugin may add its own::

        @hookimpl
        def adaptkit_presets():
            return [PresetRecord(name="convnext_tiny_digits", backbone="convnext",
                                 config={"arch": "convnext_atto", "kwargs": {"in_chans": 1}})]
    """


@hookspec
def adaptkit_commands(commands: Commands) -> None:
    """Add subcommands to ``adaptkit``. Called when the command line is built.

    ``commands.add(name, main=..., help=...)`` returns the new command's
    ``argparse.ArgumentParser``; add its flags to it. ``main(args)`` runs when the command is
    given and returns the exit status; raise an :class:`~adaptkit.errors.AdaptkitError` for a
    user error (printed as one line, exit 2). Keep this cheap: import heavy libraries in
    ``main``. A name already taken is an error naming both providers::

        @hookimpl
        def adaptkit_commands(commands):
            p = commands.add("edit", main=run_edit, help="edit StyleGAN images towards a prompt")
            p.add_argument("spec")
            p.add_argument("--prompt")
    """


@hookspec
def adaptkit_loggers() -> list[LoggerRecord]:
    """Register experiment loggers, picked by name in ``train.loggers``. Called once at load.

    A logger's factory gets the :class:`~adaptkit.records.RunInfo` of a run and returns an
    object whose ``@hookimpl`` methods (the training-lifecycle hooks below) are registered
    while that run trains::

        class CsvLogger:
            def __init__(self, run):
                self.path = run.output_dir / "metrics.csv"

            @hookimpl
            def adaptkit_evaluate(self, step, record):
                with open(self.path, "a") as f:
                    f.write(f"{step},{record.get('train_loss')}\n")

        @hookimpl
        def adaptkit_loggers():
            return [LoggerRecord(name="csv", factory=CsvLogger, summary="evaluations as CSV")]
    """


@hookspec
def adaptkit_export_formats() -> list[ExportFormatRecord]:
    """Register formats ``adaptkit export RUN OUT --format NAME`` writes. Called once at load.

    ``write(model, directory, include_base=False)`` gets the trained model (built, its adapter
    loaded, unmerged) and an empty directory, writes the files and returns their names; a run
    the format cannot carry is a :class:`~adaptkit.errors.CompatibilityError` saying why::

        def write_onnx(model, directory, *, include_base=False):
            torch.onnx.export(model.backbone, example, directory / "model.onnx")
            return ["model.onnx"]

        @hookimpl
        def adaptkit_export_formats():
            return [ExportFormatRecord(name="onnx", write=write_onnx, summary="the merged backbone as ONNX")]
    """


@hookspec
def adaptkit_train_start(run: RunInfo) -> None:
    """A run's training starts (or resumes at ``run.start_step``); on the main process only.

    Every registered plugin is called, and the loggers the spec picks::

        @hookimpl
        def adaptkit_train_start(run):
            run.log(f"training {run.total_steps} steps into {run.output_dir}")
    """


@hookspec
def adaptkit_train_step(run: RunInfo, step: int, logs: dict[str, float]) -> None:
    """After optimizer step ``step`` (1-based), on the main process: ``logs`` holds ``loss``
    (this process's mean), ``lr`` and ``samples_per_second``.

        @hookimpl
        def adaptkit_train_step(step, logs):
            if step % 100 == 0:
                print(step, logs["loss"])
    """


@hookspec
def adaptkit_evaluate(run: RunInfo, step: int, record: dict[str, Any]) -> None:
    """After the evaluation at step ``step``, on the main process. ``record`` is the line
    metrics.jsonl gets: ``step``, ``epoch``, ``lr``, ``train_loss`` and ``val_<metric>``.

        @hookimpl
        def adaptkit_evaluate(step, record):
            print(step, record.get("val_accuracy"))
    """


@hookspec
def adaptkit_train_end(run: RunInfo, status: str) -> None:
    """Training ended, on the main process: ``status`` is ``finished``, or ``failed`` when it
    raised (the exception then goes on to the caller). Close files and connections here.

        @hookimpl
        def adaptkit_train_end(run, status):
            run.state["writer"].close()
    """
