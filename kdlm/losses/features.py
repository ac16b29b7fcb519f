"""Feature terms: hint (hidden-state) distillation, its layer maps and learned projections.

FitNets (Romero et al., 2015) and TinyBERT (Jiao et al., 2020) match intermediate hidden states
as well as outputs. For a layer pair (s, t) and a counted token n, with h_s the student's hidden
state, h_t the teacher's and W a bias-free projection student width -> teacher width (identity
when the widths agree and no projection is asked for):

    mse              l_n = (1/H_t) sum_c ((W h_s)_c - (h_t)_c)^2
    normalised_mse   l_n = (1/H_t) sum_c ((W h_s)_c - (h_t)_c)^2 / (m_c + eps),
                     m_c = mean over the micro-batch's counted tokens of (h_t)_c^2 (detached):
                     LLM residual streams carry a few outlier channels hundreds of times larger than
                     the rest, which would otherwise be all the plain MSE sees
    cosine           l_n = 1 - cos(W h_s, h_t)

The term's value is sum_n c_n * mean over pairs of l_n, over the same counted tokens (output positions
that predict a supervised token) and with the same per-token coefficients c_n as the logit terms, so one
global token count normalises every term. Computed in fp32 whatever the autocast dtype.

Layer refs: an int is that decoder layer's output; "embeddings" the embedding output; "final" the final
norm's output (the LM head's input). Layer maps (`layer_pairs`):
    proportional   student i <-> teacher round(i * (L_t - 1) / (L_s - 1))
    kept           student i <-> the teacher layer it was copied from (a student made by keep_layers / prune)
    tinybert       student i <-> teacher k * (i + 1) - 1, k = L_t / L_s (TinyBERT's g(m) = k * m, 1-based)
    explicit       [[student, teacher], ...]

Projections live in `FeatureProjections`, a module of the DistillationModule: the optimizer is built from
that module's parameters, so they train (DistillKit v1 created them after the optimizer: PEERS.md), the
checkpoint holds them, and the export saves only the student (DistillKit saved them into it).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlm.errors import ConfigError
from kdlm.models.capture import NAMED_REFS, LayerRef  # one definition of a layer ref, shared with the capture
HINT_METRICS = ("mse", "normalised_mse", "cosine")
EPS = 1e-6


def layer_pairs(spec, *, student_layers: int, teacher_layers: int, kept: Optional[Sequence[int]] = None,
                field: str = "layers") -> tuple[tuple[LayerRef, LayerRef], ...]:
    """Resolve a layer map (a name or explicit pairs) into (student_ref, teacher_ref) pairs, checked against
    both models' layer counts. `kept`: the teacher layer each student layer was copied from, if it was.
    Errors are one line starting with `field`."""
    if spec is None:
        spec = "kept" if kept is not None else "proportional"
    if isinstance(spec, str):
        if spec == "proportional":
            if student_layers == 1:
                return ((0, teacher_layers - 1),)
            return tuple((i, round(i * (teacher_layers - 1) / (student_layers - 1))) for i in range(student_layers))
        if spec == "kept":
            if kept is None:
                raise ConfigError(f"{field}: kept maps each student layer to the teacher layer it was copied from, "
                                  f"but the student is not a layer subset of the teacher (student.keep_layers with "
                                  f"student.model == teacher.model); use proportional or explicit pairs")
            return tuple((i, int(t)) for i, t in enumerate(kept))
        if spec == "tinybert":
            if teacher_layers % student_layers:
                raise ConfigError(f"{field}: tinybert needs the teacher's {teacher_layers} layers to be a multiple "
                                  f"of the student's {student_layers}; use proportional or explicit pairs")
            k = teacher_layers // student_layers
            return tuple((i, k * (i + 1) - 1) for i in range(student_layers))
        raise ConfigError(f"{field}: {spec!r} is not a layer map (proportional, kept, tinybert, or [[student, "
                          f"teacher], ...] pairs)")
    pairs = []
    for i, pair in enumerate(spec):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"{field}.{i}: expected a [student, teacher] pair, got {pair!r}")
        pairs.append((check_ref(pair[0], student_layers, f"{field}.{i}", "student"),
                      check_ref(pair[1], teacher_layers, f"{field}.{i}", "teacher")))
    if not pairs:
        raise ConfigError(f"{field}: the layer map is empty")
    return tuple(pairs)


def check_ref(ref, layers: int, field: str, side: str) -> LayerRef:
    """A layer ref of one side: an index into its `layers` decoder layers, or embeddings / final."""
    if isinstance(ref, str) and ref in NAMED_REFS:
        return ref
    if isinstance(ref, bool) or not isinstance(ref, int):
        raise ConfigError(f"{field}: {ref!r} is not a layer (an index, embeddings or final)")
    if not 0 <= ref < layers:
        raise ConfigError(f"{field}: {side} layer {ref} does not exist: the {side} has {layers} decoder layers "
                          f"(0..{layers - 1})")
    return ref


def hint_values(student: Tensor, teacher: Tensor, metric: str) -> Tensor:
    """Per-token hint distance [N] between projected student states [N, H] and teacher states [N, H], fp32."""
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)  # fp32 at least
    s, t = student.to(dtype), teacher.to(dtype).detach()
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=EPS)
    squared = (s - t).pow(2)  # [N, H]
    if metric == "normalised_mse":
        squared = squared / (t.pow(2).mean(0) + EPS)  # [H]: the teacher's mean square per channel
    elif metric != "mse":
        raise ValueError(f"unknown hint metric {metric!r} (one of {', '.join(HINT_METRICS)})")
    return squared.mean(-1)


def projection_key(label: str, pair: tuple[LayerRef, LayerRef]) -> str:
    """ModuleDict key of one term's projection for one layer pair (no dots: ModuleDict forbids them)."""
    return f"{label}__{pair[0]}__{pair[1]}"


