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
from .config import GRAPH_FORMS, METHODS, OptimizeConfig, parse_input_shape
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
        click.option("--rank", "-k", type=int, default=1, show_default=True,
                     help="Depthwise filters per input channel (K); kh*kw reproduces each layer exactly."),
        click.option("--method", type=click.Choice(METHODS), default="nd", show_default=True,
                     help="Fitting method: nd = data-free Network Decoupling."),
        click.option("--graph-form", type=click.Choice(GRAPH_FORMS), default="auto", show_default=True,
                     help="Graph form of the depthwise stage for K > 1 (auto = fastest measured in onnxruntime)."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0,D1,...",
                     help="Fix a dynamic input's shape for validation, e.g. images:1,3,320,320 (repeatable). "
                          "The written model keeps its dynamic dimensions. A dynamic batch defaults to 1."),
        click.option("--calib", type=click.Path(path_type=Path), default=None,
                     help="Folder of images (recursive; labels.csv with columns file,label optional) "
                          "to validate on; without it, seeded random inputs."),
        click.option("--validation-samples", type=int, default=32, show_default=True,
                     help="How many inputs (images) to compare the original and optimized model on."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated inputs."),
        click.option("--report", "report_json", type=click.Path(path_type=Path), default=None,
                     help="Write the report as JSON here."),
        click.option("--markdown", "report_markdown", type=click.Path(path_type=Path), default=None,
                     help="Write the report as Markdown here."),
        click.option("--quiet", "-q", is_flag=True, help="Do not print the report table."),
    ]):
        fn = decorator(fn)
    return fn


def build_config(input_shapes, **options) -> OptimizeConfig:
    return OptimizeConfig(input_shapes=dict(parse_input_shape(s) for s in input_shapes), **options)


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
    report = run_optimize(input_model, output_model, build_config(**options))
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
    if options["validation_samples"] == 32:  # the default: use every bundled image
        options["validation_samples"] = 10_000
    if options["report_json"] is None:
        options["report_json"] = output_model.with_suffix(".report.json")
    report = run_optimize(model, output_model, build_config(**options))
    if not quiet:
        click.echo(render_table(report), nl=False)
        click.echo(f"wrote {output_model} and {options['report_json']}")


if __name__ == "__main__":
    main()
