"""Single-process checks of what lets big models train: the meta-device build equals the plain initialization,
bf16 FSDP computes on bf16 copies of fp32 shards, the sharded hash never gathers more than one parameter, Muon's update of a
sharded matrix equals the whole one's, samples decode with the KV cache, and a model too large for a rank is
refused before anything is built. FSDP and TP run here on a one-process gloo group (the same code paths)."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from scalelm.cli import main
from scalelm.model.gpt import GPT
from scalelm.model.presets import get_preset
from scalelm.model.sample import sample
from scalelm.parallel.data_parallel import apply_fsdp
from scalelm.parallel.fingerprint import sharded_sha256
from scalelm.parallel.materialize import materialize
from scalelm.parallel.tp import apply_tp
from scalelm.train.checkpoint import state_sha256, unique_state
from scalelm.train.muon import Muon

TINY = get_preset("tiny")


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def meta_model(cfg=TINY) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def plain_model(seed: int, cfg=TINY) -> GPT:
    model = meta_model(cfg)
    materialize([model], torch.device("cpu"), seed)
    return model


def fsdp_model(seed: int, dtypes=(torch.float32, torch.float32)) -> GPT:
    model = meta_model()
    apply_fsdp(model, init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",)), 3, dtypes=dtypes)
    materialize([model], torch.device("cpu"), seed)
    return model


def test_plain_init_is_reproducible_and_per_parameter():
    torch.manual_seed(3)
    eager = GPT(TINY)
    torch.manual_seed(3)
    assert state_sha256(unique_state(GPT(TINY))) == state_sha256(unique_state(eager))
    eager.init_weights(11)
    assert state_sha256(unique_state(plain_model(11))) == state_sha256(unique_state(eager))
    # a parameter's draw does not depend on the others: a model with more blocks starts with the same first ones
    deeper = plain_model(11, replace(TINY, n_layer=6, init_std=TINY.init_std))
    assert not torch.equal(deeper.layers["0"].attention.wo.weight, eager.layers["0"].attention.wo.weight)  # 1/√2L
    assert torch.equal(deeper.layers["0"].attention.wq.weight, eager.layers["0"].attention.wq.weight)


@pytest.mark.parametrize("wrap", ["fsdp", "tp"])
def test_meta_build_materializes_the_single_process_weights(group, wrap):
    model = meta_model()
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("x",))
    apply_fsdp(model, mesh, 3) if wrap == "fsdp" else apply_tp(model, mesh, False)
    materialize([model], torch.device("cpu"), 5)
    assert model.output.weight is model.tok_embeddings.weight  # still tied
    full = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in model.named_parameters()}
    assert state_sha256(full) == state_sha256(unique_state(plain_model(5)))
    assert model.rope_cos is not None and not model.rope_cos.is_meta


def test_bf16_fsdp_computes_on_bf16_parameters_and_keeps_fp32_shards(group):
    """The all-gather moves what the blocks compute with: bf16 here (bench/fsdp_bytes.py counts the bytes on 2
    ranks); the shards the optimizer updates and their gradients stay fp32."""
    model = fsdp_model(0, (torch.bfloat16, torch.float32))
    seen: list[torch.dtype] = []
    model.layers["0"].attention.wq.register_forward_pre_hook(lambda module, _: seen.append(module.weight.dtype))
    with torch.autocast("cpu", torch.bfloat16):
        model(torch.randint(0, TINY.vocab_size, (2, 16))).float().sum().backward()
    weight = model.layers["0"].attention.wq.weight
    assert seen == [torch.bfloat16] and weight.dtype == weight.grad.dtype == torch.float32


def test_sharded_hash_equals_single_process_one_parameter_at_a_time(group, monkeypatch):
    model = fsdp_model(9)
    largest = max(p.numel() for p in model.parameters())
    gathered: list[int] = []
    real = DTensor.full_tensor

    def watched(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        gathered.append(out.numel())
        return out

    monkeypatch.setattr(DTensor, "full_tensor", watched)
    digest = sharded_sha256([model], tied=True)
    assert digest == state_sha256(unique_state(plain_model(9)))
    assert max(gathered) == largest and len(gathered) == len(list(model.parameters()))


def test_muon_updates_a_sharded_matrix_as_the_whole_one(group):
    sharded, plain = fsdp_model(1), plain_model(1)
    pairs = [(sharded.layers["0"].attention.wq.weight, plain.layers["0"].attention.wq.weight),
             (sharded.layers["1"].mlp.w2.weight, plain.layers["1"].mlp.w2.weight)]
    opts = [Muon([s for s, _ in pairs], ns_dtype="fp32", lr=0.02), Muon([p for _, p in pairs], ns_dtype="fp32",
                                                                       lr=0.02)]
    for step in range(2):
        for s, p in pairs:
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            p.grad = g.clone()
            s.grad = DTensor.from_local(g.clone(), s.device_mesh, s.placements)
        for opt in opts:
            opt.step()
    for s, p in pairs:
        torch.testing.assert_close(s.full_tensor(), p, rtol=0, atol=1e-7)


def test_sample_decodes_with_the_kv_cache():
    model = plain_model(2)
    positions: list[int] = []
    model.register_forward_pre_hook(lambda _, args: positions.append(args[0].shape[1]))
    prompt = torch.tensor([[1, 2, 3]])
    out = sample(model, prompt, 70, temperature=0.0)  # past max_seq_len=64: the cache restarts once
    assert out.shape == (1, 73) and torch.equal(out[:, :3], prompt)
    assert positions[0] == 3 and positions.count(1) == 68 and positions[62] == 32 and len(positions) == 70
    # the first tokens equal a decode without cache (the whole sequence re-run every token)
    ids = prompt
    for _ in range(10):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out[:, :13], ids)


def test_a_model_too_large_for_a_rank_is_refused_before_launch(capsys):
    assert main(["train", "--nproc", "2", "--model.preset", "llama3-70b", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: llama3-70b needs about") and "GiB per rank" in err and "\n" not in err
