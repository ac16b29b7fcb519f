"""One distillation forward: where the teacher runs and where the objective meets the student.

Teacher: frozen, no grad, returns its last hidden state at the counted positions only
(of its own input under context distillation, whose counted positions line up with the student's).
Student: wrapped together with the objective in one nn.Module (`DistillationModule`) so
that DDP, FSDP and DeepSpeed see the whole computation, including the LM head whose
weights a sharded run only materialises inside forward. Per-example weights, negative rows
and REDI reach the objective as per-token coefficients (`objective.token_coefficients`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

from kdlm.data.encode import IGNORE
from kdlm.losses.features import FeatureProjections, feature_layers, hint_sum
from kdlm.losses.fused import DEFAULT_CHUNK_BYTES, TOTAL_KEY, fused_sums
from kdlm.losses.policy import importance_weights, pg_coefficients, rewards
from kdlm.losses.sparse import SparseTeacher, sparse_term_sums
from kdlm.losses.objective import LMHead, Term, lm_head_of, term_sums, token_coefficients, weighted_total


def counted_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Which output positions are scored, and their targets.

    Output position i predicts token i+1, so the mask is over [B, L-1]: `labels[:, 1:] != -100`.
    Returns (mask [B, L-1] bool, targets [N] long).
    """
    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    return mask, shifted[mask]


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# per-token [B, L], in a batch only when some example needs them: example weights, negative flags, which tokens
# were sampled during training, and the sampler's log-probs of them (proposal, student, teacher)
LOSS_INPUTS = ("token_weights", "negative", "sampled", "behavior_logprobs", "student_logprobs", "teacher_logprobs",
               "student_chunk")  # student_chunk: cross-tokenizer chunk ids (kdlm.data.alignment)


def model_inputs(batch: dict) -> dict[str, Tensor]:
    """What the model's forward takes from a batch: ids, and an attention mask (padded) or position ids (packed)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def loss_inputs(batch: dict) -> dict[str, Tensor]:
    """What the objective takes from a batch besides labels: per-token example weights and negative flags."""
    return {k: batch[k] for k in LOSS_INPUTS if k in batch}


def example_index(labels: Tensor, position_ids: Optional[Tensor]) -> Tensor:
    """[B, L] long: which example each token belongs to. A padded batch has one per row; in packed rows
    each member (and the padding block after the last one) starts at position 0."""
    if position_ids is None:
        return torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    return (position_ids == 0).flatten().cumsum(0).view_as(position_ids)


def last_hidden(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """The decoder's final hidden states [B, L, H], without computing the [B, L, V] logits. A peft model
    (a LoRA student) is looked through: its own `base_model` is the tuner, not the decoder."""
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    out = model.base_model(**inputs, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass
class TeacherRows:
    """The teacher's signal for a batch, at the counted positions: its last hidden states and LM head.
    Logits are computed from them inside the loss, chunk by chunk on the fused path. For feature terms, also
    the mapped layers' hidden states (at the counted positions) and attention q / k / v (whole rows)."""

    hidden: Tensor  # [N, H_teacher], no grad
    head: LMHead
    features: dict = field(default_factory=dict)  # layer ref -> [N, H_teacher], no grad
    qkv: dict = field(default_factory=dict)  # decoder layer -> (q [B, Hq, L, d], k, v [B, Hkv, L, d]), no grad
    # cross-tokenizer runs: the teacher's own next tokens at its counted rows, and each row's aligned chunk id
    targets: Optional[Tensor] = None  # [N_teacher] long
    chunks: Optional[Tensor] = None  # [N_teacher] long


