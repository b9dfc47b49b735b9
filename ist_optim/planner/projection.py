"""Optimizer state and step buffers of GaLore and APOLLO (gradient-projection AdamW).

GaLore (``pip install galore-torch``, ``GaLoreAdamW``; the HF Trainer's
``optim="galore_adamw"``) and APOLLO (``pip install apollo-torch``, ``APOLLOAdamW``;
``optim="apollo_adamw"``) train every weight with the full-rank gradient, but keep Adam's
moments in a rank-``r`` projection of each target matrix: for an ``m x n`` weight with
``m >= n`` the projector is ``r x n`` and the moments ``m x r``, else ``m x r`` and ``r x n``.
GaLore's projector is the top-``r`` singular vectors of a gradient (an SVD every
``update_proj_gap`` steps), APOLLO's a seeded Gaussian; APOLLO-Mini is APOLLO with rank 1
and one scaling factor per tensor. Everything that is not a target matrix (embeddings,
head, norms) keeps plain AdamW state.

:func:`projected_step` walks the optimizer's ``step()`` loop parameter by parameter, as the
two packages (galore-torch 1.0, apollo-torch 1.0.3) write it, allocation by allocation
(Python rebinding frees the previous iteration's temporaries only when the name is bound
again), and returns the state it keeps and the peak of the temporaries above it. With
``update=True`` the step also recomputes the projectors (GaLore: ``torch.linalg.svd`` of
each gradient in float32; APOLLO: a float32 copy of the gradient for its shape and a
Gaussian draw), which every step with ``state["step"] % update_proj_gap == 0`` does,
the first one included; a budget must hold that step. GaLore in float32 keeps a *view*
of the SVD's factor as its projector, so the whole ``min(m, n) x n`` (or ``m x min(m, n)``)
factor stays allocated; in 16-bit dtypes it keeps a compact cast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PROJECTED_OPTIMIZERS", "ProjectionSpec", "projected_step"]

#: Optimizer names of the planner that project gradients, with their HF Trainer defaults.
#: ``*-layerwise``: the Trainer's ``optim="galore_adamw_layerwise"`` /
#: ``"apollo_adamw_layerwise"``: one optimizer per parameter, stepped in the parameter's
#: post-accumulate-grad hook, which then frees the gradient.
PROJECTED_OPTIMIZERS: dict[str, dict[str, object]] = {
    "galore": {"kind": "galore", "rank": 128, "scale_type": "channel"},
    "apollo": {"kind": "apollo", "rank": 128, "scale_type": "channel"},
    "apollo-mini": {"kind": "apollo", "rank": 1, "scale_type": "tensor"},
    "galore-layerwise": {"kind": "galore", "rank": 128, "scale_type": "channel",
                         "layerwise": True},
    "apollo-layerwise": {"kind": "apollo", "rank": 128, "scale_type": "channel",
                         "layerwise": True},
    "apollo-mini-layerwise": {"kind": "apollo", "rank": 1, "scale_type": "tensor",
                              "layerwise": True},
}


@dataclass(frozen=True)
class ProjectionSpec:
    """One projected optimizer: ``kind`` (``"galore"`` or ``"apollo"``), projection ``rank``,
    APOLLO's ``scale_type`` (``"channel"`` or ``"tensor"``), and ``layerwise`` (one
    optimizer per parameter, stepped as its gradient is accumulated)."""

    kind: str
    rank: int
    scale_type: str = "channel"
    layerwise: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("galore", "apollo"):
            raise ValueError(f"kind must be 'galore' or 'apollo', got {self.kind!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"projection rank must be an integer >= 1, got {self.rank!r}")
        if self.scale_type not in ("channel", "tensor"):
            raise ValueError(f"scale_type must be 'channel' or 'tensor', got {self.scale_type!r}")


class _Heap:
    """Named temporaries of a Python loop: binding a name allocates first, then frees what
    the name held (as CPython does), and the peak of the sum is kept."""

    def __init__(self) -> None:
        self.vars: dict[str, int] = {}
        self.extra = 0  # unnamed buffers alive for a moment
        self.peak = 0

    def _mark(self) -> None:
        self.peak = max(self.peak, sum(self.vars.values()) + self.extra)

    def bind(self, name: str, nbytes: int) -> None:
        self.extra += nbytes
        self._mark()
        self.extra -= nbytes
        self.vars[name] = nbytes

    def moment(self, nbytes: int) -> None:
        """A buffer that lives only inside one expression."""
        self.extra += nbytes
        self._mark()
        self.extra -= nbytes

    def alias(self, name: str, other: str) -> None:
        """``name = other``: the old value of ``name`` goes, the storage is shared."""
        self.vars[name] = 0
        self.vars[other] = self.vars.get(other, 0)


def _low_rank(shape: tuple[int, int], rank: int, *, capped: bool = True
              ) -> tuple[int, int, int]:
    """(moment elements, projector elements, rank used) of an ``m x n`` target.

    GaLore's SVD caps the rank at ``min(m, n)``; APOLLO's random projector
    (apollo-torch 1.0.3, ``capped=False``) draws a ``rank x n`` (or ``m x rank``) matrix
    whatever the target's size.

    Example:
        >>> _low_rank((64, 32), 48), _low_rank((64, 32), 48, capped=False)
        ((2048, 1024, 32), (3072, 1536, 48))
    """
    m, n = shape
    r = min(rank, m, n) if capped else rank
    return (m * r, r * n, r) if m >= n else (r * n, m * r, r)


def _galore_update(heap: _Heap, shape: tuple[int, int], rank: int, element: int) -> int:
    """GaLore's ``get_orthogonal_matrix``; returns the bytes the new projector keeps."""
    m, n = shape
    k = min(m, n)
    r = min(rank, k)
    heap.bind("matrix", 0 if element == 4 else 4 * m * n)  # float copy of the gradient
    heap.bind("svd", 4 * (m * k + k + k * n))  # U, S, Vh
    if m >= n:  # "right": A = U[:, :r] @ diag(s[:r]) (unused), B = Vh[:r] (a view)
        heap.moment(4 * (r * r + m * r))
        heap.bind("A", 4 * m * r)
        kept = 4 * k * n if element == 4 else element * r * n
    else:  # "left": A = U[:, :r] (a view), B = diag(s[:r]) @ Vh[:r] (unused)
        heap.moment(4 * (r * r + r * n))
        heap.bind("B", 4 * r * n)
        kept = 4 * m * k if element == 4 else element * m * r
    if element != 4:  # the compact cast, beside U, S, Vh; then the old projector goes
        heap.bind("projector", kept)
    for name in ("matrix", "svd", "A", "B", "projector"):
        heap.vars.pop(name, None)
    return kept


