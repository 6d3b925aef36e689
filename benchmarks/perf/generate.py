"""Figure (e): greedy generation, SPRI model vs its native Qwen3-MoE export."""

from functools import partial
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
)

import spri_hf  # noqa: F401  (registers model_type "spri")
from spri_hf import SpriForCausalLM, export_native

from .common import TITLES
from .measuring import close_enough, time_side_by_side
from .models import qwen3_dense
from .results import Figure, log


# ---------------------------------------------------------------------------------------------------------------------
# (e) generation


def figure_generate(spec: dict, device, dtype, repeats: int, work: Path) -> Figure:
    figure = Figure("generate", TITLES["generate"])
    model = SpriForCausalLM.from_dense(
        qwen3_dense(spec), init="spri", stage=2, num_experts=spec["experts"], num_experts_per_tok=spec["top_k"]
    )
    model.save_pretrained(work / "spri")
    export_native(model, work / "native")  # checks the native model's logits before writing
    del model
    # both loaded the same way, each with transformers' default experts implementation for the device
    models = {name: AutoModelForCausalLM.from_pretrained(work / name, dtype=dtype).to(device).eval()
              for name in ("spri", "native")}
    implementations = {name: model.config._experts_implementation for name, model in models.items()}
    figure.check("same experts_implementation", len(set(implementations.values())) == 1, **implementations)
    figure.details = dict(spec, dtype=str(dtype), experts_implementation=implementations,
                          classes={name: type(model).__name__ for name, model in models.items()})
    generator = torch.Generator().manual_seed(4)
    new_tokens = spec["new_tokens"]
    for batch in spec["batches"]:
        prompt = torch.randint(3, spec["vocab"], (batch, spec["prompt"]), generator=generator).to(device)
        mask = torch.ones_like(prompt)
        outputs = {}

        def generate(name, prompt=prompt, mask=mask, outputs=outputs):
            with torch.no_grad():  # greedy, exactly new_tokens (min_new_tokens keeps EOS from stopping early)
                outputs[name] = models[name].generate(
                    input_ids=prompt, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=2,
                )

        with torch.no_grad():
            logits = {name: model(input_ids=prompt, attention_mask=mask).logits for name, model in models.items()}
        same, diff = close_enough(logits["spri"], logits["native"])
        figure.check(f"batch {batch}: same logits", same, max_abs_logit_diff=diff)
        log(f"  generate: batch {batch}")
        seconds = time_side_by_side({name: partial(generate, name) for name in models},
                                    warmup=spec["warmup"], repeats=repeats, device=device)
        generated = outputs["spri"].shape[1] - prompt.shape[1]
        figure.check(f"batch {batch}: {new_tokens} new tokens each", generated == new_tokens, generated=generated,
                     same_tokens=torch.equal(outputs["spri"], outputs["native"]))
        tokens = batch * new_tokens
        figure.add(f"batch {batch}, {spec['prompt']}+{new_tokens} tokens, {implementations['spri']}",
                   "greedy generation", "tokens/s", ("spri", tokens / seconds["spri"]),
                   ("native", tokens / seconds["native"]), target=(">=", 0.95))
    return figure
