"""`spri-hf train`: `trl sft` for SPRI. A dense model (or an SPRI checkpoint) and a dataset in, a two-stage trained SPRI
checkpoint out.

The flags are TRL's (`ScriptArguments`, `ModelConfig`, `DatasetMixtureConfig`, and `SFTConfig` with SPRI's stage
settings: `SpriSFTConfig`), parsed by TRL's own `TrlParser`, so `--config file.yaml` works as with `trl sft`, plus
SPRI's: the upcycling settings (`UpcyclingArguments`, `SpriConfig`'s own fields and defaults, the flags of
`spri-hf upcycle`) and `--task` / `--gguf_file`. Every flag is spelled with underscores as TRL spells it; the dashed
spelling (`--num-experts`) is accepted too, here and by `spri-hf upcycle`.

Causal LMs train with `SpriSFTTrainer`, so TRL's data formats and options apply: `messages` (the tokenizer's chat
template), prompt/completion (conversational or not; loss on the completion), `text`, packing, padding-free,
assistant-only loss, LoRA (`--use_peft`). Encoder-decoder models (T5, BART, ...) train with `SpriSeq2SeqTrainer` on
prompt/completion (or source/target) text. It runs under `accelerate launch` as it does alone. Everything that can be
checked (data, columns, settings, the length of stage 1) is checked before anything is written.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field

from .cli_flags import MOE_LAYERS_HELP, TASKS, UPCYCLING_FLAGS, config_help, flag_type, parse_layers
from .configuration_spri import SpriConfig


# `spri-hf train` also takes TrainingArguments' --seed (of the training run): the upcycling seed is renamed there.
# `router_aux_loss_coef` is SFTConfig's flag (None: the model's own value), as with TRL on any MoE model.
TRAIN_FLAG_NAMES = {"seed": "upcycling_seed"}
TRAINING_ARGUMENT_FLAGS = ("router_aux_loss_coef",)


def upcycling_fields(renamed: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> list[tuple]:
    """`(flag name, type, field)` of every upcycling flag, defaults and help taken from `SpriConfig`."""
    renamed = renamed or {}
    config_fields = {f.name: f for f in dataclasses.fields(SpriConfig)}
    helps = config_help(SpriConfig.__doc__)
    result = []
    for name in UPCYCLING_FLAGS:
        if name in skip:
            continue
        source = config_fields[name]
        help_text = MOE_LAYERS_HELP if name == "moe_layers" else helps.get(name, "")
        result.append(
            (
                renamed.get(name, name),
                flag_type(source.type),
                field(default=source.default, metadata={"help": help_text}),
            )
        )
    return result


UpcyclingArguments = dataclasses.make_dataclass(
    "UpcyclingArguments", upcycling_fields(TRAIN_FLAG_NAMES, skip=TRAINING_ARGUMENT_FLAGS)
)
UpcyclingArguments.__doc__ = "SPRI upcycling settings (the fields of `SpriConfig`, same defaults)."


def upcycling_settings(arguments, training) -> dict:
    settings = {
        name: getattr(arguments, TRAIN_FLAG_NAMES.get(name, name))
        for name in UPCYCLING_FLAGS
        if name not in TRAINING_ARGUMENT_FLAGS
    }
    settings["moe_layers"] = parse_layers(settings["moe_layers"])
    if training.router_aux_loss_coef is not None:
        settings["router_aux_loss_coef"] = training.router_aux_loss_coef
    return settings


@dataclass
class SpriScriptArguments:
    """What `spri-hf train` adds to TRL's script and model arguments."""

    task: str = field(default="auto", metadata={"help": "auto | causal-lm | seq2seq-lm (auto: from the config)."})
    gguf_file: str | None = field(
        default=None, metadata={"help": "Load the dense model from this GGUF file in it."}
    )


