"""HF <-> megatron conversion: bit-exact round trips, resharded loading, and refusals of bad input
that leave nothing behind."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.checks import logits_vs_transformers

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def read_hf_tensors(path) -> dict:
    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _round_trips(pairs: list, work: str) -> None:
    from megatron_opd import parallel
    from megatron_opd.checkpoint.convert import hf_to_mcore, mcore_to_hf

    for name, hf_dir in pairs:
        hf_to_mcore(hf_dir, f"{work}/{name}-mcore", layout=parallel.ParallelLayout(2, 2))
        mcore_to_hf(f"{work}/{name}-mcore", f"{work}/{name}-hf", layout=parallel.ParallelLayout(1, 2),
                    max_shard_size="200KB")


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    """Every tiny model (plus a bf16 one) converted HF -> mcore at TP2 x PP2 -> HF at PP2."""
    from megatron_opd.testing.tiny import make_hf_model

    work = tmp_path_factory.mktemp("convert")
    models = dict(tiny_models)
    models["qwen3_bf16_tied"] = str(make_hf_model(work / "src-bf16", "qwen3", dtype=torch.bfloat16,
                                                  tie_word_embeddings=True, max_shard_size="100KB"))
    run_distributed(_round_trips, 4, sorted(models.items()), str(work), timeout=600)
    return work, models


@pytest.mark.slow
def test_round_trip_is_bit_exact_with_same_config(converted):
    work, models = converted
    for name, src in models.items():
        a, b = read_hf_tensors(src), read_hf_tensors(work / f"{name}-hf")
        assert a.keys() == b.keys(), name
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (name, key)
        ca = json.loads((Path(src) / "config.json").read_text())
        cb = json.loads((work / f"{name}-hf" / "config.json").read_text())
        assert ca == cb, (name, {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)})
        assert (work / f"{name}-hf" / "model.safetensors.index.json").is_file()  # 200KB shards
        assert (work / f"{name}-hf" / "generation_config.json").is_file()
    # nothing staged is left next to the outputs
    assert not [p for p in work.iterdir() if p.name.startswith(".staging-")]


@pytest.mark.slow
def test_converted_checkpoint_loads_at_any_layout_with_same_logits(converted):
    work, models = converted
    names = ["llama_tied", "qwen2"]
    pairs = {n: (models[n], str(work / f"{n}-mcore")) for n in names}
    results = run_distributed(logits_vs_transformers, 4, pairs, LAYOUTS, timeout=600)
    diffs = {}
    for r in results:
        diffs.update(r)
    assert len(diffs) == len(names) * len(LAYOUTS)
    assert all(v <= 1e-4 for v in diffs.values()), diffs


@pytest.mark.slow
def test_exported_model_matches_transformers_on_original(converted):
    from transformers import AutoModelForCausalLM

    work, models = converted
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(5))
    for name in ("llama", "qwen3"):
        a = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(str(work / f"{name}-hf"), dtype=torch.float32)(ids).logits
        assert torch.equal(a, b)


# --- malformed inputs ---------------------------------------------------------------------------

def _break(kind: str, src: Path, dst: Path) -> str:
    """Copy the model at ``src`` to ``dst`` with one defect; return the expected message part."""
    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    if kind == "index_names_missing_shard":
        data = json.loads(index.read_text())
        data["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
        index.write_text(json.dumps(data))
        return "names shard 'model-00099-of-00099.safetensors', which does not exist"
    if kind == "shard_has_unlisted_key":
        data = json.loads(index.read_text())
        del data["weight_map"]["model.norm.weight"]
        index.write_text(json.dumps(data))
        return "holds tensor 'model.norm.weight', which model.safetensors.index.json does not list"
    shard = dst / json.loads(index.read_text())["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    tensors = load_file(shard)
    if kind == "wrong_shape":
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :-1].contiguous()
        save_file(tensors, shard, metadata={"format": "pt"})
        return "tensor 'model.layers.1.mlp.up_proj.weight' has shape [160, 95], the config implies [160, 96]"
    if kind == "wrong_dtype":
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(torch.int32)
        save_file(tensors, shard, metadata={"format": "pt"})
        return "tensor 'model.layers.1.mlp.up_proj.weight' has dtype I32"
    if kind == "mixed_dtype":
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(torch.float16)
        save_file(tensors, shard, metadata={"format": "pt"})
        return "tensor 'model.layers.1.mlp.up_proj.weight' is F16 but 'model.embed_tokens.weight' is F32"
    if kind == "missing_key":
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, shard, metadata={"format": "pt"})
        data = json.loads(index.read_text())
        del data["weight_map"]["model.layers.1.mlp.up_proj.weight"]
        index.write_text(json.dumps(data))
        return "tensor 'model.layers.1.mlp.up_proj.weight' is missing"
    if kind == "unconsumed_key":
        tensors["model.layers.7.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].clone()
        save_file(tensors, shard, metadata={"format": "pt"})
        data = json.loads(index.read_text())
        data["weight_map"]["model.layers.7.mlp.up_proj.weight"] = shard.name
        index.write_text(json.dumps(data))
        return "tensor 'model.layers.7.mlp.up_proj.weight'"
    if kind == "unknown_model_type":
        config = json.loads((dst / "config.json").read_text())
        config["model_type"] = "gpt_neox"
        (dst / "config.json").write_text(json.dumps(config))
        return "model_type 'gpt_neox' is not supported"
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory):
    from megatron_opd.testing.tiny import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("sharded") / "m", "llama", max_shard_size="100KB")


@pytest.mark.parametrize("kind", ["index_names_missing_shard", "shard_has_unlisted_key", "wrong_shape",
                                  "wrong_dtype", "mixed_dtype", "missing_key", "unconsumed_key",
                                  "unknown_model_type"])
def test_malformed_hf_input_is_refused_before_writing(kind, sharded_source, tmp_path):
    from megatron_opd import parallel
    from megatron_opd.checkpoint.convert import hf_to_mcore

    expected = _break(kind, sharded_source, tmp_path / "bad")
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        hf_to_mcore(tmp_path / "bad", out, layout=parallel.ParallelLayout(1, 1))
    assert expected in str(e.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_existing_output_is_refused_without_force(tiny_models, tmp_path):
    from megatron_opd import parallel
    from megatron_opd.checkpoint.convert import hf_to_mcore, mcore_to_hf

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="output directory exists and is not empty"):
        hf_to_mcore(tiny_models["llama"], out, layout=parallel.ParallelLayout(1, 1))
    with pytest.raises(ValueError, match="not a megatron_opd checkpoint"):
        mcore_to_hf(tiny_models["llama"], tmp_path / "out2", layout=parallel.ParallelLayout(1, 1))
    assert (out / "keep.txt").read_text() == "precious" and not (tmp_path / "out2").exists()


# --- the command line under torchrun, and vLLM on the export -------------------------------------

def _torchrun(nproc: int, *args: str) -> None:
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--max-restarts=0", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]


def _vllm_vs_megatron(hf_dir: str, mcore_dir: str) -> float:
    """Largest |log-prob| difference between vLLM on the exported HF directory and the megatron
    model loaded from the converted checkpoint, on the same sequences."""
    from megatron_opd import parallel
    from megatron_opd.checkpoint.load import load_model
    from megatron_opd.models.config import ArchConfig
    from megatron_opd.rollout.engine import RolloutEngine
    from megatron_opd.commands.score import score_sequences

    mp = parallel.initialize_global_model_parallel(parallel.ParallelLayout(1, 1))
    seqs = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(2)).tolist()
    ref = score_sequences(load_model(mcore_dir, mp), seqs, show_progress=False)
    engine = RolloutEngine(ArchConfig.from_hf_dir(hf_dir), model_dir=hf_dir, max_model_len=64,
                           kv_cache_bytes=64 << 20)
    got = engine.score(seqs)
    engine.close()
    return max(abs(a - b) for r, g in zip(ref, got) for a, b in zip(r["logprobs"], g.logprobs))


@pytest.mark.vllm
def test_cli_converts_under_torchrun_and_the_export_loads_in_vllm(tmp_path):
    """`convert hf-to-mcore` at TP2 x PP2 and the tools/ wrapper of `mcore-to-hf` at TP2 (TP shards
    merged on export), tokenizer carried along; vLLM's log-probs on the export equal megatron's."""
    from megatron_opd.testing.tiny import make_hf_model, make_sentencepiece_tokenizer

    src = make_hf_model(tmp_path / "src", "qwen2", seed=4, max_shard_size="150KB")
    make_sentencepiece_tokenizer(src)
    mc, hf = tmp_path / "mcore", tmp_path / "hf"
    _torchrun(4, "-m", "megatron_opd.cli", "convert", "hf-to-mcore", "--hf", str(src), "--out", str(mc),
              "--tp", "2", "--pp", "2")
    tool = Path(__file__).resolve().parent.parent / "tools" / "convert_mcore_to_hf.py"
    _torchrun(2, str(tool), "--mcore", str(mc), "--out", str(hf), "--tp", "2", "--max-shard-size", "150KB")
    a, b = read_hf_tensors(src), read_hf_tensors(hf)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((src / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    for d in (mc, hf):
        assert (d / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes(), d
    diff = run_distributed(_vllm_vs_megatron, 1, str(hf), str(mc), timeout=300,
                           env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})[0]
    assert diff <= 1e-4, diff