class Teacher:
    """A frozen teacher: eval mode, no gradients, never saved, never wrapped by DDP.

    `hidden_layers` / `attention_layers`: what the feature terms compare; only these layers are hooked
    (kdlm.models.capture), never `output_hidden_states` over the whole model."""

    def __init__(self, model: nn.Module, vocab: int, *, hidden_layers=(), attention_layers=()):
        self.model = model
        self.head = lm_head_of(model, vocab)
        self.hidden_layers = tuple(hidden_layers)
        self.attention_layers = tuple(attention_layers)

    @torch.no_grad()
    def rows(self, inputs: dict[str, Tensor], mask: Tensor, *, features: bool = True) -> TeacherRows:
        """The teacher's hidden states at the counted positions (`mask` [B, L-1]); with `features`, also the
        mapped layers' (validation needs only the last)."""
        if not features or (not self.hidden_layers and not self.attention_layers):
            return TeacherRows(last_hidden(self.model, inputs)[:, :-1][mask], self.head)  # [N, H_teacher]
        from kdlm.models.capture import FeatureCapture

        with FeatureCapture(self.model, hidden_layers=self.hidden_layers, attention_layers=self.attention_layers,
                            detach=True) as capture:
            hidden = last_hidden(self.model, inputs)[:, :-1][mask]
        features = {ref: h[:, :-1][mask] for ref, h in capture.hidden.items()}
        return TeacherRows(hidden, self.head, features, dict(capture.qkv))

    @torch.no_grad()
    def logits(self, inputs: dict[str, Tensor], mask: Tensor) -> Tensor:
        """Teacher logits at the counted positions: [N, V] fp32 (the unfused path)."""
        rows = self.rows(inputs, mask, features=False)
        return rows.head.logits(rows.hidden)


class TeacherEnsemble:
    """Several teachers (live `Teacher`s and offline `CachedTeacher`s may mix), pooled by `pooling`
    (kdlm.losses.multi_teacher). `primary` (the first) is what validation compares against."""

    def __init__(self, members: list[tuple[str, float, object]], pooling: str):
        self.members = members
        self.pooling = pooling

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.members]

    @property
    def primary(self):
        return self.members[0][2]


@dataclass
class EnsembleSignal:
    """Each teacher's signal for a batch (by name, in the ensemble's order), and for domain pooling the routed
    teacher index of each counted token."""

    signals: dict
    pooling: str
    route: Optional[Tensor] = None  # [N] long


def teacher_signal(teacher, batch: dict, *, features: bool = True):
    """The teacher's signal for `batch` at its counted positions: a live teacher's hidden states,
    or an offline cache's top-k log-probs looked up by sample id.

    Context distillation (the batch has `teacher_input_ids`): the teacher reads its own input, e.g.
    with demonstrations before the question, and its counted positions are those of `teacher_labels`.
    Each row counts the same answer tokens on both sides (checked when the data is encoded), so the
    teacher's rows line up one to one with the student's in row-major order."""
    if isinstance(teacher, TeacherEnsemble):
        route = batch.get("teacher_route")
        mask = counted_positions(batch["labels"])[0]
        return EnsembleSignal({name: teacher_signal(member, batch, features=features) for name, _, member in teacher.members},
                              teacher.pooling, route[:, 1:][mask] if route is not None else None)
    if isinstance(teacher, Teacher):
        if "teacher_input_ids" in batch:
            inputs = {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]}
            mask, targets = counted_positions(batch["teacher_labels"])
            rows = teacher.rows(inputs, mask, features=features)
            if "teacher_chunk" in batch:  # cross-tokenizer: the teacher's own tokens of the text, chunk-aligned
                rows.targets, rows.chunks = targets, batch["teacher_chunk"][:, 1:][mask]
            return rows
        return teacher.rows(model_inputs(batch), counted_positions(batch["labels"])[0], features=features)
    return teacher.signal(batch["sample_ids"], batch["labels"], device=batch["labels"].device)


def _first_rows(chunk: Tensor) -> Tensor:
    """Indices of each chunk's first row, for chunk ids that are non-decreasing along the rows: [C]."""
    if chunk.numel() == 0:
        return chunk
    starts = torch.ones_like(chunk, dtype=torch.bool)
    starts[1:] = chunk[1:] != chunk[:-1]
    return starts.nonzero().squeeze(1)


