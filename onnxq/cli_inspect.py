"""``onnxq analyze`` and ``onnxq compare``: look inside a model before and after quantization.

Registered on the ``onnxq`` group by :mod:`onnxq.cli`. Errors follow cli.py's
conventions: user errors raise :class:`~onnxq.errors.OnnxqError` (one line, exit 2).
"""

from __future__ import annotations

import json
import pathlib

import click

from onnxq.errors import OnnxqError

__all__ = ["analyze", "compare"]


def _setup(opts):
    from onnxq.cli import _progress, _set_debug

    _set_debug(opts)
    return _progress(opts["verbose"], opts["quiet"])


def _check_outputs(*paths) -> None:
    for p in paths:
        if p and not pathlib.Path(p).parent.is_dir():
            raise OnnxqError(f"output folder {pathlib.Path(p).parent} does not exist")


def _write_json(path: str, payload) -> None:
    from onnxq.io import atomic_output

    dest = pathlib.Path(path)
    with atomic_output(dest) as tmp:
        (tmp / dest.name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n",
                                     encoding="utf-8")


def _verbosity_options(f):
    for opt in reversed([
        click.option("-v", "--verbose", is_flag=True, help="Print every stage with timings."),
        click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
        click.option("--debug", is_flag=True, help="Show tracebacks of errors."),
    ]):
        f = opt(f)
    return f


@click.command()
@click.argument("model", required=False)
@click.option("--calib", multiple=True, type=click.Path(),
              help="Calibration data set (.txt, .jsonl, .npz); repeat to compare sets. "
                   "Default: the built-in calibration and held-out texts.")
@click.option("--tokenizer", type=click.Path(), default=None,
              help="Folder with tokenizer.json (for text data and ONNX models).")
@click.option("--text-field", type=str, default="text", help="Text field of .jsonl files.")
@click.option("--samples", type=int, default=256, show_default=True,
              help="Samples per calibration set.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--method", type=str, default="percentile", show_default=True,
              help="Range estimator whose scales are compared between sets.")
@click.option("--task", type=str, default="auto", help="Export task for HF models.")
@click.option("--all", "show_all", is_flag=True, help="List sites with verdict 'none' too.")
@click.option("--json", "json_path", type=click.Path(), default=None,
              help="Write the analysis as JSON.")
@click.option("--html", "html_path", type=click.Path(), default=None,
              help="Write an HTML report (with per-channel ranges before/after onnxq's "
                   "default outlier passes).")
@_verbosity_options
def analyze(model, calib, tokenizer, text_field, samples, batch_size, seq_len, method, task,
            show_all, json_path, html_path, **opts) -> None:
    """Outlier statistics, calibration-set sensitivity and a method verdict per site."""
    progress = _setup(opts)
    _check_outputs(json_path, html_path)
    import onnxq
    from onnxq.calibration import data as D
    from onnxq.calibration.observers import OBSERVER_METHODS
    from onnxq.eval.analyze import analyze as run_analyze
    from onnxq.eval.analyze import format_analysis

    if method not in OBSERVER_METHODS:
        raise OnnxqError(f"unknown range method {method!r}; choose one of "
                         f"{', '.join(OBSERVER_METHODS)}")
    with progress.stage("load/export"):
        m, tok = onnxq.load_source(model, task=task)
    tok = tokenizer or tok
    with progress.stage("canonicalize"):
        onnxq.prepare(m)
    specs = D.input_specs(m)
    kw = dict(tokenizer=tok, samples=samples, batch_size=batch_size, seq_len=seq_len,
              text_field=text_field)
    if calib:
        sets = [D.load_calibration(c, specs, **kw) for c in calib]
    else:
        sets = [D.load_calibration(None, specs, split=s, **kw) for s in ("calib", "heldout")]
    result = run_analyze(m, sets, method=method, progress=progress)
    if not opts["quiet"]:
        click.echo(format_analysis(result, only_interesting=not show_all))
    payload = {"source": str(model) if model else "all-MiniLM-L6-v2 (default)",
               **result.as_dict(), "timings_s": {k: round(v, 3)
                                                 for k, v in progress.timings.items()}}
    if json_path:
        _write_json(json_path, payload)
    if html_path:
        from onnxq.eval.html import write_html_report

        after = None
        with progress.stage("outlier passes (for the plots)"):
            after = _stats_after_passes(m, sets[0], result.stats[0], progress)
        report = {"title": "onnxq analyze", "source": payload["source"],
                  "calibration": result.datasets,
                  "timings_s": {k: round(v, 3) for k, v in progress.timings.items()}}
        write_html_report(report, html_path, analysis=result, stats_before=result.stats[0],
                          stats_after=after, title="onnxq analyze: outliers per site")
        if not opts["quiet"]:
            click.echo(f"onnxq: wrote {html_path}")


