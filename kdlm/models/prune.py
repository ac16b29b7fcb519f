"""Importance-based student construction: depth (ShortGPT / Minitron) and width (Minitron) pruning.

Depth. `keep` layers survive, chosen by `cfg.method`:
- uniform: an even stride (kdlm.models.init_student.uniform_layers), no calibration.
- block_influence (ShortGPT, Men et al. 2024): layer i scores the mean, over non-pad calibration tokens, of
  1 - cos(h_in, h_out), its input and output hidden states. The lowest-influence layers are dropped.
- removal_loss (Minitron's depth ranking, Muralidharan et al. 2024): layer i scores the calibration LM loss
  (mean next-token cross-entropy over non-pad tokens) of the model with layer i replaced by the identity.
  The layers whose removal costs least are dropped.
One-shot ranks once on the full model; `cfg.iterative` drops one layer at a time and re-scores what is left
(the already dropped layers skipped). `keep_first` / `keep_last` protect layer 0 / the last layer. The chosen
layers are kept with init_student.keep_layers, which fixes config.num_hidden_layers, layer_idx and layer_types.

Width (Minitron's activation-based ranking). All width statistics come from the first calibration pass, on the
unpruned model, restricted to the layers that survive depth pruning:
- intermediate_size: neuron j of a layer scores mean |act_fn(gate_proj x) * up_proj x|_j (the input of
  down_proj); every layer keeps its top k (the same k everywhere, so config stays uniform).
- num_key_value_heads: a KV group scores the sum, over its query heads, of the mean L2 norm of the head's
  attention output (the input of o_proj); every layer keeps its top groups with their query heads, so the
  query/KV ratio is unchanged; head_dim is written into the config and never changes.
- hidden_size: channel c scores the sum over every norm (each layer's input_layernorm and
  post_attention_layernorm, and the final norm) of the mean |output_c|; the top channels are kept, in their
  original order, in the embeddings, LM head (tied weights stay tied), norms and every projection reading or
  writing the residual stream. RMSNorm then averages over fewer channels, which changes its statistics: the
  pruned model is not the full model with channels zeroed, it is what Minitron distils from (accepted there).
  Llama-style layers only (Llama, Mistral, Qwen2, Qwen3); Gemma's scaled embedding and sandwich norms are refused.

Everything runs under torch.no_grad, in eval mode, in the model's dtype and on its device; calibration
sequences are right-padded into batches with an attention mask and padding never counts in any score.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from kdlm.errors import ConfigError, DataError, ModelError
from kdlm.models.init_student import decoder_layers, keep_layers, parameter_count, uniform_layers

FIELD = "student.prune."
HIDDEN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


# ----------------------------------------------------------------------------- report


@dataclass
class PruneReport:
    """What prune_student did: the kept layers (indices into the original model), per-layer scores, widths."""

    method: str
    kept_layers: list[int]
    layer_scores: Optional[list[float]]  # per original layer; None when no depth scoring ran
    widths: dict[str, tuple[int, int]]  # before -> after, only the pruned ones
    parameters: tuple[int, int]  # before, after (tied weights once)
    calibration_tokens: int
    total_layers: int = 0
    iterative: bool = False
    baseline_loss: Optional[float] = None  # removal_loss: the unpruned model's calibration loss
    drop_order: list[int] = field(default_factory=list)  # layers in the order they were dropped (scored methods)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["widths"] = {k: list(v) for k, v in self.widths.items()}
        data["parameters"] = list(self.parameters)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def summary(self) -> str:
        width = "".join(f", {k} {a}->{b}" for k, (a, b) in self.widths.items())
        how = self.method + (" (iterative)" if self.iterative and self.layer_scores is not None else "")
        return (f"kept {len(self.kept_layers)}/{self.total_layers} layers {self.kept_layers} by {how}{width}: "
                f"{self.parameters[1] / 1e6:.1f}M of {self.parameters[0] / 1e6:.1f}M parameters")

    def markdown(self) -> str:
        before, after = self.parameters
        lines = ["## Pruning", "",
                 f"- Method: `{self.method}`" + (", iterative" if self.iterative and self.layer_scores else ""),
                 f"- Kept layers ({len(self.kept_layers)} of {self.total_layers}): {self.kept_layers}",
                 f"- Parameters: {after:,} of {before:,} ({100 * after / max(before, 1):.1f}%)"]
        if self.calibration_tokens:
            lines.append(f"- Calibration: {self.calibration_tokens:,} tokens")
        if self.baseline_loss is not None:
            lines.append(f"- Calibration loss of the unpruned model: {self.baseline_loss:.4f}")
        if self.drop_order:
            lines.append(f"- Dropped, in order: {self.drop_order}")
        if self.widths:
            lines += ["", "| width | before | after |", "|---|---:|---:|"]
            lines += [f"| {name} | {a} | {b} |" for name, (a, b) in self.widths.items()]
        if self.layer_scores is not None:
            what = "block influence, 1 - cos(in, out)" if self.method == "block_influence" else \
                "calibration loss without the layer"
            lines += ["", f"| layer | score ({what}) | kept |", "|---:|---:|:---:|"]
            kept = set(self.kept_layers)
            lines += [f"| {i} | {s:.6g} | {'yes' if i in kept else ''} |" for i, s in enumerate(self.layer_scores)]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- calibration data


def calibration_token_ids(tokenizer, texts: Iterable[str], length: int) -> list[list[int]]:
    """Token ids of each text, cut to `length`; empty ones dropped. Text that already starts with the BOS token
    (a rendered chat) gets no second one."""
    out = []
    bos = getattr(tokenizer, "bos_token", None)
    for text in texts:
        special = not (bos and text.startswith(bos))
        ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])[:length]
        if ids:
            out.append(ids)
    return out


def calibration_texts(source: Optional[str], samples: int, tokenizer=None) -> list[str]:
    """The first `samples` texts of a data file (text, prompt[/completion] or messages rows); None: the
    quickstart prompts. With a chat template on `tokenizer`, prompts and chats are rendered through it."""
    if source is None:
        text = (resources.files("kdlm") / "quickstart" / "prompts.jsonl").read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()][:samples]
        where = ["quickstart prompts"] * len(rows)
    else:
        from kdlm.data.sources import read_rows

        raw = read_rows(source, "train", limit=samples)
        rows, where = raw.rows, raw.locations
    texts = [_row_text(row, loc, tokenizer) for row, loc in zip(rows, where)]
    if not texts:
        raise DataError(f"{source or 'quickstart prompts'}: no calibration rows")
    return texts


def load_calibration(tokenizer, cfg, *, source: Optional[str] = None) -> list[list[int]]:
    """Calibration token ids for a PruneConfig: `cfg.calibration` (or `source`), else the quickstart prompts."""
    texts = calibration_texts(cfg.calibration or source, cfg.calibration_samples, tokenizer)
    return calibration_token_ids(tokenizer, texts, cfg.calibration_length)


def _row_text(row: dict, where: str, tokenizer) -> str:
    chat = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    messages = None
    if isinstance(row.get("messages"), list):
        messages = row["messages"]
    elif isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
        answer = row.get("completion", row.get("response"))
        if isinstance(answer, str):
            messages.append({"role": "assistant", "content": answer})
    elif isinstance(row.get("text"), str):
        return row["text"]
    if messages is None:
        raise DataError(f"{where}: a calibration row needs 'text', 'prompt' or 'messages', got keys {sorted(row)}")
    if chat:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=messages[-1].get("role") != "assistant")
    return "\n".join(str(m.get("content", "")) for m in messages)


# ----------------------------------------------------------------------------- entry point


def prune_student(model: nn.Module, keep: Union[int, list[int], None], cfg, calibration: list[list[int]], *,
                  batch_size: int = 8, show_progress: bool = False) -> PruneReport:
    """Prune `model` in place: depth as `keep` and `cfg.method` say, then the widths `cfg` asks for.

    `keep`: a layer count (chosen by cfg.method), an explicit list of original indices (no depth scoring) or
    None (all layers). `cfg`: a kdlm.config.schema.PruneConfig. `calibration`: token-id lists (already cut to
    length); needed when cfg.scored (may be empty otherwise). All checks run before anything is computed or
    changed; bad settings raise ConfigError naming the field, unsupported architectures ModelError.
    The report's method is cfg.method for a count, "explicit" for a list and "none" for None; layer_scores is
    None unless depth was scored (for iterative scoring: a dropped layer's score from the round it was dropped
    in, a kept layer's from the last round)."""
    layers = decoder_layers(model)
    total = len(layers)
    config = model.config
    count = _check_keep(keep, total, cfg)
    _check_widths(model, cfg)
    depth_scored = isinstance(keep, int) and cfg.method != "uniform" and count < total
    widths_asked = {k: getattr(cfg, k) for k in ("intermediate_size", "num_key_value_heads", "hidden_size")
                    if getattr(cfg, k) is not None}
    needs_data = depth_scored or bool(widths_asked)
    if needs_data and not any(calibration):
        what = f"method {cfg.method}" if depth_scored else "width pruning"
        raise ConfigError(f"{FIELD}calibration: {what} needs calibration text, got none")
    before = parameter_count(model)
    was_training = model.training
    model.eval()
    try:
        batches = _batches(calibration, batch_size, _pad_id(config), _device(model)) if needs_data else []
        tokens = int(sum(int(m.sum()) for _, m in batches))
        runner = _Runner(model, batches, show_progress)
        stats = _WidthStats(model, widths_asked, runner) if widths_asked else None
        scores, order, baseline = None, [], None
        if depth_scored:
            kept, scores, order, baseline = _choose_layers(runner, cfg, count, stats)
        else:
            kept = list(range(total)) if keep is None else (
                uniform_layers(total, keep) if isinstance(keep, int) else list(keep))
            if stats is not None:
                with stats.recording():
                    runner.run("calibration: width statistics")
        if kept != list(range(total)):
            keep_layers(model, kept)
        widths = {}
        if stats is not None:
            widths = stats.apply(kept)
            config.head_dim = stats.head_dim
    finally:
        model.train(was_training)
    method = cfg.method if isinstance(keep, int) else ("explicit" if keep is not None else "none")
    return PruneReport(method=method,
                       kept_layers=kept, layer_scores=scores, widths=widths,
                       parameters=(before, parameter_count(model)), calibration_tokens=tokens, total_layers=total,
                       iterative=bool(cfg.iterative and depth_scored), baseline_loss=baseline, drop_order=order)


def _check_keep(keep, total: int, cfg) -> int:
    if keep is None:
        return total
    if isinstance(keep, bool) or not isinstance(keep, (int, list, tuple)):
        raise ConfigError(f"student.keep_layers: expected a count or a list of layer indices, got {keep!r}")
    if isinstance(keep, int):
        if keep > total:
            raise ConfigError(f"student.keep_layers: {keep} is more than the model's {total} layers")
        if keep < 1:
            raise ConfigError(f"student.keep_layers: {keep}: keep at least 1 layer")
        protected = int(cfg.keep_first) + int(cfg.keep_last and total > 1)
        if cfg.method != "uniform" and keep < protected:
            raise ConfigError(f"student.keep_layers: {keep} is fewer than the {protected} layers protected by "
                              f"{FIELD}keep_first/keep_last")
        return keep
    indices = list(keep)
    if not indices or sorted(set(indices)) != indices or indices[0] < 0 or indices[-1] >= total:
        raise ConfigError(f"student.keep_layers: {indices} needs strictly increasing indices within 0..{total - 1}")
    return len(indices)


def _check_widths(model: nn.Module, cfg) -> None:
    config = model.config
    asks = [(name, getattr(cfg, name)) for name in ("intermediate_size", "num_key_value_heads", "hidden_size")
            if getattr(cfg, name) is not None]
    if not asks:
        return
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        ok = attn is not None and mlp is not None and all(
            isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
            isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        if not ok:
            raise ModelError(f"{type(model).__name__}: width pruning needs Llama-style layers (self_attn.q/k/v/o_proj, "
                             f"mlp.gate/up/down_proj); layer {i} is a {type(layer).__name__}")
    units = {"intermediate_size": (getattr(config, "intermediate_size", None), "MLP neurons"),
             "num_key_value_heads": (getattr(config, "num_key_value_heads", None), "KV heads"),
             "hidden_size": (getattr(config, "hidden_size", None), "hidden channels")}
    for name, value in asks:
        have, what = units[name]
        if not isinstance(have, int):
            raise ModelError(f"{type(model).__name__}: config.{name} is {have!r}; cannot prune {what}")
        if value > have:
            raise ConfigError(f"{FIELD}{name}: {value} is more than the model's {have} {what}")
        if value < 1:
            raise ConfigError(f"{FIELD}{name}: {value}: keep at least 1")
    heads = config.num_attention_heads
    if cfg.num_key_value_heads is not None and heads % config.num_key_value_heads:
        raise ModelError(f"{type(model).__name__}: {heads} query heads do not split into "
                         f"{config.num_key_value_heads} KV groups")
    for layer in layers:
        for norm in ("q_norm", "k_norm"):
            module = getattr(layer.self_attn, norm, None)
            weight = getattr(module, "weight", None)
            if weight is not None and weight.shape[-1] != _head_dim(model):
                raise ModelError(f"{type(model).__name__}: self_attn.{norm} spans all heads; cannot prune heads")
    _check_new_config(model, cfg)
    if cfg.hidden_size is not None:
        family = getattr(config, "model_type", "")
        if family not in HIDDEN_FAMILIES:
            raise ModelError(f"{FIELD}hidden_size: pruning embedding channels supports {', '.join(HIDDEN_FAMILIES)} "
                             f"models, not {family or type(model).__name__}")
        extra = sorted(n for n, _ in layers[0].named_children()
                       if n not in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))
        if extra:
            raise ModelError(f"{FIELD}hidden_size: {type(layers[0]).__name__} has modules {extra} on the residual "
                             f"stream that channel pruning does not handle")


def _check_new_config(model: nn.Module, cfg) -> None:
    """The pruned widths must make a config that transformers accepts (e.g. Llama: hidden_size a multiple of
    num_attention_heads, even with head_dim explicit), or save_pretrained would fail after all the work."""
    config = copy.deepcopy(model.config)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    groups = cfg.num_key_value_heads or kv
    new = {"head_dim": _head_dim(model), "intermediate_size": cfg.intermediate_size,
           "num_key_value_heads": cfg.num_key_value_heads,
           "num_attention_heads": groups * (heads // kv) if cfg.num_key_value_heads else None,
           "hidden_size": cfg.hidden_size}
    field_name = next(n for n in ("hidden_size", "num_key_value_heads", "intermediate_size") if getattr(cfg, n))
    try:
        for key, value in new.items():
            if value is not None:
                setattr(config, key, value)
        validate = getattr(config, "validate", None)
        if callable(validate):
            validate()
    except Exception as err:  # noqa: BLE001 - transformers' validation errors have no common base
        cause = err.__cause__ or err
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"{FIELD}{field_name}: {getattr(cfg, field_name)} gives an invalid "
                          f"{type(config).__name__}: {reason}") from None


# ----------------------------------------------------------------------------- calibration passes


def _pad_id(config) -> int:
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and 0 <= pad < getattr(config, "vocab_size", pad + 1):
        return pad
    return 0  # any id: padded positions are masked out everywhere


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(calibration: list[list[int]], batch_size: int, pad: int,
             device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask) batches, longest sequences first (less padding)."""
    seqs = sorted((list(s) for s in calibration if len(s)), key=len, reverse=True)
    out = []
    for start in range(0, len(seqs), max(1, batch_size)):
        chunk = seqs[start:start + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        out.append((ids.to(device), mask.to(device)))
    return out


class _Runner:
    """Runs calibration passes; hooks read the current batch's mask from `self.mask`."""

    def __init__(self, model: nn.Module, batches, show_progress: bool):
        self.model, self.batches, self.show_progress = model, batches, show_progress
        self.mask: Optional[torch.Tensor] = None
        self.bar = None

    @contextmanager
    def progress(self, passes: int, desc: str) -> Iterator[None]:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=passes * len(self.batches), desc=desc, unit="batch", disable=not self.show_progress,
                        leave=False)
        try:
            yield
        finally:
            self.bar.close()
            self.bar = None

    @torch.no_grad()
    def run(self, desc: str = "calibration", *, loss: bool = False) -> Optional[float]:
        """One pass over the calibration set; with `loss`, the mean next-token CE over non-pad targets."""
        own_bar = self.bar is None
        if own_bar:
            ctx = self.progress(1, desc)
            ctx.__enter__()
        total, count = 0.0, 0
        try:
            for ids, mask in self.batches:
                self.mask = mask
                out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                if loss:
                    logits = out.logits[:, :-1].float()
                    target = ids[:, 1:]
                    keep = mask[:, 1:].bool()
                    ce = nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
                    total += float(ce)
                    count += int(keep.sum())
                if self.bar is not None:
                    self.bar.update(1)
        finally:
            self.mask = None
            if own_bar:
                ctx.__exit__(None, None, None)
        if loss:
            return total / max(count, 1)
        return None


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over batch and positions of `values` [B, T, ...] where mask [B, T] is 1, in float32."""
    m = mask.to(torch.float32)
    while m.dim() < values.dim():
        m = m.unsqueeze(-1)
    return (values.float() * m).sum(dim=(0, 1))


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Skip(nn.Module):
    """A decoder layer replaced by the identity (returns its input hidden states)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.__dict__["wrapped"] = layer  # not a submodule: parameters stay where they are
        for attr in ("attention_type", "layer_type", "is_sliding"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, *args, **kwargs):
        return _hidden_in(args, kwargs)


