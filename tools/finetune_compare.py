"""LoRA fine-tuning quality on one base model, four ways, in one run: LoRA on the Quaff default (int8), on the
FP32 model, on the bf16 model, and QLoRA (bitsandbytes NF4). Same data, steps, seed, LoRA and Trainer settings;
trained on token windows of one source text, evaluated on held-out windows of the same text.

    python tools/finetune_compare.py [--artifact smollm2-quaff] [--text python-faq.txt] [--steps 40] [--seq-len 128]
        [--variants ...] [--out rows.json]

Prints the final eval loss of each and Quaff's difference to FP32 LoRA and to QLoRA, the trainable parameters (the
same LoRA targets in every variant), the training and the whole wall time (load and quantize included) and the load
average (the machine may be shared); --out writes the rows as JSON. A fingerprint of the train and held-out token
ids shows every variant saw the same data.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from quaff_fx import QuaffConfig, load_quantized, quantize_
from quaff_fx.data import read_text
from quaff_fx.finetune import FinetuneConfig, make_peft_model
from quaff_fx.model_loading import load_model
from quaff_fx.training import TrainConfig, build_examples, fit, split

VARIANTS = ("quaff", "fp32", "bf16", "qlora")
ARTIFACT: str | None = None  # --artifact: a SmolLM2 artifact of the default preset instead of quantizing here


def base_model(variant: str):
    """The model to put LoRA on, and its tokenizer."""
    if variant == "quaff" and ARTIFACT:
        loaded, _ = load_quantized(ARTIFACT)
        return loaded.model, loaded.tokenizer
    loaded = load_model("smollm2", torch.bfloat16 if variant == "bf16" else torch.float32)
    if variant == "quaff":
        quantize_(loaded.model, QuaffConfig.preset("default"), tokenizer=loaded.tokenizer)
    elif variant == "qlora":
        return nf4_model(loaded.model), loaded.tokenizer
    return loaded.model, loaded.tokenizer


def nf4_model(model):
    """The FP32 model reloaded by transformers with a bitsandbytes NF4 config (QLoRA's base), on the CPU. On a CPU
    with AVX512-BF16, bitsandbytes' Linear4bit runs no-grad eval through its packed inference kernel, which casts
    the activations to bf16 whatever the compute dtype; it is turned off, so QLoRA is evaluated as it trains (FP32
    matmuls on the dequantized NF4 weight), like the other variants."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tempfile.mkdtemp(prefix="qlora-")
    model.hf_quantizer = None  # the GGUF loader's marker: the weights in memory are plain FP32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map={"": "cpu"},
                                                     dtype=torch.float32)
    for module in quantized.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)


def run(variant: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model, tokenizer = base_model(variant)
    examples = build_examples(read_text(args.text_path, "training"), tokenizer, args.seq_len, False, args.text)
    train, held_out = split(examples, args.eval_split, args.seed)
    peft_model = make_peft_model(model, FinetuneConfig(rank=8, alpha=16, seq_len=args.seq_len, seed=args.seed))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_scheduler="linear", warmup=0.1,
                      save_every=10**6, seed=args.seed, progress=False)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapter_dtypes = sorted({str(p.dtype) for p in peft_model.parameters() if p.requires_grad})
    with tempfile.TemporaryDirectory() as scratch:
        log = fit(peft_model, train, held_out, cfg, Path(scratch), pad_id=tokenizer.eos_token_id)
    return {"variant": variant, "first_loss": log["losses"][0], "last_loss": log["losses"][-1],
            "eval_loss": log["eval_loss"], "seconds": round(log["seconds"], 1), "train_windows": len(train),
            "eval_windows": len(held_out), "train_tokens": args.steps * args.batch_size * args.seq_len,
            "eval_tokens": sum(len(e["input_ids"]) for e in held_out), "trainable_params": trainable,
            "adapter_dtype": ",".join(adapter_dtypes), "data_sha": fingerprint(train, held_out)}


def fingerprint(train: list[dict], held_out: list[dict]) -> str:
    """A short hash of the train and held-out token ids: equal in every row when the variants saw the same data."""
    digest = hashlib.sha256(json.dumps([[e["input_ids"] for e in train], [e["input_ids"] for e in held_out]]).encode())
    return digest.hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default="python-faq.txt", help="a bundled text (quaff_fx/data) or a path")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-split", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", default=None, help="JSON of the rows")
    ap.add_argument("--with", dest="earlier", nargs="*", default=[],
                    help="JSON files of earlier runs (same settings) whose rows join the table")
    ap.add_argument("--artifact", default=None, help="Quaff variant: this SmolLM2 artifact (default preset) as base")
    args = ap.parse_args()
    global ARTIFACT
    ARTIFACT = args.artifact
    bundled = Path(__file__).resolve().parent.parent / "quaff_fx" / "data" / args.text
    args.text_path = bundled if bundled.is_file() else Path(args.text)
    rows = [r for f in args.earlier for r in json.loads(Path(f).read_text())]
    for variant in args.variants:
        t0 = time.perf_counter()
        try:
            rows.append(run(variant, args))
        except Exception as exc:  # a variant that cannot run here (QLoRA without a bitsandbytes backend) is reported
            rows.append({"variant": variant, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
        rows[-1].update(wall_seconds=round(time.perf_counter() - t0, 1), load_avg=round(os.getloadavg()[1], 1))
        print(f"{variant}: {rows[-1]}", file=sys.stderr, flush=True)
    by = {r["variant"]: r for r in rows if "eval_loss" in r}
    rows = [r for r in rows if "eval_loss" in r or r["variant"] not in by]  # a variant that ran in another call
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["variant"], "-", "-", "-", "-", "-", r["error"]])
            continue
        vs = {k: f"{100 * (r['eval_loss'] / by[k]['eval_loss'] - 1):+.2f}%" if k in by else "-"
              for k in ("fp32", "qlora")}
        table.append([r["variant"], f"{r['trainable_params']:,}", f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}",
                      f"{r['eval_loss']:.4f}", vs["fp32"], vs["qlora"], r["seconds"], r.get("wall_seconds", "-"),
                      r.get("load_avg", "-"), r["data_sha"]])
    print(f"SmolLM2-135M, LoRA r=8 on {args.text}: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"lr {args.lr}, seed {args.seed}; eval on {args.eval_split:.0%} held-out windows of the same text")
    print(tabulate(table, headers=["LoRA on", "trainable", "first train loss", "last train loss", "final eval loss",
                                   "vs fp32", "vs QLoRA", "train s", "wall s", "load avg", "data"]))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
