"""Batched chat generation: teacher answers for black-box data, and sample answers for reports."""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where bf16 matmuls are several times faster than fp32."""
    cpu = getattr(torch, "cpu", None)
    return bool(cpu and (getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                         or getattr(cpu, "_is_amx_tile_supported", lambda: False)()))


@torch.no_grad()
def generate_chat(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: Optional[int] = None,
    system: Optional[str] = None,
    desc: str = "generate",
    show_progress: bool = True,
) -> list[str]:
    """Answer each prompt as a user turn through the chat template; returns the decoded answers in order.

    Prompts are batched by length (less padding) with left padding, as decoder-only generation needs.
    """
    if seed is not None:
        torch.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    try:
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not show_progress)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            chats = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompts[i]}]
                     for i in idx]
            enc = tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", padding=True,
                                                return_dict=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature if do_sample else None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]  # [B, new tokens]
            for i, row in zip(idx, new):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            bar.update(len(idx))
        bar.close()
    finally:
        tokenizer.padding_side = side
    return answers
