"""The quickstart run, composed from typed objects instead of YAML.

    python examples/python_api.py
"""

from __future__ import annotations

import adaptkit
from adaptkit import RunSpec, TrainSpec
from adaptkit_plugins.timm.vit import VitParams
from adaptkit_plugins.data.digits import DigitsParams
from adaptkit_plugins.methods.full import FullParams
from adaptkit_plugins.tasks.classification import ClassificationParams


def quickstart_spec() -> RunSpec:
    """examples/quickstart.yaml as typed objects (tests/test_examples.py checks they agree)."""
    return RunSpec(
        name="quickstart_python",
        backbone=VitParams(model="vit_tiny_digits"),
        methods=[FullParams()],
        task=ClassificationParams(label_smoothing=0.1),
        data=DigitsParams(shift=1),
        train=TrainSpec(epochs=60, batch_size=64, lr=3e-3, weight_decay=0.05, warmup=0.05),
    )


def main() -> None:
    spec = quickstart_spec()
    model = adaptkit.build(spec)  # an nn.Module with the methods applied
    print(f"{sum(p.numel() for p in adaptkit.trainable_state(model).values()):,} trainable parameters")
    result = adaptkit.run(spec, overwrite=True)
    print(f"test accuracy {result.metrics['test']['accuracy']:.3f}; files in {result.output_dir}")


if __name__ == "__main__":
    main()
