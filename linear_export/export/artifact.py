"""The artifact directory: step graph(s), shared external weights, manifest.json with hashes."""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from ..errors import UserError
from ..hashing import sha256_file
from ..models import DTYPES, GPTConfig, SequenceLayout
from ..models.families import Family, family_from_json
from ..models.families.llamagen import LlamaGenC2I
from ..models.gpt import GPT
from ..outputs import FULL_DISK, clear_write_errors, write_failure
from .consistency import CACHE_LAYOUTS, MANIFEST, STEP, check_manifest, manifest_text
from .onnx_step import (
    DEFAULT_OPSET,
    decode_kernel,
    export_step,
)
from .quantize import WEIGHT_FORMATS, quantize_graphs
from .step_variants import (
    export_decode_sharing,
    export_embeds_prefill_sharing,
    export_score_sharing,
)

# Schema 2: score_position_ids; 3: shaped [B, R, T]; 4: slot_owner (a head-shared pool); 5: the
# decode step (present_query, fused attention) and the score graph replace step_noscores;
# 6: slot_positions replace slot_owner (a version 5 artifact without them reads the same).
SCHEMA_VERSION = 6
READABLE_VERSIONS = (5, 6)
STEP_DATA = "step.onnx.data"
STEP_DECODE = "step_decode.onnx"  # the decode step: no attn_mass, fused attention
SCORE = "score.onnx"  # LineAR's line-end score (runs once per line)
VQ_DECODER = "vq_decoder.onnx"
PREFILL_EMBEDS = "prefill_embeds.onnx"  # families whose prefix is features (llamagen-t2i)
UNCOND = "uncond.safetensors"  # llamagen-t2i: the learned uncond caption embedding, for CFG
REBUILD = "rebuild with linear-export build --force"
# ONNX Runtime's CPU provider has no bfloat16 kernels for these graphs.
ARTIFACT_DTYPES = ("fp32", "fp16")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("onnx", "onnx"), ("onnxscript", "onnxscript"),
                       ("onnxruntime", "onnxruntime-gpu"), ("linear_export", "linear-export")):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if name == "onnxruntime":
                import onnxruntime

                versions[name] = onnxruntime.__version__
            else:
                versions[name] = "unknown"
    return versions


@dataclass(frozen=True)
class Artifact:
    """A loaded, hash-checked artifact directory."""

    path: Path
    manifest: dict

    @property
    def config(self) -> GPTConfig:
        return GPTConfig(**self.manifest["model"]["config"])

    @property
    def layout(self) -> SequenceLayout:
        return SequenceLayout(**self.manifest["layout"])

    @property
    def family(self) -> Family:
        """How the runtime drives this artifact's model (a LlamaGen c2i one when unrecorded)."""
        record = self.manifest["model"].get("adapter")
        if record is None:
            return LlamaGenC2I.for_model(self.config, self.layout)
        family = family_from_json(record)
        if UNCOND in self.manifest["files"]:
            from safetensors.torch import load_file

            family = replace(family, uncond=load_file(self.path / UNCOND)["uncond_embedding"])
        return family

    @property
    def family_name(self) -> str:
        return self.family.name

    @property
    def capacity(self) -> int:
        return int(self.manifest["capacity"])

    @property
    def dtype_name(self) -> str:
        return self.manifest["dtype"]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def max_batch(self) -> int:
        return int(self.manifest["build"]["max_batch"])

    @property
    def head_shared(self) -> bool:
        """Whether the steps take slot_positions (per-head budgets: dead slots of a kv head)."""
        return bool(self.manifest["build"].get("head_shared", False))

    @property
    def split_cache(self) -> bool:
        """Whether the graphs take one cache input per layer (past_key.0, ...)."""
        return self.manifest["build"].get("cache_inputs", "stacked") == "per-layer"

    @property
    def step_path(self) -> Path:
        return self.path / STEP

    @property
    def weight_format(self) -> str:
        """fp32 (the graph's dtype), or int8/int4 weight-only MatMulNBits."""
        return self.manifest["build"].get("weights", "fp32")

    @property
    def decode_path(self) -> Path:
        return self.path / STEP_DECODE

    @property
    def score_path(self) -> Path:
        return self.path / SCORE

    @property
    def attention(self) -> str:
        """The decode step's attention kernel: 'gqa' (fused, updates the cache in place) or
        'math' (standard ONNX ops)."""
        return self.manifest["build"]["attention"]

    @property
    def prefill_embeds_path(self) -> Path | None:
        return self.path / PREFILL_EMBEDS if PREFILL_EMBEDS in self.manifest["files"] else None

    def file_sha256(self, name: str) -> str:
        return self.manifest["files"][name]["sha256"]


