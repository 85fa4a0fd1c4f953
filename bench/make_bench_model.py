"""Writes a config-only model folder for benchmarks: the Llama-3-8B shape with SmolLM2's tokenizer
and vocabulary (49152), from the embedded model's cached conversion. Serve it with
load_format="dummy" (random weights, the folder's config and tokenizer).

    python bench/make_bench_model.py .benchmodel [--layers 2]
"""

import argparse
import json
import shutil
from pathlib import Path

from sglite.runtime.models.loader import resolve_model

LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args()
    src, out = Path(resolve_model(None)), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config.update(LLAMA_3_8B, vocab_size=49152, torch_dtype="bfloat16")
    if args.layers:
        config["num_hidden_layers"] = args.layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {out} ({config['num_hidden_layers']} layers)")


if __name__ == "__main__":
    main()