def _stats_after_passes(model, data, before, progress):
    """Statistics of the analysed tensors after onnxq's default outlier passes."""
    from onnxq.calibration.runner import calibrate
    from onnxq.pipeline import apply_outlier_passes
    from onnxq.recipe import Recipe

    clone = model.clone()
    apply_outlier_passes(clone, data, Recipe(), progress=progress)
    values = {o.name for n in clone.graph for o in n.outputs}
    names = [n for n in before if n in values]
    if not names:
        return None
    with progress.bar("calibrating (after passes)", getattr(data, "num_samples", None)) as up:
        return calibrate(clone, data, tensors=names, progress=up)


@click.command()
@click.argument("fp32", required=True)
@click.argument("quantized", nargs=-1, required=True)
@click.option("--data", type=click.Path(), default=None,
              help="Data to run (.txt, .jsonl, .npz). Default: the built-in held-out text.")
@click.option("--tokenizer", type=click.Path(), default=None,
              help="Folder with tokenizer.json (for text data).")
@click.option("--text-field", type=str, default="text", help="Text field of .jsonl files.")
@click.option("--samples", type=int, default=128, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--top", type=int, default=10, show_default=True,
              help="Rows of the worst-first ranking to print.")
@click.option("--json", "json_path", type=click.Path(), default=None,
              help="Write every per-layer error as JSON.")
@click.option("--html", "html_path", type=click.Path(), default=None,
              help="Write an HTML report with the per-layer error plots.")
@_verbosity_options
def compare(fp32, quantized, data, tokenizer, text_field, samples, batch_size, seq_len, top,
            json_path, html_path, **opts) -> None:
    """Per-layer error (SQNR, relative error) of QUANTIZED graphs against FP32, worst first."""
    progress = _setup(opts)
    _check_outputs(json_path, html_path)
    import onnxq
    from onnxq.calibration import data as D
    from onnxq.eval.compare import compare as run_compare
    from onnxq.eval.compare import format_ranking

    with progress.stage("load"):
        ref, tok = onnxq.load_source(fp32)
        models = [(q, onnxq.load(q)) for q in quantized]
    d = D.load_calibration(data, D.input_specs(ref), tokenizer=tokenizer or tok,
                           samples=samples, batch_size=batch_size, seq_len=seq_len,
                           text_field=text_field, split="heldout")
    results = {}
    for name, q in models:
        errs = run_compare(ref, q, d, progress=progress)
        results[name] = errs
        if not opts["quiet"]:
            click.echo(format_ranking(errs, top=top, title=f"== {name} vs {fp32}"))
            click.echo("")
    timings = {k: round(v, 3) for k, v in progress.timings.items()}
    if json_path:
        _write_json(json_path, {"fp32": str(fp32), "data": d.description,
                                "models": {k: [e.as_dict() for e in v]
                                           for k, v in results.items()},
                                "timings_s": timings})
    if html_path:
        from onnxq.eval.html import write_html_report

        report = {"title": "onnxq compare", "fp32": str(fp32),
                  "quantized": ", ".join(quantized), "calibration": [d.description],
                  "timings_s": timings}
        write_html_report(report, html_path, layer_errors=results,
                          title="onnxq compare: per-layer error vs FP32")
        if not opts["quiet"]:
            click.echo(f"onnxq: wrote {html_path}")
