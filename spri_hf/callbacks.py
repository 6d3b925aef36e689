"""Training signals of SPRI models for `transformers.Trainer`: routing metrics in the Trainer's logs, and warnings.

`SpriMonitorCallback` hooks every `SpriMoeBlock` for the duration of `Trainer.train` and records, per MoE layer, how
the router spreads the tokens over the experts, the router's entropy and the load-balancing and z losses of the layer;
given a label per training example (language, task, ...), also how much the choice of expert tells about the label.
The metrics join the Trainer's training logs (`trainer.state.log_history`, the console, TensorBoard, W&B and the
other reporting integrations); see docs/TRAINING_SIGNALS.md for the names. It warns when a router collapses onto one
expert and when the forward pass turns non-finite, naming the first layer where it happened.

Placement matters: `Trainer` calls its callbacks in list order and builds that list as `[DefaultFlowCallback,
<reporting integrations>, <callbacks=...>, <printer>]`, and it writes `state.log_history` before any `on_log`. So the
monitor adds its metrics to the `logs` dict (seen by every callback after it) and to the `log_history` entry of the
same log; `add_spri_monitor(trainer)` puts it before the reporting integrations, which then receive the metrics too.
"""

import math

import torch
from transformers import DefaultFlowCallback, TrainerCallback
from transformers.utils import logging

from .integrations import find_spri_model
from .moe_layers import load_balancing_loss, router_z_loss, token_weights


logger = logging.get_logger(__name__)

# Layout of the per-layer sums one optimizer step accumulates (after the expert counts).
_FORWARDS, _TOKENS, _ENTROPY, _AUX, _Z, _BAD_INPUT, _BAD_LOGITS, _BAD_OUTPUT = range(8)
_NUM_SUMS = 8


