"""Options of an optimize run: one frozen dataclass, validated in one place."""

from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path
from typing import Mapping, Optional, Tuple

from .calib import Preprocess
from .errors import OptionError
from .fit.data import REFIT_SWEEPS
from .runtimes.base import parse_runtimes

#: Fitting methods (see fit/): refit (ours, the default with calibration data),
#: dwd-comp (paper Algorithm 2), dwd (paper Algorithm 1), nd (data-free
#: Network Decoupling, the default without), channel (Zhang et al. baseline).
METHODS = ("refit", "dwd-comp", "dwd", "nd", "channel")
DATA_FREE_METHODS = ("nd",)

#: refit's variant: chosen per layer on validation images (auto) or fixed.
REFIT_VARIANT_CHOICES = ("auto", "alg2", "sweeps", "sweeps+ls")

#: How a rank-K (K > 1) depthwise stage is written in the graph; see rewrite.py.
GRAPH_FORMS = ("auto", "sum", "split", "multiplier", "concat-input")

#: With neither --rank nor a budget: the fastest plan whose model output error
#: on held-out data stays within this (relative, |Y - Y'| / |Y|).
DEFAULT_MAX_ERROR = 0.05
#: Positions per patch element each layer is fitted on (OptimizeConfig.position_budget).
DEFAULT_POSITION_BUDGET = 64.0

#: onnxruntime graph optimisation levels a latency target can name.
RUNTIME_LEVELS = ("all", "extended", "basic")


def parse_input_shape(text: str) -> Tuple[str, Tuple[int, ...]]:
    """Parse ``name:1,3,320,320`` (Polygraphy's ``--input-shapes`` spelling).

    The name may itself contain ``:`` (TensorFlow exports use ``input:0``), so
    the shape is whatever follows the last ``:``.
    """
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise OptionError(
            f"--input-shape {text!r}: expected NAME:D0,D1,... such as images:1,3,320,320"
        )
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise OptionError(
            f"--input-shape {text!r}: dimensions must be positive integers, got {dims!r}"
        ) from None
    if not shape or any(d <= 0 for d in shape):
        raise OptionError(f"--input-shape {text!r}: dimensions must be positive integers")
    return name, shape


