"""DDP and FSDP2 on CPU with gloo, 2 processes: the same losses as one process on the same global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_finetune import IDS, quantized_tiny

from quaff_fx.finetune import FinetuneConfig, make_peft_model, train

pytestmark = pytest.mark.slow  # spawns processes (seconds of start-up each)

CFG = FinetuneConfig(steps=3, seq_len=32, batch_size=4, lr=1e-2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, mode: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        model = make_peft_model(quantized_tiny(), CFG)
        log = train(model, IDS, CFG, distributed=mode)
        scale = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.act_scale.tolist()
        queue.put((rank, log["losses"], scale))  # plain floats: a tensor would outlive its process's memory
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_training_matches_one_process(mode):
    single_model = make_peft_model(quantized_tiny(), CFG)
    single = train(single_model, IDS, CFG)["losses"]
    single_scale = single_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.act_scale
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, mode, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (l, s)) for r, l, s in (queue.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        losses, scale = results[rank]
        assert torch.allclose(torch.tensor(losses), torch.tensor(single), atol=2e-3, rtol=1e-3), (mode, losses, single)
        assert torch.allclose(torch.tensor(scale), single_scale, rtol=1e-5)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_cli_finetune_under_a_launcher(tiny_model_dir, tmp_path, launcher):
    """`quaff-fx finetune` takes the launcher's environment as it is: torchrun's and accelerate's."""
    import json
    import subprocess
    import sys

    out = tmp_path / "ddp"
    port = str(_free_port())
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port] if launcher == "torchrun"
              # accelerate starts several CPU processes only through MPI; its --multi_gpu launcher (torchrun inside)
              # runs them with gloo where there is no GPU
              else [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port])
    cmd = launch + ["-m", "quaff_fx.cli", "finetune", str(tiny_model_dir), "--steps", "2", "--seq-len", "32", "--batch-size", "4",
                    "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 2
    assert json.loads((out / "loss.json").read_text())["world_size"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