def _check_build(model: GPT, out: Path, capacity: int, max_batch: int, weight_format: str,
                 force: bool) -> str:
    """What needs no export: the model's dtype (its name), formats, `out`, capacity, batch."""
    dtype_name = next((k for k, v in DTYPES.items() if v == model.dtype), None)
    if dtype_name not in ARTIFACT_DTYPES:
        raise UserError(f"Artifacts are built in {' or '.join(ARTIFACT_DTYPES)}, not "
                        f"{dtype_name}; pass --dtype fp32 or fp16.")
    if weight_format not in WEIGHT_FORMATS:
        raise UserError(f"--weights {weight_format} is not a weight format; choose one of "
                        f"{', '.join(WEIGHT_FORMATS)}.")
    if out.exists() and not force:
        raise UserError(f"Artifact directory '{out}' already exists; pass --force to replace it "
                        "or choose another --out.")
    sequence = model.family.token_layout(model.layout).length  # end-of-line tokens included
    if capacity > sequence:
        raise UserError(f"Capacity {capacity} exceeds the whole sequence ({sequence} tokens).")
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch} must be at least 1.")
    return dtype_name


def _staging(out: Path) -> Path:
    """A fresh directory beside `out`, readable as the artifact will be, to export into."""
    with clear_write_errors(out):  # no permission to write there: one sentence
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    os.chmod(staging, directory_mode())  # mkdtemp's 0700 would hide the artifact from others
    return staging


def _export_vq_decoder(vq_model: torch.nn.Module, model: GPT, staging: Path, opset: int,
                       log: Callable[[str], None]) -> None:
    from .vq_onnx import export_vq_decoder

    log(f"exporting {VQ_DECODER}")
    export_vq_decoder(vq_model, staging / VQ_DECODER, opset,
                      grid=(model.layout.height, model.layout.width))


