"""Artifacts that cannot disagree with themselves: the manifest against its graphs, its digest.

The file hashes cover every file but the manifest, so on load the manifest is checked too:
what each graph records in `io` must be what the graph declares, the fields the runtime
sizes its buffers by (capacity, dtype, the model config, the cache layout) must follow from
the step graph's inputs and outputs, and the digest recorded at build time must match the
manifest's content. A hand edit or a manifest copied from another build is then one sentence
naming the field, not an ONNX Runtime traceback later.

The same module stamps ONNX Runtime's optimized-model cache entries (engines/ort.py), so a
truncated or altered entry is rebuilt rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

from ..errors import UserError
from ..hashing import sha256_file

MANIFEST = "manifest.json"
STEP = "step.onnx"
CACHE_LAYOUTS = {False: "stacked", True: "per-layer"}  # the graph's cache inputs
DIGEST = "manifest_sha256"  # sha256 of the manifest's canonical JSON without this key
FIX = "it was edited or copied from another build; rebuild with linear-export build --force"
STAMP = "entry.json"  # inside an ORT cache entry: each file's size and sha256
FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16"}


def manifest_digest(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != DIGEST}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def manifest_text(manifest: dict) -> str:
    """The manifest as written to disk, with its digest recorded."""
    return json.dumps({**manifest, DIGEST: manifest_digest(manifest)}, indent=2) + "\n"


def graph_io(path: Path) -> dict[str, list[dict]]:
    """The inputs and outputs a graph declares, in the manifest's `io` form."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure is the same damaged file
        raise UserError(f"{path.name} in '{path.parent}' is not a readable ONNX graph; rebuild "
                        "with linear-export build --force.") from None

    def spec(value: onnx.ValueInfoProto) -> dict:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "dtype": dtype,
                "shape": [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]}

    return {"inputs": [spec(v) for v in proto.graph.input],
            "outputs": [spec(v) for v in proto.graph.output]}


def check_manifest(path: Path, manifest: dict) -> None:
    """One UserError naming the first manifest field that disagrees with the graphs or digest."""
    where = f"{MANIFEST} in '{path}'"
    io = manifest.get("io")
    if not isinstance(io, dict) or STEP not in io:
        raise UserError(f"{where} records no io for {STEP}; {FIX}.")
    declared = {}
    for graph, recorded in io.items():
        if graph not in manifest["files"]:
            raise UserError(f"{where} records io for {graph}, which its files do not list; "
                            f"{FIX}.")
        declared[graph] = graph_io(path / graph)
        _compare_io(where, graph, recorded, declared[graph])
    _check_fields(where, manifest, declared[STEP])
    recorded_digest = manifest.get(DIGEST)  # artifacts built before digests have none
    if recorded_digest is not None and recorded_digest != manifest_digest(manifest):
        raise UserError(f"{where} does not match its recorded {DIGEST} (a field was changed "
                        f"after the build); {FIX}.")


def _compare_io(where: str, graph: str, recorded: object, declared: dict) -> None:
    for kind in ("inputs", "outputs"):
        field = f"io.{graph}.{kind}"
        entries = recorded.get(kind) if isinstance(recorded, dict) else None
        names = [entry.get("name") if isinstance(entry, dict) else None
                 for entry in entries or []]
        want = [spec["name"] for spec in declared[kind]]
        if names != want:
            raise UserError(f"{where} lists {field} {names}, but {graph} declares {want}; "
                            f"{FIX}.")
        for entry, spec in zip(entries, declared[kind], strict=True):
            for key in ("dtype", "shape"):
                if entry.get(key) != spec[key]:
                    raise UserError(f"{where} says {field} {spec['name']} has {key} "
                                    f"{entry.get(key)}, but {graph} declares {spec[key]}; "
                                    f"{FIX}.")


