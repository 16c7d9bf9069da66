"""Every engine carries its model's family adapter: the runtime never has to guess one.

The classes that run the step contract (those with `name` and `step`: TorchEngine — with or
without CUDA graphs —, OrtEngine, TrtEngine, verify's LockstepEngine) are found by parsing
their modules, so TensorRT's engine is checked where TensorRT is not installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import linear_export
from linear_export.engines.torch import TorchEngine
from linear_export.models.families.llamagen import LlamaGenC2I
from linear_export.models.gpt import GPT
from linear_export.runtime.verify import TOLERANCES, LockstepEngine

PACKAGE = Path(linear_export.__file__).parent
ENGINE_MODULES = [*sorted((PACKAGE / "engines").glob("*.py")), PACKAGE / "runtime" / "verify.py"]


def engine_classes() -> dict[str, ast.ClassDef]:
    found = {}
    for path in ENGINE_MODULES:
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            methods = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
            names = {target.id for item in node.body if isinstance(item, ast.Assign)
                     for target in item.targets if isinstance(target, ast.Name)}
            if "step" in methods and "name" in names:
                found[f"{path.stem}.{node.name}"] = node
    return found


def sets_family(init: ast.FunctionDef) -> bool:
    return any(isinstance(target, ast.Attribute) and target.attr == "family"
               and isinstance(target.value, ast.Name) and target.value.id == "self"
               for node in ast.walk(init) if isinstance(node, ast.Assign | ast.AnnAssign)
               for target in (node.targets if isinstance(node, ast.Assign) else [node.target]))


def test_every_engine_class_sets_its_family_in_its_constructor() -> None:
    classes = engine_classes()
    assert {"torch.TorchEngine", "ort.OrtEngine", "tensorrt.TrtEngine",
            "verify.LockstepEngine"} <= set(classes)
    for name, node in classes.items():
        init = next((item for item in node.body
                     if isinstance(item, ast.FunctionDef) and item.name == "__init__"), None)
        assert init is not None and sets_family(init), f"{name}.__init__ sets no self.family"


def tiny() -> GPT:
    from linear_export.models import get_config
    from linear_export.models.configs import SequenceLayout

    config = get_config("GPT-tiny")
    return GPT(config, SequenceLayout.for_image(config, 64)).eval()


def test_the_torch_engine_takes_the_model_family_or_class_to_image() -> None:
    model = tiny()
    engine = TorchEngine(model)
    assert engine.family == model.family == LlamaGenC2I.for_model(model.config, model.layout)

    class Bare(torch.nn.Module):  # a step module that names no family
        def __init__(self, like: GPT):
            super().__init__()
            self.inner, self.config, self.layout, self.dtype = like, like.config, like.layout, \
                like.dtype

    bare = TorchEngine(Bare(model))
    assert bare.family == LlamaGenC2I.for_model(model.config, model.layout)


def test_lockstep_takes_the_reference_family() -> None:
    reference = TorchEngine(tiny())
    lockstep = LockstepEngine(reference, TorchEngine(tiny()), TOLERANCES["fp32"], 4.0)
    assert lockstep.family is reference.family
