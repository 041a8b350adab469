"""Several processes on CPU with gloo: ``run_ranks`` (the two-rank harness of test_fsdp.py's DDP and FSDP2
comparisons with one process) and ``quaff-fx finetune`` under torchrun and accelerate launch."""
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # spawns processes (seconds of start-up each)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, port: int, body, args: tuple, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        queue.put((rank, body(rank, size, *args)))  # plain Python values: a tensor would outlive its process's memory
    except Exception:
        queue.put((rank, {"error": traceback.format_exc()}))  # fail the test now, not at the queue's timeout
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(body, *args, size: int = 2) -> dict:
    """``body(rank, size, *args)`` in ``size`` spawned processes joined by gloo; their results by rank. ``body``
    is a module-level function (spawn imports it by name) returning plain Python values."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, size, port, body, args, queue)) for r in range(size)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, out = queue.get(timeout=240)
        if isinstance(out, dict) and "error" in out:  # the other ranks may wait in a collective for ever
            for p in procs:
                p.terminate()
            pytest.fail(f"rank {rank}: {out['error']}")
        results[rank] = out
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "accelerate-fsdp"])
def test_cli_finetune_under_a_launcher(tiny_model_dir, tmp_path, launcher):
    """`quaff-fx finetune` takes the launcher's environment as it is: torchrun's and accelerate's. Under torchrun
    the scales sync once per step (--scale-sync step: the Trainer's callback, one all-reduce each micro-batch);
    under accelerate in every forward, with each decoder layer compiled (--compile-scope layers: the scales'
    all-reduce traced into the compiled layer, DDP around it); accelerate-fsdp: --distributed fsdp under
    accelerate's launcher (the Trainer over the sharded model, no DDP wrapper from accelerate)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "ddp"
    port = str(_free_port())
    if launcher == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:  # accelerate starts several CPU processes only through MPI; its --multi_gpu launcher (torchrun inside)
        # runs them with gloo where there is no GPU
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", port]
    sync = "step" if launcher == "torchrun" else "forward"  # the same DDP under both launchers
    cmd = launch + ["-m", "quaff_fx.cli", "finetune", str(tiny_model_dir), "--steps", "2", "--seq-len", "32",
                    "--batch-size", "4", "--grad-accum", "2", "--scale-sync", sync, "--out", str(out), "--json"]
    cmd += ["--compile-scope", "layers"] if launcher == "accelerate" else []
    cmd += ["--distributed", "fsdp"] if launcher == "accelerate-fsdp" else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 2
    log = json.loads((out / "loss.json").read_text())
    assert log["world_size"] == 2 and log["config"]["scale_sync"] == sync
    assert log["config"]["compile_scope"] == ("layers" if launcher == "accelerate" else "model")
    assert log["config"]["distributed"] == ("fsdp" if launcher == "accelerate-fsdp" else "ddp")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_finetune_fsdp_matches_ddp_merges_and_resumes(tiny_model_dir, tmp_path):
    """`quaff-fx finetune --distributed fsdp` under torchrun: the Trainer over the FSDP2-sharded model (the int8
    base split between the two processes, one layer's shards in host memory: --offload-layers 1) trains as DDP does
    on the same global batch (losses, adapter, scales, merged artifact); its checkpoint of whole tensors resumes in
    one process to the same adapter; a DDP resume of it is refused before the model loads."""
    import json
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    from quaff_fx.cli import main

    def finetune(out, mode, procs=2, resume=False):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                  str(_free_port())] if procs > 1 else [sys.executable]
        cmd = launch + ["-m", "quaff_fx.cli", "finetune", str(tiny_model_dir), "--steps", "4", "--seq-len", "32",
                        "--batch-size", "4", "--save-every", "2", "--distributed", mode, "--out", str(out), "--json",
                        "--loss", "chunked"]
        cmd += ["--resume"] if resume else ["--merge"]
        cmd += ["--offload-layers", "1"] if mode == "fsdp" and procs > 1 else []  # one of the two layers' shards on
        # the host (FSDP2's CPUOffloadPolicy): the same training, checkpoints and merge
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "loss.json").read_text())

    fsdp, ddp = finetune(tmp_path / "fsdp", "fsdp"), finetune(tmp_path / "ddp", "ddp")
    assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5) and len(fsdp["losses"]) == 4
    assert fsdp["int8_bytes_per_process"] == pytest.approx(ddp["int8_bytes_per_process"] / 2, rel=0.05)
    assert fsdp["config"]["offload_layers"] == 1

    def tensors(out, name):
        return load_file(str(out / name))

    for name in ("adapter/adapter_model.safetensors", "adapter/quaff_scales.safetensors", "merged/model.safetensors"):
        a, b = tensors(tmp_path / "fsdp", name), tensors(tmp_path / "ddp", name)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{name}: {k}")
    assert (tmp_path / "fsdp/checkpoints/checkpoint-2/quaff_fsdp.json").is_file()

    resumed = tmp_path / "resumed"  # stopped after step 2: resume in one process
    shutil.copytree(tmp_path / "fsdp", resumed)
    for gone in ("checkpoints/checkpoint-4", "adapter", "merged"):
        shutil.rmtree(resumed / gone)
    args = ["finetune", str(tiny_model_dir), "--out", str(resumed), "--resume", "--distributed", "ddp"]
    assert main(args) == 2  # refused: the optimizer state of an FSDP checkpoint is by parameter name
    finetune(resumed, "fsdp", procs=1, resume=True)
    name = "adapter/adapter_model.safetensors"
    a, b = tensors(tmp_path / "fsdp", name), tensors(resumed, name)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
