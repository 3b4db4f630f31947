"""Reference GGUF files written with llama.cpp's own ``gguf`` package, and what the tests
compare of two files: their metadata fields and their tensors."""
from __future__ import annotations


def write_tensors_and_close(w, tensors: dict) -> None:
    """Add ``tensors`` (name -> array) to the ``gguf.GGUFWriter`` ``w`` and write the file."""
    for n, t in tensors.items():
        w.add_tensor(n, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fields(path) -> dict:
    """A GGUF file's metadata: key -> (types, contents), without the reader's own GGUF.*
    entries, mapc's record and the alignment."""
    import gguf
    r = gguf.GGUFReader(str(path))
    return {k: (f.types, f.contents()) for k, f in r.fields.items()
            if not k.startswith("GGUF.") and k not in ("mapc.record", "general.alignment")}


def tensors_of(path) -> dict:
    import gguf
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