@torch.no_grad()
def reference_logprobs(signal, targets: Tensor, *, chunk: int = 1024) -> Tensor:
    """[N] fp32: a teacher's log-probability of each reference token (min_ce pooling). A live teacher's is exact
    (its logits a chunk of rows at a time); an offline top-k cache's is exact where the token is in the top-k,
    else the log of the tail mass (an upper bound)."""
    if isinstance(signal, SparseTeacher):
        hit = signal.ids == targets.unsqueeze(1)  # [N, k]
        found = (signal.logprobs.float() * hit).sum(1)
        return torch.where(hit.any(1), found, signal.tail_logprob.float())
    out = []
    for start in range(0, len(targets), chunk):
        logits = signal.head.logits(signal.hidden[start:start + chunk])
        out.append(torch.log_softmax(logits, -1).gather(1, targets[start:start + chunk, None]).squeeze(1))
    return torch.cat(out) if out else torch.zeros(0, device=targets.device)


def teacher_autocast(accelerator):
    """Autocast for the teacher's forward, without autocast's weight-cast cache: every teacher weight is
    used once per forward, so caching its low-precision copy only holds a second copy of the teacher
    (about half its fp32 size) in memory until the step ends."""
    from accelerate.utils import AutocastKwargs

    return accelerator.autocast(autocast_handler=AutocastKwargs(cache_enabled=False))


