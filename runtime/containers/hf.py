"""HuggingFace checkpoints: ``config.json`` + safetensors (one file, or shards with
``model.safetensors.index.json``); ``pytorch_model*.bin`` is read too. Output is what
transformers' ``save_pretrained`` writes, loadable by ``from_pretrained``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from mapc.errors import MapcError
from mapc.runtime.containers.base import MAPC_JSON, Source, Writer, write_json
from mapc.runtime.safetensors_io import SafetensorsFile, SafetensorsWriter

SINGLE = ()
DEFAULT_SHARD_BYTES = 5 * 10**9
LAYOUT = "hf"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")))


def make_writer(tmpdir, program, resolved, options):
    return HFWriter(tmpdir, options.get("max_shard_bytes") or DEFAULT_SHARD_BYTES)


class HFSource(Source):
    format = "hf"
    layout = "hf"

    def __init__(self, path):
        super().__init__(path)
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise MapcError(f"cannot read config.json: {e}", where=str(self.path)) from None
        self.format_meta = self.config
        self.where: dict[str, object] = {}
        st = sorted(self.path.glob("*.safetensors"))
        if st:
            index = self.path / "model.safetensors.index.json"
            if index.is_file():
                wanted = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                missing = [f for f in wanted if not (self.path / f).is_file()]
                if missing:
                    raise MapcError(f"shard {missing[0]} listed in the index is missing",
                                    where=str(self.path))
                st = [self.path / f for f in wanted]
            for f in st:
                sf = SafetensorsFile(f)
                for name in sf.keys():
                    self.where[name] = sf
        else:
            from mapc.runtime import torchfile
            for f in sorted(self.path.glob("pytorch_model*.bin")):
                state = torchfile.load(f)
                if not isinstance(state, dict):
                    raise MapcError("expected a state dict", where=str(f))
                for name, ref in state.items():
                    self.where[name] = ref

    def coords(self):
        return [SINGLE]

    def names(self, coord=SINGLE):
        return list(self.where)

    def _get(self, name):
        try:
            return self.where[name]
        except KeyError:
            raise MapcError(f"tensor {name} is not in the checkpoint", where=str(self.path)) \
                from None

    def shape(self, name, coord=SINGLE):
        x = self._get(name)
        return x.shape(name) if isinstance(x, SafetensorsFile) else tuple(x.shape)

    def dtype(self, name, coord=SINGLE):
        x = self._get(name)
        return x.dtype(name) if isinstance(x, SafetensorsFile) else x.dtype

    def read(self, name, coord=SINGLE):
        x = self._get(name)
        if isinstance(x, SafetensorsFile):
            return x.read(name)
        return x.map()


class HFWriter(Writer):
    def __init__(self, tmpdir, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        super().__init__(tmpdir)
        self.max_shard_bytes = max_shard_bytes
        self.writers = {}
        self.file_of = {}

    def begin(self, tensors):
        from mapc.runtime.backends import DTYPES
        groups, size, self.total = [[]], 0, 0
        for coord, name, shape, dt in tensors:
            n = DTYPES[dt].itemsize * math.prod(shape)
            if groups[-1] and size + n > self.max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, shape, dt))
            size += n
            self.total += n
        if len(groups) == 1:
            files = ["model.safetensors"]
        else:
            files = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
                     for k in range(len(groups))]
        for fname, group in zip(files, groups):
            self.writers[fname] = SafetensorsWriter(self.dir / fname, group, {"format": "pt"})
            for name, _, _ in group:
                self.file_of[name] = fname
        self.dtypes = {dt for *_, dt in tensors}

    def write(self, coord, name, arr):
        self.writers[self.file_of[name]].write(name, arr)

    def finish(self, record: dict):
        for w in self.writers.values():
            w.close()
        if len(self.writers) > 1:
            write_json(self.dir / "model.safetensors.index.json",
                       {"metadata": {"total_size": self.total}, "weight_map": self.file_of})
        config = dict(record["config"])
        if len(self.dtypes) == 1:
            config["dtype"] = next(iter(self.dtypes))
        write_json(self.dir / "config.json", config)
        write_json(self.dir / MAPC_JSON, record)


Source = HFSource
