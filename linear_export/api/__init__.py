"""The public Python API: load, build, make a policy, generate, verify, bench, sample."""

from ..errors import UserError
from ..export.artifact import Artifact, load_artifact
from ..runtime.policies import Policy
from ..runtime.sampling import SamplingConfig
from .bench import BenchOptions, BenchReport, bench
from .build import BuildOptions, build, cache_root, cached_artifact
from .calibrate import CalibrationSettings, calibrate
from .engines import (
    load_artifact_for,
    load_decoder,
    model_directory,
    open_engine,
    open_source,
)
from .evaluate import EvalModel, evaluate
from .generate import Generation, generate
from .models import (
    DEFAULT_CFG_SCALE,
    DEMO_CFG_SCALE,
    ModelSource,
    default_cfg_scale,
    demo_source,
    load_model,
    load_source,
    load_vq_decoder,
    parse_classes,
    prompt_conditions,
)
from .policy import fit_engine, make_policy
from .sample import SampleSpec
from .sample_run import SampleSummary, sample
from .verify import verify

__all__ = [
    "Artifact", "BenchOptions", "BenchReport", "BuildOptions", "CalibrationSettings",
    "DEFAULT_CFG_SCALE", "DEMO_CFG_SCALE", "EvalModel", "Generation", "ModelSource", "Policy",
    "SampleSpec", "SampleSummary", "SamplingConfig", "UserError", "bench", "build", "cache_root",
    "cached_artifact", "calibrate", "default_cfg_scale", "demo_source", "evaluate", "fit_engine",
    "generate", "load_artifact", "load_artifact_for", "load_decoder", "load_model", "load_source",
    "load_vq_decoder", "make_policy", "model_directory", "open_engine", "open_source",
    "parse_classes", "prompt_conditions", "sample", "verify",
]