class DistillationModule(nn.Module):
    """The student and the objective in one forward.

    Returns the per-term sums over counted tokens (detached, for logging) and, under TOTAL_KEY,
    the weighted total that carries the gradient. With `fused`, the LM head and the losses run
    chunk by chunk (kdlm.losses.fused) and no [N, V] logits exist at once.
    """

    def __init__(self, student: nn.Module, terms: list[Term], vocab: int, *, fused: bool = True,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, pg_clip: Optional[float] = 0.2,
                 pg_length_normalise: bool = True, projections: Optional[FeatureProjections] = None):
        super().__init__()
        self.student = student
        # hint terms' learned projections: a submodule, so the optimizer, DDP and the checkpoint see them;
        # the export saves `student` alone, so they never reach the exported model
        self.projections = projections
        self.terms = terms  # replaced by the loop when a schedule moves a term's parameter (TAID's t)
        self.vocab = vocab
        self.fused = fused
        self.chunk_bytes = chunk_bytes
        self.pg_clip = pg_clip
        self.pg_length_normalise = pg_length_normalise
        # redi needs each token's example (for 1/|y|), pg each sampled sequence's (for its returns)
        self.per_example = any(term.name in ("redi", "pg") for term in terms)

    @property
    def head(self) -> LMHead:
        return lm_head_of(self.student, self.vocab)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        teacher: Optional[Union[TeacherRows, SparseTeacher]] = None,
        token_weights: Optional[Tensor] = None,
        negative: Optional[Tensor] = None,
        sampled: Optional[Tensor] = None,
        behavior_logprobs: Optional[Tensor] = None,
        student_logprobs: Optional[Tensor] = None,
        teacher_logprobs: Optional[Tensor] = None,
        student_chunk: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """token_weights [B, L] fp32 / negative [B, L] bool: per token, its example's loss weight / negative flag.
        sampled [B, L] bool: the token was sampled during training; *_logprobs [B, L] fp32: the sampler's
        log-probs of each sampled token (kdlm.training.sampling)."""
        mask, targets = counted_positions(labels)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        hidden_refs, _, attention_layers, _ = feature_layers(self.terms)
        if hidden_refs or attention_layers:
            from kdlm.models.capture import FeatureCapture

            with FeatureCapture(self.student, hidden_layers=sorted(hidden_refs, key=str),
                                attention_layers=sorted(attention_layers), detach=False) as capture:
                full = last_hidden(self.student, inputs)
            captured = ({ref: h[:, :-1][mask] for ref, h in capture.hidden.items()}, dict(capture.qkv))
        else:
            full, captured = last_hidden(self.student, inputs), None
        hidden = full[:, :-1][mask]  # [N, H] (autocast dtype)
        sampling = {"sampled": sampled, "behavior": behavior_logprobs, "student": student_logprobs,
                    "teacher": teacher_logprobs}
        coefficients = self.coefficients(mask, labels, position_ids, token_weights, negative, sampling)  # [K, N] or None
        logit_terms = [t for t in self.terms if not t.is_feature and not t.is_cross_tokenizer]
        logit_rows = [k for k, t in enumerate(self.terms) if not t.is_feature and not t.is_cross_tokenizer]
        logit_coefficients = coefficients[logit_rows] if coefficients is not None else None
        if isinstance(teacher, EnsembleSignal):
            example = example_index(labels, position_ids)[:, 1:][mask]
            sums = self._ensemble_sums(hidden, teacher, targets, logit_terms, logit_coefficients, example)
        else:
            sums = self._logit_sums(hidden, teacher, targets, logit_terms, logit_coefficients) if logit_terms else {}
        if any(t.is_cross_tokenizer for t in self.terms):
            cross = self._cross_tokenizer_sums(hidden, targets, student_chunk[:, 1:][mask], teacher, coefficients)
            total = sums.get(TOTAL_KEY, 0.0) + sum(t.weight * cross[t.label] for t in self.terms if t.is_cross_tokenizer)
            sums = {**sums, **{k: v.detach() for k, v in cross.items()}, TOTAL_KEY: total}
        if captured is None:
            return sums
        features = self._feature_sums(captured, teacher, mask, attention_mask, position_ids, coefficients)
        total = sums.get(TOTAL_KEY, 0.0) + sum(t.weight * features[t.label] for t in self.terms if t.is_feature)
        return {**sums, **{k: v.detach() for k, v in features.items()}, TOTAL_KEY: total}

    def _ensemble_sums(self, hidden: Tensor, teacher: "EnsembleSignal", targets: Tensor, terms: list[Term],
                       coefficients: Optional[Tensor], example: Tensor) -> dict[str, Tensor]:
        """Multi-teacher: each teacher's terms against its own signal (the student-only terms with the first),
        times the per-example one-hot selection of min_ce / domain pooling."""
        from kdlm.losses.multi_teacher import example_mean_ce, selection

        names = list(teacher.signals)
        chosen = None
        if teacher.pooling in ("min_ce", "domain"):
            _, dense = torch.unique(example, return_inverse=True)
            ce = None
            if teacher.pooling == "min_ce":
                ce = torch.stack([example_mean_ce(reference_logprobs(teacher.signals[n], targets), dense,
                                                  int(dense.max()) + 1 if len(dense) else 0) for n in names])
            chosen = selection(teacher.pooling, example=dense, num_teachers=len(names), example_ce=ce,
                               route=teacher.route)  # [K, N]
        out: dict[str, Tensor] = {}
        total = 0.0
        dtype = torch.promote_types(self.head.weight.dtype, torch.float32)
        for k, name in enumerate(names):
            group = [i for i, t in enumerate(terms) if t.teacher == name or (k == 0 and not t.needs_teacher)]
            if not group:
                continue
            rows = coefficients[group] if coefficients is not None else None
            if chosen is not None:
                rows = rows if rows is not None else torch.ones((len(group), len(targets)), dtype=dtype,
                                                                 device=targets.device)
                pick = torch.stack([chosen[k] if terms[i].needs_teacher else torch.ones_like(chosen[k])
                                    for i in group]).to(rows.dtype)
                rows = rows * pick
            part = self._logit_sums(hidden, teacher.signals[name], targets, [terms[i] for i in group], rows)
            total = total + part.pop(TOTAL_KEY)
            out.update(part)
        out[TOTAL_KEY] = total
        return out

    def _logit_sums(self, hidden: Tensor, teacher, targets: Tensor, terms: list[Term],
                    coefficients: Optional[Tensor]) -> dict[str, Tensor]:
        """The LM-head terms: fused and chunked, or on full logits."""
        sparse = isinstance(teacher, SparseTeacher)  # an offline cache: top-k log-probs instead of hidden states
        if self.fused:
            teacher_hidden = teacher if sparse else (teacher.hidden if teacher else None)
            teacher_head = None if sparse or teacher is None else teacher.head
            return fused_sums(hidden, self.head, teacher_hidden, teacher_head, targets, terms,
                              chunk_bytes=self.chunk_bytes, coefficients=coefficients)
        student_logits = self.head.logits(hidden)  # [N, V] fp32
        if sparse:
            sums = sparse_term_sums(student_logits, teacher, targets, terms, coefficients=coefficients)
        else:
            teacher_logits = teacher.head.logits(teacher.hidden) if teacher is not None else None
            sums = term_sums(student_logits, teacher_logits, targets, terms, coefficients=coefficients)
        return {**{k: v.detach() for k, v in sums.items()}, TOTAL_KEY: weighted_total(sums, terms)}

    def _cross_tokenizer_sums(self, hidden: Tensor, targets: Tensor, chunk: Tensor, teacher: "TeacherRows",
                              coefficients: Optional[Tensor]) -> dict[str, Tensor]:
        """alm / uld over the byte-aligned chunks (kdlm.losses.cross_tokenizer). `chunk` [N]: each counted student
        row's chunk id (-1: its chunk is not counted); the teacher's rows carry theirs. A chunk's weight is the
        coefficient of its first student row."""
        from kdlm.losses.cross_tokenizer import alm_sum, chunk_logprobs, token_logprobs, uld_sum_from_hidden

        if not isinstance(teacher, TeacherRows) or teacher.chunks is None:
            raise ValueError("cross-tokenizer terms need a live teacher on chunk-aligned input (kdlm.data.alignment)")
        keep = chunk >= 0
        s_hidden, s_targets, s_chunk = hidden[keep], targets[keep], chunk[keep]
        num = int(teacher.chunks.max()) + 1 if teacher.chunks.numel() else 0
        s_first, t_first = _first_rows(s_chunk), _first_rows(teacher.chunks)  # [C] each, in chunk order
        sums: dict[str, Tensor] = {}
        teacher_chunks = None
        for k, term in enumerate(self.terms):
            if not term.is_cross_tokenizer:
                continue
            weights = coefficients[k][keep][s_first] if coefficients is not None else None  # [C]
            if num == 0:
                sums[term.label] = hidden.sum() * 0.0
            elif term.name == "alm":
                if teacher_chunks is None:
                    with torch.no_grad():
                        teacher_lp = token_logprobs(teacher.hidden, teacher.head, teacher.targets)
                    teacher_chunks = chunk_logprobs(teacher_lp, teacher.chunks, num)
                student_chunks = chunk_logprobs(token_logprobs(s_hidden, self.head, s_targets), s_chunk, num)
                sums[term.label] = alm_sum(student_chunks, teacher_chunks, tau=term.tau, divergence=term.divergence,
                                           weights=weights)
            else:  # uld: both models' next-token distributions where each chunk starts
                sums[term.label] = uld_sum_from_hidden(s_hidden[s_first], self.head, teacher.hidden[t_first],
                                                       teacher.head, temperature=term.temperature, weights=weights)
        return sums

    def _feature_sums(self, captured, teacher: TeacherRows, mask: Tensor, attention_mask: Optional[Tensor],
                      position_ids: Optional[Tensor], coefficients: Optional[Tensor]) -> dict[str, Tensor]:
        """The feature terms' sums over counted tokens (hint: per token; attention: per counted query row)."""
        from kdlm.losses.attention import attention_score_mse_sum, relation_kl_sum

        if not isinstance(teacher, TeacherRows) or (not teacher.features and not teacher.qkv):
            raise ValueError("feature terms need a live teacher whose mapped layers were captured "
                             "(Teacher(hidden_layers=..., attention_layers=...))")
        student_hidden, student_qkv = captured
        query_rows = nn.functional.pad(mask, (0, 1))  # [B, L]: the counted output positions, as query rows
        sums = {}
        for k, term in enumerate(self.terms):
            if not term.is_feature:
                continue
            coefficient = coefficients[k] if coefficients is not None else None
            if term.name == "hint":
                sums[term.label] = hint_sum(term, student_hidden, teacher.features, self.projections, coefficient)
                continue
            if coefficient is not None:  # per query row, over the same counted positions as the hint / logit terms
                row_weights = torch.zeros(mask.shape, dtype=coefficient.dtype, device=mask.device)
                row_weights[mask] = coefficient
                row_weights = nn.functional.pad(row_weights, (0, 1))
            else:
                row_weights = None
            total = 0.0
            for s_layer, t_layer in term.layers:
                sq, sk, sv = student_qkv[s_layer]
                tq, tk, tv = teacher.qkv[t_layer]
                masks = dict(query_rows=query_rows, attention_mask=attention_mask, position_ids=position_ids,
                             chunk_rows=term.chunk_rows, row_weights=row_weights)
                if term.name == "attention_relation":
                    total = total + relation_kl_sum({"q": sq, "k": sk, "v": sv}, {"q": tq, "k": tk, "v": tv},
                                                    relations=term.relations, relation_heads=term.relation_heads,
                                                    **masks)
                else:
                    total = total + attention_score_mse_sum((sq, sk), (tq, tk), **masks)
            sums[term.label] = total / len(term.layers)
        return sums

    def coefficients(self, mask: Tensor, labels: Tensor, position_ids: Optional[Tensor],
                     token_weights: Optional[Tensor], negative: Optional[Tensor],
                     sampling: Optional[dict] = None) -> Optional[Tensor]:
        """The objective's per-term coefficients [K, N] at the counted tokens; None on the plain path.

        On top of objective.token_coefficients (example weights, negatives, redi's 1/|y|), for sampled rows:
        - a term's `rows` scope: samples keeps only sampled tokens, data only the dataset's own;
        - importance weights w = q(y_t) / p~(y_t) on the sampled tokens of the divergence and pg terms, when the
          sampler recorded the proposal (teacher-mixed sampling): the expectation is then under the student;
        - pg (MiniLLM's long-term part): c_t = A_t * w_t, A_t the (length-normalised) return of the rewards
          log p(y_t) - log q(y_t) after t, zeroed where PPO-style clipping stops the gradient."""
        sampling = sampling or {}
        sampled = sampling.get("sampled")
        scoped = any(term.rows != "all" or term.name == "pg" for term in self.terms)
        if token_weights is None and negative is None and not self.per_example and not scoped:
            return None

        def at_counted(per_token: Optional[Tensor]) -> Optional[Tensor]:  # [B, L] -> [N]: output i predicts token i+1
            return per_token[:, 1:][mask] if per_token is not None else None

        example = at_counted(example_index(labels, position_ids)) if self.per_example else None
        dtype = torch.promote_types(self.head.weight.dtype, torch.float32)  # the losses' compute dtype
        base = token_coefficients(self.terms, weights=at_counted(token_weights), negative=at_counted(negative),
                                  example=example, dtype=dtype)
        n = int(mask.sum())
        base = base if base is not None else torch.ones((len(self.terms), n), dtype=dtype, device=mask.device)
        is_sampled = at_counted(sampled) if sampled is not None else torch.zeros(n, dtype=torch.bool, device=mask.device)
        weights = None
        if sampling.get("behavior") is not None and sampling.get("student") is not None:
            w = importance_weights(at_counted(sampling["student"]), at_counted(sampling["behavior"])).to(dtype)
            weights = torch.where(is_sampled, w, torch.ones_like(w))  # [N]: 1 on the data's own tokens
        rows = []
        for k, term in enumerate(self.terms):
            row = base[k]
            if term.rows == "samples" or term.name == "pg":
                row = row * is_sampled
            elif term.rows == "data":
                row = row * ~is_sampled
            if term.name == "pg":
                row = row * self._pg_coefficients(at_counted, example, is_sampled, weights, sampling, dtype)
            elif weights is not None and term.needs_teacher:
                row = row * weights
            rows.append(row)
        return torch.stack(rows)  # [K, N]

    def _pg_coefficients(self, at_counted, example: Tensor, is_sampled: Tensor, weights: Optional[Tensor],
                         sampling: dict, dtype: torch.dtype) -> Tensor:
        """[N]: pg's c_t = A_t * w_t after clipping (0 on unsampled tokens, and on steps without samples)."""
        if sampling.get("teacher") is None or sampling.get("student") is None:
            return torch.zeros_like(is_sampled, dtype=dtype)  # an off-policy step: no policy gradient
        reward = rewards(at_counted(sampling["teacher"]), at_counted(sampling["student"])).to(dtype) * is_sampled
        w = weights if weights is not None else torch.ones_like(reward)
        coefficient = pg_coefficients(rewards=reward, example=example, weights=w,
                                      length_normalise=self.pg_length_normalise, clip=self.pg_clip)
        return coefficient * is_sampled