@contextmanager
def _skipped(model: nn.Module, indices: Iterable[int]) -> Iterator[None]:
    """Temporarily replace decoder layers `indices` by the identity (layer count and layer types unchanged)."""
    layers = decoder_layers(model)
    saved = {i: layers[i] for i in indices}
    try:
        for i, layer in saved.items():
            layers[i] = _Skip(layer)
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


class _Influence:
    """Per-layer block influence, mean over non-pad tokens of 1 - cos(h_in, h_out)."""

    def __init__(self, runner: _Runner, layers: nn.ModuleList, indices: list[int]):
        self.runner, self.layers, self.indices = runner, layers, indices
        self.sums = {i: 0.0 for i in indices}
        self.count = 0

    @contextmanager
    def recording(self) -> Iterator[None]:
        handles = [self.layers[i].register_forward_hook(self._hook(i), with_kwargs=True) for i in self.indices]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, i: int) -> Callable:
        def hook(module, args, kwargs, output):
            x, y = _hidden_in(args, kwargs).float(), _hidden_out(output).float()
            cos = nn.functional.cosine_similarity(x, y, dim=-1)
            mask = self.runner.mask
            self.sums[i] += float(((1 - cos) * mask).sum())
            if i == self.indices[0]:
                self.count += int(mask.sum())
        return hook

    def scores(self) -> dict[int, float]:
        return {i: s / max(self.count, 1) for i, s in self.sums.items()}


