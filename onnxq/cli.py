"""The ``onnxq`` command line: a thin layer that parses options and calls the API.

User errors print one line on stderr and exit with code 2; internal errors exit
with code 1. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import pathlib
import signal
import sys
from typing import Any

import click

from onnxq.errors import OnnxqError

__all__ = ["main"]

_DEBUG = False


def _recipe(ctx_opts: dict[str, Any]):
    from onnxq.recipe import Recipe, load_recipe

    base = load_recipe(ctx_opts["recipe"]) if ctx_opts.get("recipe") else Recipe()
    changes: dict[str, Any] = {}
    for key in ("target", "method", "samples", "batch_size", "seq_len", "batch_tokens", "opset",
                "weight_bits",
                "kv_bits", "kv_group_size",
                "embedding_bits", "block_size"):
        if ctx_opts.get(key) is not None:
            changes[key] = ctx_opts[key]
    if ctx_opts.get("keep_fp"):
        changes["keep_fp"] = tuple(base.keep_fp) + tuple(ctx_opts["keep_fp"])
    if ctx_opts.get("outliers"):
        changes["outliers"] = tuple(x for o in ctx_opts["outliers"] for x in o.split(","))
    if ctx_opts.get("no_validate"):
        changes["validate_samples"] = 0
    return base.replace(**changes) if changes else base


def _progress(verbose: bool, quiet: bool):
    from onnxq._progress import Progress

    return Progress(0 if quiet else 2 if verbose else 1)


_common = [
    click.option("--target", type=str, default=None,
                 help="Deployment target: ort-cpu, tensorrt (default) or jetson."),
    click.option("--calib", type=click.Path(), default=None,
                 help="Calibration data: .txt (one sample per line), .jsonl or .npz. "
                      "Default: built-in English text."),
    click.option("--tokenizer", type=click.Path(), default=None,
                 help="Folder with tokenizer.json (text models) or preprocessor_config.json "
                      "(image models), for calibrating ONNX files that don't record it."),
    click.option("--text-field", type=str, default="text",
                 help="Field holding the text in .jsonl calibration files."),
    click.option("--samples", type=int, default=None, help="Calibration samples (default 256)."),
    click.option("--batch-size", type=int, default=None, help="Calibration batch size (32)."),
    click.option("--seq-len", type=int, default=None, help="Max tokens per text sample (128)."),
    click.option("--batch-tokens", type=int, default=None,
                 help="Max padded tokens per text calibration batch (1024); bounds memory."),
    click.option("--method", type=str, default=None,
                 help="Activation range estimator: minmax, percentile (default), entropy, mse."),
    click.option("--recipe", type=click.Path(), default=None, help="TOML recipe file."),
    click.option("--weight-bits", type=int, default=None,
                 help="8 (default) or 4: blocked int4 linear weights (W4A8, opset 21)."),
    click.option("--embedding-bits", type=int, default=None,
                 help="8 (default) or 4: int4 embedding rows packed two per byte (opset 18+)."),
    click.option("--block-size", type=int, default=None, help="Rows per int4 weight block (128)."),
    click.option("--opset", type=int, default=None, help="Opset for export (default 21)."),
    click.option("--task", type=str, default="auto",
                 help="Export task: feature-extraction or text-classification."),
    click.option("-v", "--verbose", is_flag=True, help="Print every stage with timings."),
    click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
    click.option("--debug", is_flag=True, help="Show tracebacks of errors."),
]


def _with_common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxq")
def cli() -> None:
    """onnxq: accurate static INT8 ONNX graphs for transformers."""


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(), required=True, help="Output .onnx file.")
@_with_common
@click.option("--keep-fp", multiple=True, help="Module path or tensor (glob) to keep in FP32.")
@click.option("--outliers", multiple=True,
              help="Outlier methods: auto, none, smoothquant, osplus, osplus-shift, "
                   "ffn-scaling, peg, hadamard (decoders), mosf (ViT).")
@click.option("--stats", "stats_path", type=click.Path(), default=None,
              help="Statistics file from `onnxq calibrate` (skips calibration).")
@click.option("--no-validate", is_flag=True, help="Skip the fidelity check.")
@click.option("--kv-bits", type=int, default=None,
              help="text-generation only: also store the KV cache as 8/4/2-bit codes (RotateKV).")
@click.option("--kv-group-size", type=int, default=None,
              help="Channels per KV quantization group (default 128, or head_dim if smaller).")
@click.option("--min-cosine", type=float, default=None,
              help="Accuracy-driven fallback: keep the worst layers in floating point until "
                   "the held-out mean cosine vs FP32 reaches this value.")
def convert(model, output, stats_path, min_cosine, **opts) -> None:
    """Convert MODEL (ONNX file, HF folder; default all-MiniLM-L6-v2) to static INT8."""
    _set_debug(opts)
    import onnxq
    from onnxq.calibration.stats import Stats

    recipe = _recipe(opts)
    progress = _progress(opts["verbose"], opts["quiet"])
    stats = Stats.load(stats_path) if stats_path else None
    result = onnxq.convert(
        model, output, recipe=recipe, calib=opts["calib"], tokenizer=opts["tokenizer"],
        stats=stats, progress=progress, task=opts["task"], text_field=opts["text_field"],
        min_cosine=min_cosine,
    )
    if not opts["quiet"]:
        _print_summary(result.report)


def _print_summary(report: dict[str, Any]) -> None:
    out = report.get("output", {})
    fid = report.get("fidelity")
    cov = report["coverage"]
    lines = [f"onnxq: wrote {out.get('path')} ({out.get('bytes', 0) / 1e6:.1f} MB), "
             f"target {report['target']}"]
    if fid:
        extra = ""
        if fid.get("recall_at_10") is not None:
            extra = f", neighbour recall@10 {fid['recall_at_10']:.3f}"
        if fid.get("top1_agreement") is not None:
            extra += f", top-1 agreement {fid['top1_agreement']:.3f}"
        lines.append(f"  fidelity vs FP32 on {fid['samples']} held-out samples: mean cosine "
                     f"{fid['mean_cosine']:.4f}{extra}")
    fb = report.get("fallback")
    if fb:
        state = "reached" if fb["reached"] else "NOT reached"
        speed = fb.get("speed_vs_fully_quantized")
        cost = f", speed {speed:.2f}x of the fully quantized graph" if speed else ""
        lines.append(f"  fallback to cosine {fb['target_cosine']}: {state}; kept in FP: "
                     f"{', '.join(fb['kept_fp']) or 'nothing'}{cost}")
    lines.append(f"  linear weights quantized: {100 * cov['fraction']:.1f}%; lint "
                 + ("clean" if not report["lint"] else f"{len(report['lint'])} violations"))
    base = pathlib.Path(out.get("path", "out.onnx"))
    lines.append(f"  report: {base.with_name(base.name.removesuffix('.onnx') + '.report.md')}")
    click.echo("\n".join(lines))


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(), required=True, help="Output .onnx file.")
@click.option("--task", type=str, default="auto",
              help="feature-extraction (encoders' default), text-classification, "
                   "text-generation (decoders with KV cache; default for *ForCausalLM) or "
                   "image-classification (ViT/DeiT).")
@click.option("--opset", type=int, default=21, help="ONNX opset (default 21).")
@click.option("--kv-bits", type=click.Choice(["8", "4", "2"]), default=None,
              help="text-generation only: store the KV cache as 8/4/2-bit codes packed in "
                   "uint8 with per-token group scales (RotateKV).")
@click.option("--kv-group-size", type=int, default=None,
              help="Channels per KV quantization group (default 128, or head_dim if smaller).")
@click.option("--debug", is_flag=True)
def export(model, output, task, opset, kv_bits, kv_group_size, debug) -> None:
    """Export a Hugging Face MODEL folder (default all-MiniLM-L6-v2) to ONNX."""
    _set_debug({"debug": debug})
    import onnxq

    m = onnxq.export(model, task=task, opset=opset)
    if kv_bits is not None:
        if m.metadata_props.get("onnxq.task") != "text-generation":
            raise OnnxqError("--kv-bits needs a text-generation (decoder) model")
        from onnxq.passes.kv_cache import quantize_kv_cache

        quantize_kv_cache(m, bits=int(kv_bits), group_size=kv_group_size)
    onnxq.save(m, output)
    click.echo(f"onnxq: wrote {output}")


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(), required=True, help="Statistics file (.npz).")
@_with_common
def calibrate(model, output, **opts) -> None:
    """Calibrate MODEL and save statistics for `onnxq quantize --stats`."""
    _set_debug(opts)
    import onnxq

    recipe = _recipe(opts)
    m, tok = onnxq.load_source(model, task=opts["task"], opset=recipe.opset)
    onnxq.prepare(m)
    stats = onnxq.calibrate(m, opts["calib"], tokenizer=opts["tokenizer"] or tok, recipe=recipe,
                            progress=_progress(opts["verbose"], opts["quiet"]),
                            text_field=opts["text_field"])
    stats.save(output)
    if not opts["quiet"]:
        click.echo(f"onnxq: wrote statistics of {len(stats.observers)} tensors to {output}")


@cli.command()
@click.argument("model", required=True)
@click.option("-o", "--output", type=click.Path(), required=True, help="Output .onnx file.")
@click.option("--stats", "stats_path", type=click.Path(), required=True,
              help="Statistics file from `onnxq calibrate`.")
@_with_common
@click.option("--keep-fp", multiple=True, help="Module path or tensor (glob) to keep in FP32.")
def quantize(model, output, stats_path, **opts) -> None:
    """Insert Q/DQ into MODEL using a saved statistics file (no calibration run)."""
    _set_debug(opts)
    import onnxq
    from onnxq.calibration.stats import Stats
    from onnxq.eval.report import linear_weight_coverage

    recipe = _recipe(opts)
    stats = Stats.load(stats_path)
    m, _ = onnxq.load_source(model, task=opts["task"], opset=recipe.opset)
    onnxq.prepare(m)
    onnxq.quantize(m, stats, recipe=recipe)
    onnxq.save(m, output)
    if not opts["quiet"]:
        cov = linear_weight_coverage(m)
        click.echo(f"onnxq: wrote {output} ({100 * cov['fraction']:.1f}% of linear weights INT8)")


@cli.command()
@click.argument("model", required=True)
@click.option("--target", type=str, default="tensorrt", help="ort-cpu, tensorrt or jetson.")
@click.option("--json", "as_json", is_flag=True, help="Print violations as JSON.")
@click.option("--debug", is_flag=True)
def lint(model, target, as_json, debug) -> None:
    """Check a QDQ graph against TARGET's rules; exit 1 if anything is wrong."""
    _set_debug({"debug": debug})
    import onnxq
    from onnxq.targets.lint import lint as run_lint
    from onnxq.targets.profiles import get_target

    profile = get_target(target)
    violations = run_lint(onnxq.load(model), profile)
    if as_json:
        click.echo(json.dumps([v.__dict__ for v in violations], indent=2))
    else:
        for v in violations:
            click.echo(str(v))
        click.echo(f"onnxq lint --target {target}: "
                   + ("clean" if not violations else f"{len(violations)} violation(s)"))
    if violations:
        sys.exit(1)


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--batch", type=int, default=32, show_default=True, help="Samples per run.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per sample.")
@click.option("--threads", type=int, default=0,
              help="Intra-op threads (default 0: onnxruntime's default, all cores).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed rounds.")