def build_artifact(
    model: GPT,
    out: Path,
    *,
    model_name: str,
    image_size: int,
    weights: dict,
    capacity: int,
    build_options: dict,
    max_batch: int = 64,
    opset: int = DEFAULT_OPSET,
    split_cache: bool = True,
    head_shared: bool = False,
    attention: str = "gqa",
    weight_format: str = "fp32",
    force: bool = False,
    log: Callable[[str], None] = lambda line: None,
    vq_decoder: tuple[torch.nn.Module, dict] | None = None,
) -> Artifact:
    """Export `model` into a new artifact at `out`, renamed into place only once complete.

    `weights` says how to rebuild the reference model ({"source": "checkpoint", "path",
    "sha256"} or {"source": "random", "seed", "std"}); `build_options` records the policy.
    `split_cache`: one cache input per layer (bound in place; see export/split_cache.py).
    `head_shared`: the steps take slot_positions, for per-head budgets.
    `attention`: the decode step's kernel, 'gqa' (ONNX Runtime's, needs split_cache) or 'math'.
    `vq_decoder`: (VQModel, record) adds `vq_decoder.onnx`; the record (model name, weights
    path and hash) goes into the manifest so verify can rebuild the PyTorch decoder.
    """
    out = Path(out)
    dtype_name = _check_build(model, out, capacity, max_batch, weight_format, force)
    staging = _staging(out)
    try:
        started = time.perf_counter()
        log(f"exporting {STEP} (capacity {capacity}, {dtype_name}, opset {opset})")
        kernel = decode_kernel(attention, split_cache)
        io = _export_step_graphs(model, staging, kernel=kernel, weight_format=weight_format,
                                 log=log, capacity=capacity, max_batch=max_batch, opset=opset,
                                 split_cache=split_cache, head_shared=head_shared)
        if vq_decoder is not None:
            _export_vq_decoder(vq_decoder[0], model, staging, opset, log)
        build = {**build_options, "max_batch": max_batch,
                 "cache_inputs": CACHE_LAYOUTS[split_cache], "head_shared": head_shared,
                 "attention": kernel, "weights": weight_format, "variants": sorted(io),
                 "export_seconds": round(time.perf_counter() - started, 3)}
        log("hashing files and writing the manifest")
        manifest = _manifest(model, model_name, image_size, dtype_name, capacity, opset, io,
                             weights, build, _hash_files(staging))
        if vq_decoder is not None:
            manifest["vq_decoder"] = {"file": VQ_DECODER, **vq_decoder[1]}
        (staging / MANIFEST).write_text(manifest_text(manifest))
        _move_into_place(staging, out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in FULL_DISK:  # `out` untouched
            raise write_failure(out, error) from None
        raise
    return Artifact(out, manifest)


def _export_step_graphs(model: GPT, staging: Path, *, kernel: str, weight_format: str,
                        log: Callable[[str], None], **shared) -> dict:
    """step.onnx, the decode step and the score graph (and a feature prefix's prefill) into
    `staging`, all sharing step.onnx's weight file, quantized if asked; their IO by file."""
    def record(specs: tuple[list, list]) -> dict:
        return {"inputs": [s.to_json() for s in specs[0]],
                "outputs": [s.to_json() for s in specs[1]]}

    step_options = {key: shared[key] for key in ("capacity", "max_batch", "opset",
                                                 "split_cache", "head_shared")}
    io = {STEP: record(export_step(model, staging / STEP, **step_options))}
    log(f"exporting {STEP_DECODE} ({kernel} attention, sharing {STEP_DATA})")
    io[STEP_DECODE] = record(export_decode_sharing(model, staging, staging / STEP,
                                                   name=STEP_DECODE, attention=kernel,
                                                   **shared))
    log(f"exporting {SCORE}")
    io[SCORE] = record(export_score_sharing(model, staging, staging / STEP, name=SCORE,
                                            **shared))
    caption_dim = getattr(model, "caption_dim", None)
    if caption_dim is not None:  # a feature prefix: its own prefill graph, and CFG's uncond
        from safetensors.torch import save_file

        log(f"exporting {PREFILL_EMBEDS} (sharing {STEP_DATA})")
        io[PREFILL_EMBEDS] = record(export_embeds_prefill_sharing(
            model, staging, staging / STEP, embed_dim=caption_dim, name=PREFILL_EMBEDS,
            capacity=shared["capacity"], max_batch=shared["max_batch"], opset=shared["opset"],
            split_cache=shared["split_cache"]))
        uncond = model.cls_embedding.uncond_embedding.detach().float().contiguous().cpu()
        save_file({"uncond_embedding": uncond}, str(staging / UNCOND))
    if weight_format != "fp32":
        weighted = [STEP_DECODE] + ([PREFILL_EMBEDS] if caption_dim is not None else [])
        quantize_graphs(staging, STEP, weighted, [SCORE], weight_format, log,
                        standard_ops=kernel == "math")  # TensorRT's form for standard-op graphs
    return io


def directory_mode() -> int:
    """What a plain mkdir would give: 0777 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _manifest(model: GPT, model_name: str, image_size: int, dtype_name: str, capacity: int,
              opset: int, io: dict, weights: dict, build: dict, files: dict) -> dict:
    config, layout, family = model.config, model.layout, model.family
    # The adapter is recorded for the families whose conditions are not class ids.
    adapter = None if isinstance(family, LlamaGenC2I) else family.to_json()
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"family": family.name, "name": model_name, "config": asdict(config),
                  **({"adapter": adapter} if adapter else {})},
        "layout": asdict(layout),
        "image_size": image_size,
        "vocab_size": config.vocab_size,
        "num_classes": config.num_classes,
        "capacity": capacity,
        "dtype": dtype_name,
        "opset": opset,
        "io": io,
        "files": files,
        "weights": weights,
        "build": build,
        "tools": tool_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _hash_files(directory: Path) -> dict[str, dict]:
    return {
        path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST
    }


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished artifact to `out`; an old one is removed only after the swap."""
    if not out.exists():
        try:
            os.replace(staging, out)
            return
        except OSError as error:  # another build placed `out` since: replace that one
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.replace(out, retired / out.name)
    os.replace(staging, out)
    shutil.rmtree(retired, ignore_errors=True)


def load_artifact(path: str | Path, *, check_hashes: bool = True) -> Artifact:
    """Read and check an artifact: schema version, every listed file present and unchanged."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"Artifact directory '{path}' does not exist; build one with "
                        "linear-export build --out DIR.")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"'{path}' is not an artifact ({MANIFEST} is missing); build one with "
                        "linear-export build --out DIR.")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        version = manifest["schema_version"]
        if not all(isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
                   for entry in files.values()):
            raise KeyError("files")  # an entry without its size and hash
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{MANIFEST} in '{path}' is corrupt (not a valid manifest); "
                        f"{REBUILD}.") from None
    pool = isinstance(manifest.get("build"), dict) and manifest["build"].get("head_shared")
    if version not in READABLE_VERSIONS or (version < 6 and pool):  # 5's pool: slot_owner
        what = f"{version} with per-head budgets" if pool else version
        raise UserError(f"{MANIFEST} in '{path}' has schema version {what}, but this "
                        f"linear-export reads version {SCHEMA_VERSION}; {REBUILD}.")
    for required in (STEP, STEP_DATA):
        if required not in files:
            raise UserError(f"{MANIFEST} in '{path}' lists no {required}; {REBUILD}.")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"{name} is missing from artifact '{path}'; {REBUILD}.")
        if file.stat().st_size != entry["bytes"]:
            raise UserError(f"{name} is corrupt (size {file.stat().st_size} bytes, manifest "
                            f"says {entry['bytes']}); {REBUILD}.")
        if check_hashes and sha256_file(file) != entry["sha256"]:
            raise UserError(f"{name} is corrupt (sha256 mismatch); {REBUILD}.")
    check_manifest(path, manifest)  # the manifest itself: against the graphs and its digest
    return Artifact(path, manifest)


def rehash(artifact_dir: Path) -> None:
    """Rewrite the manifest's file hashes after a deliberate edit (tests, manual surgery)."""
    manifest_path = Path(artifact_dir) / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {name: {"sha256": sha256_file(Path(artifact_dir) / name),
                                "bytes": (Path(artifact_dir) / name).stat().st_size}
                         for name in manifest["files"]}
    manifest_path.write_text(manifest_text(manifest))
