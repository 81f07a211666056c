#!/usr/bin/env python
"""Example export script: onnxq's passes composed by hand, step by step.

This is what ``onnxq convert`` does for the default recipe, written out with the
public API so that you can change any step (other outlier passes, other
statistics, layers kept in FP32, ...)::

    export (Hugging Face → ONNX)          onnxq.export
    canonicalize                          onnxq.passes.CanonicalizePass
    short calibration with row samples    onnxq.calibrate(..., sample_rows=...)
    Outlier Suppression+ (FP32-exact)     onnxq.passes.OutlierSuppressionPlusPass
    full calibration                      onnxq.calibrate
    Q/DQ for the target                   onnxq.passes.InsertQDQPass
    int8 embedding tables                 onnxq.passes.QuantizeEmbeddingsPass
    save (atomic, external data > 2 GB)   onnxq.save

Usage::

    python tools/example_export.py -o minilm.int8.onnx                # the default model
    python tools/example_export.py --model path/to/hf-folder -o model.int8.onnx
"""

from __future__ import annotations

import argparse
import itertools
import sys

import onnxq
from onnxq.calibration import data as calib_data
from onnxq.passes import (
    CanonicalizePass,
    InsertQDQPass,
    OutlierSuppressionPlusPass,
    QuantizeEmbeddingsPass,
)
from onnxq.passes._patterns import find_norm_sites
from onnxq.targets.profiles import get_target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="Hugging Face folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    parser.add_argument("--target", default="tensorrt", help="ort-cpu, tensorrt or jetson")
    parser.add_argument("--samples", type=int, default=256, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample")
    args = parser.parse_args(argv)

    # 1. Export. onnxq.load_source is onnxq.export for a Hugging Face folder (or
    #    onnxq.load for an .onnx file) that also returns the folder holding the tokenizer;
    #    with a folder of your own, ``model = onnxq.export(folder)`` and ``tokenizer =
    #    folder`` do the same.
    model, tokenizer = onnxq.load_source(args.model)
    recipe = onnxq.Recipe(target=args.target, samples=args.samples, seq_len=args.seq_len)
    target = get_target(recipe.target)

    # 2. Canonicalize: fold constants, fuse LayerNorm/GELU, Gemm -> MatMul. Every pass
    #    is an onnx_ir InPlacePass: call it on the model, it returns a PassResult.
    CanonicalizePass()(model)

    # The calibration data: the embedded English text, tokenized for the model inputs
    # (replace None by a .txt/.jsonl/.npz file of your own).
    data = calib_data.load_calibration(
        None, calib_data.input_specs(model), tokenizer=tokenizer, samples=recipe.samples,
        batch_size=recipe.batch_size, seq_len=recipe.seq_len,
    )

    # 3. Outlier Suppression+ needs statistics of the untransformed graph at every
    #    LayerNorm output, with a reservoir of activation rows for its grid search. A few
    #    batches are enough (the paper migrates from a single batch).
    sites = [site.output.name for site in find_norm_sites(model.graph)]
    first_batches = list(itertools.islice(iter(data), 4))
    site_stats = onnxq.calibrate(model, first_batches, tensors=sites, sample_rows=1024)
    osp = OutlierSuppressionPlusPass(stats=site_stats, symmetric=target.activation_symmetric)
    result = osp(model)
    print(f"OS+: folded shift/scale at {len(getattr(result, 'sites', []))} LayerNorm sites")

    # 4. Full calibration of the transformed graph: the scales must describe the
    #    activations that will actually be quantized.
    stats = onnxq.calibrate(model, data, recipe=recipe)

    # 5. Q/DQ for the target: per-channel int8 weights, per-tensor activations, Q/DQ on
    #    attention MatMuls where the target wants them, never on LayerNorm/Softmax/GELU.
    qdq = InsertQDQPass(stats=stats, target=target, method=recipe.method)(model)
    print(f"Q/DQ: {len(qdq.activations)} activations, {len(qdq.weights)} weights")

    # 6. Embedding tables as int8 rows with per-row scales.
    emb = QuantizeEmbeddingsPass()(model)
    print(f"int8 embeddings: {', '.join(emb.tables) or 'none'}")

    # 7. Save atomically (with external data above 1.8 GB of weights).
    onnxq.save(model, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except onnxq.OnnxqError as exc:
        print(f"example_export: error: {exc}", file=sys.stderr)
        sys.exit(2)
