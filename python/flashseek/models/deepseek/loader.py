"""Reads sharded safetensors checkpoints of DeepSeek-V3/R1 (never pickles).

Everything is validated before a byte of weight data is read: the index, every shard's header
(parsed directly so that a truncated file is detected, not mmapped into a crash), and every
tensor's presence, shape and dtype against `tensor_specs(cfg)`. All problems are gathered into one
CheckpointError. Tensors are then memory-mapped and streamed to the device shard by shard.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator, Optional

import torch

from flashseek.models.deepseek.checkpoint import INDEX_NAME, TensorSpec, tensor_specs
from flashseek.models.deepseek.config import DeepseekConfig

SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E5M2": torch.float8_e5m2,
}
_ITEMSIZE = {"F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 << 20


class CheckpointError(ValueError):
    pass


def read_safetensors_header(path: Path) -> tuple[dict, list[str]]:
    """(tensor entries, problems) of one .safetensors file, checking it is complete."""
    problems = []
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return {}, [f"{path.name}: truncated (no header)"]
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                return {}, [f"{path.name}: truncated or corrupt header (header {hlen} bytes, file {size} bytes)"]
            header = json.loads(f.read(hlen))
    except FileNotFoundError:
        return {}, [f"{path.name}: shard file is missing"]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {}, [f"{path.name}: header is not valid JSON ({exc})"]
    header.pop("__metadata__", None)
    data_len = size - 8 - hlen
    end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    if end > data_len:
        cut = sorted(n for n, e in header.items() if int(e["data_offsets"][1]) > data_len)
        problems.append(f"{path.name}: truncated file ({data_len} data bytes, header needs {end}); "
                        f"incomplete tensors: {', '.join(cut)}")
    for name, e in header.items():
        want = _ITEMSIZE.get(e.get("dtype"), 0) * _prod(e.get("shape", []))
        a, b = e["data_offsets"]
        if want and b - a != want:
            problems.append(f"{path.name}: {name} has {b - a} bytes for shape {e['shape']} {e['dtype']}")
    return header, problems


def _prod(xs):
    n = 1
    for x in xs:
        n *= int(x)
    return n


def checkpoint_files(model_dir: Path) -> tuple[dict, list[str]]:
    """name -> shard file name, from the index json, or the single model.safetensors."""
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            doc = json.loads(index.read_text())
            wm = doc["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not an object")
            return {str(k): str(v) for k, v in wm.items()}, []
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({type(exc).__name__}: {exc})") from None
    single = model_dir / "model.safetensors"
    if single.exists():
        header, problems = read_safetensors_header(single)
        return {n: single.name for n in header}, problems
    raise CheckpointError(f"{model_dir}: no {INDEX_NAME} and no model.safetensors")


class CheckpointReader:
    """A validated checkpoint: `iter_tensors(device)` streams the tensors the model needs."""

    def __init__(self, model_dir, cfg: DeepseekConfig, num_layers: Optional[int] = None):
        self.dir = Path(model_dir)
        self.full_cfg = cfg
        self.cfg = cfg if num_layers is None else cfg.with_layers(num_layers)
        self.num_layers = self.cfg.num_hidden_layers
        self.weight_map, problems = checkpoint_files(self.dir)
        specs = tensor_specs(cfg)  # the full checkpoint, MTP included
        self.needed = self._needed(specs)
        # A full load checks every tensor (MTP too); a --num-layers load only what it reads, so a
        # partial download of the first shards serves a partial run.
        checked = specs if num_layers is None else {n: specs[n] for n in self.needed}
        self.headers: dict[str, dict] = {}
        files = set(self.weight_map.values()) if num_layers is None else \
            {self.weight_map[n] for n in checked if n in self.weight_map}
        for fname in sorted(files):
            header, p = read_safetensors_header(self.dir / fname)
            self.headers[fname] = header
            problems += p
        missing, shape_bad, dtype_bad, unexpected, misplaced = [], [], [], [], []
        for name, spec in checked.items():
            fname = self.weight_map.get(name)
            if fname is None:
                missing.append(name)
                continue
            entry = self.headers.get(fname, {}).get(name)
            if entry is None:
                if fname in self.headers and self.headers[fname]:
                    misplaced.append(f"{name} (index says {fname})")
                continue
            if list(entry["shape"]) != list(spec.shape):
                shape_bad.append(f"{name}: {list(entry['shape'])}, expected {list(spec.shape)}")
            dt = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dt != spec.dtype:
                dtype_bad.append(f"{name}: {entry['dtype']}, expected {_st_name(spec.dtype)}")
        unexpected = sorted(set(self.weight_map) - set(specs))
        for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("shape mismatches", shape_bad), ("dtype mismatches", dtype_bad),
                             ("tensors absent from the shard the index names", misplaced)):
            if items:
                problems.append(f"{len(items)} {label}: " + "; ".join(items))
        if problems:
            raise CheckpointError(f"checkpoint {self.dir} does not match its config "
                                  f"({cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP):\n  - "
                                  + "\n  - ".join(problems))

    def _needed(self, specs: dict[str, TensorSpec]) -> list[str]:
        keep = []
        for name in specs:
            if name.startswith("model.layers."):
                layer = int(name.split(".")[2])
                if layer >= self.num_layers:
                    continue  # MTP module or beyond --num-layers
            keep.append(name)
        return keep

    @property
    def total_bytes(self) -> int:
        tot = 0
        for name in self.needed:
            e = self.headers[self.weight_map[name]][name]
            tot += e["data_offsets"][1] - e["data_offsets"][0]
        return tot

    def iter_tensors(self, device="cpu", progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in self.needed:
            by_file.setdefault(self.weight_map[name], []).append(name)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, desc=f"loading {self.dir.name}")
        try:
            for fname in sorted(by_file):
                with safe_open(str(self.dir / fname), framework="pt", device="cpu") as f:
                    for name in by_file[fname]:
                        t = f.get_tensor(name)
                        if bar is not None:
                            bar.update(t.numel() * t.element_size())
                        yield name, t.to(device, non_blocking=False)
        finally:
            if bar is not None:
                bar.close()


def _st_name(dtype) -> str:
    for k, v in SAFETENSORS_DTYPES.items():
        if v == dtype:
            return k
    return str(dtype)


def load_config(model_dir) -> DeepseekConfig:
    return DeepseekConfig.from_json(Path(model_dir) / "config.json")
