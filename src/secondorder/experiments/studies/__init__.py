"""One module per study of the ``secondorder`` command (see :mod:`secondorder.experiments.cli`)."""
