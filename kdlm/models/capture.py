"""Record a model's hidden states and post-RoPE q/k/v during a forward, with hooks.

Feature distillation (hidden-state and attention transfer) needs a few intermediate
tensors of the teacher and the student. Asking for `output_hidden_states` keeps every
layer of the teacher; asking for `output_attentions` forces eager attention and a
[B, heads, L, L] tensor per layer. `FeatureCapture` instead records only the layers
named, while the model keeps its attention implementation (SDPA, FlashAttention,
eager) and its masks.

Hidden states come from forward hooks: on a decoder layer (its output), on the input
embedding module (its output, before any model-specific scaling done outside it) and
on the final norm (`model.model.norm`).

q/k/v come from transformers' attention-function interface. Every transformers 5.x
attention module calls `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)(module, query, key, value, attention_mask, ...)` after RoPE
(and after q/k norms where a model has them), before the GQA repeat. While at least one
capture is active, `AttentionInterface.get_interface` is wrapped (class-wide, so
model-local interface instances are covered too): it returns the function transformers
would have returned, wrapped so that a call whose `module` belongs to a watched decoder
layer records (query, key, value) and then calls the original with the same arguments.
Nothing else changes: the implementation name in the config stays as it is, so
transformers builds exactly the mask it would have built (a 4-D additive/boolean mask
for eager/SDPA, none or cu_seqlens for FlashAttention), the same kernel runs and the
outputs are bit-identical. The same mechanism covers flash_attention_2/3 (shapes
[B, H, L, d] are what the modules pass to every implementation); only eager and SDPA
are tested here (no GPU).

Recording is armed by a forward pre-hook on the module that owns the decoder layers, and
each ref records once per forward: the backward replay of gradient checkpointing (which
re-runs the attention modules) does not overwrite or duplicate what was captured. With
non-reentrant checkpointing (transformers' default) the student's captured tensors stay
in the autograd graph and their gradients are correct; reentrant checkpointing runs the
layer under no_grad, so captured student tensors would have no graph.

With a KV cache, the captured k/v are what the module passes on (past + current); in
training there is no past, so k/v cover the same L positions as q.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Union

import torch
from torch import nn

from kdlm.errors import ConfigError
from kdlm.models.init_student import decoder_layers

LayerRef = Union[int, str]
"""A decoder layer index (its output hidden states), "embeddings" (the input embedding's output) or "final"
(the final norm's output)."""

NAMED_REFS = ("embeddings", "final")

# ----------------------------------------------------------------------------- the attention-interface wrapper

_lock = threading.Lock()
_watchers: dict[nn.Module, list[Callable]] = {}  # attention-side module -> callbacks (one per active capture)
_installed: dict[str, Any] = {}  # "original": AttentionInterface.get_interface before wrapping


def _install() -> None:
    from transformers.modeling_utils import AttentionInterface

    if "original" in _installed:
        return
    original = AttentionInterface.__dict__["get_interface"]

    def get_interface(self, attn_implementation, default):
        fn = original(self, attn_implementation, default)
        if not _watchers:
            return fn

        def capturing(*args, **kwargs):
            named = dict(zip(("module", "query", "key", "value"), args))
            module = named.get("module", kwargs.get("module"))
            callbacks = _watchers.get(module) if module is not None else None
            if callbacks:
                q, k, v = (named.get(n, kwargs.get(n)) for n in ("query", "key", "value"))
                for callback in list(callbacks):
                    callback(q, k, v)
            return fn(*args, **kwargs)

        return capturing

    AttentionInterface.get_interface = get_interface
    _installed["original"] = original


def _uninstall() -> None:
    from transformers.modeling_utils import AttentionInterface

    if "original" in _installed and not _watchers:
        AttentionInterface.get_interface = _installed.pop("original")


def _watch(module: nn.Module, callback: Callable) -> None:
    with _lock:
        _watchers.setdefault(module, []).append(callback)
        _install()


def _unwatch(module: nn.Module, callback: Callable) -> None:
    with _lock:
        callbacks = _watchers.get(module, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            _watchers.pop(module, None)
        _uninstall()


# ----------------------------------------------------------------------------- refs


def _owner(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module
    raise ConfigError(f"{type(model).__name__}: its decoder layers have no parent module")


def final_norm(model: nn.Module) -> nn.Module:
    """The final norm applied after the last decoder layer (model.model.norm for Llama/Qwen/Gemma/Mistral)."""
    owner = _owner(model, decoder_layers(model))
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        node = getattr(owner, name, None)
        if isinstance(node, nn.Module):
            return node
    raise ConfigError(f"layer 'final': {type(model).__name__} has no final norm at model.model.norm to capture")


def check_refs(model: nn.Module, refs: Iterable[LayerRef], *, attention: bool = False) -> list[LayerRef]:
    """Validate layer refs against `model`; a bad one raises a one-line ConfigError naming it."""
    count = len(decoder_layers(model))
    out: list[LayerRef] = []
    for ref in refs:
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise ConfigError(f"layer {ref!r} is not a layer index or one of {', '.join(map(repr, NAMED_REFS))}")
        if isinstance(ref, str):
            if attention:
                raise ConfigError(f"layer {ref!r}: attention is captured from decoder layers only (0..{count - 1})")
            if ref not in NAMED_REFS:
                raise ConfigError(f"layer {ref!r} is not a layer index or one of {', '.join(map(repr, NAMED_REFS))}")
        elif not 0 <= ref < count:
            raise ConfigError(f"layer {ref} does not exist: the model has {count} decoder layers (0..{count - 1})")
        if ref not in out:
            out.append(ref)
    return out


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find the hidden states in a {type(output).__name__} module output")


# ----------------------------------------------------------------------------- FeatureCapture


class FeatureCapture:
    """Context manager: while active, a forward of `model` records

    - `hidden[ref]` -> [B, L, H] for each ref in `hidden_layers` (forward hooks on the decoder layer,
      the input embedding module, or the final norm);
    - `qkv[i]` -> (q [B, Hq, L, d], k [B, Hkv, L, d], v [B, Hkv, L, d]) for each decoder layer i in
      `attention_layers`: post-RoPE, before the GQA repeat, as passed to the attention function.

    `detach=True` (teacher) stores detached tensors, so no graph is kept; `detach=False` (student) keeps
    them in the graph so a loss on them reaches the model's weights. Each forward overwrites the previous
    record; `clear()` drops it. Everything is removed on exit; captures on different models (or several on
    one model) may be active at once.
    """

    def __init__(self, model: nn.Module, *, hidden_layers: Iterable[LayerRef] = (),
                 attention_layers: Iterable[int] = (), detach: bool):
        self.model = model
        self.detach = detach
        self.hidden_layers = check_refs(model, hidden_layers)
        self.attention_layers = check_refs(model, attention_layers, attention=True)
        self.hidden: dict[LayerRef, torch.Tensor] = {}
        self.qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._layers = decoder_layers(model)
        self._owner = _owner(model, self._layers)
        self._handles: list = []
        self._watched: list[tuple[nn.Module, Callable]] = []
        self._armed: set = set()
        self._active = False

    # -- recording

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if self.detach else tensor

    def _arm(self, module, args, kwargs=None):
        self._armed = {("hidden", ref) for ref in self.hidden_layers} | {("qkv", i) for i in self.attention_layers}

    def _hidden_hook(self, ref: LayerRef) -> Callable:
        def hook(module, args, output):
            if ("hidden", ref) in self._armed:
                self._armed.discard(("hidden", ref))
                self.hidden[ref] = self._keep(_first_tensor(output))

        return hook

    def _qkv_callback(self, index: int) -> Callable:
        def callback(query, key, value):
            if ("qkv", index) in self._armed:
                self._armed.discard(("qkv", index))
                self.qkv[index] = (self._keep(query), self._keep(key), self._keep(value))

        return callback

    def clear(self) -> None:
        self.hidden.clear()
        self.qkv.clear()

    # -- context

    def __enter__(self) -> "FeatureCapture":
        if self._active:
            raise RuntimeError("this FeatureCapture is already active")
        self._active = True
        try:
            self._handles.append(self._owner.register_forward_pre_hook(self._arm))
            for ref in self.hidden_layers:
                if ref == "embeddings":
                    module = self.model.get_input_embeddings()
                elif ref == "final":
                    module = final_norm(self.model)
                else:
                    module = self._layers[ref]
                self._handles.append(module.register_forward_hook(self._hidden_hook(ref)))
            for index in self.attention_layers:
                callback = self._qkv_callback(index)
                # the attention function receives the attention module, a submodule of the layer
                for module in self._layers[index].modules():
                    _watch(module, callback)
                    self._watched.append((module, callback))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, callback in self._watched:
            _unwatch(module, callback)
        self._watched.clear()
        self._armed = set()
        self._active = False

    def __exit__(self, *exc) -> None:
        self._remove()


def active_watchers() -> int:
    """How many (module, capture) watches are registered (0 when no capture is active); for tests."""
    return sum(len(v) for v in _watchers.values())


def interface_wrapped() -> bool:
    """Whether AttentionInterface.get_interface is currently wrapped; for tests."""
    return "original" in _installed