@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    """Everything an optimize run needs besides the input and output paths.

    rank: K, the number of depthwise filters per input channel, the same
        for every layer (1 is the paper's form; kh*kw reproduces the layer
        exactly). Clamped per layer to the largest useful rank,
        min(kh*kw, out_channels / group). For method "channel", c' is chosen
        per layer for the MACs of rank K. None (the default): the rank, or
        keeping the conv, is chosen per layer under a budget (see select_plan.py).
    target_speedup / max_error / latency_budget_ms: the budget of the
        per-layer choice, at most one, only without rank: whole-model speed-up
        measured on the runtime, relative output error on held-out data, or
        whole-model milliseconds. None of them: max_error DEFAULT_MAX_ERROR.
    runtime / level / threads: where latency is measured (per layer for the
        choice, whole model for the report): a runner name (runtimes/base.py),
        onnxruntime's optimisation level, intra-op threads.
    measure_latency: time the original and the written model side by side
        for the report (model.latency); the budgeted choice always does.
    method: fitting method, one of METHODS; None means refit with
        calibration data and nd without.
    inter_layer: fit each layer on the inputs the partly decomposed model
        produces, against the original model's outputs (paper eq. 10).
    refit_variant: for method refit: "sweeps+ls" (the default) runs every
        step; "auto" picks per layer on every 4th fit image (see fit/data.py
        refit); "alg2" / "sweeps" stop earlier. benchmarks/RESULTS.md compares.
    refit_sweeps: for method refit: block-coordinate sweeps over the channels
        after Algorithm 2 (the "sweeps" steps; refit_variant "alg2" runs
        none). Fewer fit faster;
        benchmarks/RESULTS.md (section 5, run 15) compares their accuracy.
    graph_form: graph form of the depthwise stage for K > 1, one of GRAPH_FORMS.
    input_shapes: fixed shapes for dynamic graph inputs, used for validation
        and MAC counts; the written model keeps its dynamic dimensions.
    calib: folder of images (labels.csv beside them optional), or .npy/.npz
        files (or a folder of them); without it, validation uses seeded
        uniform [0, 1) inputs and only method nd is possible.
    holdout: fraction of the calibration data held out (every 1/holdout-th
        item) for validation and per-layer errors, never fitted on.
    max_images: use at most this many calibration items (None: all).
    positions_per_image: output positions sampled per image for the
        statistics (None: every position).
    position_budget: fit each layer on about this many times its patch size
        (c/group*kh*kw) output positions, sampled evenly over the fit images
        (0 or None: every position). The d x d statistics cost d^2 per
        position; past some multiple of d, more positions add little
        (benchmarks/RESULTS.md section 5).
    preprocess: how image files become input tensors.
    validation_samples: how many random inputs to compare original and
        optimized on when there is no calibration data.
    seed: seed for generated validation inputs.
    report_json / report_markdown: where to write the report, if anywhere.
    """

    rank: Optional[int] = None
    target_speedup: Optional[float] = None
    max_error: Optional[float] = None
    latency_budget_ms: Optional[float] = None
    runtime: str = "ort"
    level: str = "all"
    threads: int = 1
    measure_latency: bool = True
    method: Optional[str] = None
    inter_layer: bool = True
    refit_variant: str = "sweeps+ls"
    refit_sweeps: int = REFIT_SWEEPS
    graph_form: str = "auto"
    input_shapes: Mapping[str, Tuple[int, ...]] = dataclasses.field(default_factory=dict)
    calib: Optional[Path] = None
    holdout: float = 0.2
    max_images: Optional[int] = None
    positions_per_image: Optional[int] = None
    position_budget: Optional[float] = DEFAULT_POSITION_BUDGET
    preprocess: Preprocess = Preprocess()
    validation_samples: int = 32
    seed: int = 0
    report_json: Optional[Path] = None
    report_markdown: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise OptionError(f"--rank must be a positive integer, got {self.rank!r}")
        budgets = {"--target-speedup": self.target_speedup, "--max-error": self.max_error,
                   "--latency-budget": self.latency_budget_ms}
        given = [flag for flag, v in budgets.items() if v is not None]
        if len(given) > 1:
            raise OptionError(f"{' and '.join(given)}: give at most one budget")
        if given and self.rank is not None:
            raise OptionError(f"--rank fixes the rank of every layer; {given[0]} chooses it per layer: "
                              "give one or the other")
        if self.target_speedup is not None and not self.target_speedup > 1:
            raise OptionError(f"--target-speedup must be above 1, got {self.target_speedup}")
        if self.max_error is not None and not self.max_error > 0:
            raise OptionError(f"--max-error must be positive, got {self.max_error}")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise OptionError(f"--latency-budget must be positive (milliseconds), got {self.latency_budget_ms}")
        if self.level not in RUNTIME_LEVELS:
            raise OptionError(f"--level {self.level!r} is not known; choose one of {', '.join(RUNTIME_LEVELS)}")
        if len(parse_runtimes(self.runtime)) != 1:
            raise OptionError(f"--runtime {self.runtime!r}: optimize targets one runtime")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise OptionError(f"--threads must be a positive integer, got {self.threads!r}")
        if self.method is not None and self.method not in METHODS:
            raise OptionError(
                f"--method {self.method!r} is not known; choose one of {', '.join(METHODS)}"
            )
        if self.refit_variant not in REFIT_VARIANT_CHOICES:
            raise OptionError(f"--refit-variant {self.refit_variant!r} is not known; "
                              f"choose one of {', '.join(REFIT_VARIANT_CHOICES)}")
        if isinstance(self.refit_sweeps, bool) or not isinstance(self.refit_sweeps, numbers.Integral) \
                or self.refit_sweeps < 0:
            raise OptionError(f"--refit-sweeps must be 0 or a positive integer, got {self.refit_sweeps!r}")
        object.__setattr__(self, "refit_sweeps", int(self.refit_sweeps))  # a numpy integer too, for the report
        if self.graph_form not in GRAPH_FORMS:
            raise OptionError(
                f"--graph-form {self.graph_form!r} is not known; choose one of {', '.join(GRAPH_FORMS)}"
            )
        if self.validation_samples < 1:
            raise OptionError(
                f"--validation-samples must be at least 1, got {self.validation_samples}"
            )
        if not 0 <= self.holdout < 1:
            raise OptionError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.position_budget is not None and not self.position_budget >= 0:
            raise OptionError(f"--position-budget must be 0 (every position) or positive, got {self.position_budget}")
        for name in ("max_images", "positions_per_image"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be positive, got {value}")
        object.__setattr__(self, "input_shapes", dict(self.input_shapes))

    @property
    def selects(self) -> bool:
        """Whether the rank (or keeping the conv) is chosen per layer under a budget."""
        return self.rank is None

    @property
    def budget(self) -> Tuple[str, float]:
        """The budget of the per-layer choice: ("target_speedup" | "max_error" | "latency_budget_ms", value)."""
        for name in ("target_speedup", "latency_budget_ms", "max_error"):
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        return "max_error", DEFAULT_MAX_ERROR

    def resolved_method(self, has_data: bool) -> str:
        """The method to run: the explicit one, else refit with data and nd without."""
        method = self.method or ("refit" if has_data else "nd")
        if method not in DATA_FREE_METHODS and not has_data:
            raise OptionError(f"--method {method} fits to calibration data: give --calib DIR "
                              "(or use --method nd, which needs none)")
        return method
