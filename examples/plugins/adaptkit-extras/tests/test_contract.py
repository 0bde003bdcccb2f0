"""adaptkit's contract suite on this package's components (install the package first).

    pip install examples/plugins/adaptkit-extras && python -m pytest examples/plugins/adaptkit-extras/tests
"""

from adaptkit.testing import contract_tests

globals().update(contract_tests(backbones=["convnext"], methods=["ia3"]))
