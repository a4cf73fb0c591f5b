r"""Models of the experiments: the seed networks and the Rosenbrock function.

Each network builder takes a ``seed`` (an int or a ``torch.Generator``) and initializes the
weights with PyTorch's default initialization inside ``torch.random.fork_rng``, so the result
depends only on the seed and the global random state is left untouched. Models are built on the
CPU; move them with ``.to(device)``.

The Rosenbrock function :math:`f(x) = (1 - x_0)^2 + 100 (x_1 - x_0^2)^2` comes in two forms
that optimize the same objective:

* :class:`Rosenbrock` returns :math:`f(x)` itself; pair it with :func:`value_loss`.
* :class:`RosenbrockResiduals` returns the residuals
  :math:`r(x) = (1 - x_0,\; 10 (x_1 - x_0^2))`, so :math:`f = \lVert r \rVert^2`; pair it with
  ``nn.MSELoss(reduction="sum")`` against a zero target of shape ``(1, 2)``. This form has a
  meaningful Gauss-Newton matrix :math:`2 J^\top J`.

Both ignore their input; feed any tensor, e.g. ``torch.zeros(1)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = [
    "Rosenbrock",
    "RosenbrockResiduals",
    "mnist_mlp",
    "sigmoid_cnn",
    "small_mlp",
    "spiral_mlp",
    "value_loss",
]


@contextmanager
def _seeded(seed: int | torch.Generator) -> Iterator[None]:
    """Run the body with the CPU random state seeded, restoring the previous state afterwards."""
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=seed).item())
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def spiral_mlp(
    width: int = 200, n_classes: int = 5, *, seed: int | torch.Generator = 0
) -> nn.Module:
    """Build the SiLU MLP of the spiral problem: ``2 -> width -> width -> n_classes``.

    With the defaults it has 41,805 parameters.

    Args:
        width: Width of the two hidden layers.
        n_classes: Number of outputs (logits).
        seed: Seed or generator of the initialization.

    Returns:
        ``Sequential(Linear(2, width), SiLU, Linear(width, width), SiLU,
        Linear(width, n_classes))``.

    Raises:
        TypeError: If ``seed`` is neither an int nor a ``torch.Generator``.
    """
    with _seeded(seed):
        return nn.Sequential(
            nn.Linear(2, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, n_classes),
        )


def sigmoid_cnn(*, seed: int | torch.Generator = 0) -> nn.Module:
    """Build the sigmoid CNN for ``(N, 1, 28, 28)`` MNIST images (hard for plain SGD).

    Args:
        seed: Seed or generator of the initialization.

    Returns:
        ``Conv2d(1, 10, 5), Sigmoid, MaxPool2d(2, 2), Conv2d(10, 20, 5), Sigmoid,
        MaxPool2d(2, 2), Flatten, Linear(320, 50), Sigmoid, Linear(50, 10)`` as a
        ``Sequential``.

    Raises:
        TypeError: If ``seed`` is neither an int nor a ``torch.Generator``.
    """
    with _seeded(seed):
        return nn.Sequential(
            nn.Conv2d(1, 10, 5, 1),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(10, 20, 5, 1),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(4 * 4 * 20, 50),
            nn.Sigmoid(),
            nn.Linear(50, 10),
        )


def mnist_mlp(hidden: int = 128, *, seed: int | torch.Generator = 0) -> nn.Module:
    """Build the ReLU MLP ``784 -> hidden -> 10`` for MNIST images.

    Args:
        hidden: Width of the hidden layer.
        seed: Seed or generator of the initialization.

    Returns:
        ``Sequential(Flatten, Linear(784, hidden), ReLU, Linear(hidden, 10))``.

    Raises:
        TypeError: If ``seed`` is neither an int nor a ``torch.Generator``.
    """
    with _seeded(seed):
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )


def small_mlp(dim: int = 10, *, seed: int | torch.Generator = 0) -> nn.Module:
    """Build the small ReLU MLP of the Hessian-free example: ``dim -> dim -> dim``.

    Args:
        dim: Input, hidden and output width.
        seed: Seed or generator of the initialization.

    Returns:
        ``Sequential(Linear(dim, dim, bias=False), ReLU, Linear(dim, dim))``.

    Raises:
        TypeError: If ``seed`` is neither an int nor a ``torch.Generator``.
    """
    with _seeded(seed):
        return nn.Sequential(
            nn.Linear(dim, dim, bias=False),
            nn.ReLU(),
            nn.Linear(dim, dim),
        )


class _RosenbrockBase(nn.Module):
    def __init__(self, start: Sequence[float], dtype: torch.dtype) -> None:
        super().__init__()
        values = [float(v) for v in start]
        if len(values) != 2:
            raise ValueError(f"start must hold 2 numbers, got {len(values)}: {start!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point type, got {dtype}")
        self.x = nn.Parameter(torch.tensor(values, dtype=dtype))

    def residuals(self) -> Tensor:
        """Return the residuals ``(1 - x0, 10 (x1 - x0^2))``, shape ``(2,)``.

        Returns:
            The residual vector, whose squared norm is the Rosenbrock value.
        """
        x0, x1 = self.x[0], self.x[1]
        return torch.stack((1.0 - x0, 10.0 * (x1 - x0 * x0)))


class Rosenbrock(_RosenbrockBase):
    r"""The Rosenbrock function :math:`f(x) = (1 - x_0)^2 + 100 (x_1 - x_0^2)^2` as a module.

    The parameter ``x`` (shape ``(2,)``) is the point; ``forward`` ignores its input and returns
    the value, to be used with :func:`value_loss`. The minimum is :math:`f(1, 1) = 0`;
    :math:`f(-1, 3) = 404`.

    Args:
        start: Initial point.
        dtype: Floating-point type of the parameter.

    Raises:
        ValueError: If ``start`` does not hold two numbers.
        TypeError: If ``dtype`` is not a floating-point type.
    """

    def __init__(
        self, start: Sequence[float] = (-1.0, 3.0), *, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(start, dtype)

    def forward(self, inputs: Tensor | None = None) -> Tensor:
        """Evaluate the function at the current parameter.

        Args:
            inputs: Ignored (a dummy batch so that the module fits the ``model(inputs)`` API).

        Returns:
            The value :math:`f(x)` as a 0-dim tensor.
        """
        x0, x1 = self.x[0], self.x[1]
        return (1.0 - x0) ** 2 + 100.0 * (x1 - x0 * x0) ** 2


class RosenbrockResiduals(_RosenbrockBase):
    r"""The Rosenbrock function in least-squares form: ``forward`` returns the residuals.

    .. math::
        r(x) = \begin{pmatrix} 1 - x_0 \\ 10 (x_1 - x_0^2) \end{pmatrix}, \qquad
        f(x) = \lVert r(x) \rVert^2 = (1 - x_0)^2 + 100 (x_1 - x_0^2)^2.

    The output has shape ``(1, 2)`` (a batch of one), so
    ``nn.MSELoss(reduction="sum")(model(inputs), torch.zeros(1, 2))`` equals :math:`f(x)`.

    Args:
        start: Initial point.
        dtype: Floating-point type of the parameter.

    Raises:
        ValueError: If ``start`` does not hold two numbers.
        TypeError: If ``dtype`` is not a floating-point type.
    """

    def __init__(
        self, start: Sequence[float] = (-1.0, 3.0), *, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(start, dtype)

    def forward(self, inputs: Tensor | None = None) -> Tensor:
        """Evaluate the residuals at the current parameter.

        Args:
            inputs: Ignored (a dummy batch so that the module fits the ``model(inputs)`` API).

        Returns:
            The residuals, shape ``(1, 2)``.
        """
        return self.residuals().unsqueeze(0)


def value_loss(output: Tensor, target: Tensor | None = None) -> Tensor:
    """Loss for models that return the objective value itself, e.g. :class:`Rosenbrock`.

    Args:
        output: The model output, a tensor with exactly one element.
        target: Ignored; present so the function has the ``loss_fn(output, target)`` signature.

    Returns:
        ``output`` as a 0-dim tensor.

    Raises:
        ValueError: If ``output`` does not have exactly one element.
    """
    if output.numel() != 1:
        raise ValueError(
            f"value_loss expects a scalar model output (1 element), got shape {tuple(output.shape)}"
        )
    return output.reshape(())