@dataclass
class Seq2SeqGenerationArguments:
    """`Seq2SeqTrainingArguments`' own flags (evaluation by generation), for encoder-decoder runs."""

    predict_with_generate: bool = field(default=False, metadata={"help": "seq2seq-lm: evaluate by generating."})
    generation_max_length: int | None = field(
        default=None, metadata={"help": "seq2seq-lm: max_length when generating."}
    )
    generation_num_beams: int | None = field(default=None, metadata={"help": "seq2seq-lm: num_beams when generating."})
    generation_config: str | None = field(default=None, metadata={"help": "seq2seq-lm: a GenerationConfig to load."})


# Flags of spri_hf 0.2's `spri-hf train`, accepted until 0.4 with a message naming TRL's flag
LEGACY_FLAGS = {
    "model": "model_name_or_path",
    "dataset": "dataset_name",
    "dataset_split": "dataset_train_split",
    "eval_split": "dataset_test_split",
    "text_column": "dataset_text_field",
}
# ... and the column flags, which TRL has no flag for: the columns are renamed to TRL's names
LEGACY_COLUMN_FLAGS = {
    "prompt_column": "prompt", "completion_column": "completion", "source_column": "prompt", "target_column": "completion",
}  # fmt: skip


def say(message: str):
    """A message on stderr from the main process only (every rank of `accelerate launch` parses the flags)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"spri-hf train: {message}", file=sys.stderr)


def rewrite_legacy_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """`argv` with the 0.2 flags replaced by TRL's, and the column renames `{their column: TRL's column}`."""
    rewritten, renames = [], {}
    items = iter(argv)
    for item in items:
        name, equals, value = item[2:].partition("=") if item.startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        if name in LEGACY_FLAGS:
            new = LEGACY_FLAGS[name]
            say(f"--{name} is now --{new} (TRL's name); --{name} goes in spri_hf 0.4.")
            rewritten += [f"--{new}={value}"] if equals else [f"--{new}"]
        elif name in LEGACY_COLUMN_FLAGS:
            column = value if equals else next(items, None)
            if column is None:
                raise ValueError(f"--{name} needs a column name.")
            renames[column] = LEGACY_COLUMN_FLAGS[name]
            say(
                f"--{name} goes in spri_hf 0.4; name the column '{LEGACY_COLUMN_FLAGS[name]}' in the data (TRL's "
                "column names) instead."
            )
        else:
            rewritten.append(item)
    return rewritten, renames


def make_parser():
    try:
        from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser
    except ImportError as err:
        raise ImportError(f'spri-hf train runs TRL\'s SFTTrainer: pip install "spri_hf[trl]" ({err}).') from None

    from .trl import SpriSFTConfig

    return TrlParser(
        (
            ScriptArguments,
            SpriSFTConfig,
            ModelConfig,
            DatasetMixtureConfig,
            UpcyclingArguments,
            SpriScriptArguments,
            Seq2SeqGenerationArguments,
        ),
        prog="spri-hf train",
        description=(
            "trl sft for SPRI: upcycle a dense model and train both SPRI stages in one run (SpriSFTTrainer; "
            "SpriSeq2SeqTrainer for encoder-decoders). TRL's flags and data formats, --config file.yaml, plus SPRI's "
            "upcycling and stage flags."
        ),
    )


def parse(argv: list[str] | None):
    """`(script, training, model_args, mixture, upcycling, spri, generation, column renames)`; `--help` prints every
    flag."""
    argv, renames = rewrite_legacy_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        return (*make_parser().parse_args_and_config(argv), renames)
    except ValueError as err:
        if "bf16" not in str(err):
            raise
        raise ValueError(
            f"{err} TRL's SFTConfig trains in bfloat16 by default: on a CPU pass --use_cpu (and --bf16 false where the "
            "CPU has no bfloat16 units, e.g. no AMX: much faster)."
        ) from None


def run(argv: list[str] | None = None) -> int:
    """Parse, check everything, upcycle, train both stages, save (and push when `--push_to_hub`)."""
    train(*parse(argv))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# data

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_TASKS = ("auto", "causal-lm", "seq2seq-lm")


def load_splits(name: str, config_name: str | None):
    """A `DatasetDict` from a local file, a local folder (data files, or one written by `save_to_disk`) or a
    `datasets` name; refuses a missing file and an unreadable one, naming it."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    extension = os.path.splitext(name)[1].lower()
    if os.path.isdir(name):
        saved = any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json"))
        try:
            splits = load_from_disk(name) if saved else load_dataset(name)
        except Exception as err:  # datasets raises many kinds; the folder is what the user can fix
            raise ValueError(f"--dataset_name {name}: the folder could not be read as a dataset ({err}).") from None
        return DatasetDict(train=splits) if isinstance(splits, Dataset) else splits
    if extension in _LOCAL_FORMATS or os.path.exists(name):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"--dataset_name {name}: no such file.")
        if extension not in _LOCAL_FORMATS:
            raise ValueError(
                f"--dataset_name {name}: unknown format {extension!r}; use one of {sorted(_LOCAL_FORMATS)}."
            )
        with open(name, "rb") as handle:
            if not handle.read(1 << 16).strip():
                raise ValueError(f"--dataset_name {name} has no rows; nothing to train on.")
        try:
            return load_dataset(_LOCAL_FORMATS[extension], data_files=name)
        except Exception as err:
            raise ValueError(
                f"--dataset_name {name}: could not be read as {_LOCAL_FORMATS[extension]} ({err})."
            ) from None
    try:
        return load_dataset(name, config_name)
    except Exception as err:
        raise ValueError(f"--dataset_name {name}: could not be loaded ({type(err).__name__}: {err}).") from None


def select_split(splits, split: str, flag: str, source: str):
    if split not in splits:
        raise ValueError(f"{flag} {split!r}: {source} has the splits {sorted(splits)}; name one of them.")
    rows = splits[split]
    if len(rows) == 0:
        raise ValueError(f"{source} (split {split!r}) has no rows; nothing to train on.")
    return rows


def load_data(script, mixture, training, renames: dict[str, str]):
    """`(train rows, eval rows or None, where they came from)`, TRL's rules: `--datasets` (a mixture, YAML) or
    `--dataset_name`; the test split only when `eval_strategy` is not "no"."""
    if mixture.datasets:
        from trl import get_dataset

        splits, source = get_dataset(mixture), "the --datasets mixture"
    elif script.dataset_name:
        splits, source = (
            load_splits(script.dataset_name, script.dataset_config),
            f"--dataset_name {script.dataset_name}",
        )
    else:
        raise ValueError(
            "Name the data with --dataset_name (a file, a folder or a datasets name), or --datasets in --config."
        )
    train_rows = select_split(splits, script.dataset_train_split, "--dataset_train_split", source)
    eval_rows = None
    if training.eval_strategy != "no":
        eval_rows = select_split(splits, script.dataset_test_split, "--dataset_test_split", source)
    rename = {old: new for old, new in renames.items() if old != new}
    columns = train_rows.column_names
    if not rename and {"source", "target"} <= set(columns) and not {"prompt", "completion"} & set(columns):
        say(
            "the 'source'/'target' columns are read as 'prompt'/'completion' until spri_hf 0.4; name them "
            "'prompt'/'completion' (TRL's names)."
        )
        rename = {"source": "prompt", "target": "completion"}
    if rename:
        missing = [old for old in rename if old not in train_rows.column_names]
        if missing:
            raise ValueError(f"{source} has the columns {train_rows.column_names}, not {missing}.")
        train_rows = train_rows.rename_columns(rename)
        eval_rows = eval_rows.rename_columns(rename) if eval_rows is not None else None
    return train_rows, eval_rows, source


def _check_messages(value, column: str, row: int, source: str):
    if not isinstance(value, list) or not value:
        raise ValueError(f"{source}: column '{column}' holds no messages in row {row}.")
    for message in value:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"{source}: column '{column}', row {row}: every message needs a 'role' and a 'content', got {message!r}."
            )


def _check_text(value, column: str, row: int, source: str):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{source}: column '{column}' is empty or not text in row {row}.")


def data_format(rows, training, task: str, source: str) -> str:
    """Which of TRL's formats the rows are in -- "messages", "prompt-completion" or "text" -- after checking every row;
    refuses preference data, unknown columns and empty or malformed rows, naming the column and the row."""
    columns = rows.column_names
    if "chosen" in columns and "rejected" in columns:
        raise ValueError(
            f"{source} is preference data ('chosen'/'rejected'): spri-hf train runs SFT. Train preferences with "
            "spri_hf.trl.SpriDPOTrainer from Python (docs/TRAINING.md, 'DPO')."
        )
    if "prompt" in columns and "completion" in columns:
        kind, checked = "prompt-completion", ("prompt", "completion")
    elif task == "causal-lm" and "messages" in columns:
        kind, checked = "messages", ("messages",)
    elif task == "causal-lm" and training.dataset_text_field in columns:
        kind, checked = "text", (training.dataset_text_field,)
    else:
        wanted = (
            f"'messages', '{training.dataset_text_field}' (--dataset_text_field) or 'prompt' + 'completion'"
            if task == "causal-lm"
            else "'prompt' + 'completion' text"
        )
        raise ValueError(f"{source} has the columns {columns}, but a {task} run needs {wanted}.")
    conversational = kind == "messages" or (kind == "prompt-completion" and isinstance(rows[0]["prompt"], list))
    if task == "seq2seq-lm" and conversational:
        raise ValueError(
            f"{source}: conversational rows train decoder-only models; a seq2seq-lm run needs plain text."
        )
    for column in checked:
        check = _check_messages if conversational else _check_text
        for row, value in enumerate(rows[column]):
            check(value, column, row, source)
    return "conversational prompt-completion" if conversational and kind == "prompt-completion" else kind


# ---------------------------------------------------------------------------------------------------------------------
# the run

_HEAD_SUFFIXES = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForSequenceClassification", "sequence-classification"),
    ("ForMaskedLM", "masked-lm"),
    ("Model", "base"),
)


def task_for(config) -> str:
    """The `--task` of a dense config: speech and text encoder-decoders by model type, otherwise the head its
    `architectures` name (an encoder without one: masked LM; a decoder: causal LM)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES:
        return "speech-seq2seq"
    if config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq-lm"
    for architecture in getattr(config, "architectures", None) or []:
        for suffix, task in _HEAD_SUFFIXES:
            if architecture.endswith(suffix):
                return task
    return "masked-lm" if config.model_type in ("bert", "roberta", "xlm-roberta") else "causal-lm"


# TRL options that only exist for decoder-only SFT: a seq2seq-lm run refuses them rather than ignore them
_CAUSAL_ONLY = {"packing": False, "padding_free": False, "assistant_only_loss": False, "chat_template_path": None}


def peft_config_for(model_args, base_model_type: str):
    """TRL's `get_peft_config`; with neither `--lora_target_modules` nor `--lora_target_parameters`, the dense
    family's PEFT defaults (e.g. q_proj, v_proj) -- PEFT has none for `model_type="spri"`."""
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is not None and model_args.lora_target_modules is None and model_args.lora_target_parameters is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(base_model_type)
        if defaults is None:
            raise ValueError(
                f"--use_peft: PEFT has no default LoRA targets for {base_model_type} models; name them with "
                "--lora_target_modules (e.g. q_proj v_proj) and/or --lora_target_parameters (the experts, e.g. "
                "mlp.experts.gate_up_proj mlp.experts.down_proj)."
            )
        config.target_modules = set(defaults)
    return config


def train(
    script, training, model_args, mixture, upcycling, spri, generation=None, renames: dict[str, str] | None = None
):
    """Check everything, upcycle (or load the SPRI checkpoint), train both stages, save; returns the trainer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import modeling_spri
    from .upcycling.settings import make_config

    if model_args.model_name_or_path is None:
        raise ValueError(
            "Name the model with --model_name_or_path: a dense checkpoint (folder or Hub id) or an SPRI one."
        )
    if spri.task not in _TASKS:
        raise ValueError(f"--task {spri.task!r}: spri-hf train takes one of {list(_TASKS)}.")
    name = model_args.model_name_or_path
    # only what the user set: from_dense streams a local folder tensor by tensor when nothing else is asked of it
    load = {"revision": model_args.model_revision, "trust_remote_code": training.trust_remote_code or None}
    load = {key: value for key, value in dict(load, gguf_file=spri.gguf_file).items() if value is not None}
    config = AutoConfig.from_pretrained(name, **load)
    is_spri = config.model_type == "spri"
    base = config.base_config if is_spri else config
    task = spri.task if spri.task != "auto" else task_for(base)
    if task not in ("causal-lm", "seq2seq-lm"):
        raise ValueError(
            f"{name} is a {base.model_type} model for the {task!r} task; spri-hf train trains causal-lm and "
            "seq2seq-lm models. Use SpriTrainer / SpriSeq2SeqTrainer from Python for the others."
        )
    if task == "seq2seq-lm":
        given = [f"--{flag}" for flag, default in _CAUSAL_ONLY.items() if getattr(training, flag) != default]
        if given or model_args.use_peft:
            raise ValueError(
                f"{' '.join(given + ['--use_peft'] * model_args.use_peft)}: TRL's SFT options for decoder-only models; "
                f"{name} is an encoder-decoder ({base.model_type}), trained by SpriSeq2SeqTrainer without them."
            )
    if task == "causal-lm" and generation is not None and generation != Seq2SeqGenerationArguments():
        given = [f"--{f.name}" for f in dataclasses.fields(generation) if getattr(generation, f.name) != f.default]
        raise ValueError(f"{' '.join(given)}: for encoder-decoder runs (seq2seq-lm); {name} is a causal LM.")
    settings = upcycling_settings(upcycling, training)
    if not is_spri:  # validated from the config alone, before any weight is loaded
        make_config(base, **settings)  # also detects the FFN of a family without a table entry
    will_have_stage1 = (
        (config.stage == 1) if is_spri else (settings["init"] == "spri" and settings["stage"] in (None, 1))
    )
    if model_args.use_peft and will_have_stage1 and training.stage1_steps != 0:
        raise ValueError(
            "--use_peft: a LoRA adapter cannot cross SPRI's stage switch (stage 2 replaces the residual factors the "
            "adapter would wrap). Add --stage1_steps 0 to train the adapter on the upcycled model in stage 2, or train "
            "both stages without --use_peft first and then --use_peft on that checkpoint."
        )
    peft_config = peft_config_for(model_args, base.model_type) if model_args.use_peft else None

    train_rows, eval_rows, source = load_data(script, mixture, training, renames or {})
    kind = data_format(train_rows, training, task, source)
    if eval_rows is not None:
        data_format(eval_rows, training, task, f"{source} (split {script.dataset_test_split!r})")
    tokenizer = AutoTokenizer.from_pretrained(name, **load)
    conversational = kind in ("messages", "conversational prompt-completion")
    if conversational and tokenizer.chat_template is None and not training.chat_template_path:
        raise ValueError(
            f"{source} holds conversations ({kind}), but the tokenizer of {name} has no chat template: pass one with "
            "--chat_template_path (a Jinja file or a tokenizer folder)."
        )

    spri_class = getattr(modeling_spri, TASKS[task])
    loading = {"dtype": model_args.dtype} if model_args.dtype not in (None, "auto") else {}
    if model_args.attn_implementation:
        loading["attn_implementation"] = model_args.attn_implementation
    if is_spri:
        model = spri_class.from_pretrained(name, **load, **loading)
    elif spri.gguf_file:  # GGUF files hold decoder-only models
        dense = AutoModelForCausalLM.from_pretrained(name, **load, **loading)
        model = spri_class.from_dense(dense, base_model=name, **settings)
        del dense
    else:
        model = spri_class.from_dense(name, **load, **loading, **settings)
    if peft_config is not None and model.config.stage == 1:  # --stage1_steps 0: the adapter trains on stage 2
        model.set_stage(2)
    if peft_config is not None and (not is_spri or config.stage == 1):  # the adapter's base exists nowhere else
        save_adapter_base(model, training.output_dir)
    model.train()

    existed = os.path.exists(training.output_dir)
    trainer = make_trainer(task, model, training, train_rows, eval_rows, tokenizer, peft_config, generation)
    if model.config.stage == 1 and training.stage1_steps != 0:
        try:  # the run's length is known once TRL has prepared the data (packing changes it)
            trainer.planned_switch_step()  # refuses a stage 1 as long as the run
        except ValueError:
            if not existed and os.path.isdir(training.output_dir) and not os.listdir(training.output_dir):
                os.rmdir(training.output_dir)  # made empty by Trainer.__init__; nothing was written
            raise
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_model(training.output_dir)
    if training.push_to_hub:
        trainer.push_to_hub(**({"dataset_name": script.dataset_name} if task == "causal-lm" else {}))
    if trainer.is_world_process_zero():
        print(
            f"spri-hf train: {type(model).__name__} trained {trainer.state.global_step} steps (stage 1 until step "
            f"{trainer.switch_step}) on {source} ({kind}) and saved to {os.path.abspath(training.output_dir)}.",
            file=sys.stderr,
        )
    return trainer


ADAPTER_BASE_FOLDER = "spri_base_model"


def save_adapter_base(model, output_dir: str):
    """An adapter trained on a model upcycled (or switched) in this run needs that model to load: it is saved
    (stage 2, before training) to `output_dir/spri_base_model`, which the adapter's `base_model_name_or_path` names."""
    from accelerate import PartialState

    folder = os.path.abspath(os.path.join(output_dir, ADAPTER_BASE_FOLDER))
    state = PartialState()
    if state.is_main_process:
        model.save_pretrained(folder)
    state.wait_for_everyone()
    model.name_or_path = model.config.name_or_path = folder  # what PEFT records as the adapter's base


def make_trainer(task, model, training, train_rows, eval_rows, tokenizer, peft_config, generation=None):
    """`SpriSFTTrainer` for causal LMs; `SpriSeq2SeqTrainer` on tokenized prompt/completion for encoder-decoders."""
    if task == "causal-lm":
        from .trl import SpriSFTTrainer

        return SpriSFTTrainer(
            model=model, args=training, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=tokenizer,
            peft_config=peft_config,
        )  # fmt: skip
    from transformers import DataCollatorForSeq2Seq

    from .trainer import SpriSeq2SeqTrainer, SpriSeq2SeqTrainingArguments

    fields = dataclasses.fields(SpriSeq2SeqTrainingArguments)
    values = {f.name: getattr(training, f.name) for f in fields if f.init and hasattr(training, f.name)}
    values.update(dataclasses.asdict(generation) if generation is not None else {})
    arguments = SpriSeq2SeqTrainingArguments(**values)

    def encode(example):
        ids = tokenizer(example["prompt"], truncation=True, max_length=training.max_length)["input_ids"]
        labels = tokenizer(text_target=example["completion"], truncation=True, max_length=training.max_length)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels["input_ids"]}

    def tokenized(rows):
        return None if rows is None else rows.map(encode, remove_columns=rows.column_names)

    return SpriSeq2SeqTrainer(
        model=model, args=arguments, train_dataset=tokenized(train_rows), eval_dataset=tokenized(eval_rows),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(run())
