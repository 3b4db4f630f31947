"""The installed wheel on its own: run by scripts/test.sh with the Python of a fresh venv that
holds only mapc's declared dependencies, from a directory outside the repository.

    python wheel_smoke.py WORKDIR [--gguf {missing,installed}] [--only FORMAT...]

Builds a tiny random HF checkpoint from the spec's own hf layout (so nothing here knows tensor
names), converts it to every format and back to hf, and checks with ``mapc verify`` (the CLI
entry point of the venv) that each output and each round trip holds the same tensors. With
``--gguf missing`` the gguf extra is not installed: converting to gguf must fail with one line
naming the extra. Exits non-zero on the first failure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

FAMILY = "llama"                    # a shipped spec with a layout for every format
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 48, "vocab_size": 64, "tie_word_embeddings": False,
          "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "hidden_act": "silu"}
# target format -> extra options (a topology the format has, to exercise resharding)
TARGETS = {"hf": [], "megatron": ["--tp", "2", "--pp", "2"], "nemo": ["--tp", "2"],
           "gguf": [], "dcp": [], "nxdt": ["--tp", "2"], "deepspeed": ["--dp", "2"],
           "universal": [], "neox": ["--tp", "2"]}


def mapc(*argv, check=True, entry_point=False) -> subprocess.CompletedProcess:
    """Run the mapc command: in-process through its main() (fast), or with ``entry_point``
    through the venv's ``mapc`` console script."""
    argv = [str(a) for a in argv]
    if entry_point:
        exe = Path(sys.executable).with_name("mapc")
        r = subprocess.run([str(exe), *argv], capture_output=True, text=True)
    else:
        import contextlib
        import io
        from mapc.cli.main import main as cli
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli(argv)
        r = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check and r.returncode != 0:
        sys.exit(f"wheel smoke: mapc {' '.join(argv)} failed ({r.returncode}):\n{r.stderr}")
    return r


def tiny_hf(path: Path) -> Path:
    import mapc as api
    from safetensors.numpy import save_file
    program = api.compile_spec(FAMILY, layout="hf", config=CONFIG)
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(inst.recipe.shard_shape).astype(np.float32)
               for inst, _, name in program.target.placements()}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--gguf", choices=("missing", "installed"), default="missing")
    ap.add_argument("--only", nargs="*", default=list(TARGETS), help="target formats to try")
    args = ap.parse_args()
    import mapc as api
    here = Path(api.__file__).resolve()
    if "site-packages" not in here.parts:
        sys.exit(f"wheel smoke: mapc imported from {here}, not from the installed wheel")
    for forbidden in ("torch", "pytest", "hypothesis", "transformers"):
        try:
            __import__(forbidden)
            sys.exit(f"wheel smoke: {forbidden} is installed in the wheel's venv")
        except ImportError:
            pass
    work = args.workdir
    os.chdir(work)
    src = tiny_hf(work / "hf")
    version = mapc("--version", entry_point=True, check=False)
    if version.returncode != 0 or not version.stdout.startswith("mapc "):
        sys.exit(f"wheel smoke: the mapc console script does not run: {version.stderr}")
    done = []
    for fmt in args.only:
        opts = TARGETS[fmt]
        out = work / f"{fmt}-out" if fmt != "nemo" else work / "out.nemo"
        if fmt == "gguf" and args.gguf == "missing":
            r = mapc("convert", src, out, "--to", fmt, "-q", check=False)
            if r.returncode != 1 or r.stderr.count("\n") != 1 or "mapc[gguf]" not in r.stderr:
                sys.exit(f"wheel smoke: gguf without its extra should fail in one line naming "
                         f"mapc[gguf]; got {r.returncode}: {r.stderr}")
            if out.exists():
                sys.exit("wheel smoke: a failed gguf conversion left its output")
            done.append(f"{fmt} (extra missing: one-line error)")
            continue
        mapc("convert", src, out, "--to", fmt, *opts, "-q", entry_point=fmt == "hf")
        mapc("verify", src, out, "-q", entry_point=fmt == "hf")
        back = work / f"{fmt}-back"
        mapc("convert", out, back, "--to", "hf", "-q")
        mapc("verify", src, back, "-q")
        mapc("inspect", out)
        done.append(fmt)
    print("wheel smoke ok: hf -> " + ", ".join(done) + " -> hf, each verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
