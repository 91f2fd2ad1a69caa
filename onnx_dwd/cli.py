"""Command line: parse options into an OptimizeConfig, call the API, map errors to exit codes.

Exit status: 0 success, 1 a DwdError (message on stderr, no traceback),
2 a usage error (click's own).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .api import optimize as run_optimize
from .decompose import no_progress
from .calib import Preprocess
from .config import (DEFAULT_MAX_ERROR, DEFAULT_POSITION_BUDGET, GRAPH_FORMS, METHODS, REFIT_SWEEPS,
                     REFIT_VARIANT_CHOICES, RUNTIME_LEVELS, OptimizeConfig, parse_input_shape)
from .errors import DwdError
from .report import render_table

#: The embedded default: a small trained CNN and labelled images, in the repository.
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "calibration" / "fashion_mnist"


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DwdError as exc:
            click.echo(f"onnx-dwd: error: {exc}", err=True)
            sys.exit(1)
    return wrapper


def optimize_options(fn):
    """Options shared by `optimize` and `demo`; each one reaches OptimizeConfig."""
    for decorator in reversed([
        click.option("--rank", "-k", type=int, default=None,
                     help="Depthwise filters per input channel (K), the same for every layer; kh*kw reproduces "
                          "each layer exactly. Without it, the rank (or keeping the conv) is chosen per layer "
                          f"under a budget (default --max-error {DEFAULT_MAX_ERROR})."),
        click.option("--target-speedup", type=float, default=None,
                     help="Budget: the whole model must run this many times faster on --runtime (measured)."),
        click.option("--max-error", type=float, default=None,
                     help="Budget: the model's relative output error on held-out data must stay within this; "
                          "the fastest such model is written."),
        click.option("--latency-budget", "latency_budget_ms", type=float, default=None, metavar="MS",
                     help="Budget: the whole model must run within this many milliseconds on --runtime."),
        click.option("--runtime", default="ort", show_default=True,
                     help="Where latency is measured (per layer for the choice, whole model for the report): "
                          "ort (onnxruntime CPU, or ort:LEVEL), litert, ncnn, mnn, openvino."),
        click.option("--level", type=click.Choice(RUNTIME_LEVELS), default="all", show_default=True,
                     help="onnxruntime graph optimisation level for --runtime ort (extended is the closer "
                          "stand-in for ARM runtimes)."),
        click.option("--threads", type=int, default=1, show_default=True, help="Threads of --runtime."),
        click.option("--latency/--no-latency", "measure_latency", default=True, show_default=True,
                     help="Time the original and the written model side by side for the report "
                          "(a budgeted choice always does)."),
        click.option("--method", type=click.Choice(METHODS), default=None,
                     help="refit (ours; default with --calib), dwd-comp (paper Alg. 2), dwd (paper Alg. 1), "
                          "nd (data-free Network Decoupling; default without --calib), channel (baseline: "
                          "k x k conv to c' channels + 1x1, c' for the MACs of rank K)."),
        click.option("--inter-layer/--no-inter-layer", default=True, show_default=True,
                     help="Fit each layer on the inputs of the partly decomposed model against the original "
                          "model's outputs (paper eq. 10); data-driven methods only."),
        click.option("--refit-variant", type=click.Choice(REFIT_VARIANT_CHOICES), default="sweeps+ls",
                     show_default=True,
                     help="refit only: sweeps+ls runs every step (the paper's Algorithm 2, extra sweeps, "
                          "least-squares pointwise weights); alg2 / sweeps stop earlier; auto picks per layer "
                          "on every 4th fit image (less prone to overfit tiny calibration sets)."),
        click.option("--refit-sweeps", type=click.IntRange(min=0), default=REFIT_SWEEPS, show_default=True,
                     help="refit only (not --refit-variant alg2): block-coordinate sweeps over the channels "
                          "after Algorithm 2. Fewer fit faster; benchmarks/RESULTS.md (section 5, run 15) "
                          "compares their accuracy."),
        click.option("--graph-form", type=click.Choice(GRAPH_FORMS), default="auto", show_default=True,
                     help="Graph form of the depthwise stage for K > 1 (auto = fastest measured in onnxruntime)."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
                     help="Fix a dynamic input's shape for validation, e.g. images:1,3,320,320 (repeatable). "
                          "The written model keeps its dynamic dimensions. A dynamic batch defaults to 1."),
        click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help="Calibration data: a folder of images (jpg/png/bmp, recursive; labels.csv with "
                          "columns file,label optional), or .npy/.npz input tensors (a file or a folder)."),
        click.option("--holdout", type=float, default=0.2, show_default=True,
                     help="Fraction of the calibration data held out (never fitted on) for validation."),
        click.option("--max-images", type=int, default=None, help="Use at most this many calibration images (or array files)."),
        click.option("--positions-per-image", type=int, default=None,
                     help="Sample this many output positions per image for the statistics (default: all)."),
        click.option("--position-budget", type=float, default=DEFAULT_POSITION_BUDGET, show_default=True,
                     help="Fit each layer on about this many times its patch size (c*kh*kw) output positions, "
                          "sampled evenly from the images; 0: every position."),
        click.option("--resize", type=int, default=None,
                     help="Resize the shorter image side to this, then centre-crop to the model's input size "
                          "(default: resize straight to the input size)."),
        click.option("--scale", type=float, default=1 / 255, show_default="1/255",
                     help="Pixel values are multiplied by this, then (v - mean) / std."),
        click.option("--mean", default="0", show_default=True, help="Per-channel mean, comma-separated."),
        click.option("--std", default="1", show_default=True, help="Per-channel std, comma-separated."),
        click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default="rgb", show_default=True,
                     help="Channel order of 3-channel inputs."),
        click.option("--layout", type=click.Choice(["auto", "nchw", "nhwc"]), default="auto", show_default=True,
                     help="Image tensor layout; auto reads it off the input shape."),
        click.option("--validation-samples", type=int, default=32, show_default=True,
                     help="How many random inputs to validate on when there is no calibration data."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated inputs."),
        click.option("--report", "report_json", type=click.Path(path_type=Path), default=None,
                     help="Write the report as JSON here."),
        click.option("--markdown", "report_markdown", type=click.Path(path_type=Path), default=None,
                     help="Write the report as Markdown here."),
        click.option("--quiet", "-q", is_flag=True, help="Do not print the report table."),
    ]):
        fn = decorator(fn)
    return fn


def _floats(text: str, flag: str):
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DwdError(f"{flag} {text!r}: expected comma-separated numbers such as 0.485,0.456,0.406") from None


def build_config(input_shapes, resize, scale, mean, std, channel_order, layout, **options) -> OptimizeConfig:
    preprocess = Preprocess(resize=resize, scale=scale, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                            channel_order=channel_order, layout=layout)
    return OptimizeConfig(input_shapes=dict(parse_input_shape(s) for s in input_shapes), preprocess=preprocess,
                          **options)


def show_progress(iterable, label, length):
    """A progress bar on stderr (click's), one per pass over the calibration data."""
    with click.progressbar(iterable, length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        yield from bar


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-dwd")
def main():
    """Replace regular convolutions of an ONNX model by depthwise + 1x1 convolutions."""


@main.command()
@click.argument("input_model", type=click.Path(path_type=Path))
@click.argument("output_model", type=click.Path(path_type=Path))
@optimize_options
@_user_errors
def optimize(input_model, output_model, quiet, **options):
    """Decompose INPUT_MODEL's regular convs and write OUTPUT_MODEL with a report."""
    report = run_optimize(input_model, output_model, build_config(**options),
                          progress=no_progress if quiet else show_progress)
    if not quiet:
        click.echo(render_table(report), nl=False)


@main.command()
@click.option("--out", "output_model", type=click.Path(path_type=Path), default=Path("fashion_mnist_dwd.onnx"),
              show_default=True, help="Where to write the optimized default model.")
@optimize_options
@_user_errors
def demo(output_model, quiet, **options):
    """Optimize the embedded default (a trained Fashion-MNIST CNN) on its bundled images."""
    model = DEFAULT_DIR / "model.onnx"
    if not model.is_file():
        raise DwdError(f"{model}: the embedded default model is missing; run onnx-dwd from a checkout "
                       "installed with `pip install -e .`")
    if options["calib"] is None:
        options["calib"] = DEFAULT_DIR / "images"
    if options["report_json"] is None:
        options["report_json"] = output_model.with_suffix(".report.json")
    report = run_optimize(model, output_model, build_config(**options),
                          progress=no_progress if quiet else show_progress)
    if not quiet:
        click.echo(render_table(report), nl=False)
        click.echo(f"wrote {output_model} and {options['report_json']}")


@main.command("bench")
@click.argument("before", type=click.Path(path_type=Path))
@click.argument("after", type=click.Path(path_type=Path))
@click.option("--runtime", "runtimes", default="ort", show_default=True, metavar="NAMES",
              help="Comma-separated runtimes: ort (at --level), ort:LEVEL, litert, ncnn, mnn, openvino (each "
                   "but ort an optional install, see README).")
@click.option("--threads", default="1", show_default=True, help="Comma-separated thread counts, e.g. 1,2.")
@click.option("--level", type=click.Choice(["all", "extended", "basic"]), default="all", show_default=True,
              help="onnxruntime graph optimisation level for --runtime ort (extended is the closer stand-in "
                   "for ARM runtimes).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
              help="Fix dynamic input dims (repeatable); a dynamic batch alone defaults to 1.")
@click.option("--blocks", type=int, default=20, show_default=True, help="Interleaved timing blocks per model.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the result here.")
@click.option("--quiet", "-q", is_flag=True, help="Do not print progress on stderr.")
@_user_errors
def bench_command(before, after, runtimes, threads, level, input_shapes, blocks, json_path, quiet):
    """Check BEFORE and AFTER against onnxruntime on each runtime, then time them side by side.

    Prints one table: runtime x threads -> before and after ms, speed-up, spread,
    numeric match. Exits 1 if a runtime could not convert or run a model.
    """
    from .bench import bench, render
    from .modelio import check_writable, write_text_atomic
    from .report import to_json
    from .runtimes.base import parse_runtimes
    try:
        thread_counts = [int(t) for t in threads.split(",")]
    except ValueError:
        raise DwdError(f"--threads {threads!r}: expected comma-separated integers such as 1,2") from None
    if json_path is not None:
        check_writable(json_path, "--json")
    result = bench(before, after, runtimes=parse_runtimes(runtimes), threads=thread_counts, level=level,
                   blocks=blocks, input_shapes=dict(parse_input_shape(s) for s in input_shapes),
                   log=None if quiet else (lambda message: click.echo(message, err=True)))
    click.echo(render(result), nl=False)
    if json_path is not None:
        write_text_atomic(json_path, to_json(result))
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