@click.option("--repeat", type=int, default=10, show_default=True, help="Timed rounds.")
@click.option("--seconds", type=float, default=None,
              help="Time budget instead of --repeat: run rounds until it is spent.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option("--debug", is_flag=True)
def bench(models, batch, seq_len, threads, warmup, repeat, seconds, as_json, debug) -> None:
    """Time MODELS interleaved on onnxruntime CPU; speed ratios against the first."""
    _set_debug({"debug": debug})
    from onnxq.eval.bench import bench as run_bench
    from onnxq.eval.bench import format_table

    results = run_bench(list(models), batch=batch, seq_len=seq_len, threads=threads,
                        warmup=warmup, repeat=repeat, seconds=seconds)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        click.echo(format_table(results))


def _set_debug(opts: dict[str, Any]) -> None:
    global _DEBUG
    _DEBUG = bool(opts.get("debug"))


def _on_signal(signum, frame):  # pragma: no cover - exercised by subprocess tests
    from onnxq import _interrupt

    _interrupt.request()  # checked at every stage boundary, should this raise get lost
    raise KeyboardInterrupt


def _user_error_in_chain(exc: BaseException) -> OnnxqError | None:
    """Pass infrastructure wraps errors (PreconditionError); find the user error inside."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OnnxqError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``onnxq`` console script."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        cli.main(args=argv, prog_name="onnxq", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("onnxq: interrupted; no output written", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("onnxq: interrupted; no output written", err=True)
        sys.exit(130)
    except OnnxqError as exc:
        if _DEBUG:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        click.echo(f"onnxq: error: {msg}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - last line of defence
        if _DEBUG:
            raise
        user = _user_error_in_chain(exc)
        if user is not None:
            msg = str(user).splitlines()[0] if str(user) else type(user).__name__
            click.echo(f"onnxq: error: {msg}", err=True)
            sys.exit(2)
        msg = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"onnxq: internal error: {type(exc).__name__}: {msg} (rerun with --debug)",
                   err=True)
        sys.exit(1)


from onnxq.cli_inspect import analyze as _analyze_cmd  # noqa: E402
from onnxq.cli_inspect import compare as _compare_cmd  # noqa: E402

cli.add_command(_analyze_cmd)
cli.add_command(_compare_cmd)