def _choose_layers(runner: _Runner, cfg, count: int, stats: Optional["_WidthStats"]):
    """(kept, per-layer scores, drop order, baseline loss) for block_influence / removal_loss."""
    model = runner.model
    layers = decoder_layers(model)
    total = len(layers)
    protected = ({0} if cfg.keep_first else set()) | ({total - 1} if cfg.keep_last else set())
    drops = total - count
    active = list(range(total))
    scores: dict[int, float] = {}
    order: list[int] = []
    baseline = None

    def pick(round_scores: dict[int, float], n: int) -> list[int]:
        candidates = sorted((i for i in active if i not in protected), key=lambda i: (round_scores[i], i))
        return candidates[:n]

    if cfg.method == "block_influence":
        rounds = drops if cfg.iterative else 1
        with runner.progress(rounds, "calibration: block influence"):
            for r in range(rounds):
                influence = _Influence(runner, layers, active)
                dropped = [i for i in range(total) if i not in active]
                with influence.recording(), _skipped(model, dropped), (
                        stats.recording() if stats is not None and r == 0 else _nothing()):
                    runner.run()
                round_scores = influence.scores()
                scores.update(round_scores)
                chosen = pick(round_scores, 1 if cfg.iterative else drops)
                order += chosen
                active = [i for i in active if i not in chosen]
    else:  # removal_loss
        passes = 1 + (sum(total - r for r in range(drops)) if cfg.iterative else total)
        with runner.progress(passes, "calibration: removal loss"):
            with stats.recording() if stats is not None else _nothing():
                baseline = runner.run(loss=True)
            for _ in range(drops if cfg.iterative else 1):
                dropped = [i for i in range(total) if i not in active]
                round_scores = {}
                for i in active:
                    with _skipped(model, dropped + [i]):
                        round_scores[i] = runner.run(loss=True)
                scores.update(round_scores)
                chosen = pick(round_scores, 1 if cfg.iterative else drops)
                order += chosen
                active = [i for i in active if i not in chosen]
    return active, [scores[i] for i in range(total)], order, baseline


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ----------------------------------------------------------------------------- width