def _check_fields(where: str, manifest: dict, step: dict) -> None:
    """The fields the runtime sizes buffers by, against the step graph's declared IO."""
    from ..models import GPTConfig, SequenceLayout

    inputs = {spec["name"]: spec for spec in step["inputs"]}
    outputs = {spec["name"]: spec for spec in step["outputs"]}
    per_layer = "past_key.0" in inputs
    if not (per_layer or "past_key" in inputs) or "logits" not in outputs:
        raise UserError(f"{STEP} beside {where} lacks the step contract's past_key and logits; "
                        "rebuild with linear-export build --force.")
    try:
        config = GPTConfig(**manifest["model"]["config"])
        SequenceLayout(**manifest["layout"])
    except (KeyError, TypeError):
        raise UserError(f"{where} has no valid model.config or layout; {FIX}.") from None
    max_batch = manifest.get("build", {}).get("max_batch")
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise UserError(f"{where} says build.max_batch {max_batch}, not a whole number of rows "
                        f"of at least 1; {FIX}.")
    cache = inputs["past_key.0" if per_layer else "past_key"]
    shape = cache["shape"] if per_layer else cache["shape"][1:]  # [B, Hkv, C, D]
    layers = (sum(name.startswith("past_key.") for name in inputs) if per_layer
              else cache["shape"][0])
    source = f"{STEP}'s {cache['name']} {cache['dtype']} {cache['shape']}"
    build = manifest.get("build", {})
    found = {  # field: (what the manifest says, what it must be, where that comes from)
        "capacity": (manifest.get("capacity"), shape[2], source),
        "dtype": (FLOAT_DTYPES.get(manifest.get("dtype"), manifest.get("dtype")),
                  cache["dtype"], source),
        "model.config.n_layer": (config.n_layer, layers, source),
        "model.config.n_kv_head": (config.kv_heads, shape[1], source),
        "model.config.dim": (config.head_dim, shape[3], f"{source} (head_dim = dim / n_head)"),
        "model.config.vocab_size": (config.vocab_size, outputs["logits"]["shape"][-1],
                                    f"{STEP}'s logits {outputs['logits']['shape']}"),
        "vocab_size": (manifest.get("vocab_size"), config.vocab_size, "model.config"),
        "num_classes": (manifest.get("num_classes"), config.num_classes, "model.config"),
        "build.cache_inputs": (build.get("cache_inputs", "stacked"), CACHE_LAYOUTS[per_layer],
                               f"{STEP}'s cache inputs"),
        "build.head_shared": (bool(build.get("head_shared", False)), "slot_positions" in inputs,
                              f"whether {STEP} takes slot_positions"),
    }
    if "attn_mass" in outputs:
        found["model.config.n_head"] = (config.n_head, outputs["attn_mass"]["shape"][2],
                                        f"{STEP}'s attn_mass {outputs['attn_mass']['shape']}")
    for field, (says, want, origin) in found.items():
        if says != want:
            if field == "dtype":
                says, want = manifest.get("dtype"), want.replace("float", "fp")
            if field == "model.config.dim":
                says, want = config.dim, want * config.n_head
            raise UserError(f"{where} says {field} {says}, but {origin} makes it {want}; "
                            f"{FIX}.")


def stamp_entry(directory: Path) -> None:
    """Record each file of a finished cache entry (before it is renamed into place)."""
    files = {path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
             for path in sorted(directory.iterdir()) if path.is_file() and path.name != STAMP}
    (directory / STAMP).write_text(json.dumps(files, indent=2) + "\n")


def entry_intact(directory: Path) -> bool:
    """Whether a cache entry holds exactly the files its stamp lists, unchanged."""
    try:
        files = json.loads((directory / STAMP).read_text())
        present = {path.name for path in directory.iterdir() if path.name != STAMP}
        return bool(files) and present == set(files) and all(
            (directory / name).stat().st_size == entry["bytes"]
            and sha256_file(directory / name) == entry["sha256"] for name, entry in files.items())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