def _apollo_update(heap: _Heap, shape: tuple[int, int], rank: int, element: int) -> int:
    """APOLLO's random projector; returns the bytes it keeps."""
    m, n = shape
    _, projector, _ = _low_rank(shape, rank, capped=False)
    heap.bind("matrix", 0 if element == 4 else 4 * m * n)  # .float() of the gradient
    heap.bind("randn", 4 * projector)
    heap.bind("projector", 4 * projector)  # randn / sqrt(rank)
    heap.vars.pop("randn")
    kept = element * projector
    if element != 4:
        heap.bind("projector", kept)  # .to(dtype)
    heap.vars.pop("matrix")
    heap.vars.pop("projector")
    return kept


def projected_step(shapes: Sequence[tuple[int, ...]], targets: Sequence[bool], element: int,
                   spec: ProjectionSpec, update: bool) -> tuple[int, int]:
    """(state bytes, peak temporary bytes) of one GaLore / APOLLO ``step()``.

    Args:
        shapes: every trained parameter's shape, in the optimizer's order.
        targets: which of them are projected (2-D target matrices).
        element: bytes per element of parameters and gradients.
        spec: the optimizer.
        update: the step recomputes the projectors.

    Example:
        >>> spec = ProjectionSpec("galore", rank=4)
        >>> state, peak = projected_step([(64, 32), (32,)], [True, False], 2, spec, False)
        >>> state == 2 * (2 * 64 * 4 + 4 * 32) + 2 * 2 * 32  # moments + projector; Adam
        True
    """
    heap = _Heap()
    state = 0
    for shape, target in zip(shapes, targets, strict=True):
        full = element
        for size in shape:
            full *= size
        heap.alias("grad", "p.grad")
        if not target:
            state += 2 * full
            heap.bind("denom", full)
            heap.bind("norm_grad", full)
            continue
        if len(shape) != 2:
            raise ValueError(f"a projected target must be a matrix, got shape {tuple(shape)}")
        m, n = int(shape[0]), int(shape[1])
        moment, projector, _ = _low_rank((m, n), spec.rank, capped=spec.kind == "galore")
        low = element * moment
        if spec.kind == "galore":
            kept = (_galore_update(heap, (m, n), spec.rank, element) if update
                    else (4 * min(m, n) * (n if m >= n else m) if element == 4
                          else element * projector))
        else:
            kept = _apollo_update(heap, (m, n), spec.rank, element) if update \
                else element * projector
        state += 2 * low + kept
        heap.bind("grad", low)  # project
        heap.bind("denom", low)
        heap.bind("norm_grad", low)
        if spec.kind == "galore":  # project_back, then "* scale": two full-size buffers
            heap.moment(2 * full)
            heap.bind("norm_grad", full)
            continue
        state += element  # state["scaled_grad"], a 0-d norm
        vector = max(m, n) if spec.scale_type == "channel" else 1
        heap.bind("factor", element * vector)  # norm(norm_grad) / (norm(grad) + 1e-8)
        heap.moment(2 * element * vector)
        heap.bind("scaled_grad", full)  # p.grad * factor
        heap.moment(full)  # scaled_grad / limiter, beside the old one
        heap.bind("norm_grad", 0)  # norm_grad = scaled_grad: the low-rank one goes
    return state, heap.peak