class SpriMonitorCallback(TrainerCallback):
    """Logs per-layer expert load, router entropy and router losses; warns on expert collapse and non-finite values.

    Opt-in: pass it to `Trainer(callbacks=[SpriMonitorCallback()])`, or call `add_spri_monitor(trainer)` so that the
    reporting integrations (TensorBoard, W&B, ...) receive the metrics as well (see the module docstring). Only
    training forward passes are recorded (not evaluation, nor the recomputation of gradient checkpointing); padding
    tokens are left out where the batch has an `attention_mask`, as in the model's own router losses. In multi-process
    training each process records its own tokens and the main process reports them.

    Args:
        collapse_share (`float`, defaults to 0.9):
            A layer has collapsed onto expert e when e is among the top-k choices of more than this share of the
            layer's tokens in an optimizer step. With k experts per token, uniform routing gives every expert a share
            of k / num_experts, so the threshold must lie above that.
        collapse_steps (`int`, defaults to 10):
            How many consecutive optimizer steps a layer must stay collapsed before the warning. Each layer warns once
            until its top share falls back below `collapse_share`.
        log_every (`int`, *optional*):
            Add the metrics to every training log of the Trainer (`None`, following `logging_steps`) or to the first
            training log at least this many optimizer steps after the previous one. Each report covers every step
            since the previous report.
        per_expert (`bool`, defaults to `False`):
            Also log the load share of every expert of every layer (`spri/<layer>/load_expert_<e>`).
        routing_label_key (`str`, *optional*):
            The key of a per-example label in the training batches: an integer tensor of shape (batch,), such as a
            language or task id. The monitor takes it out of the model's inputs (the model never sees it) and logs,
            per layer, the mutual information between that label and the experts the example's tokens choose
            (`spri/<layer>/label_expert_mi_bits`), which shows whether experts specialise by label. Keep the column
            in the batches: `TrainingArguments(remove_unused_columns=False)` and a collator that keeps it. Examples
            with a negative label are left out.
    """

    def __init__(
        self,
        collapse_share: float = 0.9,
        collapse_steps: int = 10,
        log_every: int | None = None,
        per_expert: bool = False,
        routing_label_key: str | None = None,
    ):
        if not 0.0 < collapse_share <= 1.0:
            raise ValueError(f"collapse_share={collapse_share} must lie in (0, 1]: a share of the tokens of a layer.")
        if not isinstance(collapse_steps, int) or collapse_steps < 1:
            raise ValueError(f"collapse_steps={collapse_steps!r} must be a positive number of optimizer steps.")
        if log_every is not None and (not isinstance(log_every, int) or log_every < 1):
            raise ValueError(f"log_every={log_every!r} must be None (every Trainer log) or a positive step count.")
        self.collapse_share = collapse_share
        self.collapse_steps = collapse_steps
        self.log_every = log_every
        self.per_expert = per_expert
        self.routing_label_key = routing_label_key
        # set by `add_spri_monitor`: the monitor runs before the reporting integrations
        self.placed_before_reporters = False
        self._handles = []
        self._sites: list[str] = []
        self._step_sums: dict[int, torch.Tensor] = {}
        self._step_loss_bad: torch.Tensor | None = None
        # per recorded forward of the step: its routing labels and, per layer, (batch * num_experts) expert counts
        self._step_label_tables: list[tuple[torch.Tensor, dict[int, torch.Tensor]]] = []
        self._routing_labels: torch.Tensor | None = None
        self._routers, self._label_window = [], []

    # ---- Trainer events ----

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        spri_model = find_spri_model(model)
        if spri_model is None:
            raise ValueError(
                f"SpriMonitorCallback found no SPRI model inside {type(model).__name__}: it monitors models upcycled "
                "with spri_hf (SpriForCausalLM.from_dense, ...); remove the callback for other models."
            )
        self._remove_hooks()
        config = spri_model.config
        self._top_k, self._num_experts = config.num_experts_per_tok, config.num_experts
        uniform_share = self._top_k / self._num_experts
        if self._top_k < self._num_experts and self.collapse_share <= uniform_share:
            raise ValueError(
                f"collapse_share={self.collapse_share} is not above the share every expert gets under uniform routing "
                f"(num_experts_per_tok / num_experts = {uniform_share:.3g}); pick one in ({uniform_share:.3g}, 1]."
            )
        if args.report_to and not self.placed_before_reporters:
            logger.warning(
                "SpriMonitorCallback was passed in Trainer(callbacks=...), which runs it after the reporting "
                f"integrations {args.report_to}: its metrics reach trainer.state.log_history and the console but not "
                "those integrations. Use spri_hf.callbacks.add_spri_monitor(trainer) instead."
            )
        sites = spri_model.moe_sites()
        self._sites = [f"{stack}.{idx}" for stack, idx, _ in sites]
        self._routers = [block.router for _, _, block in sites]
        self._remove_unused_columns = args.remove_unused_columns
        self._recording = False
        self._attention_mask = self._routing_labels = None
        self._step_sums, self._step_loss_bad, self._step_label_tables = {}, None, []
        self._reset_window(state.global_step)
        self._collapse_run = [0] * len(sites)
        self._collapse_warned = [False] * len(sites)
        self._nonfinite_warned = False
        self._handles.append(spri_model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        self._handles.append(spri_model.register_forward_hook(self._model_hook, with_kwargs=True, always_call=True))
        for index, (_, _, block) in enumerate(sites):
            self._handles.append(block.router.register_forward_hook(self._router_hook(index)))
            self._handles.append(block.register_forward_hook(self._block_hook(index)))

    def on_step_end(self, args, state, control, **kwargs):
        """Once per optimizer step: collapse and non-finite checks, then the step joins the logging window."""
        label_tables, self._step_label_tables = self._step_label_tables, []
        if not self._step_sums and self._step_loss_bad is None:
            return
        num_experts = self._num_experts
        indices = sorted(self._step_sums)
        device = self._step_sums[indices[0]].device if indices else self._step_loss_bad.device
        parts = [self._step_sums[index].to(device) for index in indices]
        loss_bad = self._step_loss_bad if self._step_loss_bad is not None else torch.zeros((), device=device)
        parts.append(loss_bad.to(device).reshape(1))
        layout = []
        for labels, tables in label_tables:
            layout.append((labels.shape[0], sorted(tables)))
            # float32 holds integers below 2**24 exactly: the labels travel as two such halves
            labels = labels.to(device).long()
            parts += [(labels // 2**24).float(), (labels % 2**24).float()]
            parts += [tables[index].to(device) for index in layout[-1][1]]
        values = torch.cat(parts).tolist()  # the step's one host sync
        width = num_experts + _NUM_SUMS
        rows = {index: values[i * width : (i + 1) * width] for i, index in enumerate(indices)}
        self._step_sums, self._step_loss_bad = {}, None
        loss_was_bad = values[len(indices) * width] > 0
        self._add_label_tables(values[len(indices) * width + 1 :], layout)

        for index, row in rows.items():
            window = self._window[index]
            for position, value in enumerate(row):
                window[position] += value
        self._check_collapse(rows, state.global_step)
        self._check_finite(rows, loss_was_bad, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # training logs carry "loss"; evaluation logs ("eval_loss") and the run summary ("train_loss") do not
        if logs is None or "loss" not in logs or not self._sites:
            return
        if self.log_every is not None and state.global_step - self._window_start < self.log_every:
            return
        metrics = self.window_metrics()
        self._reset_window(state.global_step)
        if not metrics:
            return
        logs.update(metrics)
        # Trainer.log appended this log to the history before calling the callbacks
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and "loss" in last:
            last.update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()

    # ---- metrics and checks ----

    def window_metrics(self) -> dict[str, float]:
        """The metrics of the steps recorded since the last report (names in docs/TRAINING_SIGNALS.md)."""
        num_experts = self._num_experts
        names = ["load_max", "load_min", "load_cv", "entropy", "aux_loss", "z_loss", "label_expert_mi_bits"]
        metrics, per_layer = {}, {name: [] for name in names + ["bias_range"]}
        for site, sums, label_table in zip(self._sites, self._window, self._label_window):
            forwards, routed = sums[num_experts + _FORWARDS], sum(sums[:num_experts])
            if forwards == 0 or routed == 0:
                continue
            shares = [count / routed for count in sums[:num_experts]]
            # the shares sum to 1, so their mean is 1 / num_experts
            spread = math.sqrt(sum((share - 1 / num_experts) ** 2 for share in shares) / num_experts)
            values = {
                "load_max": max(shares),
                "load_min": min(shares),
                "load_cv": spread * num_experts,
                "entropy": sums[num_experts + _ENTROPY] / sums[num_experts + _TOKENS],
                "aux_loss": sums[num_experts + _AUX] / forwards,
                "z_loss": sums[num_experts + _Z] / forwards,
            }
            if label_table:  # filled with routing_label_key only
                values["label_expert_mi_bits"] = _mutual_information_bits(label_table)
            for name, value in values.items():
                metrics[f"spri/{site}/{name}"] = value
                per_layer[name].append(value)
            if self.per_expert:
                metrics.update({f"spri/{site}/load_expert_{e}": share for e, share in enumerate(shares)})
        for site, value in self._bias_ranges().items():
            metrics[f"spri/{site}/bias_range"] = value
            per_layer["bias_range"].append(value)
        for name, values in per_layer.items():
            if values:
                metrics[f"spri/{name}_mean"] = sum(values) / len(values)
        return metrics

    def _reset_window(self, step: int):
        self._window = [[0.0] * (self._num_experts + _NUM_SUMS) for _ in self._sites]
        # per layer: label -> the number of (token, top-k slot) choices of each expert by that label's tokens
        self._label_window: list[dict[int, list[float]]] = [{} for _ in self._sites]
        self._window_start = step

    def _add_label_tables(self, values: list[float], layout: list[tuple[int, list[int]]]):
        """Adds the step's per-example expert counts (`values`, laid out as `on_step_end` sent them) to the window's
        label x expert tables: each example's counts join the row of its label."""
        num_experts, position = self._num_experts, 0
        for batch, indices in layout:
            high, low = values[position : position + batch], values[position + batch : position + 2 * batch]
            labels = [round(upper) * 2**24 + round(lower) for upper, lower in zip(high, low)]
            position += 2 * batch
            for index in indices:
                table = self._label_window[index]
                for example, label in enumerate(labels):
                    if label < 0:
                        continue
                    row = table.setdefault(label, [0.0] * num_experts)
                    start = position + example * num_experts
                    for expert, count in enumerate(values[start : start + num_experts]):
                        row[expert] += count
                position += batch * num_experts

    def _bias_ranges(self) -> dict[str, float]:
        """max - min of each router's `e_score_correction_bias` (auxiliary-loss-free balancing), where it has one."""
        biases = {
            site: bias.detach().float()
            for site, router in zip(self._sites, self._routers)
            if (bias := getattr(router, "e_score_correction_bias", None)) is not None
        }
        if not biases:
            return {}
        device = next(iter(biases.values())).device
        ranges = torch.stack([(bias.max() - bias.min()).to(device) for bias in biases.values()]).tolist()
        return dict(zip(biases, ranges))

    def _check_collapse(self, rows: dict[int, list[float]], step: int):
        if self._top_k >= self._num_experts:  # every token visits every expert: shares carry no signal
            return
        for index, row in rows.items():
            counts = row[: self._num_experts]
            tokens = row[self._num_experts + _TOKENS]
            if tokens <= 0:
                continue
            # each token makes top_k choices: count / tokens is the share of tokens that have e among their top-k
            collapsed = {e: count / tokens for e, count in enumerate(counts) if count / tokens > self.collapse_share}
            if not collapsed:
                self._collapse_run[index] = 0
                self._collapse_warned[index] = False
                continue
            self._collapse_run[index] += 1
            if self._collapse_run[index] >= self.collapse_steps and not self._collapse_warned[index]:
                self._collapse_warned[index] = True
                shares = ", ".join(f"expert {e}: {share:.1%}" for e, share in collapsed.items())
                logger.warning(
                    f"Expert collapse in MoE layer {self._sites[index]}: more than {self.collapse_share:.0%} of its "
                    f"tokens had the same expert among their top-{self._top_k} choices ({shares}) for "
                    f"{self._collapse_run[index]} consecutive optimizer steps, up to step {step}. A larger "
                    "router_aux_loss_coef or a lower learning rate for the routers usually restores balance."
                )

    def _check_finite(self, rows: dict[int, list[float]], loss_bad: bool, step: int):
        offset = self._num_experts
        bad_sites = [
            index
            for index in sorted(rows)
            if any(rows[index][offset + part] > 0 for part in (_BAD_INPUT, _BAD_LOGITS, _BAD_OUTPUT))
        ]
        if not bad_sites and not loss_bad:
            self._nonfinite_warned = False
            return
        if self._nonfinite_warned:
            return
        self._nonfinite_warned = True
        if not bad_sites:
            logger.warning(
                f"Non-finite loss at step {step}, while the inputs, router logits and outputs of every MoE layer were "
                "finite: the cause lies outside the MoE blocks (output head, labels or loss). Trainer replaces "
                "non-finite losses in its logs unless logging_nan_inf_filter=False."
            )
            return
        first = bad_sites[0]
        row = rows[first]
        if row[offset + _BAD_INPUT] > 0:
            where = (
                "the hidden states entering its MoE block were already non-finite, so the cause lies before this "
                "block (attention, norms or embeddings)"
            )
        elif row[offset + _BAD_LOGITS] > 0:
            where = "its router logits became non-finite from finite inputs (router weights)"
        else:
            where = "its MoE block's output became non-finite from finite inputs and router logits (expert weights)"
        others = ", ".join(self._sites[index] for index in bad_sites[1:])
        logger.warning(
            f"Non-finite values at step {step}, first in MoE layer {self._sites[first]}: {where}."
            + (f" Later layers affected: {others}." if others else "")
        )

    # ---- hooks ----

    def _model_pre_hook(self, module, args, kwargs):
        self._recording = module.training
        self._attention_mask = kwargs.get("attention_mask")
        key = self.routing_label_key
        if key is None:
            return None
        labels = kwargs.pop(key, None)  # the model does not take it
        if self._recording:
            self._routing_labels = self._checked_labels(labels, kwargs)
            self._step_label_tables.append((self._routing_labels, {}))
        return args, kwargs

    def _checked_labels(self, labels, kwargs) -> torch.Tensor:
        key = self.routing_label_key
        if labels is None:
            dropped = " (remove_unused_columns=True drops it)" if self._remove_unused_columns else ""
            raise self._error(
                f"SpriMonitorCallback(routing_label_key={key!r}) found no {key!r} in the training batch (keys: "
                f"{sorted(kwargs)}){dropped}. Keep the column in the batches: TrainingArguments("
                "remove_unused_columns=False) and a data collator that passes it on as a tensor of shape (batch,)."
            )
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
            given = type(labels).__name__
            if isinstance(labels, torch.Tensor):
                given = f"{labels.dtype} tensor of shape {tuple(labels.shape)}"
            raise self._error(
                f"SpriMonitorCallback(routing_label_key={key!r}) expects one integer label per example, a tensor of "
                f"shape (batch,); the batch carries a {given}."
            )
        return labels.detach()

    def _error(self, message: str) -> ValueError:
        """A ValueError raised inside a hook ends the training run: the hooks go first, so that no stale hook stays
        on the model for the next run."""
        self._remove_hooks()
        self._recording = False
        self._attention_mask = self._routing_labels = None
        return ValueError(message)

    def _model_hook(self, module, args, kwargs, output):
        # runs after the forward (or its exception): gradient checkpointing's recomputation is not recorded
        try:
            # ModelOutput is a dict; a `return_dict=False` tuple carries no named loss
            loss = output.get("loss") if self._recording and isinstance(output, dict) else None
            if loss is not None:
                with torch.no_grad():
                    bad = (~torch.isfinite(loss.detach()).all()).float()
                    self._step_loss_bad = bad if self._step_loss_bad is None else self._step_loss_bad + bad
        finally:
            self._recording = False
            self._attention_mask = self._routing_labels = None

    def _router_hook(self, index: int):
        def hook(router, args, output):
            if not self._recording:
                return
            hidden_states = args[0]
            router_logits, _, top_k_index = output
            with torch.no_grad():
                logits = router_logits.detach().float()
                num_tokens, num_experts = logits.shape
                weights = token_weights(self._attention_mask, num_tokens, logits.device)
                slot_weights = weights.repeat_interleave(top_k_index.shape[-1])
                counts = torch.zeros(num_experts, device=logits.device).index_add_(
                    0, top_k_index.reshape(-1), slot_weights
                )
                if self._routing_labels is not None:
                    self._add_example_counts(index, top_k_index, slot_weights)
                entropy = (torch.special.entr(logits.softmax(dim=-1)).sum(dim=-1) * weights).sum()
                sums = torch.stack(
                    [
                        torch.ones((), device=logits.device),
                        weights.sum(),
                        entropy,
                        load_balancing_loss([logits], self._top_k, self._attention_mask),
                        router_z_loss([logits], self._attention_mask),
                        (~torch.isfinite(hidden_states).all()).float(),
                        (~torch.isfinite(logits).all()).float(),
                        torch.zeros((), device=logits.device),  # the block's output, added by `_block_hook`
                    ]
                )
                update = torch.cat([counts, sums])
                previous = self._step_sums.get(index)
                self._step_sums[index] = update if previous is None else previous + update

        return hook

    def _add_example_counts(self, index: int, top_k_index: torch.Tensor, slot_weights: torch.Tensor):
        """Counts, per example of the batch, its tokens' top-k choices of each expert; the router sees the stack's
        `batch * seq_len` tokens flattened, example after example."""
        batch, num_experts = self._routing_labels.shape[0], self._num_experts
        num_tokens = top_k_index.shape[0]
        if batch == 0 or num_tokens % batch:
            raise self._error(
                f"MoE layer {self._sites[index]} routed {num_tokens} tokens, not a multiple of the {batch} labels under "
                f"{self.routing_label_key!r}: it takes one label per example, a tensor of shape (batch,)."
            )
        example = torch.arange(num_tokens, device=top_k_index.device) // (num_tokens // batch)
        slots = (example[:, None] * num_experts + top_k_index).reshape(-1)
        table = torch.zeros(batch * num_experts, device=top_k_index.device).index_add_(0, slots, slot_weights)
        tables = self._step_label_tables[-1][1]
        tables[index] = table if index not in tables else tables[index] + table

    def _block_hook(self, index: int):
        def hook(block, args, output):
            if not self._recording or index not in self._step_sums:
                return
            with torch.no_grad():
                bad = (~torch.isfinite(output.detach()).all()).float()
                self._step_sums[index][self._num_experts + _BAD_OUTPUT] += bad

        return hook

    def _remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _mutual_information_bits(table: dict[int, list[float]]) -> float:
    """Mutual information (bits) between label and expert of a label x expert count table (label -> counts):
    `sum p(l, e) log2(p(l, e) / (p(l) p(e)))`, 0 when the choice of expert does not depend on the label."""
    rows = list(table.values())
    total = sum(sum(row) for row in rows)
    if total <= 0:
        return 0.0
    expert_totals = [sum(column) for column in zip(*rows)]
    information = 0.0
    for row in rows:
        label_total = sum(row)
        for count, expert_total in zip(row, expert_totals):
            if count > 0:
                information += count / total * math.log2(count * total / (label_total * expert_total))
    return max(information, 0.0)


def add_spri_monitor(trainer, **settings) -> SpriMonitorCallback:
    """Add a `SpriMonitorCallback(**settings)` to `trainer`, before its reporting integrations, and return it.

    Placed there, the monitor's metrics reach TensorBoard, W&B and the other integrations named in `report_to`, not
    only `trainer.state.log_history`. A monitor already given in `Trainer(callbacks=...)` is moved there instead
    (then `settings` must be empty).
    """
    callbacks = trainer.callback_handler.callbacks
    existing = next((callback for callback in callbacks if isinstance(callback, SpriMonitorCallback)), None)
    if existing is not None and settings:
        raise ValueError(
            f"The trainer already has a SpriMonitorCallback; add_spri_monitor moves it and cannot apply {settings}. "
            "Pass the settings to the callback you created, or do not create one."
        )
    monitor = existing if existing is not None else SpriMonitorCallback(**settings)
    if existing is not None:
        callbacks.remove(existing)
    flow = next((i for i, callback in enumerate(callbacks) if isinstance(callback, DefaultFlowCallback)), -1)
    callbacks.insert(flow + 1, monitor)
    monitor.placed_before_reporters = True
    return monitor




class SpriRouterBiasCallback(TrainerCallback):
    """Auxiliary-loss-free load balancing (`router_balance="bias"` or `"both"`): after every optimizer step, each
    router's `e_score_correction_bias` moves `router_bias_update_rate` toward its idle experts, from the top-k choices
    of that step's training forwards (`SpriPreTrainedModel.update_router_biases`; summed over the processes, so every
    rank keeps the same bias). `SpriTrainer`, `SpriSeq2SeqTrainer` and the SPRI TRL trainers add it by themselves;
    pass it to a plain `Trainer(callbacks=[...])`. A model without bias balancing is left alone."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        spri_model = find_spri_model(model)
        if spri_model is None:
            raise ValueError(
                f"SpriRouterBiasCallback found no SPRI model inside {type(model).__name__}; remove the callback."
            )
        routers = [block.router for _, _, block in spri_model.moe_sites()]
        if spri_model.config.router_balance in ("bias", "both") and all(
            router.e_score_correction_bias is None for router in routers
        ):
            raise ValueError(
                f"config.router_balance={spri_model.config.router_balance!r}, but the routers were built without a "
                "routing bias (the setting was changed after the model was made). Pass it when the model is made: "
                "from_pretrained(..., router_balance='bias') or from_dense(..., router_balance='bias')."
            )
        for router in routers:  # counts of forwards before training are not a step's load
            router.expert_load = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        spri_model = find_spri_model(model)
        if spri_model is not None:
            spri_model.update_router_biases()


__all__ = ["SpriMonitorCallback", "SpriRouterBiasCallback", "add_spri_monitor", "find_spri_model"]
