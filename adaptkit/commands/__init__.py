"""Sub-commands of the ``adaptkit`` command line, one module each."""
