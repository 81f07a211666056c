"""Child process of :func:`onnxq.eval.bench.bench`: a JSON spec on stdin, timings on stdout.

Separate process because the shared onnxruntime thread pool it sets up is
process-wide and would forbid per-session pools in the caller.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from onnxq.errors import OnnxqError
    from onnxq.eval.bench import _time_models

    spec = json.loads(sys.stdin.read())
    try:
        times = _time_models(spec)
    except OnnxqError as exc:
        print(json.dumps({"error": str(exc), "kind": type(exc).__name__}))
        return 1
    print(json.dumps({"times": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
