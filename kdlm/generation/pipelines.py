"""The generation pipelines, by name: what the teacher is asked for each prompt and which rows come out.

    responses     the teacher answers prompts or chats: sequence-level KD data (Kim & Rush 2016), instruction data
    self_instruct seed tasks -> new instructions (Wang et al. 2023: 8 in-context tasks, 6 seed + 2 generated,
                  ROUGE-L <= 0.7 against every kept one, length and keyword filters) -> answers
    cot           k sampled rationales per question, checked by an answer verifier; rejection sampling with a
                  resampling budget; rejected rationales kept as negatives; self-consistency vote without gold
    step_by_step  distilling step-by-step (Hsieh et al. 2023) for decoder-only students: each verified
                  rationale gives a label row and a rationale row, tagged, weighted alpha and 1 - alpha
    context       in-context learning / context distillation: the teacher sees k demonstrations and the input;
                  the student row holds the input alone (Snell et al. 2022) or keeps them (Huang et al. 2022)

A pipeline is a class with `items` (read and check the prompts), `prepare` (work done before the
per-prompt fan-out, e.g. self_instruct's instruction rounds), `run` (one prompt's coroutine -> rows)
and `estimate` (the dry run). Configs name pipelines; they never import code.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from kdlm.errors import ConfigError, DataError
from kdlm.generation.registry import look_up, register_into


@dataclass
class Item:
    """One prompt: its place in the input (for provenance and ordering), the chat to send and a gold answer."""

    index: int
    ref: str  # file:line of the prompt
    text: str  # the prompt text (the question, the instruction)
    messages: list[dict]  # what the teacher is sent (system, the user turn(s))
    gold: Optional[str] = None
    row: dict = field(default_factory=dict)


PIPELINES: dict[str, type] = {}


def register_pipeline(name: str):
    """Decorator: register a Pipeline class as `name` (sets its `name`); a name already taken is a ValueError."""
    def wrap(cls):
        cls.name = name
        return register_into(PIPELINES, "pipeline", name)(cls)
    return wrap


def get_pipeline(name: str):
    """A new pipeline object of the class registered as `name` (ConfigError naming the nearest when unknown)."""
    return look_up(PIPELINES, "pipeline", "generate.pipeline", name)()


# ----------------------------------------------------------------------------- prompts and rows

PROMPT_KEYS = ("question", "instruction", "prompt", "text", "input")


def read_items(recipe, source: Optional[str] = None, *, instruction: Optional[str] = None) -> list[Item]:
    """The prompts of `generate.prompts` (or `source`) as Items. Each row is a chat (`messages`; a trailing
    assistant turn is dropped and kept as the reference) or a prompt column; bad rows are errors naming file:line."""
    from kdlm.data import read_rows

    g = recipe.generate
    src = source or g.prompts
    if not src:
        raise ConfigError("generate.prompts: no prompt file given")
    raw = read_rows(src, "train", limit=g.max_prompts)
    items = []
    for i, (row, where) in enumerate(zip(raw.rows, raw.locations)):
        items.append(item_from_row(row, where, i, recipe, instruction=instruction))
    if not items:
        raise DataError(f"{src}: no prompts")
    return items


def item_from_row(row: dict, where: str, index: int, recipe, *, instruction: Optional[str] = None) -> Item:
    g = recipe.generate
    gold = row.get(g.answer_field)
    gold = str(gold) if gold is not None and not isinstance(gold, (dict, list)) else None
    messages = row.get(g.messages_field)
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
                for m in messages):
            raise DataError(f"{where}: field '{g.messages_field}' must be a non-empty list of {{role, content}}")
        if messages[-1]["role"] == "assistant":
            gold = gold if gold is not None else messages[-1]["content"]
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: the chat must end with a user turn (or a user turn and its reference answer)")
        text = messages[-1]["content"]
        chat = [dict(m) for m in messages]
    else:
        keys = (g.prompt_field,) + tuple(k for k in PROMPT_KEYS if k != g.prompt_field)
        key = next((k for k in keys if isinstance(row.get(k), str) and row[k].strip()), None)
        if key is None:
            raise DataError(f"{where}: no prompt: expected '{g.messages_field}' or a string field "
                            f"'{g.prompt_field}' (or {', '.join(PROMPT_KEYS)})")
        text = row[key]
        extra = row.get("input") if key == "instruction" else None  # Self-Instruct rows: instruction + input
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n\n{extra}"
        chat = [{"role": "user", "content": text}]
    user = g.prompt_template.replace("{prompt}", chat[-1]["content"])
    if instruction:
        user = f"{user}\n{instruction}"
    chat[-1] = {"role": "user", "content": user}
    if g.system and chat[0]["role"] != "system":
        chat = [{"role": "system", "content": g.system}] + chat
    return Item(index=index, ref=where, text=text, messages=chat, gold=gold, row=row)


def make_row(gen, item: Item, messages: list[dict], sample, *, part: str = "", extra: Optional[dict] = None,
             verdict: Optional[str] = None, answer: Optional[str] = None, target: Optional[str] = None) -> dict:
    """A dataset row: the student's chat with the teacher's answer (or `target`), plus its provenance."""
    t = gen.recipe.teacher
    c = sample.completion
    row: dict[str, Any] = {
        "id": sample.key + (f":{part}" if part else ""),
        "messages": list(messages) + [{"role": "assistant", "content": target if target is not None else sample.text}],
    }
    if extra:
        row.update(extra)
    prov = {
        "pipeline": gen.recipe.generate.pipeline,
        "request_key": sample.key,
        "teacher": {"backend": t.backend, "model": t.model, "fingerprint": gen.backend.fingerprint},
        "sampling": {**_sampling_of(gen), "seed": gen.recipe.generate.seed + sample.index},
        "sample_index": sample.index,
        "finish_reason": c.get("finish_reason"),
        "usage": {"prompt_tokens": c.get("prompt_tokens"), "completion_tokens": c.get("completion_tokens")},
        "latency_s": c.get("latency_s"),
        "attempts": c.get("attempts"),
        "cached": sample.cached,
        "verdict": verdict,
        "source": item.ref,
        "order": [item.index, sample.index, part],
    }
    if answer is not None:
        prov["answer"] = answer
    row["provenance"] = prov
    if c.get("logprobs") is not None:
        row["teacher_logprobs"] = c["logprobs"]
    return row


def _sampling_of(gen) -> dict:
    return gen.sampling().as_dict()


def _prompt_chars(items: list[Item]) -> int:
    return sum(sum(len(m["content"]) for m in it.messages) for it in items)


def _requests(gen_or_recipe_n: int, items: int, native_n: bool = True) -> int:
    return items if native_n else items * gen_or_recipe_n


# ----------------------------------------------------------------------------- pipelines


class Pipeline:
    name = "base"
    instruction: Optional[str] = None

    def items(self, recipe) -> list[Item]:
        return read_items(recipe, instruction=self.instruction)

    async def prepare(self, gen, items: list[Item]) -> list[Item]:
        return items

    async def run(self, gen, item: Item) -> list[dict]:
        raise NotImplementedError

    async def after(self, gen, items: list[Item]) -> None:
        return None

    def estimate(self, recipe, items: list[Item]) -> dict:
        n = recipe.generate.n
        return {"requests": len(items), "samples": len(items) * n, "prompt_tokens": _prompt_chars(items) // 4,
                "max_completion_tokens": len(items) * n * recipe.generate.max_new_tokens}

    def columns(self) -> dict[str, str]:
        """The row columns besides id/messages/provenance, for the dataset card."""
        return {}


@register_pipeline("responses")
class Responses(Pipeline):
    """The teacher answers each prompt n times; one row per answer."""

    async def run(self, gen, item: Item) -> list[dict]:
        samples = await gen.samples(item.messages, n=gen.recipe.generate.n, ref=item.ref)
        return [make_row(gen, item, item.messages, s) for s in samples]


@register_pipeline("cot")
class ChainOfThought(Pipeline):
    """k rationales per question, verified; resampled (k more) while none passes, up to max_rounds rounds."""

    @property
    def instruction(self):  # set per recipe in items()
        return self._instruction

    def items(self, recipe) -> list[Item]:
        from kdlm.generation.verifiers import get_verifier

        self.verifier = get_verifier(recipe.generate.verifier, **recipe.generate.verifier_options)
        self._instruction = recipe.generate.cot_instruction or None
        return read_items(recipe, instruction=self._instruction)

    async def run(self, gen, item: Item) -> list[dict]:
        return await cot_rows(gen, item, self.verifier)

    def estimate(self, recipe, items: list[Item]) -> dict:
        return cot_estimate(recipe, items)

    def columns(self) -> dict[str, str]:
        return {"answer": "the gold answer, or the self-consistency pseudo-label",
                "verdict": "verified | rejected | no_answer",
                "negative": "true for a rejected rationale (train with data.negative_field: negative and the redi term)"}


def cot_estimate(recipe, items: list[Item]) -> dict:
    out = Pipeline.estimate(Pipeline(), recipe, items)
    if recipe.generate.max_rounds > 1:
        out["note"] = (f"plus up to {recipe.generate.max_rounds - 1} more rounds of {recipe.generate.n} samples "
                       "for each question with no verified rationale")
    return out


async def cot_rows(gen, item: Item, verifier) -> list[dict]:
    """Rejection sampling with a verifier; majority vote (self-consistency, Wang et al. 2023) when there is no gold."""
    from kdlm.generation.verifiers import majority_vote

    g = gen.recipe.generate
    gold = verifier.gold(item.gold) if item.gold is not None else None
    samples = []
    for r in range(g.max_rounds):
        if r:
            gen.grow(g.n)
        new = await gen.samples(item.messages, n=g.n, first_index=r * g.n, ref=item.ref)
        samples += new
        if gold is None or any(verifier.match(verifier.extract(s.text), gold) for s in new):
            break  # verified (or nothing to verify against: the vote needs no more rounds)
    answers = [verifier.extract(s.text) for s in samples]
    label, share = (gold, None) if gold is not None else majority_vote(answers)
    stats = gen.stats
    stats["questions"] = stats.get("questions", 0) + 1
    rows = []
    verified_here = 0
    for s, a in zip(samples, answers):
        ok = a is not None and label is not None and verifier.match(a, label)
        verified_here += ok
        verdict = "verified" if ok else ("no_answer" if a is None else "rejected")
        if not ok and not g.keep_negatives:
            continue
        extra = {"answer": label, "verdict": verdict, "negative": not ok}
        if gold is None:
            extra["pseudo_label"] = True
            extra["vote_share"] = round(share, 4)
        rows.append(make_row(gen, item, _student_messages(item), s, extra=extra, verdict=verdict, answer=a))
    stats["cot_samples"] = stats.get("cot_samples", 0) + len(samples)
    stats["verified_samples"] = stats.get("verified_samples", 0) + verified_here
    stats["questions_verified"] = stats.get("questions_verified", 0) + (verified_here > 0)
    stats["verified_fraction"] = stats["verified_samples"] / max(1, stats["cot_samples"])
    stats["questions_verified_fraction"] = stats["questions_verified"] / max(1, stats["questions"])
    return rows


def _student_messages(item: Item) -> list[dict]:
    return item.messages


@register_pipeline("step_by_step")
class StepByStep(Pipeline):
    """Distilling step-by-step (Hsieh et al. 2023) for decoder-only students.

    The original trains a T5 on two tasks with task prefixes: "[label]" -> the answer and "[rationale]" -> the
    rationale, with L = alpha * L_label + (1 - alpha) * L_rationale. Here each verified rationale gives two chat
    rows, the question prefixed by the task tag in the user turn and the target as the assistant turn, and a
    `weight` column (alpha, 1 - alpha) that `data.weight_field: weight` turns into per-token loss weights. At
    inference the label tag asks for the bare answer (cheap), the rationale tag for the explanation.

    Input: the rows of a `cot` generation (a kdlm generate folder as generate.prompts), or plain questions, for
    which the cot pipeline runs first with the same settings.
    """

    def items(self, recipe) -> list[Item]:
        from kdlm.data import read_rows
        from kdlm.generation.verifiers import get_verifier

        self.verifier = get_verifier(recipe.generate.verifier, **recipe.generate.verifier_options)
        if not recipe.generate.prompts:
            raise ConfigError("generate.prompts: no prompt file given")
        raw = read_rows(recipe.generate.prompts, "train", limit=None)
        self.from_cot = bool(raw.rows) and (raw.rows[0].get("provenance") or {}).get("pipeline") == "cot"
        if self.from_cot:
            return [Item(index=i, ref=where, text="", messages=[], row=row)
                    for i, (row, where) in enumerate(zip(raw.rows, raw.locations))]
        return read_items(recipe, instruction=recipe.generate.cot_instruction or None)

    async def run(self, gen, item: Item) -> list[dict]:
        if self.from_cot:
            return self.rows_of(gen, item.row, item.ref)
        out = []
        for row in await cot_rows(gen, item, self.verifier):
            out += self.rows_of(gen, row, item.ref, question=item.text)
        return out

    def rows_of(self, gen, row: dict, ref: str, *, question: Optional[str] = None) -> list[dict]:
        g = gen.recipe.generate
        if row.get("negative") or row.get("verdict") not in (None, "verified"):
            return []
        if question is None:
            user = next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")
            instr = g.cot_instruction
            question = user[: -len(instr)].rstrip() if instr and user.endswith(instr) else user
        text = row["messages"][-1]["content"]
        rationale, label = split_rationale(text, g.split_patterns)
        if not label:
            label = (row.get("provenance") or {}).get("answer") or row.get("answer") or ""
        if not rationale or not label:
            return []
        base = {k: v for k, v in row.items() if k not in ("messages", "id", "weight", "task")}
        prov = dict(row.get("provenance") or {}, pipeline="step_by_step", cot_source=ref)
        out = []
        for task, tag, target, weight in (("label", g.label_tag, label, g.alpha),
                                          ("rationale", g.rationale_tag, rationale, 1.0 - g.alpha)):
            order = list(prov.get("order") or [0, 0, ""])
            out.append({**base, "id": f"{row['id']}:{task}",
                        "messages": [{"role": "user", "content": f"{tag} {question}"},
                                     {"role": "assistant", "content": target}],
                        "task": task, "weight": weight,
                        "provenance": dict(prov, order=[order[0], order[1], task])})
        return out

    def estimate(self, recipe, items: list[Item]) -> dict:
        if getattr(self, "from_cot", False):
            return {"requests": 0, "samples": 0, "prompt_tokens": 0, "max_completion_tokens": 0,
                    "note": "rows are built from the cot rows; no teacher request"}
        return cot_estimate(recipe, items)

    def columns(self) -> dict[str, str]:
        return {"task": "label | rationale", "weight": "loss weight: alpha for label rows, 1 - alpha for rationale rows "
                "(train with data.weight_field: weight)"}


def split_rationale(text: str, patterns: list[str]) -> tuple[str, str]:
    """(rationale, answer) at the LAST occurrence of the first pattern that occurs ("So the answer is 72." ->
    rationale before it, answer "72"). No pattern: (text, "")."""
    for pattern in patterns:
        at = text.rfind(pattern)
        if at >= 0:
            answer = text[at + len(pattern):].strip().strip(":").strip()
            answer = answer.rstrip(".").strip()
            return text[:at].strip(), answer
    return text.strip(), ""


@register_pipeline("context")
class Context(Pipeline):
    """The teacher answers with k demonstrations before the input (as earlier chat turns); the row keeps the
    student's view (input alone, or with the demonstrations) and `teacher_messages`, the teacher's view, for
    context distillation with a live white-box teacher (`data.teacher_messages_field: teacher_messages`)."""

    def items(self, recipe) -> list[Item]:
        g = recipe.generate
        items = read_items(recipe)
        def answer(d: Item) -> Optional[str]:
            value = d.row.get(g.demonstration_field)
            return str(value) if isinstance(value, (str, int, float)) else d.gold

        source = read_items(recipe, g.demonstrations) if g.demonstrations else items
        self.pool = [(d.text, answer(d), d.ref) for d in source if answer(d)]
        self.same_source = not g.demonstrations
        if g.k_shot and len(self.pool) < g.k_shot + self.same_source:
            raise DataError(f"{g.demonstrations or g.prompts}: {len(self.pool)} rows with an answer "
                            f"('{g.demonstration_field}'), fewer than generate.k_shot = {g.k_shot} demonstrations")
        return items

    def demonstrations(self, recipe, item: Item) -> list[tuple[str, str, str]]:
        rng = random.Random(recipe.generate.seed * 1_000_003 + item.index)
        pool = [d for d in self.pool if not (self.same_source and d[2] == item.ref)]
        return rng.sample(pool, recipe.generate.k_shot) if recipe.generate.k_shot else []

    async def run(self, gen, item: Item) -> list[dict]:
        g = gen.recipe.generate
        demos = self.demonstrations(gen.recipe, item)
        system = [m for m in item.messages if m["role"] == "system"]
        shots: list[dict] = []
        for question, answer, _ in demos:
            shots += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if g.context_instruction:
            if system:
                system = [{"role": "system", "content": system[0]["content"] + "\n\n" + g.context_instruction}]
            else:
                system = [{"role": "system", "content": g.context_instruction}]
        user = [m for m in item.messages if m["role"] != "system"]
        teacher_messages = system + shots + user
        student_messages = teacher_messages if g.student_sees_demonstrations else [m for m in item.messages]
        samples = await gen.samples(teacher_messages, n=g.n, ref=item.ref)
        return [make_row(gen, item, student_messages, s,
                         extra={"teacher_messages": teacher_messages + [{"role": "assistant", "content": s.text}],
                                "demonstrations": [d[2] for d in demos]}) for s in samples]

    def columns(self) -> dict[str, str]:
        return {"teacher_messages": "the teacher's chat: demonstrations, the input and the same answer "
                "(data.teacher_messages_field: teacher_messages for context distillation with a live teacher)",
                "demonstrations": "where each demonstration came from (file:line)"}


@register_pipeline("self_instruct")
class SelfInstruct(Pipeline):
    """Self-Instruct (Wang et al. 2023): grow a pool of instructions from seed tasks, then answer every new one.

    Each request shows 8 numbered tasks (6 seed, 2 already generated, when there are) and asks for more; a new
    instruction is kept when it has min_words..max_words words, names no banned keyword, does not start with
    punctuation, and its ROUGE-L against every instruction in the pool is <= rouge_threshold. Rounds of
    `concurrency` requests run until num_instructions are kept. Everything is seeded and the answers are
    cached, so a restarted run rebuilds the same pool without sending a request twice.
    """

    def items(self, recipe) -> list[Item]:
        self.seeds = read_items(recipe)
        return self.seeds

    async def prepare(self, gen, items: list[Item]) -> list[Item]:
        import asyncio

        from kdlm.generation.filters import RougeLIndex

        g = gen.recipe.generate
        pool = [it.text for it in items]  # seed instructions count for the ROUGE-L check too
        index = RougeLIndex()  # one index of the pool: each check costs the candidates that could still match
        for text in pool:
            index.add(text)
        kept: list[str] = []
        rejected: dict[str, int] = {}
        rounds = 0
        banned = re.compile(r"\b(" + "|".join(re.escape(w) for w in g.banned_keywords) + r")\b", re.I) if g.banned_keywords else None
        sampling = gen.sampling(temperature=g.temperature if g.temperature > 0 else 0.7)
        while len(kept) < g.num_instructions and rounds < g.max_rounds_self_instruct:
            batch = []
            for j in range(g.concurrency):
                rng = random.Random(hash((g.seed, rounds, j)) & 0xFFFFFFFF)
                shown = rng.sample(pool, min(g.seed_tasks_per_prompt, len(pool)))
                if kept:
                    shown += rng.sample(kept, min(g.generated_per_prompt, len(kept)))
                batch.append(self.prompt(shown, g))
            rounds += 1
            gen.grow(len(batch))
            results = await asyncio.gather(*(gen.samples(m, n=1, sampling=sampling, ref=f"self_instruct round {rounds}")
                                             for m, _ in batch))
            candidates = [(s, inst) for (messages, start), samples in zip(batch, results) for s in samples
                          for inst in parse_instructions(s.text, start)]
            for s, inst in candidates:
                if len(kept) >= g.num_instructions:
                    break  # enough: the rest of this round's candidates are not looked at
                reason = self.reject_reason(inst, index, g, banned)
                if reason:
                    rejected[reason] = rejected.get(reason, 0) + 1
                    continue
                index.add(inst)
                kept.append(inst)
                self.origin[inst] = (s.key, rounds)
        gen.stats.update({"self_instruct_rounds": rounds, "instructions_kept": len(kept),
                          "instructions_rejected": rejected})
        return [Item(index=i, ref=f"self_instruct:{self.origin[t][0]}", text=t,
                     messages=([{"role": "system", "content": g.system}] if g.system else [])
                     + [{"role": "user", "content": g.prompt_template.replace("{prompt}", t)}],
                     row={"instruction_round": self.origin[t][1]})
                for i, t in enumerate(kept)]

    def __init__(self):
        self.origin: dict[str, tuple[str, int]] = {}

    @staticmethod
    def prompt(shown: list[str], g) -> tuple[list[dict], int]:
        lines = "\n".join(f"{i + 1}. {' '.join(t.split())}" for i, t in enumerate(shown))
        start = len(shown) + 1
        text = (f"Come up with a series of diverse tasks. Here are {len(shown)} examples:\n{lines}\n\n"
                f"Write 8 new tasks, different from these and from each other, one per line, numbered from {start}.")
        return [{"role": "user", "content": text}], start

    @staticmethod
    def reject_reason(inst: str, index, g, banned) -> Optional[str]:
        words = inst.split()
        if not (g.min_words <= len(words) <= g.max_words):
            return "length"
        if banned is not None and banned.search(inst):
            return "keyword"
        if not inst[0].isalnum() or not inst.isascii():
            return "format"
        if index.max_score(inst)[0] > g.rouge_threshold:
            return "rouge"
        return None

    async def run(self, gen, item: Item) -> list[dict]:
        samples = await gen.samples(item.messages, n=gen.recipe.generate.n, ref=item.ref)
        return [make_row(gen, item, item.messages, s, extra={"instruction_round": item.row.get("instruction_round")})
                for s in samples]

    def estimate(self, recipe, items: list[Item]) -> dict:
        g = recipe.generate
        rounds = math.ceil(g.num_instructions / max(1, g.concurrency * 2))  # guess: 2 kept per request
        gen_requests = min(rounds, g.max_rounds_self_instruct) * g.concurrency
        answers = g.num_instructions
        return {"requests": gen_requests + answers, "samples": gen_requests + answers * g.n,
                "prompt_tokens": gen_requests * 150 + answers * 40,
                "max_completion_tokens": (gen_requests + answers * g.n) * g.max_new_tokens,
                "note": "instruction rounds estimated at 2 kept instructions per request"}

    def columns(self) -> dict[str, str]:
        return {"instruction_round": "the generation round that produced the instruction"}


_NUMBERED = re.compile(r"^\s*(?:task\s*)?(\d{1,3})\s*[.:)\-]\s*(.+?)\s*$", re.I)


def parse_instructions(text: str, start: int) -> list[str]:
    """Numbered lines ("9. Write ...", "Task 10: ...") numbered >= start, in order, markdown bold removed."""
    out = []
    for line in text.splitlines():
        m = _NUMBERED.match(line.replace("**", ""))
        if m and int(m.group(1)) >= start:
            inst = m.group(2).strip().strip('"').strip()
            if inst:
                out.append(inst)
    return out
