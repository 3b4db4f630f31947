"""megatron's ``distrib_optim.pt`` (the legacy torch format's distributed optimizer) written
directly: each rank's file laid out from its DDP buffers before any state arrives, every master
and moment pwritten into its place, the alignment gaps left as holes, each member's CRC-32
combined from its pieces (runtime/containers/megatron.py).

Checked against the file as it is written whole -- ``TorchWriter.add_tensor`` of every flat
buffer, then the same object (how mapc wrote it before, through scratch buffers) -- byte for
byte, and against the source's values: a Trainer-style checkpoint made with torch (bf16 weights
beside fp32 norms, so two DDP buffers per rank; torch AdamW's state-dict layout with random
moments). That megatron-core loads these files is tests/test_torch_dist.py's and
tests/test_distopt_buffers.py's ground truth.
"""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import mapc  # noqa: E402
from mapc.runtime import torchfile  # noqa: E402
from mapc.runtime.containers import distopt  # noqa: E402
from mapc.runtime.containers.megatron import DISTRIB_OPTIM, _physical, rank_dir  # noqa: E402

H, L, NH, NG, F, V = 64, 4, 8, 2, 96, 250
SLOTS = {"master": "param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


def _trainer_checkpoint(path):
    """model.safetensors (bf16, norms fp32), config.json, optimizer.pt with AdamW's two groups
    (decayed, then the norms) over named_parameters order, trainer_state.json."""
    g = torch.Generator().manual_seed(0)
    hd = H // NH
    names = [("model.embed_tokens.weight", (V, H))]
    for i in range(L):
        p = f"model.layers.{i}."
        names += [(p + "self_attn.q_proj.weight", (NH * hd, H)),
                  (p + "self_attn.k_proj.weight", (NG * hd, H)),
                  (p + "self_attn.v_proj.weight", (NG * hd, H)),
                  (p + "self_attn.o_proj.weight", (H, NH * hd)),
                  (p + "mlp.gate_proj.weight", (F, H)), (p + "mlp.up_proj.weight", (F, H)),
                  (p + "mlp.down_proj.weight", (H, F)),
                  (p + "input_layernorm.weight", (H,)),
                  (p + "post_attention_layernorm.weight", (H,))]
    names += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    weights = {n: torch.randn(s, generator=g).to(torch.float32 if "norm" in n
                                                 else torch.bfloat16) for n, s in names}
    path.mkdir()
    safetensors_torch.save_file(weights, str(path / "model.safetensors"),
                                metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
        "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NG,
        "intermediate_size": F, "vocab_size": V, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "hidden_act": "silu"}))
    order = [n for n, _ in names if "norm" not in n] + [n for n, _ in names if "norm" in n]
    state = {i: {"step": torch.tensor(3.0),
                 "exp_avg": torch.randn(weights[n].shape, generator=g).to(weights[n].dtype),
                 "exp_avg_sq": torch.rand(weights[n].shape, generator=g).to(weights[n].dtype)}
             for i, n in enumerate(order)}
    hyper = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "amsgrad": False, "foreach": None,
             "maximize": False, "capturable": False, "differentiable": False, "fused": None,
             "decoupled_weight_decay": True}
    decayed = sum("norm" not in n for n in order)
    torch.save({"state": state, "param_groups": [
        dict(hyper, weight_decay=0.1, params=list(range(decayed))),
        dict(hyper, weight_decay=0.0, params=list(range(decayed, len(order))))]},
        path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    return path, weights, {n: state[i] for i, n in enumerate(order)}   # in order


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _trainer_checkpoint(tmp_path_factory.mktemp("distrib_optim_src") / "trainer")


def _written_whole(path, state):
    """``state`` (torch.load of a distrib_optim.pt) written as before: each buffer's flat
    param, exp_avg, exp_avg_sq by add_tensor, in gbuf order, then legacy_state."""
    w = torchfile.TorchWriter(path)
    buffers = []
    for g in range(len(state) - 1):
        ((pair, flats),) = state[g].items()
        buffers.append((tuple(torchfile.TorchDType(str(x).removeprefix("torch."))
                              for x in pair),
                        {slot: w.add_tensor(flats[key].numpy()) for slot, key in SLOTS.items()},
                        flats["numel_unpadded"]))
    w.finish(distopt.legacy_state(buffers))
    return path.read_bytes()


# (tp, pp, vpp, dp): buffers per rank file 2 (bf16, fp32), 2, 4 (two model chunks)
CASES = [(2, 1, 1, 2), (1, 2, 1, 3), (1, 2, 2, 2)]


@pytest.mark.parametrize("tp,pp,vpp,dp", CASES, ids=[f"tp{c[0]}pp{c[1]}vpp{c[2]}dp{c[3]}"
                                                     for c in CASES])
def test_distrib_optim_is_the_file_written_whole_with_the_sources_values(source, tmp_path,
                                                                         tp, pp, vpp, dp):
    """Every rank's distrib_optim.pt: zipfile's CRC check passes, the bytes equal the same
    buffers written whole, each buffer holds every parameter's master and moments at its place
    and zeros in the alignment gaps, no scratch is left; back to HF with the optimizer, the
    masters are the weights and the moments the source's, exactly."""
    src, weights, moments = source
    kw = dict(to="megatron", tp=tp, pp=pp, dp=dp, vpp=vpp if vpp > 1 else None)
    cp = mapc.plan_convert(src, tmp_path / "m", **kw)
    layouts = cp.write.detail.layouts
    cp.close()
    mapc.convert(src, tmp_path / "m", **kw)
    out = tmp_path / "m" / "iter_0000003"
    files = sorted(out.glob(f"*/{DISTRIB_OPTIM}"))
    assert len(files) == tp * pp
    assert not list((tmp_path / "m").rglob(".scratch*"))
    covered: dict = {}                 # (rank dir, gbuf) -> mask of the elements parameters hold
    for coord, lay in layouts.items():
        d = rank_dir(_physical(coord, pp), pp)
        for b, buf in enumerate(lay.buffers, lay.gbuf0):
            mask = np.zeros(sum(x.numel_unpadded for x in buf.buckets), bool)
            off = 0
            for bucket in buf.buckets:
                for _, start, numel in bucket.params:
                    mask[off + start:off + start + numel] = True
                off += bucket.numel_unpadded
            covered[(d, b)] = mask
    for f in files:
        with zipfile.ZipFile(f) as zf:
            assert zf.testzip() is None
        state = torch.load(f, weights_only=False)
        assert f.read_bytes() == _written_whole(tmp_path / "whole.pt", state)
        nbuf = len(state) - 1           # per model chunk a bf16 and an fp32 buffer
        assert sorted(str(next(iter(state[g]))[0]) for g in range(nbuf)) == \
            sorted(["torch.bfloat16", "torch.float32"] * vpp)
        for g in range(nbuf):
            ((pair, flats),) = state[g].items()
            mask = covered[(f.parent.name, g)]
            for key in SLOTS.values():
                flat = flats[key].numpy()
                assert flat.shape == mask.shape
                assert not flat[~mask].any(), (f, g, key)        # the gaps: zeros
                # the parameters' places hold values (zeros: the vocabulary padding rows)
                assert np.count_nonzero(flat[mask]) > 0.9 * mask.sum()
    mapc.convert(tmp_path / "m", tmp_path / "hf", to="hf", with_optimizer=True)
    masters = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(masters) == sorted(weights)
    for name, w in weights.items():
        assert torch.equal(masters[name], w.float()), name
    exported = torch.load(tmp_path / "hf" / "optimizer.pt", weights_only=True)["state"]
    assert len(exported) == len(moments)
    for i, name in enumerate(moments):          # the same index order: Trainer's
        for slot in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(exported[i][slot], moments[name][slot].float()), (name, slot)


def test_a_failing_write_leaves_no_output(source, tmp_path, monkeypatch):
    """A write into a distrib_optim.pt failing midway (the disk full) is one MapcError, and no
    DST, partial rank file or scratch is left beside the source, which is unchanged."""
    from mapc.errors import MapcError
    src = source[0]
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    calls = []
    real = torchfile.TorchWriter.fill

    def fill(self, placeholder, at, array):
        calls.append(self.path.name)
        if len(calls) == 40:
            raise MapcError("cannot write checkpoint: No space left on device",
                            where=str(self.path))
        return real(self, placeholder, at, array)
    monkeypatch.setattr(torchfile.TorchWriter, "fill", fill)
    with pytest.raises(MapcError, match="No space left on device"):
        mapc.convert(src, tmp_path / "out" / "m", to="megatron", tp=2, dp=2)
    assert set(calls) == {DISTRIB_OPTIM} and len(calls) >= 40   # (a write in flight)
    assert not (tmp_path / "out" / "m").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