def _head_dim(model: nn.Module) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    return config.hidden_size // config.num_attention_heads


class _WidthStats:
    """Activation statistics of the unpruned model (per original layer), and the slicing they lead to."""

    def __init__(self, model: nn.Module, asked: dict[str, int], runner: "_Runner"):
        self.model, self.asked, self.runner = model, asked, runner
        self.layers = decoder_layers(model)
        self.head_dim = _head_dim(model)
        self.neurons: dict[int, torch.Tensor] = {}
        self.heads: dict[int, torch.Tensor] = {}
        self.channels: dict[str, torch.Tensor] = {}  # "<layer>.<norm>" or "norm"

    def _acc(self, store: dict, key, value: torch.Tensor) -> None:
        store[key] = store[key] + value if key in store else value

    @contextmanager
    def recording(self) -> Iterator[None]:
        handles = []
        for i, layer in enumerate(self.layers):
            if "intermediate_size" in self.asked:
                handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._neuron_hook(i)))
            if "num_key_value_heads" in self.asked:
                handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._head_hook(i)))
            if "hidden_size" in self.asked:
                for name in ("input_layernorm", "post_attention_layernorm"):
                    handles.append(getattr(layer, name).register_forward_hook(self._channel_hook(f"{i}.{name}")))
        if "hidden_size" in self.asked:
            handles.append(_final_norm(self.model).register_forward_hook(self._channel_hook("norm")))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @property
    def mask(self) -> torch.Tensor:
        return self.runner.mask

    def _neuron_hook(self, i: int) -> Callable:
        def hook(module, args):
            self._acc(self.neurons, i, _masked_sum(args[0].abs(), self.mask))
        return hook

    def _head_hook(self, i: int) -> Callable:
        def hook(module, args):
            x = args[0]
            per_head = x.float().view(*x.shape[:2], -1, self.head_dim).norm(dim=-1)  # [B, T, heads]
            self._acc(self.heads, i, _masked_sum(per_head, self.mask))
        return hook

    def _channel_hook(self, key: str) -> Callable:
        def hook(module, args, output):
            self._acc(self.channels, key, _masked_sum(_hidden_out(output).abs(), self.mask))
        return hook

    # ---- applying

    def apply(self, kept: list[int]) -> dict[str, tuple[int, int]]:
        """Slice the (depth-pruned) model; `kept[j]` is the original index of its layer j."""
        config = self.model.config
        widths: dict[str, tuple[int, int]] = {}
        layers = decoder_layers(self.model)
        if "intermediate_size" in self.asked:
            k = self.asked["intermediate_size"]
            before = config.intermediate_size
            for layer, orig in zip(layers, kept):
                idx = _top(self.neurons[orig], k)
                mlp = layer.mlp
                _slice_linear(mlp.gate_proj, out_idx=idx)
                _slice_linear(mlp.up_proj, out_idx=idx)
                _slice_linear(mlp.down_proj, in_idx=idx)
                if hasattr(mlp, "intermediate_size"):
                    mlp.intermediate_size = k
            config.intermediate_size = k
            widths["intermediate_size"] = (before, k)
        if "num_key_value_heads" in self.asked:
            g = self.asked["num_key_value_heads"]
            kv, heads, d = config.num_key_value_heads, config.num_attention_heads, self.head_dim
            rep = heads // kv
            for layer, orig in zip(layers, kept):
                groups = _top(self.heads[orig].view(kv, rep).sum(-1), g)
                q_heads = (groups[:, None] * rep + torch.arange(rep)).flatten()
                q_rows = _rows(q_heads, d)
                kv_rows = _rows(groups, d)
                attn = layer.self_attn
                _slice_linear(attn.q_proj, out_idx=q_rows)
                _slice_linear(attn.k_proj, out_idx=kv_rows)
                _slice_linear(attn.v_proj, out_idx=kv_rows)
                _slice_linear(attn.o_proj, in_idx=q_rows)
                for attr, value in (("num_heads", g * rep), ("num_key_value_heads", g)):
                    if hasattr(attn, attr):
                        setattr(attn, attr, value)
            config.num_attention_heads = g * rep
            config.num_key_value_heads = g
            widths["num_key_value_heads"] = (kv, g)
            widths["num_attention_heads"] = (heads, g * rep)
        if "hidden_size" in self.asked:
            h = self.asked["hidden_size"]
            before = config.hidden_size
            total = self.channels["norm"].clone()
            for orig in kept:
                total += self.channels[f"{orig}.input_layernorm"] + self.channels[f"{orig}.post_attention_layernorm"]
            idx = _top(total, h)
            self._slice_hidden(idx)
            config.hidden_size = h
            widths["hidden_size"] = (before, h)
        return widths

    def _slice_hidden(self, idx: torch.Tensor) -> None:
        model = self.model
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embed.weight
        _slice_param(embed, "weight", idx, dim=1)
        embed.embedding_dim = len(idx)
        if head is not None:
            if tied:
                head.weight = embed.weight
            else:
                _slice_param(head, "weight", idx, dim=1)
            head.in_features = len(idx)
        for layer in decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _slice_linear(lin, in_idx=idx)
            for lin in (attn.o_proj, mlp.down_proj):
                _slice_linear(lin, out_idx=idx)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                _slice_param(norm, "weight", idx, dim=0)
            for module in (layer, mlp):
                if hasattr(module, "hidden_size"):
                    module.hidden_size = len(idx)
        _slice_param(_final_norm(model), "weight", idx, dim=0)


def _final_norm(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    if norm is None:
        raise ModelError(f"{type(model).__name__}: no final norm at model.norm")
    return norm


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in increasing index order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k]
    return torch.tensor(sorted(order), dtype=torch.long)


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _slice_param(module: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    param = getattr(module, name)
    data = param.data.index_select(dim, idx.to(param.device)).clone()
    setattr(module, name, nn.Parameter(data, requires_grad=param.requires_grad))


def _slice_linear(linear: nn.Linear, *, out_idx: Optional[torch.Tensor] = None,
                  in_idx: Optional[torch.Tensor] = None) -> None:
    if out_idx is not None:
        _slice_param(linear, "weight", out_idx, dim=0)
        if linear.bias is not None:
            _slice_param(linear, "bias", out_idx, dim=0)
        linear.out_features = len(out_idx)
    if in_idx is not None:
        _slice_param(linear, "weight", in_idx, dim=1)
        linear.in_features = len(in_idx)