class FeatureProjections(nn.Module):
    """The hint terms' learned projections, one bias-free Linear(student width -> teacher width) per
    (term, layer pair): when the widths differ, or for every pair with `projection: xavier`.

    identity init: W = I (rectangular: the first min(H_s, H_t) channels map straight through), so a student
    cut from the teacher starts with its own states compared as they are; xavier: Glorot-uniform."""

    def __init__(self, terms, student_width: int, teacher_width: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.maps = nn.ModuleDict()
        for term in terms:
            if term.name != "hint":
                continue
            for pair in term.layers:
                if student_width == teacher_width and term.projection == "identity":
                    continue
                linear = nn.Linear(student_width, teacher_width, bias=False, dtype=dtype)
                with torch.no_grad():
                    nn.init.eye_(linear.weight) if term.projection == "identity" else nn.init.xavier_uniform_(linear.weight)
                self.maps[projection_key(term.label, pair)] = linear

    def project(self, label: str, pair, hidden: Tensor) -> Tensor:
        key = projection_key(label, pair)
        if key not in self.maps:
            return hidden
        linear = self.maps[key]
        dtype = torch.promote_types(torch.promote_types(hidden.dtype, linear.weight.dtype), torch.float32)
        return F.linear(hidden.to(dtype), linear.weight.to(dtype))


def hint_sum(term, student_hidden: dict, teacher_hidden: dict, projections: Optional[FeatureProjections],
             coefficient: Optional[Tensor]) -> Tensor:
    """sum_n c_n * mean over the term's pairs of l_n (0-dim fp32). *_hidden: ref -> [N, H] at counted tokens."""
    per_token = None
    device = next(iter(student_hidden.values())).device
    with torch.autocast(device_type=device.type, enabled=False):  # projections and distances in fp32
        for pair in term.layers:
            s = student_hidden[pair[0]]
            if projections is not None:
                s = projections.project(term.label, pair, s)
            values = hint_values(s, teacher_hidden[pair[1]], term.metric)  # [N]
            per_token = values if per_token is None else per_token + values
    per_token = per_token / len(term.layers)
    if coefficient is None:
        return per_token.sum()
    return (per_token * coefficient.to(per_token.dtype)).sum()


class ModelDims:
    """What the feature terms need of a model's config: layer count, widths and attention heads."""

    def __init__(self, config):
        config = getattr(config, "text_config", None) or config
        self.layers = int(config.num_hidden_layers)
        self.hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden // self.heads)

    def width(self, relation: str) -> int:
        """Width of the vectors a relation compares: all query heads (qq) or all key / value heads (kk, vv)."""
        return (self.heads if relation == "qq" else self.kv_heads) * self.head_dim


def resolve_feature_terms(terms: list, *, student: ModelDims, teacher: ModelDims,
                          kept: Optional[Sequence[int]] = None) -> list:
    """Fill each feature term's layer pairs and relation heads from both models' shapes; other terms unchanged.
    Errors are one line naming the term's field (loss.terms[i].layers / relation_heads)."""
    import dataclasses

    out = []
    for i, term in enumerate(terms):
        if not term.is_feature:
            out.append(term)
            continue
        field = f"loss.terms[{i}]"
        pairs = layer_pairs(term.layer_spec, student_layers=student.layers, teacher_layers=teacher.layers,
                            kept=kept, field=f"{field}.layers")
        heads = term.relation_heads
        if term.name != "hint":
            named = [p for p in pairs if isinstance(p[0], str) or isinstance(p[1], str)]
            if named:
                raise ConfigError(f"{field}.layers: {term.name} compares decoder layers' attention; {named[0]!r} "
                                  f"names {', '.join(NAMED_REFS)}, which have none")
        if term.name == "attention_relation":
            heads = heads or min(student.kv_heads, teacher.kv_heads)
            for relation in term.relations:
                for side, dims in (("student", student), ("teacher", teacher)):
                    if dims.width(relation) % heads:
                        given = "" if term.relation_heads else f" (the default: the smaller KV head count)"
                        raise ConfigError(
                            f"{field}.relation_heads: {heads}{given} does not divide the {side}'s "
                            f"{relation} width {dims.width(relation)} ({dims.heads if relation == 'qq' else dims.kv_heads}"
                            f" heads x {dims.head_dim}); choose a common divisor of "
                            f"{student.width(relation)} and {teacher.width(relation)}")
        if term.name == "attention_score" and student.heads != teacher.heads:
            raise ConfigError(f"{field}: attention_score compares attention scores head by head and needs equal "
                              f"head counts (student {student.heads}, teacher {teacher.heads}); use "
                              f"attention_relation")
        out.append(dataclasses.replace(term, layers=pairs, relation_heads=heads))
    return out


def feature_layers(terms: list) -> tuple[set, set, set, set]:
    """What to capture: (student hidden refs, teacher hidden refs, student attention layers, teacher attention
    layers) over every feature term's pairs. Only these are hooked: never the whole model's hidden states."""
    s_hidden, t_hidden, s_attn, t_attn = set(), set(), set(), set()
    for term in terms:
        if not term.is_feature:
            continue
        for s, t in term.layers:
            if term.name == "hint":
                s_hidden.add(s)
                t_hidden.add(t)
            else:
                s_attn.add(s)
                t_attn.add(t)
    return s_hidden, t_hidden, s_attn, t_attn
