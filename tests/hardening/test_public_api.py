"""The public Python API: every name exists, is documented and has type hints."""

from __future__ import annotations

import inspect

import onnx_ir as ir
import pytest

import onnxq
import onnxq.passes
import onnxq.recipe
import onnxq.support

API = ["load", "save", "export", "calibrate", "quantize", "convert", "prepare", "load_source",
       "validate", "load_recipe", "Recipe", "ConvertResult", "OnnxqError"]
PASSES = ["CanonicalizePass", "OutlierSuppressionPlusPass", "SmoothQuantPass",
          "ExplicitChannelScalingPass", "PerEmbeddingGroupPass", "QuantizeEmbeddingsPass",
          "InsertQDQPass"]


def _public(module):
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield name, obj


def _annotation_gaps(func) -> list[str]:
    sig = inspect.signature(func)
    gaps = [p for p, param in sig.parameters.items()
            if p not in ("self", "cls") and param.kind not in (param.VAR_POSITIONAL,)
            and param.annotation is inspect.Parameter.empty]
    if func.__name__ != "__init__" and sig.return_annotation is inspect.Signature.empty:
        gaps.append("return")
    return gaps


def test_documented_names_exist():
    for name in API:
        assert name in onnxq.__all__ and hasattr(onnxq, name), name
    for name in PASSES:
        assert name in onnxq.passes.__all__, name
        assert issubclass(getattr(onnxq.passes, name), ir.passes.InPlacePass), name
    assert onnxq.recipe.load_recipe is onnxq.load_recipe


@pytest.mark.parametrize("module", [onnxq, onnxq.passes, onnxq.recipe, onnxq.support],
                         ids=lambda m: m.__name__)
def test_public_names_have_docstrings_and_type_hints(module):
    missing = []
    for name, obj in _public(module):
        if not inspect.getdoc(obj):
            missing.append(f"{name}: no docstring")
        if inspect.isfunction(obj):
            missing += [f"{name}: {g} not annotated" for g in _annotation_gaps(obj)]
        elif inspect.isclass(obj) and not issubclass(obj, BaseException):
            for meth in ("__init__", "call"):
                func = obj.__dict__.get(meth)
                if func is not None:
                    missing += [f"{name}.{meth}: {g} not annotated"
                                for g in _annotation_gaps(func)]
            for meth_name, meth in vars(obj).items():
                if inspect.isfunction(meth) and not meth_name.startswith("_") \
                        and meth_name != "call" and not inspect.getdoc(meth):
                    missing.append(f"{name}.{meth_name}: no docstring")
    assert not missing, "\n".join(missing)


def test_readme_python_api_example_names():
    """The README's step-by-step example only uses public names."""
    for name in ("export", "prepare", "calibrate", "quantize", "save", "convert", "Recipe"):
        assert callable(getattr(onnxq, name))
